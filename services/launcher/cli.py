"""`python -m services.launcher up`: start the local mesh and keep it up until Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

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
    parser.parse_args(argv)

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
