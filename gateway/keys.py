"""API keys: parsed from MLMESH_API_KEYS / MLMESH_API_KEYS_FILE, or generated for development."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from services.common.settings import Settings

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


def write_dev_key(path: Path, client: str = "dev") -> tuple[str, str]:
    """Generate a development key into ``path`` (mode 0600) and return (client, key)."""
    key = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{client}={key}\n")
    return client, key
