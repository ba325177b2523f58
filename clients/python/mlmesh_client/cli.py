"""The `mlmesh` command: run the mesh locally and talk to it through the gateway."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mlmesh_client.client import Client, MeshError


def _client(args: argparse.Namespace) -> Client:
    return Client(args.gateway, api_key=args.api_key)


def _experiments(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        for e in mesh.list_experiments(args.filter):
            print(f"{e.experiment_id:>6}  {e.name}")


def _models(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        for m in mesh.list_registered_models(args.filter):
            aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(m.aliases.items())) or "-"
            print(f"{m.name}  aliases: {aliases}")


def _versions(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        for v in mesh.list_model_versions(args.name):
            aliases = ",".join(v.aliases) or "-"
            print(f"v{v.version:<4} {v.stage:<10} aliases: {aliases:<20} run {v.run_id}")


def _promote(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        done = mesh.transition(
            args.name, args.version, args.stage, archive_existing=args.archive_existing
        )
        v = done.model_version
        print(f"{v.name} v{v.version} is now {v.stage} (aliases: {', '.join(v.aliases) or '-'})")
        if done.previous_version:
            print(f"previous holder: v{done.previous_version}")
        if done.archived_versions:
            print("archived: " + ", ".join(f"v{n}" for n in done.archived_versions))


def _audit(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        for e in mesh.list_audit_events(args.model, args.limit):
            when = e.time.ToDatetime().isoformat(timespec="seconds")
            print(
                f"{when}  {e.client:<12} {e.action} {e.model_name} v{e.version}: "
                f"{e.from_stage} -> {e.to_stage}"
            )


def _up(_: argparse.Namespace) -> None:
    from services.launcher.cli import main as launcher_main  # the server side, only for `up`

    sys.exit(launcher_main(["up"]))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlmesh", description=__doc__)
    parser.add_argument(
        "--gateway", help="gateway host:port (default $MLMESH_GATEWAY or 127.0.0.1:8000)"
    )
    parser.add_argument("--api-key", help="API key (default $MLMESH_API_KEY)")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("up", help="start the whole mesh locally until Ctrl-C").set_defaults(
        run=_up
    )
    p = commands.add_parser("experiments", help="list experiments")
    p.add_argument("--filter", default="", help="MLflow filter, e.g. \"name LIKE 'mnist%%'\"")
    p.set_defaults(run=_experiments)
    p = commands.add_parser("models", help="list registered models and their aliases")
    p.add_argument("--filter", default="", help="MLflow filter")
    p.set_defaults(run=_models)
    p = commands.add_parser("versions", help="list a model's versions")
    p.add_argument("name")
    p.set_defaults(run=_versions)
    p = commands.add_parser("promote", help="move a version to a stage (needs an API key)")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--stage", default="Production", help="Production, Staging or Archived")
    p.add_argument("--archive-existing", action="store_true", help="archive the previous holders")
    p.set_defaults(run=_promote)
    p = commands.add_parser("audit", help="show the newest registry changes (needs an API key)")
    p.add_argument("--model", default="", help="only this registered model")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(run=_audit)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except MeshError as err:
        print(f"mlmesh: {err}", file=sys.stderr)
        sys.exit(1)
