"""Dynamic batching: concurrent requests for one model version share one forward pass.

Requests queue up; the batcher takes what is queued, waits up to ``max_wait_s`` for more
while the batch has room, and runs the batch in the forward-pass executor. While a batch
runs, new requests queue, so under load batches fill without any waiting at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from services.inference import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Item:
    images: np.ndarray
    future: asyncio.Future[np.ndarray]


class Batcher:
    """Coalesces ``predict`` calls into forward passes of at most ``max_size`` images."""

    def __init__(
        self,
        forward: Callable[[np.ndarray], np.ndarray],
        executor: Executor,
        max_size: int,
        max_wait_s: float,
    ) -> None:
        self._forward = forward
        self._executor = executor
        self._max_size = max(1, max_size)
        self._max_wait_s = max(0.0, max_wait_s)
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()  # None: close() was called
        self._carry: _Item | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, 10) for ``images`` (N, 784), computed in some batch."""
        loop = asyncio.get_running_loop()
        if self._closed:  # a request that got this version just before it was unloaded
            return await loop.run_in_executor(self._executor, self._timed, images)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="batcher")
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._queue.put_nowait(_Item(images, future))
        return await future

    async def close(self) -> None:
        """Answer everything queued, then stop."""
        self._closed = True
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task

    async def _run(self) -> None:
        stopping = False
        while not stopping or self._carry is not None:
            batch, stopping = await self._collect(stopping)
            if batch:
                await self._execute(batch)

    async def _collect(self, stopping: bool) -> tuple[list[_Item], bool]:
        """The next batch, and whether close()'s marker was reached."""
        first = self._carry or (None if stopping else await self._queue.get())
        self._carry = None
        if first is None:
            return [], True
        batch, rows = [first], len(first.images)
        deadline = time.monotonic() + self._max_wait_s
        while rows < self._max_size and not stopping:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item is None:
                stopping = True
            elif rows + len(item.images) > self._max_size:
                self._carry = item  # starts the next batch; requests are never split
                break
            else:
                batch.append(item)
                rows += len(item.images)
        return batch, stopping

    async def _execute(self, batch: list[_Item]) -> None:
        live = [item for item in batch if not item.future.done()]  # callers may have gone
        if not live:
            return
        images = live[0].images if len(live) == 1 else np.concatenate([i.images for i in live])
        loop = asyncio.get_running_loop()
        try:
            probabilities = await loop.run_in_executor(self._executor, self._timed, images)
        except Exception as exc:
            log.exception("forward pass of %d images failed", len(images))
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        start = 0
        for item in live:
            end = start + len(item.images)
            if not item.future.done():
                item.future.set_result(probabilities[start:end])
            start = end

    def _timed(self, images: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        out = self._forward(images)
        metrics.FORWARD_DURATION.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(images))
        return out
