"""The Inference domain: validated images in, probabilities out, through cache and batcher.

Every protocol face (mlmesh's Predict RPCs here, the Open Inference Protocol later) calls
``Inference.predict``; caching, batching, model resolution and metrics live only here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.inference import metrics
from services.inference.cache import PredictionCache, cache_key
from services.inference.repository import LoadedModel, ModelRepository, parse_version


@dataclass(frozen=True)
class Predictions:
    """The answers for a batch of images, and the version that gave them."""

    model_name: str
    model_version: int
    probabilities: np.ndarray  # (N, 10) float32
    cached: np.ndarray  # (N,) bool


@dataclass(frozen=True)
class Loaded:
    """A version made ready to serve, and whether it was in memory already."""

    model: LoadedModel
    already_loaded: bool


class Inference:
    """Answers predictions for the registered models the repository resolves."""

    def __init__(
        self, repository: ModelRepository, cache: PredictionCache, default_model_name: str
    ) -> None:
        self._repository = repository
        self._cache = cache
        self._default_model_name = default_model_name

    async def load(self, model_name: str, model_version: str) -> Loaded:
        """Load ``model_name`` at ``model_version`` (a number or an alias) if it is not held
        yet; FailedPrecondition says why a version cannot be served."""
        name = model_name.strip() or self._default_model_name
        version = await self._repository.resolve(name, parse_version(model_version))
        already = self._repository.holds(name, version)
        return Loaded(await self._repository.get(name, version), already)

    async def predict(
        self, images: np.ndarray, model_name: str, model_version: str, *, read_cache: bool = True
    ) -> Predictions:
        """Classify ``images`` (N, 784) float32 in [0, 1] with ``model_name`` at
        ``model_version`` ("" = production). ``read_cache=False`` computes fresh answers
        (they are still stored)."""
        name = model_name.strip() or self._default_model_name
        model = await self._repository.model(name, model_version)
        model.observe(images)
        keys = [cache_key(model.cache_scope, image) for image in images]
        found = await self._cache.get_many(keys) if read_cache else [None] * len(keys)
        missing = [i for i, answer in enumerate(found) if answer is None]
        probabilities = np.empty((len(images), 10), dtype=np.float32)
        cached = np.ones(len(images), dtype=bool)
        for i, answer in enumerate(found):
            if answer is not None:
                probabilities[i] = answer
        if missing:
            computed = await model.batcher.predict(
                images if len(missing) == len(images) else images[missing]
            )
            probabilities[missing] = computed
            cached[missing] = False
            await self._cache.put_many([(keys[i], probabilities[i]) for i in missing])
        hits = len(images) - len(missing)
        if hits:
            metrics.CACHE_HITS.labels(name).inc(hits)
        if missing:
            metrics.CACHE_MISSES.labels(name).inc(len(missing))
        metrics.PREDICTIONS.labels(*model.labels).inc(len(images))
        return Predictions(name, model.version, probabilities, cached)
