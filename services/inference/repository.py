"""Which model version answers, and the versions held in memory.

A request names a registered model (or gets the configured default) and a version: a number,
an alias, or nothing for ``production``. Aliases resolve through a table this replica keeps
current in three ways: a lookup on first use, the Registry's model events on Redis (a
transition re-resolves the model's aliases at once), and a periodic re-read that covers a
missed event. The production and staging aliases are read where mlmesh recorded them (the
audit log, services/common/aliases.py), so a change made in MLflow around mlmesh is not
served; with MLMESH_INFERENCE_FOLLOW_MLFLOW_ALIASES they, like every other alias, are read
from MLflow. A moved alias switches only once its new version is loaded, so no request waits
for a load and none fails during the switch. Loaded versions live in a small LRU; each is
loaded once, off the event loop, however many requests ask for it meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import asyncpg
import mlflow.artifacts
import mlflow.models
import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.aliases import STAGE_OF_ALIAS, recorded_alias
from services.common.errors import FailedPrecondition, InvalidArgument, MeshError, NotFound
from services.common.events import MODEL_EVENTS_CHANNEL
from services.common.mlflow_store import MlflowStore, mlflow_errors
from services.common.model_contract import (
    DRIFT_REFERENCE,
    ModelContract,
    contract_of,
    parse_drift_reference,
)
from services.common.settings import Settings
from services.inference import metrics
from services.inference.batching import Batcher
from services.inference.drift import DriftMonitor
from services.inference.runtime import (
    CUDA,
    ModelRaised,
    Runtime,
    check_answers,
    load_runtime,
    resolve_device,
)

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
# Absent aliases remembered at most (a caller inventing alias names must not grow memory).
MAX_UNSET_ALIASES = 1000


Forward = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class LoadedModel:
    """One model version in memory: its contract, runtime, batcher and drift monitors."""

    name: str
    version: int
    run_id: str
    runtime: Runtime
    contract: ModelContract
    batcher: Batcher
    drift: dict[str, DriftMonitor] = field(default_factory=dict)  # by input name
    size_bytes: int = 0
    _exported: set[str] = field(default_factory=set)  # drift monitors in the metrics

    @cached_property
    def labels(self) -> tuple[str, str]:
        return self.name, str(self.version)

    @cached_property
    def cache_scope(self) -> str:
        """What identifies this version's answers in the prediction cache."""
        return f"{self.name}:{self.version}:{self.run_id}"

    def observe(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Feed the drift monitors (inputs with a reference). Their gauges appear with the
        first rows and read the monitor when scraped: the score is computed per scrape, not
        per request."""
        for name, monitor in self.drift.items():
            monitor.observe(inputs[name])
            if name not in self._exported:
                self._exported.add(name)
                metrics.INPUT_DRIFT.labels(*self.labels, name).set_function(monitor.score)
                metrics.DRIFT_WINDOW.labels(*self.labels, name).set_function(
                    lambda monitor=monitor: monitor.rows
                )

    def forget_metrics(self) -> None:
        metrics.MODELS_LOADED.remove(*self.labels, self.runtime.kind)
        for name in self.drift:
            for gauge in (metrics.INPUT_DRIFT, metrics.DRIFT_WINDOW):
                try:
                    gauge.remove(*self.labels, name)
                except KeyError:  # never observed
                    pass


def forward_of(runtime: Runtime, contract: ModelContract) -> Forward:
    """The forward pass the batcher runs: the runtime, its answers checked against the
    contract, and any failure of the model's own code as ModelRaised."""
    batched = contract.batched

    def forward(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(inputs.values()))) if batched else None
        try:
            answers = runtime(inputs)
        except Exception as exc:
            raise ModelRaised(f"{type(exc).__name__}: {exc}") from exc
        return check_answers(answers, contract, rows)

    return forward


def parse_version(reference: str) -> int | str:
    """A request's model_version: "" (production), a number, or an alias name."""
    reference = reference.strip()
    if not reference:
        return DEFAULT_ALIAS
    if reference.isdigit():
        version = int(reference)
        if version < 1:
            raise InvalidArgument(f"model_version must be 1 or more, got {reference!r}")
        return version
    if reference.lstrip("-").isdigit():
        raise InvalidArgument(f"model_version must be 1 or more, got {reference!r}")
    return reference


class ModelRepository:
    """Resolves (model, version or alias) to a loaded model.

    ``audit_db`` is where the recorded production and staging aliases are read (mlmesh's
    database); without it, or with MLMESH_INFERENCE_FOLLOW_MLFLOW_ALIASES, MLflow's are.
    """

    def __init__(
        self,
        settings: Settings,
        forward_executor: Executor,
        audit_db: asyncpg.Pool | None = None,
    ) -> None:
        self._settings = settings
        self._audit_db = None if settings.inference_follow_mlflow_aliases else audit_db
        self._store = MlflowStore(settings.mlflow_tracking_uri)
        self._forward_executor = forward_executor
        # Where forward passes run (MLMESH_INFERENCE_DEVICE), decided once, at start-up.
        self._device = resolve_device(settings.inference_device)
        self._aliases: dict[tuple[str, str], int] = {}
        self._models: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Task[LoadedModel]] = {}
        # Called with a model's name (None: every model) whenever its aliases are re-read,
        # so that what else follows the Registry (the rollouts) follows it at the same time.
        self.followers: list[Callable[[str | None], Awaitable[None]]] = []

    # -- requests ------------------------------------------------------------------------------

    async def model(self, name: str, reference: str) -> LoadedModel:
        """The loaded model that answers for ``name`` at ``reference`` (number or alias)."""
        version = await self.resolve(name, parse_version(reference))
        return await self.get(name, version)

    async def resolve(self, name: str, reference: int | str) -> int:
        """The version number ``reference`` stands for."""
        if isinstance(reference, int):
            return reference
        key = (name, reference)
        if key in self._aliases:
            version = self._aliases[key]
        else:
            version = await self._lookup_alias(name, reference)
            # Remembered even when absent (None), so an alias that is not there yet costs
            # no MLflow call per request; events and the periodic check fill it in.
            if version is not None or len(self._aliases) < MAX_UNSET_ALIASES:
                self._set_alias(name, reference, version)
        if version is None:
            raise _no_such_alias(name, reference)
        return version

    async def get(self, name: str, version: int) -> LoadedModel:
        """Version ``version`` of ``name``, loading it when it is not held yet."""
        key = (name, version)
        model = self._models.get(key)
        if model is not None:
            self._models.move_to_end(key)
            return model
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(name, version), name=f"load {name} v{version}")
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        # shield: a caller that goes away must not cancel a load other callers wait for
        return await asyncio.shield(task)

    def production_version(self, name: str) -> int | None:
        """The version this replica serves as ``name``'s production (None: not known yet)."""
        return self._aliases.get((name, DEFAULT_ALIAS))

    def holds(self, name: str, version: int) -> bool:
        """Whether version ``version`` of ``name`` is in memory."""
        return (name, version) in self._models

    async def is_loaded(self, name: str, reference: str) -> bool:
        """Whether the version ``reference`` stands for is in memory (nothing is loaded);
        False too for a model, version or alias that does not exist."""
        try:
            version = await self.resolve(name, parse_version(reference))
        except (NotFound, FailedPrecondition):
            return False
        return self.holds(name, version)

    async def versions(self, name: str) -> list[int]:
        """The registered versions of ``name``, newest first; NotFound for an unknown model."""
        page = await asyncio.to_thread(self._store.list_model_versions, name, 1000, "")
        return [int(v.version) for v in page.items]

    # -- keeping aliases current ---------------------------------------------------------------

    async def refresh(self, name: str | None = None) -> None:
        """Re-resolve the aliases in use (of ``name``, or all); switch each moved alias once
        its new version is loaded."""
        for (model_name, alias), current in list(self._aliases.items()):
            if name is not None and model_name != name:
                continue
            try:
                version = await self._lookup_alias(model_name, alias)
            except MeshError as exc:
                log.warning("could not re-read alias %s of %s: %s", alias, model_name, exc)
                continue
            if version == current:
                continue
            if version is None:
                self._set_alias(model_name, alias, None)
                log.info("alias %s of %s was removed", alias, model_name)
                continue
            try:
                await self.get(model_name, version)  # load first, then switch
            except MeshError as exc:
                log.error(
                    "alias %s of %s moved to v%d, which cannot be loaded: %s",
                    alias,
                    model_name,
                    version,
                    exc,
                )
                continue
            self._set_alias(model_name, alias, version)
            metrics.ALIAS_SWITCHES.labels(model_name, alias).inc()
            log.info("%s@%s now serves v%d (was %s)", model_name, alias, version, current)
        for follower in self.followers:
            await follower(name)

    async def warm(self, name: str) -> None:
        """Load the production version of ``name`` at start-up, if it has one."""
        try:
            model = await self.model(name, "")
        except MeshError as exc:
            log.info("nothing to warm up for %s yet: %s", name, exc)
            return
        log.info("warmed up %s v%d (%s)", name, model.version, model.runtime.kind)

    async def follow_events(self, redis: Redis) -> None:
        """Refresh a model's aliases whenever the Registry announces a transition of it."""
        while True:
            try:
                async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(MODEL_EVENTS_CHANNEL)
                    # Events may have been missed while (re)connecting.
                    await self.refresh()
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        name = _event_model(message.get("data")) if message else None
                        if name is not None:
                            await self.refresh(name)
            except (RedisError, OSError) as exc:
                log.warning("model events: Redis failed (%s); retrying in 1 s", exc)
                await asyncio.sleep(1.0)

    async def refresh_forever(self, interval_s: float) -> None:
        """The periodic check behind the events."""
        while True:
            await asyncio.sleep(interval_s)
            await self.refresh()  # logs and skips what it cannot re-read

    # -- internals -------------------------------------------------------------------------------

    def _set_alias(self, name: str, alias: str, version: int | None) -> None:
        """Record where ``alias`` points (None: nowhere) and export it."""
        had = self._aliases.get((name, alias))
        self._aliases[(name, alias)] = version
        if version is not None:
            metrics.ALIAS_VERSION.labels(name, alias).set(version)
        elif had is not None:
            metrics.ALIAS_VERSION.remove(name, alias)

    async def _lookup_alias(self, name: str, alias: str) -> int | None:
        """The version ``alias`` points at (recorded by mlmesh for production and staging,
        else in MLflow), or None when the model has no such alias; NotFound when the model
        itself does not exist."""
        if self._audit_db is not None and alias in STAGE_OF_ALIAS:
            version = await recorded_alias(self._audit_db, name, alias)
            if version is None:
                await asyncio.to_thread(self._store.get_registered_model, name)  # NotFound
            return version
        try:
            found = await asyncio.to_thread(self._store.get_model_version_by_alias, name, alias)
        except NotFound:
            await asyncio.to_thread(self._store.get_registered_model, name)  # NotFound if absent
            return None
        return int(found.version)

    async def _load(self, name: str, version: int) -> LoadedModel:
        what = f"model {name!r} version {version}"
        started = time.monotonic()
        found = await asyncio.to_thread(self._store.get_model_version, name, version)
        read = await asyncio.to_thread(self._read, name, version, found.run_id, what)
        s = self._settings
        on_cuda = read.runtime.device == CUDA  # larger batches: settings per device
        model = LoadedModel(
            name=name,
            version=version,
            run_id=found.run_id or "",
            runtime=read.runtime,
            contract=read.contract,
            batcher=Batcher(
                forward_of(read.runtime, read.contract),
                self._forward_executor,
                (s.batch_max_size_cuda if on_cuda else s.batch_max_size)
                if read.contract.batched
                else 1,
                (s.batch_max_wait_ms_cuda if on_cuda else s.batch_max_wait_ms) / 1e3,
                read.runtime.kind,
            ),
            drift={
                input_name: DriftMonitor(feature, s.drift_window_images)
                for input_name, feature in read.reference.items()
            },
            size_bytes=read.size_bytes,
        )
        self._models[(name, version)] = model
        metrics.MODELS_LOADED.labels(*model.labels, read.runtime.kind).set(1)
        metrics.MODEL_LOAD_DURATION.observe(time.monotonic() - started)
        log.info(
            "loaded %s (%s on %s, %.1f MB; %s) in %.2f s",
            what,
            read.runtime.kind,
            read.runtime.device,
            read.size_bytes / 1e6,
            read.contract.describe(),
            time.monotonic() - started,
        )
        await self._evict()
        return model

    async def _evict(self) -> None:
        """Unload least recently used versions while more are held than the count or the
        memory budget allow, sparing those an alias points at while others can go; the
        version loaded last always stays."""
        s = self._settings
        while len(self._models) > 1 and (
            len(self._models) > max(1, s.model_cache_versions)
            or sum(m.size_bytes for m in self._models.values()) > s.model_cache_bytes
        ):
            pinned = {(name, version) for (name, _), version in self._aliases.items()}
            keys = list(self._models)[:-1]
            key = next((k for k in keys if k not in pinned), keys[0])
            model = self._models.pop(key)
            model.forget_metrics()
            await model.batcher.close()
            log.info("unloaded model %r version %d", *key)
        metrics.MODELS_LOADED_BYTES.set(sum(m.size_bytes for m in self._models.values()))

    def _read(self, name: str, version: int, run_id: str | None, what: str) -> _Read:
        """Download ``version``'s model, read its contract, load it, try it on its input
        example, and read its drift reference (blocking)."""
        uri = self._settings.mlflow_tracking_uri
        with tempfile.TemporaryDirectory(prefix="mlmesh-model-") as tmp:
            source = self._store.model_version_download_uri(name, version)
            try:
                with mlflow_errors(f"downloading {what}"):
                    local = Path(
                        mlflow.artifacts.download_artifacts(
                            artifact_uri=source, dst_path=tmp, tracking_uri=uri
                        )
                    )
            except NotFound as exc:  # the version exists; its files do not
                raise FailedPrecondition(
                    f"{what} cannot be served: its files are missing from the artifact store "
                    f"({source}): {exc}"
                ) from exc
            try:
                meta = mlflow.models.Model.load(str(local))
            except Exception as exc:
                raise FailedPrecondition(
                    f"{what} cannot be served: {source} holds no MLflow model "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            contract = contract_of(meta.signature, what, meta.metadata)
            runtime = load_runtime(
                local,
                contract,
                threads=self._settings.inference_threads,
                flavors=self._settings.inference_flavor_list,
                what=what,
                device=self._device,
            )
            _try_example(meta, local, runtime, contract, what)
            size = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
            reference = self._reference(run_id, contract, Path(tmp), what)
        return _Read(runtime, contract, reference, size)

    def _reference(
        self, run_id: str | None, contract: ModelContract, tmp: Path, what: str
    ) -> dict[str, object]:
        """The version's drift reference by input (model_contract.DRIFT_REFERENCE in its run);
        empty when it has none (its inputs' drift is then not measured)."""
        if not run_id:
            return {}
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=DRIFT_REFERENCE,
                dst_path=str(tmp / "reference"),
                tracking_uri=self._settings.mlflow_tracking_uri,
            )
        except Exception as exc:  # absent: served without drift
            log.info("%s has no %s (%s): its inputs' drift is not measured", what,
                     DRIFT_REFERENCE, type(exc).__name__)  # fmt: skip
            return {}
        try:
            return dict(parse_drift_reference(Path(path).read_text(), contract))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s's %s cannot be read (%s); its inputs' drift is not measured",
                        what, DRIFT_REFERENCE, exc)  # fmt: skip
            return {}


@dataclass(frozen=True)
class _Read:
    """What loading a version found."""

    runtime: Runtime
    contract: ModelContract
    reference: dict
    size_bytes: int


def _try_example(
    meta: mlflow.models.Model, local: Path, runtime: Runtime, contract: ModelContract, what: str
) -> None:
    """Run the model once on the input example it was logged with, if any: a version that
    fails on its own example is refused when it loads, not on its first request."""
    try:
        example = meta.load_input_example(str(local))
    except Exception as exc:  # an unreadable example says nothing about the model
        log.warning("%s: its input example cannot be read (%s)", what, exc)
        return
    if example is None:
        return
    inputs = example_inputs(example, contract)
    if inputs is None:
        log.warning("%s: its input example does not fit its signature; not tried", what)
        return
    try:
        forward_of(runtime, contract)(inputs)
    except ModelRaised as exc:
        raise FailedPrecondition(
            f"{what} cannot be served: on its own input example it fails ({exc})"
        ) from exc


def example_inputs(example: object, contract: ModelContract) -> dict[str, np.ndarray] | None:
    """An MLflow input example (a DataFrame, an array or a dict of them) as the contract's
    inputs, or None where it does not fit."""
    try:
        if hasattr(example, "columns"):  # a DataFrame
            columns = {str(c): example[c].to_numpy() for c in example.columns}  # type: ignore[attr-defined]
        elif isinstance(example, Mapping):
            columns = {str(k): np.asarray(v) for k, v in example.items()}
        else:
            columns = {contract.inputs[0].name: np.asarray(example)}
        inputs = {}
        for spec in contract.inputs:
            array = columns[spec.name]
            if spec.datatype == "BYTES":
                flat = [v.encode() if isinstance(v, str) else v for v in array.ravel().tolist()]
                array = np.empty(len(flat), dtype=object)
                array[:] = flat
            else:
                array = array.astype(spec.dtype)
            if len(array.shape) != len(spec.shape):
                return None
            inputs[spec.name] = array
        return inputs
    except (KeyError, ValueError, TypeError, IndexError):
        return None


def _no_such_alias(name: str, alias: str) -> MeshError:
    if alias == DEFAULT_ALIAS:
        return FailedPrecondition(
            f"model {name!r} has no production version yet: promote one with "
            f"`mlmesh promote {name} VERSION` (RegistryService.TransitionModelVersion to "
            "production), or ask for a version number"
        )
    return NotFound(f"model {name!r} has no version with alias {alias!r}")


def _event_model(data: object) -> str | None:
    """The model a Registry event names, or None for anything unreadable."""
    if isinstance(data, bytes):
        data = data.decode(errors="replace")
    try:
        event = json.loads(data) if isinstance(data, str) else None
    except json.JSONDecodeError:
        return None
    name = event.get("model_name") if isinstance(event, dict) else None
    return name if isinstance(name, str) and name else None
