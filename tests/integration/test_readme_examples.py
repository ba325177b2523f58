"""The README's grpcurl lines, and the error answers its Errors section shows, as written.

Every `.venv/bin/grpcurl` command of the README's bash blocks (continuation lines joined) runs
through bash from the repository root, as a user would paste it after `make up`: with the test
mesh's addresses in place of localhost:8000 and localhost:50051, its state directory in place
of .mlmesh, $MLMESH_API_KEY set, and $IMAGE set by the README's own line. The TLS example runs
against a TLS gateway with the development certificate; the one against a service directly
uses the mesh's certificates in the state directory, and the health check its health port. The
Errors section's curl lines must answer the JSON shown under each, and the MLflow examples of
"Using it" what their comments say.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import grpc
import pytest

from gateway.keys import API_KEY_HEADER
from mlmesh.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.settings import Settings
from services.launcher.mesh import Mesh
from services.training.ml.train import train
from tests.integration.test_gateway_tls import tls_gateway  # noqa: F401 (a fixture)
from tests.integration.test_training_ml import a_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def bash_commands(text: str) -> list[str]:
    """The commands of a markdown text's ```bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        commands += [c.strip() for c in re.sub(r"\\\n", " ", block).splitlines() if c.strip()]
    return commands


COMMANDS = bash_commands(README)
GRPCURL = [c for c in COMMANDS if c.startswith(".venv/bin/grpcurl ")]
IMAGE = next(c for c in COMMANDS if c.startswith("IMAGE="))  # the README's own $IMAGE
_ERRORS = README[README.index("### Errors") :]
_ERRORS = _ERRORS[: _ERRORS.index("\n### ", 1)]
# (curl command, the JSON answer the README shows under it)
ERROR_EXAMPLES = re.findall(r"^(curl .*)\n# (\{.*\})$", _ERRORS, flags=re.M)


def test_the_readme_has_the_examples() -> None:
    assert len(GRPCURL) >= 7, GRPCURL
    assert len(ERROR_EXAMPLES) >= 4, ERROR_EXAMPLES
    # Nothing points at a descriptor set that `make up` does not write.
    for command in GRPCURL:
        assert "-protoset" not in command or "-protoset .mlmesh/mlmesh.binpb" in command, command


@pytest.fixture(scope="module")
def production_model(mesh: Mesh, keys: dict[str, str]) -> None:
    """A production version of the default model, for the Predict example (which names none):
    a small MLP, trained here."""
    name = mesh.settings.default_model_name
    result = train(
        a_spec(mesh, model_name=name, architecture="mlp", train_subset=500, seed=3),
        lambda _: None,
        lambda: False,
    )
    with grpc.insecure_channel(f"127.0.0.1:{mesh.settings.gateway_port}") as channel:
        registry_pb2_grpc.RegistryServiceStub(channel).TransitionModelVersion(
            registry_pb2.TransitionModelVersionRequest(
                model_name=name, version=result.model_version, stage="production"
            ),
            metadata=[(API_KEY_HEADER, keys["bob"])],
        )


def run_bash(script: str, key: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()), "MLMESH_API_KEY": key}
    return subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def in_the_mesh(command: str, here: dict[str, str]) -> str:
    """``command`` with the README's addresses and paths replaced by ``here``'s."""
    for written, actual in sorted(here.items(), key=lambda kv: -len(kv[0])):
        command = command.replace(written, actual)
    return command


def as_written(mesh: Mesh) -> dict[str, str]:
    """What the README's addresses and paths are in the test mesh."""
    s = mesh.settings
    return {
        "localhost:8000": f"localhost:{s.gateway_port}",
        "localhost:50051": s.registry_address,
        "localhost:50061": s.health_address(s.registry_address),
        ".mlmesh/": f"{s.state_dir}/",
    }


@pytest.mark.parametrize("command", GRPCURL, ids=lambda c: c.split()[-1][:60])
def test_grpcurl_example(
    command: str, mesh: Mesh, keys: dict[str, str], request: pytest.FixtureRequest
) -> None:
    here = as_written(mesh)
    if "-cacert .mlmesh/tls/" in command:  # the TLS section's: a TLS gateway, the dev cert
        tls: Settings = request.getfixturevalue("tls_gateway")
        here["localhost:8000"] = f"localhost:{tls.gateway_port}"
        here[".mlmesh/tls/gateway.crt"] = str(tls.gateway_tls_cert_file)
    if "InferenceService/Predict" in command:
        request.getfixturevalue("production_model")
    done = run_bash(f"{IMAGE}\n{in_the_mesh(command, here)}", keys["alice"])
    assert done.returncode == 0, f"{command}\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
    target = shlex.split(command, comments=True)[-1]
    if target == "list":
        assert "grpc.health.v1.Health" in done.stdout.split() or (
            "mlmesh.registry.v1.RegistryService" in done.stdout.split()
        ), done.stdout
        return
    answer = json.loads(done.stdout)
    expected_key = {
        "grpc.health.v1.Health/Check": "status",
        "mlmesh.inference.v1.InferenceService/Predict": "prediction",
    }.get(target)
    if expected_key:
        assert expected_key in answer, answer


@pytest.mark.parametrize(("command", "shown"), ERROR_EXAMPLES, ids=lambda c: c[-40:])
def test_error_example(command: str, shown: str, mesh: Mesh, keys: dict[str, str]) -> None:
    done = run_bash(in_the_mesh(command, as_written(mesh)), keys["alice"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(shown), done.stdout


_USING = README[README.index("## Using it") :]
_USING = _USING[: _USING.index("\n### ")]
# The "Using it" block that talks to MLflow through the gateway, continuation lines joined.
MLFLOW_BLOCK = next(
    block
    for block in re.findall(r"^```bash\n(.*?)^```", _USING, flags=re.M | re.S)
    if "MLFLOW_TRACKING_TOKEN" in block
)


def test_mlflow_examples_through_the_gateway(mesh: Mesh, keys: dict[str, str]) -> None:
    here = {**as_written(mesh), "localhost:5000": f"localhost:{mesh.settings.gateway_mlflow_port}"}
    commands = [c for c in bash_commands(f"```bash\n{MLFLOW_BLOCK}```\n") if not c.startswith("#")]
    answers = []
    for command in commands[1:]:  # after the export line, each curl on its own
        done = run_bash(
            f"{in_the_mesh(commands[0], here)}\n{in_the_mesh(command, here)}", keys["alice"]
        )
        assert done.returncode == 0, done.stderr
        answers.append(json.loads(done.stdout))
    search, create, alias = answers
    assert "experiments" in search
    assert create["error_code"] == "UNAUTHENTICATED"
    assert alias["error_code"] == "PERMISSION_DENIED"
    assert alias["message"].startswith("Setting an alias in MLflow is refused at mlmesh's gateway")
    assert "TransitionModelVersion" in alias["message"]
