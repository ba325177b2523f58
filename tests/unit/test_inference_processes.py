"""N Inference processes: their ports (Settings.inference_endpoints), the default that follows
the cores, the launcher's children and the gateway's clusters of N endpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gateway.render import OIP_HTTP_CLUSTER, build_descriptor_set, render_envoy_config, tool
from gateway.tls import ensure_mesh_certificates
from services.common.settings import INFERENCE_PORT_STEP, Settings
from services.launcher.mesh import child_env, inference_specs, mesh_specs, stages

KEYS = "alice=" + "k" * 20


def ports(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "inference_address": "127.0.0.1:41000",
        "inference_health_port": 41001,
        "inference_ops_port": 41002,
        "inference_http_port": 41003,
    }
    return Settings(**{**values, **overrides})


def test_process_i_listens_on_each_inference_port_plus_step_times_i() -> None:
    assert INFERENCE_PORT_STEP == 100  # the README and deploy/README.md say 100
    endpoints = ports(inference_processes=3).inference_endpoints()
    assert [(e.index, e.name) for e in endpoints] == [
        (0, "inference"), (1, "inference-1"), (2, "inference-2"),
    ]  # fmt: skip
    assert [(e.address, e.health_port, e.ops_port, e.http_port) for e in endpoints] == [
        ("127.0.0.1:41000", 41001, 41002, 41003),
        ("127.0.0.1:41100", 41101, 41102, 41103),
        ("127.0.0.1:41200", 41201, 41202, 41203),
    ]
    # Process 0 is the configured ports themselves: one process is the mesh as it was.
    one = Settings(inference_processes=1)
    (only,) = one.inference_endpoints()
    assert (only.address, only.health_port, only.ops_port, only.http_port) == (
        one.inference_address, one.inference_health_port, one.inference_ops_port,
        one.inference_http_port,
    )  # fmt: skip


def test_the_default_is_one_process_per_usable_core() -> None:
    cores = len(os.sched_getaffinity(0))
    assert Settings.model_fields["inference_processes"].default == 0
    assert Settings(inference_processes=0).inference_process_count == cores
    assert len(Settings().inference_endpoints()) == cores
    assert Settings(inference_processes=5).inference_process_count == 5


def test_the_default_follows_the_affinity_not_the_machine() -> None:
    # A process pinned to one core (taskset, a container's cpuset) runs one Inference process.
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from services.common.settings import Settings; "
        "print(Settings(inference_processes=0).inference_process_count)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert out.stdout.strip() == "1"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # 9104 + 100 would be fine, but an ops port right below the gateway's collides.
        ({"inference_ops_port": 8900, "gateway_port": 9000}, "also MLMESH_GATEWAY_PORT"),
        # Process 1's gRPC port on process 0's health port.
        (
            {"inference_health_port": 41100},
            "process 1's gRPC port 41100 is also Inference process 0's health port",
        ),
        ({"inference_http_port": 65500}, "would be 65600, not a TCP port"),
    ],
)
def test_ports_that_collide_are_refused_by_name(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ports(inference_processes=2, **overrides)


def test_the_defaults_leave_room_for_sixteen_processes() -> None:
    assert len(Settings(inference_processes=16).inference_endpoints()) == 16


def test_each_launcher_child_gets_its_own_ports_through_the_environment(tmp_path: Path) -> None:
    settings = ports(inference_processes=2, state_dir=tmp_path)
    specs = inference_specs(settings)
    assert [s.name for s in specs] == ["inference", "inference-1"]
    second = specs[1]
    assert set(second.ports) == {("127.0.0.1", p) for p in (41100, 41101, 41102, 41103)}
    env = {**child_env(settings), **second.env}
    # What the child builds from its environment: process 1's ports, nothing else changed.
    seen = Settings(**{k.removeprefix("MLMESH_").lower(): v for k, v in env.items()
                       if k.startswith("MLMESH_") and k != "MLMESH_STATE_DIR"})  # fmt: skip
    assert seen.inference_address == "127.0.0.1:41100"
    assert (seen.inference_health_port, seen.inference_ops_port, seen.inference_http_port) == (
        41101, 41102, 41103,
    )  # fmt: skip
    assert seen.registry_address == settings.registry_address
    assert specs[0].env["MLMESH_INFERENCE_ADDRESS"] == settings.inference_address


def test_the_processes_start_together_and_the_gateway_after_them(tmp_path: Path) -> None:
    names = [[spec.name for spec in stage] for stage in stages(mesh_specs(ports(
        inference_processes=3, state_dir=tmp_path)))]  # fmt: skip
    assert ["inference", "inference-1", "inference-2"] in names
    assert names.index(["inference", "inference-1", "inference-2"]) == len(names) - 2
    assert names[-1] == ["envoy"] and all(len(stage) == 1 for stage in names[:-2])


def test_the_gateway_balances_over_every_process(tmp_path: Path) -> None:
    settings = ports(inference_processes=3, api_keys=KEYS, state_dir=tmp_path)
    ensure_mesh_certificates(settings.mesh_tls)
    descriptor = build_descriptor_set(tmp_path / "mlmesh.binpb")
    path = render_envoy_config(settings, descriptor, tmp_path / "envoy.yaml")
    clusters = {
        c["name"]: c for c in yaml.safe_load(path.read_text())["static_resources"]["clusters"]
    }

    def endpoints(name: str) -> list[int]:
        (group,) = clusters[name]["load_assignment"]["endpoints"]
        return [
            e["endpoint"]["address"]["socket_address"]["port_value"] for e in group["lb_endpoints"]
        ]

    assert endpoints("inference") == [41000, 41100, 41200]
    assert endpoints(OIP_HTTP_CLUSTER) == [41003, 41103, 41203]
    assert endpoints("registry") == [int(settings.registry_address.rsplit(":", 1)[1])]
    for name in ("inference", OIP_HTTP_CLUSTER):
        assert clusters[name]["lb_policy"] == "LEAST_REQUEST"
        assert clusters[name]["health_checks"], name  # an endpoint that stops answering is left
    result = subprocess.run(
        [tool("envoy"), "--mode", "validate", "-c", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
