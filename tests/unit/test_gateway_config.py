"""Pure logic of the gateway: API keys, path templates, policy completeness."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from gateway.keys import (
    ApiKeyError,
    ApiKeysWatcher,
    load_api_keys,
    new_api_key,
    parse_api_keys,
    write_dev_key,
)
from gateway.policy import OIP_REST_ROUTES
from gateway.render import (
    OIP_PATHS,
    build_descriptor_set,
    render_envoy_config,
    template_regex,
    tool,
)
from gateway.tls import ensure_mesh_certificates
from services.common.settings import Settings

GOOD = "k" * 20


def test_parse_api_keys() -> None:
    text = f"alice={GOOD}, bob={'b' * 20}\n# comment\n\ncarol = {'c' * 20}"
    assert parse_api_keys(text, "x") == {"alice": GOOD, "bob": "b" * 20, "carol": "c" * 20}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("alice", "not client=key"),
        ("=abc", "not client=key"),
        ("alice=short", "16-256 printable"),
        (f"alice={GOOD},bob={GOOD}", "reuses another client's key"),
        (f"al ice={GOOD}", "not client=key"),
    ],
)
def test_bad_api_keys_are_named_without_the_key(text: str, needle: str) -> None:
    with pytest.raises(ApiKeyError, match=needle) as err:
        parse_api_keys(text, "MLMESH_API_KEYS")
    assert GOOD not in str(err.value)


def test_generated_keys_never_start_with_a_dash() -> None:
    # token_urlsafe starts one key in 64 with "-": among 3,000 some would (all but surely),
    # and `mlmesh --api-key "$KEY"` would read such a key as an option.
    keys = [new_api_key(24) for _ in range(3000)]
    assert not [k for k in keys if k.startswith("-")]
    assert len(set(keys)) == len(keys) and all(len(k) == 32 for k in keys)
    assert parse_api_keys(f"alice={keys[0]}", "x") == {"alice": keys[0]}


def test_keys_file_and_env_combine(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    client, key = write_dev_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    settings = Settings(api_keys=f"alice={GOOD}", api_keys_file=path)
    assert load_api_keys(settings) == {"alice": GOOD, client: key}
    with pytest.raises(ApiKeyError, match="MLMESH_API_KEYS_FILE"):
        load_api_keys(Settings(api_keys="", api_keys_file=tmp_path / "missing"))


@pytest.mark.parametrize(
    ("template", "matches", "misses"),
    [
        ("/v1/models/{name}", ["/v1/models/a-b.c"], ["/v1/models/a/b", "/v1/models/"]),
        (
            "/v1/models/{model_name}/versions/{version}:transition",
            ["/v1/models/m/versions/3:transition"],
            ["/v1/models/m/versions/3", "/v1/models/m/versions/3:transitionx"],
        ),
        ("/v1/files/{path=**}", ["/v1/files/a/b/c"], ["/v1/files/"]),
        ("/v1/x/{name=shelves/*}", ["/v1/x/shelves/7"], ["/v1/x/books/7"]),
    ],
)
def test_template_regex(template: str, matches: list[str], misses: list[str]) -> None:
    regex = re.compile(template_regex(template))
    assert all(regex.match(m) for m in matches)
    assert not any(regex.match(m) for m in misses)


def test_render_refuses_without_keys(tmp_path: Path) -> None:
    descriptor = build_descriptor_set(tmp_path / "mlmesh.binpb")
    with pytest.raises(ApiKeyError, match="no API keys configured"):
        render_envoy_config(
            Settings(api_keys="", api_keys_file=None), descriptor, tmp_path / "envoy.yaml"
        )


def test_rendered_config_is_valid_for_envoy(tmp_path: Path) -> None:
    descriptor = build_descriptor_set(tmp_path / "mlmesh.binpb")
    settings = Settings(api_keys=f"alice={GOOD}", state_dir=tmp_path)
    with pytest.raises(ValueError, match="mesh-certs"):  # no certificates for mutual TLS yet
        render_envoy_config(settings, descriptor, tmp_path / "e.yaml")
    ensure_mesh_certificates(settings.mesh_tls)
    config = render_envoy_config(settings, descriptor, tmp_path / "e.yaml")
    assert config.stat().st_mode & 0o777 == 0o600
    result = subprocess.run(
        [tool("envoy"), "--mode", "validate", "-c", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout


def test_keys_watcher_rotates_only_valid_changes(tmp_path: Path) -> None:
    keys_file, envoy_keys = tmp_path / "api-keys", tmp_path / "envoy-api-keys.json"
    keys_file.write_text(f"alice={GOOD}\n")
    watcher = ApiKeysWatcher(Settings(api_keys="", api_keys_file=keys_file), envoy_keys)
    assert not watcher.poll() and not envoy_keys.exists()  # nothing changed yet

    def credentials() -> list[dict[str, str]]:
        resource = json.loads(envoy_keys.read_text())["resources"][0]
        return resource["typed_config"]["credentials"]

    keys_file.write_text(f"bob={'b' * 20}\n")
    assert watcher.poll()
    assert credentials() == [{"client": "bob", "key": "b" * 20}]
    assert envoy_keys.stat().st_mode & 0o777 == 0o600
    keys_file.write_text("bob=short\n")
    assert not watcher.poll()  # refused: bob's key stays in force
    assert credentials() == [{"client": "bob", "key": "b" * 20}]


def test_make_generate_works_on_a_fresh_clone(tmp_path: Path) -> None:
    """`make generate` in a copy of the tracked files (no gateway/build: git ignores it) builds
    the descriptor set, with this checkout's venv (its install step taken as done)."""
    root = Path(__file__).resolve().parents[2]
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    clone = tmp_path / "clone"
    for name in filter(None, tracked):
        if (root / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, clone / name)
    assert not (clone / "gateway" / "build").exists()
    venv = root / ".venv"
    made = subprocess.run(
        ["make", "-o", f"{venv}/.installed", "generate", f"VENV={venv}"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    built = descriptor_pb2.FileDescriptorSet.FromString(
        (clone / "gateway" / "build" / "mlmesh.binpb").read_bytes()
    )
    assert "mlmesh/registry/v1/registry.proto" in {f.name for f in built.file}


def test_oip_paths_cover_the_oip_routes_only() -> None:
    """Replies Envoy makes itself on these paths take the protocol's {"error": ...} shape."""
    oip = re.compile(OIP_PATHS)
    for _, template, _ in OIP_REST_ROUTES:
        path = re.sub(r"\{[^}]*\}", "m", template)
        assert oip.match(path) and oip.match(path + "?x=1"), template
    assert not any(oip.match(p) for p in ("/v1/models", "/v2x", "/train", "/inference.X/Y"))
