"""deploy/k8s: every manifest validates offline (strict schemas), and keeps its promises."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from gateway.keys import ApiKeyError, parse_api_keys
from services.common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest and the newest Kubernetes this kubernetes-validate release ships schemas for that
# we promise to support (native gRPC probes need 1.27+).
KUBERNETES_VERSIONS = ["1.33.0", "1.37.0"]
GRPC_SERVICES = {"registry": 50051, "training": 50052, "inference": 50053}
HEALTH_PORTS = {"registry": 50061, "training": 50062, "inference": 50063}
HTTP_PROBES = {"worker": ("/health", 9103), "mlflow": ("/health", 5000), "envoy": ("/health", 8000)}
METRICS = {
    "registry": ("9101", "/metrics"),
    "training": ("9102", "/metrics"),
    "worker": ("9103", "/metrics"),
    "inference": ("9104", "/metrics"),
    "envoy": ("9902", "/stats/prometheus"),
}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> list[dict[str, Any]]:
    return [d for p in manifest_files() for d in yaml.safe_load_all(p.read_text()) if d]


def applied() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/k8s` applies (the Secret templates are left out)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [
        d
        for name in kustomization["resources"]
        for d in yaml.safe_load_all((K8S / name).read_text())
        if d
    ]


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in applied() if d["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's port, a number or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"{container['name']}: no port named {port!r}"
    return named[port]


def test_there_is_something_to_check() -> None:
    kinds = {d["kind"] for d in applied()}
    assert {"Namespace", "ConfigMap", "Deployment", "StatefulSet", "Service"} <= kinds
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path, version: str) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_unknown_fields() -> None:
    deployment = copy.deepcopy(of_kind("Deployment")["registry"])
    pod_spec(deployment)["containers"][0]["readinessProbe"]["grpcc"] = {"port": 50051}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_templates() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    files = {p.name for p in manifest_files()}
    assert listed == {f for f in files if not f.endswith(".example.yaml")}
    assert all(
        d["metadata"]["namespace"] == "mlmesh" for d in applied() if d["kind"] != "Namespace"
    )


def test_every_container_has_requests_and_limits() -> None:
    workloads = {**of_kind("Deployment"), **of_kind("StatefulSet")}
    assert set(GRPC_SERVICES) | set(HTTP_PROBES) <= set(workloads)
    for name, workload in workloads.items():
        for c in containers(workload):
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), (name, c["name"], part)


@pytest.mark.parametrize(("name", "port"), GRPC_SERVICES.items())
def test_grpc_services_have_native_grpc_probes_on_the_health_port(name: str, port: int) -> None:
    # The kubelet presents no client certificate: its gRPC probes ask the plain-text health
    # port, which answers grpc.health.v1 only; the gRPC port takes mutual TLS only.
    container = pod_spec(of_kind("Deployment")[name])["containers"][0]
    assert port_number(container, "grpc") == port
    health = HEALTH_PORTS[name]
    assert port_number(container, "health") == health
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health, (name, probe)
    config = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    assert config[f"MLMESH_{name.upper()}_ADDRESS"] == f"0.0.0.0:{port}"
    assert config[f"MLMESH_{name.upper()}_HEALTH_PORT"] == str(health)


def _mounted_secret(workload: dict[str, Any], container: dict[str, Any], path: str) -> dict:
    """The secret volume ``container`` mounts at ``path``."""
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert path in mounts, (container["name"], path)
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    return volumes[mounts[path]]["secret"]


@pytest.mark.parametrize("name", [*GRPC_SERVICES, "envoy"])
def test_the_mesh_certificates_come_from_the_mtls_secret(name: str) -> None:
    config = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    directory = config["MLMESH_MTLS_DIR"]
    workload = of_kind("Deployment")[name]
    own = ["gateway.crt", "gateway.key"] if name == "envoy" else ["service.crt", "service.key"]
    for container in containers(workload):
        if container["name"] in ("render-config", "envoy", name):
            secret = _mounted_secret(workload, container, directory)
            assert secret["secretName"] == "mlmesh-mtls"
            # Each pod gets only its own key, never the CA's.
            assert [i["key"] for i in secret["items"]] == ["ca.crt", *own]
    template = yaml.safe_load((K8S / "secret-mtls.example.yaml").read_text())
    assert template["metadata"]["name"] == "mlmesh-mtls"
    assert "ca.key" not in template["stringData"]


def _allowed(policy: dict[str, Any]) -> list[tuple[set[str] | None, set[str]]]:
    """Each ingress rule of a NetworkPolicy: (the app names it lets in, None for anyone; its
    ports by name)."""
    rules = []
    for rule in policy["spec"].get("ingress", []):
        ports = {p["port"] for p in rule.get("ports", [])}
        if "from" not in rule:
            rules.append((None, ports))
            continue
        names: set[str] = set()
        for peer in rule["from"]:
            selector = peer["podSelector"]
            if "namespaceSelector" in peer:  # another namespace's Prometheus
                names.add("prometheus@" + selector["matchLabels"]["app.kubernetes.io/name"])
            elif "matchLabels" in selector:
                names.add(selector["matchLabels"]["app.kubernetes.io/name"])
            else:
                (expression,) = selector["matchExpressions"]
                assert expression["operator"] == "In"
                names |= set(expression["values"])
        rules.append((names, ports))
    return rules


def test_network_policies_keep_everyone_but_the_gateway_out() -> None:
    policies = of_kind("NetworkPolicy")
    default = policies["default-deny-ingress"]["spec"]
    assert default["podSelector"] == {} and default["policyTypes"] == ["Ingress"]
    assert "ingress" not in default
    by_app = {
        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]: _allowed(p)
        for name, p in policies.items()
        if name != "default-deny-ingress"
    }
    assert set(by_app) == {
        "envoy", "registry", "training", "inference", "worker", "mlflow", "postgres", "redis",
    }  # fmt: skip

    def who_reaches(app: str, port: str) -> set[str] | None:
        found: set[str] = set()
        for names, ports in by_app[app]:
            if port in ports:
                if names is None:
                    return None  # anyone
                found |= names
        return found

    assert who_reaches("envoy", "http") is None and who_reaches("envoy", "mlflow") is None
    assert who_reaches("registry", "grpc") == {"envoy"}
    assert who_reaches("training", "grpc") == {"envoy"}
    assert who_reaches("inference", "grpc") == {"envoy", "registry"}
    assert who_reaches("inference", "oip-http") == {"envoy"}
    services = {"registry", "training", "worker", "inference"}
    assert who_reaches("postgres", "postgres") == services | {"mlflow"}
    assert who_reaches("redis", "redis") == services
    assert who_reaches("mlflow", "http") == services | {"envoy", "prometheus@prometheus"}
    for app in GRPC_SERVICES:  # probes and Prometheus
        assert who_reaches(app, "health") is None and who_reaches(app, "ops") is None
    # Every port a policy names is a port of the pods it selects.
    workloads = {**of_kind("Deployment"), **of_kind("StatefulSet")}
    for app, rules in by_app.items():
        named = {p["name"] for c in containers(workloads[app]) for p in c.get("ports", [])}
        assert set().union(*(ports for _, ports in rules)) <= named, app


def test_mlflow_is_served_through_envoy() -> None:
    envoy = of_kind("Deployment")["envoy"]
    (main,) = [c for c in pod_spec(envoy)["containers"] if c["name"] == "envoy"]
    config = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    assert port_number(main, "mlflow") == int(config["MLMESH_GATEWAY_MLFLOW_PORT"]) == 5000
    ports = {p["name"]: p["port"] for p in of_kind("Service")["envoy"]["spec"]["ports"]}
    assert ports["mlflow"] == 5000


@pytest.mark.parametrize(("name", "expected"), HTTP_PROBES.items())
def test_http_services_have_http_probes(name: str, expected: tuple[str, int]) -> None:
    container = pod_spec(of_kind("Deployment")[name])["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], port_number(container, get["port"])) == expected, (name, probe)


def test_container_ports_are_named_and_services_match_them() -> None:
    workloads = {**of_kind("Deployment"), **of_kind("StatefulSet")}
    for workload in workloads.values():
        for c in containers(workload):
            assert all(p.get("name") for p in c.get("ports", [])), c["name"]
    for name, service in of_kind("Service").items():
        selector = service["spec"]["selector"]
        matching = [
            w
            for w in workloads.values()
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, f"Service {name} selects {len(matching)} workloads"
        names = {p["name"] for c in containers(matching[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["name"] and port["targetPort"] in names, (name, port)


@pytest.mark.parametrize(("name", "expected"), METRICS.items())
def test_pods_carry_prometheus_scrape_annotations(name: str, expected: tuple[str, str]) -> None:
    workload = of_kind("Deployment")[name]
    notes = workload["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert (notes["prometheus.io/port"], notes["prometheus.io/path"]) == expected
    ports = {p["containerPort"] for c in containers(workload) for p in c.get("ports", [])}
    assert int(expected[0]) in ports


@pytest.mark.parametrize("name", ["inference", "worker"])
def test_hpas_scale_inference_and_workers_on_cpu(name: str) -> None:
    hpa = of_kind("HorizontalPodAutoscaler")[name]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", name)
    assert name in of_kind("Deployment")
    # A replicas field would fight the HPA on every `kubectl apply`.
    assert "replicas" not in of_kind("Deployment")[name]["spec"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("name", ["registry", "training", "inference", "envoy"])
def test_pdbs_cover_the_request_path(name: str) -> None:
    pdb = of_kind("PodDisruptionBudget")[name]
    labels = of_kind("Deployment")[name]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # maxUnavailable, not minAvailable: a single replica must not block node drains.
    assert pdb["spec"]["maxUnavailable"] == 1


def test_pods_run_as_non_root_with_the_image_user() -> None:
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    workloads = {**of_kind("Deployment"), **of_kind("StatefulSet")}
    for name, workload in workloads.items():
        pod = pod_spec(workload)["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        if any(c["image"] == "mlmesh:latest" for c in containers(workload)):
            assert pod["runAsUser"] == uid, name
        for c in containers(workload):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], (name, c["name"])


def test_images_match_compose() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    images = {c["image"] for d in of_kind("Deployment").values() for c in containers(d)}
    assert images == {compose["registry"]["image"], compose["envoy"]["image"]}


def test_configmap_names_only_real_settings() -> None:
    data = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    fields = {f"MLMESH_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= fields, f"not settings (typos?): {set(data) - fields}"
    settings = Settings(**{k.removeprefix("MLMESH_").lower(): v for k, v in data.items()})
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    # A pod is one Inference process (and Envoy's renderer, which reads this ConfigMap too,
    # renders one endpoint: the headless Service); replicas scale it.
    assert [e.address for e in settings.inference_endpoints()] == ["0.0.0.0:50053"]
    # No password in a ConfigMap: PGPASSWORD comes from the mlmesh-postgres Secret.
    for url in (settings.database_url, settings.mlflow_backend_store_uri):
        assert (urlsplit(url).hostname, urlsplit(url).password) == ("postgres", None), url
    assert "password" not in yaml.safe_dump(data).lower()


def test_gateway_renderer_dials_headless_services_and_reads_the_key_file() -> None:
    envoy = of_kind("Deployment")["envoy"]
    (render,) = pod_spec(envoy)["initContainers"]
    assert render["command"] == ["python", "-m", "gateway", "render", "--out", "/gateway"]
    env = {e["name"]: e.get("value") for e in render["env"]}
    services = of_kind("Service")
    for name, port in GRPC_SERVICES.items():
        host, _, dialled = env[f"MLMESH_{name.upper()}_ADDRESS"].rpartition(":")
        assert int(dialled) == port and services[host]["spec"]["clusterIP"] == "None"
    mounts = {m["mountPath"]: m["name"] for m in render["volumeMounts"]}
    key_dir = str(Path(env["MLMESH_API_KEYS_FILE"]).parent)
    volumes = {v["name"]: v for v in pod_spec(envoy)["volumes"]}
    assert volumes[mounts[key_dir]]["secret"]["secretName"] == "mlmesh-api-keys"
    assert "emptyDir" in volumes[mounts["/gateway"]]
    (main,) = [c for c in pod_spec(envoy)["containers"] if c["name"] == "envoy"]
    assert "/gateway/envoy.yaml" in main["command"]


def test_secret_templates_hold_no_usable_key() -> None:
    template = yaml.safe_load((K8S / "secret-api-keys.example.yaml").read_text())
    assert template["metadata"]["name"] == "mlmesh-api-keys"
    assert "kubectl" in (K8S / "secret-api-keys.example.yaml").read_text()
    with pytest.raises(ApiKeyError):
        parse_api_keys(template["stringData"]["api-keys"], "template")
