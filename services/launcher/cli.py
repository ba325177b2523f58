"""`python -m services.launcher up`: start the local mesh and keep it up until Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from gateway.tls import write_dev_certificate
from services.common.server import configure_logging
from services.common.settings import Settings
from services.launcher.mesh import Mesh
from services.launcher.process import LaunchAborted, LaunchError

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher; the exit code is 0 after a requested stop, 1 when something failed."""
    parser = argparse.ArgumentParser(
        prog="python -m services.launcher",
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
    args = parser.parse_args(argv)

    if args.command == "dev-cert":
        directory = args.dir or Settings().state_dir / "tls"
        cert, key = write_dev_certificate(directory, tuple(args.host))
        print(f"export MLMESH_GATEWAY_TLS_CERT_FILE={cert.resolve()}")
        print(f"export MLMESH_GATEWAY_TLS_KEY_FILE={key.resolve()}")
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
