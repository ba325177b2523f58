"""Which model version answers, and the versions held in memory.

A request names a registered model (or gets the configured default) and a version: a number,
an alias, or nothing for ``production``. Aliases resolve through a table this replica keeps
current in three ways: a lookup in MLflow on first use, the Registry's model events on Redis
(a transition re-resolves the model's aliases at once), and a periodic re-read that covers a
missed event. A moved alias switches only once its new version is loaded, so no request waits
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
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import mlflow.artifacts
import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.errors import FailedPrecondition, InvalidArgument, MeshError, NotFound
from services.common.events import MODEL_EVENTS_CHANNEL
from services.common.settings import Settings
from services.inference import metrics
from services.inference.batching import Batcher
from services.inference.drift import DriftMonitor
from services.inference.runtime import Runtime, TensorInfo, load_runtime, model_tensors
from services.registry.store import MlflowStore, mlflow_errors
from services.training.ml.catalog import DATASETS
from services.training.ml.data import load_dataset
from services.training.ml.report import INPUT_REFERENCE, input_reference

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
# Absent aliases remembered at most (a caller inventing alias names must not grow memory).
MAX_UNSET_ALIASES = 1000


@dataclass
class LoadedModel:
    """One model version in memory, with its batcher and drift monitor."""

    name: str
    version: int
    run_id: str
    runtime: Runtime
    batcher: Batcher
    drift: DriftMonitor | None
    input: TensorInfo
    output: TensorInfo

    @property
    def labels(self) -> tuple[str, str]:
        return self.name, str(self.version)

    @property
    def cache_scope(self) -> str:
        """What identifies this version's answers in the prediction cache."""
        return f"{self.name}:{self.version}:{self.run_id}"

    def observe(self, images: np.ndarray) -> None:
        """Feed the drift monitor and export its score."""
        if self.drift is None:
            return
        self.drift.observe(images)
        metrics.INPUT_DRIFT.labels(*self.labels).set(self.drift.score())
        metrics.DRIFT_WINDOW.labels(*self.labels).set(self.drift.images)


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
    """Resolves (model, version or alias) to a loaded model."""

    def __init__(self, settings: Settings, forward_executor: Executor) -> None:
        self._settings = settings
        self._store = MlflowStore(settings.mlflow_tracking_uri)
        self._forward_executor = forward_executor
        self._aliases: dict[tuple[str, str], int] = {}
        self._models: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Task[LoadedModel]] = {}

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
        """The version ``alias`` points at in MLflow, or None when the model has no such
        alias; NotFound when the model itself does not exist."""
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
        runtime, tensors, reference = await asyncio.to_thread(
            self._read, name, version, found.run_id, what
        )
        s = self._settings
        model = LoadedModel(
            name=name,
            version=version,
            run_id=found.run_id or "",
            runtime=runtime,
            batcher=Batcher(
                runtime, self._forward_executor, s.batch_max_size, s.batch_max_wait_ms / 1e3
            ),
            drift=DriftMonitor(reference, s.drift_window_images) if reference is not None else None,
            input=tensors[0],
            output=tensors[1],
        )
        self._models[(name, version)] = model
        metrics.MODELS_LOADED.labels(*model.labels, runtime.kind).set(1)
        metrics.MODEL_LOAD_DURATION.observe(time.monotonic() - started)
        log.info("loaded %s (%s) in %.2f s", what, runtime.kind, time.monotonic() - started)
        await self._evict()
        return model

    async def _evict(self) -> None:
        """Unload least recently used versions beyond the limit, sparing those an alias
        points at while others can go."""
        while len(self._models) > max(1, self._settings.model_cache_versions):
            pinned = {(name, version) for (name, _), version in self._aliases.items()}
            key = next((k for k in self._models if k not in pinned), next(iter(self._models)))
            model = self._models.pop(key)
            metrics.MODELS_LOADED.remove(*model.labels, model.runtime.kind)
            await model.batcher.close()
            log.info("unloaded model %r version %d", *key)

    def _read(
        self, name: str, version: int, run_id: str | None, what: str
    ) -> tuple[Runtime, tuple[TensorInfo, TensorInfo], np.ndarray | None]:
        """Download ``version``'s model, load it, and read its tensors and drift reference
        (blocking)."""
        uri = self._settings.mlflow_tracking_uri
        with tempfile.TemporaryDirectory(prefix="mlmesh-model-") as tmp:
            source = self._store.model_version_download_uri(name, version)
            try:
                with mlflow_errors(f"downloading {what}"):
                    local = mlflow.artifacts.download_artifacts(
                        artifact_uri=source, dst_path=tmp, tracking_uri=uri
                    )
            except NotFound as exc:  # the version exists; its files do not
                raise FailedPrecondition(
                    f"{what} cannot be served: its files are missing from the artifact store "
                    f"({source}): {exc}"
                ) from exc
            runtime = load_runtime(Path(local), self._settings.inference_threads, what)
            tensors = model_tensors(Path(local), what)
            reference = self._reference(run_id, tmp, what)
        return runtime, tensors, reference

    def _reference(self, run_id: str | None, tmp: str, what: str) -> np.ndarray | None:
        """The training inputs' pixel histogram: the one logged with the run, or, when the run
        has none, computed now from the training split of the dataset the run names."""
        if not run_id:
            log.warning("%s has no run; its inputs' drift is not measured", what)
            return None
        uri = self._settings.mlflow_tracking_uri
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=INPUT_REFERENCE,
                dst_path=str(Path(tmp) / "reference"),
                tracking_uri=uri,
            )
            return np.asarray(json.loads(Path(path).read_text())["histogram"], dtype=np.float64)
        except Exception as exc:  # absent or unreadable: compute it, or serve without drift
            absent = f"{type(exc).__name__}: {exc}"
        dataset = self._store.get_run(run_id).data.params.get("dataset", "")
        if dataset not in DATASETS:
            log.warning(
                "%s has no %s (%s) and its run names no known dataset (params.dataset=%r); "
                "its inputs' drift is not measured",
                what, INPUT_REFERENCE, absent, dataset,
            )  # fmt: skip
            return None
        train = load_dataset(dataset, self._settings.data_dir).train
        log.info("%s has no %s: computed it from %s's training split", what, INPUT_REFERENCE,
                 dataset)  # fmt: skip
        reference = input_reference(train.images, train.labels)["histogram"]
        return np.asarray(reference, dtype=np.float64)


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
