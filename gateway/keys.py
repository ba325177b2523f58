"""API keys: parsed from MLMESH_API_KEYS / MLMESH_API_KEYS_FILE, or generated for development.

Envoy reads the keys from a file of their own (``ENVOY_KEYS_FILE`` beside envoy.yaml), which
it watches: the api_key_auth filter is configured through ECDS (extension config discovery)
with a filesystem source. Replacing that file (atomically, by rename) changes the keys for
every request that starts afterwards; requests already past the filter are not touched, and
no listener or connection is drained. ``ApiKeysWatcher`` is how the launcher does it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from pathlib import Path

from services.common.headers import API_KEY_HEADER, CLIENT_HEADER
from services.common.settings import Settings

log = logging.getLogger(__name__)

# MLflow clients send MLFLOW_TRACKING_TOKEN as "Authorization: Bearer <token>"; on the MLflow
# listener the key may come that way too (api_key_auth drops a "Bearer " prefix itself).
BEARER_HEADER = "authorization"
# The api_key_auth filters' names in envoy.yaml.j2; ECDS finds each one's config by its name.
FILTER_NAME = "envoy.filters.http.api_key_auth"
MLFLOW_FILTER_NAME = "mlmesh.filters.http.mlflow_api_key_auth"
ENVOY_KEYS_FILE = "envoy-api-keys.json"  # written beside envoy.yaml
# The same keys for the MLflow listener, which also reads them from BEARER_HEADER: a file of
# its own, since ECDS serves one filter's config per file.
ENVOY_MLFLOW_KEYS_FILE = "envoy-mlflow-api-keys.json"

_CLIENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_KEY = re.compile(r"^[\x21-\x7e]{16,256}$")  # printable, no spaces, long enough to guess badly


class ApiKeyError(ValueError):
    """The configured API keys are malformed; the message says where, never the key."""


def parse_api_keys(text: str, source: str) -> dict[str, str]:
    """Parse client=key pairs separated by commas or newlines; '#' starts a comment line."""
    keys: dict[str, str] = {}
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    for n, entry in enumerate(entries, 1):
        if not entry or entry.startswith("#"):
            continue
        client, sep, key = entry.partition("=")
        client, key = client.strip(), key.strip()
        if not sep or not _CLIENT.match(client):
            raise ApiKeyError(f"{source}: entry {n} is not client=key with a valid client name")
        if not _KEY.match(key):
            raise ApiKeyError(
                f"{source}: key of client {client!r} must be 16-256 printable characters"
            )
        if key in keys.values():
            raise ApiKeyError(f"{source}: client {client!r} reuses another client's key")
        keys[client] = key
    return keys


def load_api_keys(settings: Settings) -> dict[str, str]:
    """All configured keys, client -> key: MLMESH_API_KEYS plus MLMESH_API_KEYS_FILE."""
    keys = parse_api_keys(settings.api_keys, "MLMESH_API_KEYS")
    if settings.api_keys_file is not None:
        path = Path(settings.api_keys_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ApiKeyError(f"MLMESH_API_KEYS_FILE {path}: {exc.strerror}") from exc
        for client, key in parse_api_keys(text, str(path)).items():
            if client in keys and keys[client] != key:
                raise ApiKeyError(f"client {client!r} has two different keys configured")
            keys[client] = key
    return keys


def new_api_key(nbytes: int = 32) -> str:
    """A random URL-safe key that does not start with "-".

    ``token_urlsafe`` starts one key in 64 with "-", and a command line then reads
    ``--api-key -Xy...`` as a missing value followed by an option: the README's
    ``mlmesh --api-key "$MLMESH_API_KEY"`` would fail for that key.
    """
    while (key := secrets.token_urlsafe(nbytes)).startswith("-"):
        pass
    return key


def write_dev_key(path: Path, client: str = "dev") -> tuple[str, str]:
    """Generate a development key into ``path`` (mode 0600) and return (client, key)."""
    key = new_api_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{client}={key}\n")
    return client, key


def write_envoy_keys(keys: dict[str, str], path: Path) -> Path:
    """Write the api_key_auth configs Envoy watches (mode 0600), replacing each atomically:
    ``path`` (ENVOY_KEYS_FILE, the mesh listener's: x-api-key only) and, beside it,
    ENVOY_MLFLOW_KEYS_FILE (the MLflow listener's: x-api-key or Authorization: Bearer).

    Envoy reloads a file when a new one is renamed into place; a half-written file is
    never seen, and one Envoy rejects leaves the previous keys in force.
    """
    _write_filter_config(path, FILTER_NAME, keys, [API_KEY_HEADER])
    _write_filter_config(
        path.with_name(ENVOY_MLFLOW_KEYS_FILE),
        MLFLOW_FILTER_NAME,
        keys,
        [API_KEY_HEADER, BEARER_HEADER],
    )
    return path


def _write_filter_config(path: Path, name: str, keys: dict[str, str], headers: list[str]) -> None:
    resource = {
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
            "credentials": [{"client": c, "key": k} for c, k in sorted(keys.items())],
            "key_sources": [{"header": header} for header in headers],
            "forwarding": {"header": CLIENT_HEADER, "hide_credentials": True},
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"resources": [resource]}, f, indent=1)
    os.replace(tmp, path)


class ApiKeysWatcher:
    """Keeps Envoy's key file in step with MLMESH_API_KEYS_FILE: key rotation without restart.

    ``poll()`` rewrites Envoy's file when the keys file's content changed; ``reload()`` does
    it unconditionally (the launcher calls it on SIGHUP). New keys are checked first:
    malformed ones, or none at all, are logged and the old keys stay in force. Replace the
    keys file atomically (write a new file, rename it over the old one), so that a
    half-written file is never read.
    """

    def __init__(self, settings: Settings, envoy_keys: Path) -> None:
        self._settings = settings
        self._envoy_keys = envoy_keys
        self._seen = self._signature()

    def _signature(self) -> bytes | None:
        # The content, not the mtime: two writes within one clock tick share an mtime.
        if self._settings.api_keys_file is None:
            return None
        try:
            return hashlib.sha256(Path(self._settings.api_keys_file).read_bytes()).digest()
        except OSError:
            return None

    def poll(self) -> bool:
        """Reload if the keys file changed since last looked at; True when keys were written."""
        signature = self._signature()
        if signature == self._seen:
            return False
        self._seen = signature
        return self.reload()

    def reload(self) -> bool:
        """Re-read the configured keys and hand them to Envoy; False (logged) if they are bad."""
        try:
            keys = load_api_keys(self._settings)
        except ApiKeyError as exc:
            log.error("API keys not reloaded, the previous ones stay in force: %s", exc)
            return False
        if not keys:
            log.error("API keys not reloaded: none configured; the previous ones stay in force")
            return False
        write_envoy_keys(keys, self._envoy_keys)
        # Client names only: keys never reach a log.
        log.info("API keys reloaded: clients %s", ", ".join(sorted(keys)))
        return True
