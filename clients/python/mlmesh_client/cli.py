"""The `mlmesh` command: talk to a running mesh through its gateway (`mlmesh-server up`, the
server's own command, starts one)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from mlmesh.datasets.v1 import datasets_pb2
from mlmesh.registry.v1 import registry_pb2
from mlmesh.training.v1 import sweep_pb2, training_pb2
from mlmesh_client.api import DATASET_FORMATS, DEFAULT_TIMEOUT_S
from mlmesh_client.client import Client
from mlmesh_client.errors import MeshError
from mlmesh_client.images import ImageError, read_image_file


class UsageError(Exception):
    """Input the user can fix (a file, an index); exits with 2, as argparse's own errors do."""


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.gateway,
        api_key=args.api_key,
        timeout_s=args.timeout or None,
        tls=args.tls,
        ca_file=args.ca_file,
    )


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
        done = mesh.promote(
            args.name,
            args.version,
            args.stage,
            archive_existing=args.archive_existing,
            force=args.force,
        )
        v = done.model_version
        print(f"{v.name} v{v.version} is now {v.stage} (aliases: {', '.join(v.aliases) or '-'})")
        if done.HasField("comparison"):
            print(_comparison(done.comparison, v.version))
        if done.previous_version:
            print(f"previous holder: v{done.previous_version}")
        if done.archived_versions:
            print("archived: " + ", ".join(f"v{n}" for n in done.archived_versions))
        if done.forced:
            print(f"forced: {done.audit_event.note.removeprefix('forced: ')}")


def _comparison(c: registry_pb2.MetricComparison, version: int) -> str:
    def shown(has: bool, value: float) -> str:
        return f"{value:.4f}" if has else "(none logged)"

    candidate = shown(c.HasField("candidate_value"), c.candidate_value)
    if not c.production_version:
        return f"{c.metric_key}: v{version} {candidate} (no production version before)"
    production = shown(c.HasField("production_value"), c.production_value)
    verdict = " (worse)" if c.worse else ""
    return (
        f"{c.metric_key}: v{version} {candidate}{verdict}, "
        f"production v{c.production_version} {production}"
    )


def _reference(text: str) -> tuple[str, int]:
    name, sep, version = text.partition("@")
    if sep and not version.isdigit():
        raise UsageError(f"give NAME or NAME@VERSION, got {text!r}")
    return name, int(version) if sep else 0


def _resize(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit() or not int(height) * int(width):
        raise UsageError(f"--resize takes HxW, e.g. 32x32; got {text!r}")
    return int(height), int(width)


class UploadProgress:
    """A one-line bar of the bytes sent."""

    def __init__(self, out=sys.stderr) -> None:
        self._out = out

    def __call__(self, sent: int, total: int) -> None:
        width = 30
        filled = int(width * sent / max(1, total))
        self._out.write(
            f"\r  uploading [{'#' * filled}{'-' * (width - filled)}] "
            f"{sent / 1e6:.1f}/{total / 1e6:.1f} MB"
        )
        if sent >= total:
            self._out.write("\n  checking and storing it...\n")
        self._out.flush()


def describe_dataset(d: datasets_pb2.Dataset) -> list[str]:
    """What `mlmesh datasets show` prints of a version."""
    kind = "images" if d.kind == datasets_pb2.DATASET_KIND_IMAGES else "table"
    if kind == "images":
        shape = f"{d.height}x{d.width}, {'RGB' if d.channels == 3 else 'grey'}"
    else:
        shape = f"{len(d.columns)} feature columns, label {d.label_column!r}"
    split = d.splits
    lines = [
        f"{d.name}@{d.version}{' (built in)' if d.builtin else ''}: {d.samples} {kind} ({shape})",
        f"  classes ({len(d.classes)}): "
        + ", ".join(f"{c.name} {c.count}" for c in d.classes[:20])
        + (" ..." if len(d.classes) > 20 else ""),
        f"  split: train {split.train}, validation {split.validation}, test {split.test}"
        f" ({'from the upload' if split.from_upload else 'stratified, seeded'})",
    ]
    if d.columns:
        lines.append("  columns: " + ", ".join(f"{c.name} ({c.type})" for c in d.columns))
    if not d.builtin:
        lines.append(
            f"  digest {d.digest[:16]}..., {d.size_bytes} bytes from {d.filename!r}, "
            f"MLflow run {d.mlflow_run_id}"
        )
    return lines


def _datasets_upload(args: argparse.Namespace) -> None:
    if not os.path.isfile(args.path):
        raise UsageError(f"{args.path} is not a file")
    with _client(args) as mesh:
        answer = mesh.upload_dataset(
            args.name,
            args.path,
            label_column=args.label,
            format=args.format,
            resize=_resize(args.resize),
            validation_fraction=args.validation_fraction,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            on_progress=UploadProgress(),
        )
    print("\n".join(describe_dataset(answer.dataset)))
    if not answer.created:
        print("  (identical bytes and options: the version made before)")


def _datasets_list(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        for d in mesh.list_datasets():
            print(describe_dataset(d)[0])


def _datasets_show(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        print("\n".join(describe_dataset(mesh.get_dataset(*_reference(args.reference)))))


def _datasets_delete(args: argparse.Namespace) -> None:
    name, version = _reference(args.reference)
    if not version:
        raise UsageError("name the version to delete: NAME@VERSION")
    with _client(args) as mesh:
        gone = mesh.delete_dataset_version(name, version)
    print(f"deleted {gone.name}@{gone.version}")


def _audit(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        for e in mesh.list_audit_events(args.model, args.limit):
            when = e.time.ToDatetime().isoformat(timespec="seconds")
            # A rollout's events move no stage: their note says what happened.
            change = f"{e.from_stage} -> {e.to_stage}" if e.to_stage else e.note
            print(f"{when}  {e.client:<12} {e.action} {e.model_name} v{e.version}: {change}")


def _predict(args: argparse.Namespace) -> None:
    label = None
    with _client(args) as mesh:
        if args.image is not None:
            try:
                image = read_image_file(
                    args.image, invert=args.invert, resize=_resize(args.resize), mode=args.colour
                )
            except ImageError as err:
                raise UsageError(str(err)) from None
            shape = None
        else:
            if args.invert or args.resize or args.colour:
                raise UsageError("--invert, --resize and --colour are for --image")
            name, version = _reference(args.dataset)
            sample = mesh.dataset_sample(name, args.index, version=version, split=args.split)
            d = sample.dataset
            if d.kind != datasets_pb2.DATASET_KIND_IMAGES:
                raise UsageError(
                    f"{d.name}@{d.version} is a table; ask a table model through the Open "
                    "Inference Protocol (see the README)"
                )
            image, shape = np.asarray(sample.pixels, np.float32), (d.height, d.width, d.channels)
            label = (sample.label, sample.class_name)
        answer = mesh.predict(image, model_name=args.model, model_version=args.version, shape=shape)

    def named(index: int, name: str) -> str:
        return str(index) if not name or name == str(index) else f"{index} ({name})"

    prediction = named(answer.prediction, answer.class_name)
    print(f"prediction: {prediction}  confidence {answer.confidence:.4f}")
    print(f"model:      {answer.model_name} v{answer.model_version}")
    print(f"cached:     {str(answer.cached).lower()}")
    if label is not None:
        verdict = "right" if label[0] == answer.prediction else "wrong"
        print(f"true label: {named(*label)}  ({verdict})")


class Progress:
    """A one-line progress bar for batches, and a line per finished epoch."""

    def __init__(self, out=sys.stderr) -> None:
        self._out = out

    def __call__(self, event) -> None:
        kind = event.WhichOneof("event")
        if kind == "queued":
            self._line(f"job {event.job_id} queued")
        elif kind == "started":
            s = event.started
            self._line(f"started (attempt {s.attempt}) on {s.device}; MLflow run {s.mlflow_run_id}")
        elif kind == "batch_progress":
            b = event.batch_progress
            width = 30
            filled = int(width * b.batch / max(1, b.total_batches))
            bar = "#" * filled + "-" * (width - filled)
            self._out.write(
                f"\r  epoch {b.epoch} [{bar}] {b.batch}/{b.total_batches} loss {b.train_loss:.4f}"
            )
            self._out.flush()
        elif kind == "epoch_completed":
            e = event.epoch_completed
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(e.metrics.items()))
            self._line(f"epoch {e.epoch}/{e.total_epochs}: {metrics}")
        elif kind == "succeeded":
            s = event.succeeded
            self._line(
                f"succeeded: run {s.mlflow_run_id}, {s.model_name} v{s.model_version}, "
                f"test_accuracy {s.metrics.get('test_accuracy', float('nan')):.4f}"
            )
        elif kind == "failed":
            self._line(f"failed: {event.failed.error}")
        elif kind == "cancelled":
            self._line(f"cancelled by {event.cancelled.cancelled_by or 'someone'}")

    def _line(self, text: str) -> None:
        self._out.write("\r\033[K" + text + "\n")
        self._out.flush()


# The options of `mlmesh train` and `mlmesh sweep` are their request's fields: names, types
# and enum choices come from the messages (a new field is a new option), and defaults and
# bounds stay the service's, which names a bad value in its INVALID_ARGUMENT. Declared here
# only: the shorter flags some fields also take.
SHORT_FLAGS = {
    "learning_rate": "--lr",
    "experiment_name": "--experiment",
    "model_name": "--model",
    "max_trials": "--trials",
    "objective_metric": "--objective",
}
_OPTION_TYPES = {
    FieldDescriptor.CPPTYPE_INT32: (int, "N"),
    FieldDescriptor.CPPTYPE_INT64: (int, "N"),
    FieldDescriptor.CPPTYPE_UINT32: (int, "N"),
    FieldDescriptor.CPPTYPE_UINT64: (int, "N"),
    FieldDescriptor.CPPTYPE_DOUBLE: (float, "X"),
    FieldDescriptor.CPPTYPE_FLOAT: (float, "X"),
    FieldDescriptor.CPPTYPE_STRING: (str, "TEXT"),
}


def _enum_prefix(field: FieldDescriptor) -> str:
    # Every enum's value 0 is <ENUM>_UNSPECIFIED (buf lint), so that names the prefix.
    return field.enum_type.values_by_number[0].name.removesuffix("UNSPECIFIED")


def _option_fields(message: type[Message]) -> list[FieldDescriptor]:
    """The fields of ``message`` an option sets: scalars and enums (not lists, maps or
    messages, which a command spells its own way)."""
    return [f for f in message.DESCRIPTOR.fields if f.message_type is None and not f.is_repeated]


def add_field_options(parser: argparse.ArgumentParser, message: type[Message]) -> None:
    """An option for each scalar or enum field of ``message``: --field-name (and its short
    flag), of the field's type; an enum's choices are its values' short names."""
    for field in _option_fields(message):
        flags = [f"--{field.name.replace('_', '-')}"]
        if field.name in SHORT_FLAGS:
            flags.append(SHORT_FLAGS[field.name])
        if field.enum_type is not None:
            prefix = _enum_prefix(field)
            choices = [v.name.removeprefix(prefix).lower() for v in field.enum_type.values[1:]]
            parser.add_argument(*flags, dest=field.name, type=str.lower, choices=choices)
        elif field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
            parser.add_argument(*flags, dest=field.name, action="store_true", default=None)
        else:
            kind, metavar = _OPTION_TYPES[field.cpp_type]
            parser.add_argument(*flags, dest=field.name, type=kind, metavar=metavar)


def field_values(args: argparse.Namespace, message: type[Message]) -> dict[str, object]:
    """The fields of ``message`` the command line gave (enums by their full names)."""
    values: dict[str, object] = {}
    for field in _option_fields(message):
        value = getattr(args, field.name, None)
        if value is None:
            continue
        if field.enum_type is not None:
            value = _enum_prefix(field) + str(value).upper()
        values[field.name] = value
    return values


def _train(args: argparse.Namespace) -> None:
    fields = field_values(args, training_pb2.SubmitTrainingJobRequest)
    with _client(args) as mesh:
        job = mesh.train(on_event=Progress(), **fields)
    if job.state != training_pb2.JOB_STATE_SUCCEEDED:
        sys.exit(1)


def parse_space(text: str) -> tuple[str, dict]:
    """One ``--param`` of `mlmesh sweep`: NAME=SPEC, where SPEC is a choice list (``a,b,c``),
    ``log:LOW:HIGH`` or ``range:LOW:HIGH`` (continuous), or ``int:LOW:HIGH[:STEP]``."""
    name, sep, spec = text.partition("=")
    if not sep or not name.strip() or not spec.strip():
        raise UsageError(f"--param must be NAME=SPEC, got {text!r}")
    kind, _, rest = spec.partition(":")
    parts = rest.split(":")
    try:
        if kind in ("log", "range") and len(parts) == 2:
            scale = "SCALE_LOG" if kind == "log" else "SCALE_LINEAR"
            low, high = (float(p) for p in parts)
            return name.strip(), {"range": {"low": low, "high": high, "scale": scale}}
        if kind == "int" and len(parts) in (2, 3):
            low, high, *step = (int(p) for p in parts)
            return name.strip(), {"int_range": {"low": low, "high": high, "step": (step or [1])[0]}}
    except ValueError:
        raise UsageError(f"--param {name}: bad number in {spec!r}") from None
    if kind in ("log", "range", "int"):
        raise UsageError(
            f"--param {name}: {kind} takes LOW:HIGH{'[:STEP]' if kind == 'int' else ''}"
        )

    def value(v: str) -> float | str:
        try:
            return float(v)
        except ValueError:
            return v.strip()

    return name.strip(), {"choice": {"values": [value(v) for v in spec.split(",")]}}


def _value(v) -> str:
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        return f"{v.number_value:g}"
    return str(getattr(v, kind)) if kind else ""


class SweepTable:
    """The live table of a sweep's trials, redrawn in place on a terminal at every event."""

    def __init__(self, out=sys.stdout, live: bool | None = None) -> None:
        self._out = out
        self._live = out.isatty() if live is None else live
        self._drawn = 0
        self.trials: dict[int, dict] = {}
        self.best: int | None = None
        self.status = ""

    def __call__(self, event) -> None:
        kind = event.WhichOneof("event")
        if kind == "queued":
            self.status = f"sweep {event.sweep_id} queued"
        elif kind == "trial_started":
            e = event.trial_started
            row = self.trials.setdefault(e.trial_number, {})
            params = ", ".join(f"{k}={_value(v)}" for k, v in sorted(e.params.items()))
            row.update(state="running", params=params, epoch="", value=None)
            self.status = f"sweep {event.sweep_id} running"
        elif kind == "trial_epoch":
            e = event.trial_epoch
            row = self.trials.setdefault(e.trial_number, {"state": "running", "params": ""})
            row.update(epoch=f"{e.epoch}/{e.total_epochs}", value=e.value)
        elif kind == "trial_ended":
            e = event.trial_ended
            row = self.trials.setdefault(e.trial_number, {"params": "", "epoch": ""})
            state = sweep_pb2.TrialState.Name(e.state).removeprefix("TRIAL_STATE_").lower()
            row.update(state=state, value=e.value if e.HasField("value") else None)
            if e.error:
                row["params"] += f"  ({e.error[:60]})"
        elif kind == "new_best":
            self.best = event.new_best.trial_number
        elif kind == "succeeded":
            s = event.succeeded
            accuracy = s.metrics.get("test_accuracy", float("nan"))
            self.status = (
                f"done: best trial {s.best_trial} ({s.best_value:.4f}), test_accuracy "
                f"{accuracy:.4f}; registered {s.model_name} v{s.model_version}"
            )
        elif kind == "failed":
            self.status = f"failed: {event.failed.error}"
        elif kind == "cancelled":
            self.status = f"cancelled by {event.cancelled.cancelled_by or 'someone'}"
        if self._live:
            self.draw()
        elif kind == "trial_ended":  # not a terminal: a line per finished trial
            n = event.trial_ended.trial_number
            self._out.write(self._row(n, self.trials[n]) + "\n")
        elif kind in ("succeeded", "failed", "cancelled"):
            self._out.write("\n".join(self.render()) + "\n")

    def _row(self, number: int, row: dict) -> str:
        value = row.get("value")
        shown = f"{value:.4f}" if value is not None else "-"
        star = "*" if number == self.best else " "
        return (
            f"{star}{number:>5}  {row.get('state', ''):<10} {row.get('epoch', ''):>6}  "
            f"{shown:>9}  {row.get('params', '')}"
        )

    def render(self) -> list[str]:
        lines = [f" {'trial':>5}  {'state':<10} {'epoch':>6}  {'objective':>9}  params"]
        lines += [self._row(n, r) for n, r in sorted(self.trials.items())]
        lines.append(self.status)
        return lines

    def draw(self) -> None:
        lines = self.render()
        if self._drawn:
            self._out.write(f"\033[{self._drawn}F\033[J")
        self._out.write("\n".join(lines) + "\n")
        self._out.flush()
        self._drawn = len(lines)


def _sweep(args: argparse.Namespace) -> None:
    if not args.param:
        raise UsageError("give at least one --param NAME=SPEC to search")
    fields = field_values(args, sweep_pb2.SubmitSweepRequest)
    fields["search_space"] = dict(parse_space(p) for p in args.param)
    if args.prune != "none":
        stopping = {"warmup_epochs": args.warmup_epochs, "startup_trials": args.startup_trials}
        fields["early_stopping"] = {
            "pruner": f"PRUNER_{args.prune.upper()}",
            **{k: v for k, v in stopping.items() if v is not None},
        }
    table = SweepTable()
    with _client(args) as mesh:
        sweep = mesh.sweep(on_event=table, **fields)
    if sweep.state != sweep_pb2.SWEEP_STATE_SUCCEEDED:
        sys.exit(1)


UP_MOVED = (
    "moved to the server: the mesh is started by `mlmesh-server up` (or `make up`) "
    "in a checkout installed with `make install`; this package (mlmesh-client) only talks to a "
    "running mesh"
)


def _figures(f: registry_pb2.VersionFigures) -> str:
    accuracy = f"{f.accuracy:.3f} of {f.feedback}" if f.HasField("accuracy") else "-"
    return (
        f"v{f.version}: {f.requests} req, errors {f.error_rate:.1%}, p99 "
        f"{f.p99_latency_ms:g} ms, accuracy {accuracy}"
    )


def describe_rollout(r: registry_pb2.Rollout) -> list[str]:
    """A rollout in a few lines: what, where it stands, both versions' figures, the decision."""
    mode = registry_pb2.RolloutMode.Name(r.mode).removeprefix("ROLLOUT_MODE_").lower()
    state = registry_pb2.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_").lower()
    share = f" at {r.weight}%" if r.mode == registry_pb2.ROLLOUT_MODE_CANARY else ""
    lines = [
        f"{r.rollout_id}  {r.model_name}: {mode} of v{r.candidate_version}{share} against "
        f"v{r.production_version}  [{state}]",
        f"  production {_figures(r.production)}",
        f"  candidate  {_figures(r.candidate)}",
    ]
    if r.mode == registry_pb2.ROLLOUT_MODE_SHADOW:
        agreement = f"{r.shadow.agreement:.3f}" if r.shadow.HasField("agreement") else "-"
        lines.append(
            f"  shadow     agreement {agreement} over {r.shadow.compared}, dropped "
            f"{r.shadow.dropped}"
        )
    if r.HasField("decision"):
        lines.append(f"  decision   {r.decision.guard}: {r.decision.message}")
    return lines


def _rollout_start(args: argparse.Namespace) -> None:
    guards = {
        name: value
        for name, value in (
            ("min_requests", args.min_requests),
            ("max_error_rate", args.max_error_rate),
            ("max_p99_latency_ms", args.max_p99_ms),
            ("max_p99_latency_ratio", args.max_p99_ratio),
            ("min_agreement", args.min_agreement),
            ("max_accuracy_drop", args.max_accuracy_drop),
            ("min_feedback", args.min_feedback),
        )
        if value is not None
    }
    steps = [int(w) for w in args.steps.split(",") if w.strip()] if args.steps else []
    with _client(args) as mesh:
        rollout = mesh.start_rollout(
            args.name,
            args.version,
            mode="shadow" if args.shadow else "canary",
            weight=args.canary or 0,
            weight_steps=steps,
            step_interval_s=args.every,
            **guards,
        )
        print("\n".join(describe_rollout(rollout)))
        if args.watch:
            _follow(mesh, rollout.rollout_id)


def _follow(mesh: Client, rollout_id: str) -> None:
    for answer in mesh.watch_rollout(rollout_id):
        print("\n".join(describe_rollout(answer.rollout)), flush=True)


def _rollout_id(mesh: Client, args: argparse.Namespace) -> str:
    """The rollout ID names, or the newest of --model."""
    if args.rollout_id:
        return args.rollout_id
    if not args.model:
        raise UsageError("give a rollout ID or --model NAME (its newest rollout)")
    found = mesh.list_rollouts(args.model)
    if not found:
        raise UsageError(f"model {args.model!r} has no rollout")
    return found[0].rollout_id


def _rollout_watch(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        _follow(mesh, _rollout_id(mesh, args))


def _rollout_show(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        print("\n".join(describe_rollout(mesh.get_rollout(_rollout_id(mesh, args)))))


def _rollout_list(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        for rollout in mesh.list_rollouts(args.model):
            print(describe_rollout(rollout)[0])


def _rollout_promote(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        print("\n".join(describe_rollout(mesh.promote_rollout(args.rollout_id))))


def _rollout_abort(args: argparse.Namespace) -> None:
    with _client(args) as mesh:
        print("\n".join(describe_rollout(mesh.abort_rollout(args.rollout_id, args.reason))))


def _feedback(args: argparse.Namespace) -> None:
    pairs = list(args.labels)
    if args.file:
        with open(args.file, encoding="utf-8") as lines:
            pairs += [line.strip().replace(",", "=") for line in lines if line.strip()]
    labels = []
    for pair in pairs:
        pid, _, label = pair.partition("=")
        if not pid or not label.strip().isdigit():
            raise UsageError(f"{pair!r} is not PREDICTION_ID=LABEL (a class index)")
        labels.append((pid, int(label)))
    if not labels:
        raise UsageError("give PREDICTION_ID=LABEL pairs or --file")
    with _client(args) as mesh:
        done = mesh.submit_feedback(labels)
    print(f"recorded {done.recorded} labels, {done.correct} of them answered right")
    for pid in done.unknown_ids:
        print(f"unknown (expired, never issued, or labelled before): {pid}")


def _up(_: argparse.Namespace) -> None:
    pass  # the server side, only for `up`


def _up(_: argparse.Namespace) -> None:
    raise UsageError(UP_MOVED)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlmesh", description=__doc__)
    parser.add_argument(
        "--gateway", help="gateway host:port (default $MLMESH_GATEWAY or 127.0.0.1:8000)"
    )
    parser.add_argument(
        "--api-key",
        help="API key (default $MLMESH_API_KEY); write --api-key=KEY for a key that starts "
        'with "-"',
    )
    parser.add_argument(
        "--tls", action="store_true", help="the gateway speaks TLS (trust the system's CAs)"
    )
    parser.add_argument(
        "--ca-file",
        help="PEM CA to trust for the gateway's TLS (implies --tls; default "
        "$MLMESH_GATEWAY_CA_FILE)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="each call's deadline (0: none; default %(default)g); a stream (train's, sweep's "
        "watching) and an upload have none",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("up", help="moved to the server: `mlmesh-server up`").set_defaults(run=_up)
    p = commands.add_parser("experiments", help="list experiments")
    p.add_argument("--filter", default="", help="MLflow filter, e.g. \"name LIKE 'mnist%%'\"")
    p.set_defaults(run=_experiments)
    p = commands.add_parser("models", help="list registered models and their aliases")
    p.add_argument("--filter", default="", help="MLflow filter")
    p.set_defaults(run=_models)
    p = commands.add_parser("versions", help="list a model's versions")
    p.add_argument("name")
    p.set_defaults(run=_versions)
    p = commands.add_parser(
        "train",
        help="train a model and follow it live (needs an API key)",
        description="Train a model and follow it live. Each option sets the "
        "SubmitTrainingJobRequest field of its name (--lr: learning_rate, --experiment: "
        "experiment_name, --model: model_name); the service gives the rest its defaults and "
        "names a value out of bounds. Example: --epochs 1 --train-subset 5000",
    )
    add_field_options(p, training_pb2.SubmitTrainingJobRequest)
    p.set_defaults(run=_train)
    p = commands.add_parser(
        "sweep",
        help="search hyperparameters, trials spread over the workers (needs an API key)",
        description="Run a hyperparameter sweep with a live table of its trials; the best "
        "trial's model is registered. Each option sets the SubmitSweepRequest field of its "
        "name (--trials: max_trials, --objective: objective_metric, and as for train); "
        "--param adds to search_space, --prune and the two after it set early_stopping. "
        "Example: --param learning_rate=log:1e-4:1e-2 --param optimizer=adam,sgd "
        "--param batch_size=int:32:256:32",
    )
    p.add_argument(
        "--param",
        action="append",
        metavar="NAME=SPEC",
        help="a searched parameter: NAME=a,b,c | log:LOW:HIGH | range:LOW:HIGH | "
        "int:LOW:HIGH[:STEP]",
    )
    p.add_argument("--prune", choices=("median", "successive_halving", "none"), default="median")
    p.add_argument("--warmup-epochs", type=int, help="epochs before pruning")
    p.add_argument("--startup-trials", type=int, help="trials before pruning")
    add_field_options(p, sweep_pb2.SubmitSweepRequest)
    p.set_defaults(run=_sweep)
    p = commands.add_parser("promote", help="move a version to a stage (needs an API key)")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--stage", default="Production", help="Production, Staging or Archived")
    p.add_argument("--archive-existing", action="store_true", help="archive the previous holders")
    p.add_argument(
        "--force",
        action="store_true",
        help="promote even a version worse than production on the promotion metric, or move "
        "the production version elsewhere (leaving the model without one)",
    )
    p.set_defaults(run=_promote)
    p = commands.add_parser(
        "predict",
        help="classify an image file or a test image (needs an API key)",
        description="Classify one image with a registered model and say which version answered.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--image",
        metavar="PATH",
        help="a picture (PNG, JPEG, ...), at its own size unless --resize; or a .npy array",
    )
    source.add_argument(
        "--index", type=int, metavar="N", help="sample N of a dataset's split (see --dataset)"
    )
    p.add_argument(
        "--dataset",
        default="mnist",
        help="NAME or NAME@VERSION: the dataset --index reads (default mnist)",
    )
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--resize", default="", help="HxW: resize the picture, e.g. 28x28")
    p.add_argument(
        "--colour", default="", choices=("grey", "rgb"), help="make the picture grey or RGB"
    )
    p.add_argument(
        "--invert",
        action="store_true",
        help="the picture is dark on light (MNIST is light on dark)",
    )
    p.add_argument("--model", default="", help="registered model (default: the service's)")
    p.add_argument(
        "--version", default="", help="version number or alias (default: the production version)"
    )
    p.set_defaults(run=_predict)
    p = commands.add_parser("audit", help="show the newest registry changes (needs an API key)")
    p.add_argument("--model", default="", help="only this registered model")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(run=_audit)

    p = commands.add_parser("datasets", help="upload, list and show datasets (needs an API key)")
    datasets = p.add_subparsers(dest="datasets_command", required=True)
    d = datasets.add_parser(
        "upload",
        help="upload a file as a new version of a dataset",
        description="Upload a zip or tar of one folder of images per class, a CSV or Parquet "
        "table (with --label), or an .npz of x and y. The server checks it and says what it "
        "found; identical bytes give back the version they made before.",
    )
    d.add_argument("name")
    d.add_argument("path")
    d.add_argument("--label", default="", help="a table's label column")
    d.add_argument(
        "--format",
        default="",
        choices=[f for f in DATASET_FORMATS if f],
        help="how to read the file (default: from its content)",
    )
    d.add_argument("--resize", default="", help="HxW: resize every image, e.g. 32x32")
    d.add_argument("--validation-fraction", type=float, default=0.0)
    d.add_argument("--test-fraction", type=float, default=0.0)
    d.add_argument("--split-seed", type=int, default=0)
    d.set_defaults(run=_datasets_upload)
    datasets.add_parser("list", help="every dataset's latest version").set_defaults(
        run=_datasets_list
    )
    d = datasets.add_parser("show", help="one version: NAME or NAME@VERSION")
    d.add_argument("reference")
    d.set_defaults(run=_datasets_show)
    d = datasets.add_parser("delete", help="delete NAME@VERSION (not while a job uses it)")
    d.add_argument("reference")
    d.set_defaults(run=_datasets_delete)

    p = commands.add_parser(
        "rollout",
        help="canary and shadow rollouts of a candidate version (needs an API key)",
    )
    rollout = p.add_subparsers(dest="rollout_command", required=True)
    r = rollout.add_parser(
        "start",
        help="start a rollout of NAME's VERSION against production",
        description="Send a share of the traffic (--canary PERCENT) or a copy of it "
        "(--shadow) to a candidate version; the guards decide: it is promoted when they all "
        "hold over --min-requests, rolled back when one breaks.",
    )
    r.add_argument("name")
    r.add_argument("version", type=int)
    how = r.add_mutually_exclusive_group(required=True)
    how.add_argument("--canary", type=int, metavar="PERCENT", help="the candidate's share, 1-99")
    how.add_argument("--shadow", action="store_true", help="compute every request on it too")
    r.add_argument("--steps", default="", help="later canary weights, e.g. 50,80")
    r.add_argument("--every", type=float, default=0.0, help="seconds between weight steps")
    r.add_argument("--min-requests", type=int, help="requests before any decision")
    r.add_argument("--max-error-rate", type=float, help="0 to 1")
    r.add_argument("--max-p99-ms", type=float, help="largest p99 latency, ms")
    r.add_argument("--max-p99-ratio", type=float, help="largest p99 relative to production")
    r.add_argument("--min-agreement", type=float, help="shadow: lowest agreement, 0 to 1")
    r.add_argument("--max-accuracy-drop", type=float, help="live accuracy below production")
    r.add_argument("--min-feedback", type=int, help="labels each version needs first")
    r.add_argument("--watch", action="store_true", help="follow it until it ends")
    r.set_defaults(run=_rollout_start)
    for verb, run, what in (
        ("watch", _rollout_watch, "follow a rollout live until it ends"),
        ("show", _rollout_show, "one rollout with its figures"),
    ):
        r = rollout.add_parser(verb, help=what)
        r.add_argument("rollout_id", nargs="?", default="")
        r.add_argument("--model", default="", help="the newest rollout of this model")
        r.set_defaults(run=run)
    for verb, run, what in (
        ("promote", _rollout_promote, "promote the candidate now"),
        ("abort", _rollout_abort, "end the rollout; production keeps serving"),
    ):
        r = rollout.add_parser(verb, help=what)
        r.add_argument("rollout_id")
        if verb == "abort":
            r.add_argument("--reason", default="")
        r.set_defaults(run=run)
    r = rollout.add_parser("list", help="rollouts, newest first")
    r.add_argument("--model", default="", help="only this registered model")
    r.set_defaults(run=_rollout_list)
    p = commands.add_parser(
        "feedback",
        help="true labels of earlier answers, by prediction_id (needs an API key)",
    )
    p.add_argument("labels", nargs="*", metavar="PREDICTION_ID=LABEL")
    p.add_argument("--file", help="a file of PREDICTION_ID,LABEL lines")
    p.set_defaults(run=_feedback)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UsageError as err:
        print(f"mlmesh {args.command}: {err}", file=sys.stderr)
        sys.exit(2)
    except MeshError as err:
        print(f"mlmesh: {err}", file=sys.stderr)
        sys.exit(1)
