"""`python -m gateway render --out DIR`: build the descriptor set and render Envoy's config.

The launcher does this itself; this entrypoint is for deployments that run Envoy on its own
(docker compose, Kubernetes init containers). Settings come from MLMESH_* variables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.render import build_descriptor_set, render_envoy_config
from services.common.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="write mlmesh.binpb and envoy.yaml into --out")
    render.add_argument("--out", type=Path, required=True, help="directory Envoy will read")
    args = parser.parse_args()
    descriptor = build_descriptor_set(args.out / "mlmesh.binpb")
    config = render_envoy_config(Settings(), descriptor, args.out / "envoy.yaml")
    print(f"wrote {descriptor} and {config}")


if __name__ == "__main__":
    main()
