"""`mlmesh-server up` (or `python -m services.launcher up`): start the local mesh and keep it up
until Ctrl-C/SIGTERM; and the server's other commands (dev-cert, mesh-certs, reset)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from gateway.tls import ensure_mesh_certificates, write_dev_certificate
from services.common.db import database_name
from services.common.server import configure_logging
from services.common.settings import MeshTlsFiles, Settings
from services.launcher.mesh import Mesh
from services.launcher.process import LaunchAborted, LaunchError
from services.launcher.state import artifact_root, reset_state

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher; the exit code is 0 after a requested stop, 1 when something failed."""
    parser = argparse.ArgumentParser(
        prog="mlmesh-server",
        description="Run mlmesh on this machine; configuration comes from MLMESH_* variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "up",
        help="start PostgreSQL, Redis, MLflow, the services and Envoy (each only where needed), "
        "print the URLs and an API key, and stop everything on Ctrl-C or SIGTERM",
    )
    dev_cert = commands.add_parser(
        "dev-cert",
        help="write a self-signed development certificate and key for the gateway's TLS "
        "listener, and print the settings that turn it on",
    )
    dev_cert.add_argument(
        "--dir", type=Path, default=None, help="where to write them (default: STATE_DIR/tls)"
    )
    dev_cert.add_argument(
        "--host", action="append", default=[], help="another DNS name or IP it is valid for"
    )
    mesh_certs = commands.add_parser(
        "mesh-certs",
        help="write the mesh's CA and the certificates the gateway and the services use for "
        "mutual TLS (for compose and Kubernetes Secrets; `up` makes its own); existing ones "
        "are kept unless they expire within 30 days",
    )
    mesh_certs.add_argument(
        "--dir", type=Path, default=None, help="where to write them (default: MLMESH_MTLS_DIR)"
    )
    reset = commands.add_parser(
        "reset",
        help="drop the state directory's databases (mlmesh's and MLflow's) and its MLflow "
        "artifacts, for a fresh start; the mesh must be stopped",
    )
    reset.add_argument("--yes", action="store_true", help="do it (without: say what it would do)")
    args = parser.parse_args(argv)

    if args.command == "reset":
        return _reset(Settings(), confirmed=args.yes)
    if args.command == "dev-cert":
        directory = args.dir or Settings().state_dir / "tls"
        cert, key = write_dev_certificate(directory, tuple(args.host))
        print(f"export MLMESH_GATEWAY_TLS_CERT_FILE={cert.resolve()}")
        print(f"export MLMESH_GATEWAY_TLS_KEY_FILE={key.resolve()}")
        return 0

    if args.command == "mesh-certs":
        files = MeshTlsFiles(args.dir) if args.dir else Settings().mesh_tls
        written = ensure_mesh_certificates(files)
        print(f"{files.directory.resolve()}: " + (", ".join(written) or "all current"))
        return 0

    settings = Settings()
    configure_logging(settings)
    # httpx logs every readiness probe at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    mesh = Mesh(settings)
    mesh.install_signal_handlers()
    try:
        mesh.start()
        print(mesh.summary(), flush=True)
        mesh.wait()
        log.info("stopping the mesh")
    except LaunchAborted:
        log.info("stopped before the mesh was ready, as requested")
    except LaunchError as exc:
        log.error("%s", exc)
        return 1
    finally:
        mesh.stop()
    return 0


def _reset(settings: Settings, *, confirmed: bool) -> int:
    what = (
        f"the databases {database_name(settings.database_url)} and "
        f"{database_name(settings.mlflow_backend_store_uri)}, and the MLflow artifacts in "
        f"{artifact_root(settings)}"
    )
    if not confirmed:
        print(f"this would remove {what}; run again with --yes to do it")
        return 2
    try:
        removed = reset_state(settings)
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"reset failed: {exc}", file=sys.stderr)
        return 1
    print("removed: " + ", ".join(removed))
    return 0
