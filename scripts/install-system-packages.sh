#!/usr/bin/env bash
# Debian packages mlmesh uses beside its Python ones: Fashion-MNIST's IDX files (offline
# data), docker-compose (to validate docker-compose.yml), the load generators of
# `make bench` (wrk for HTTP, h2load from nghttp2-client for gRPC), prometheus (its
# promtool checks deploy/prometheus and runs the alert unit tests), and chromium (headless,
# the test that the MLflow UI loads through the gateway). Installed only when missing and
# when running as root; otherwise say what is missing and go on.
set -euo pipefail
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "note: not installed (needs root): ${missing[*]}; Fashion-MNIST training, the" \
       "compose check, make bench, the promtool checks and the MLflow UI test need them" >&2
fi
