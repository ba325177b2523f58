"""Dynamic batching: concurrent requests for one model version share one forward pass.

Requests queue up; the batcher takes what is queued and, while the batch has room and other
requests are on their way (asked for but not yet queued: reading the cache, say), waits up to
``max_wait_s`` for them; then it runs the batch in the forward-pass executor. A lone request
never waits for company. While a batch runs, new requests queue, so under load batches fill
without any waiting at all.

A request is a dict of input arrays with the same number of rows (the contract's batch
dimension); a batch stacks every input of its requests along that dimension and splits the
answers back by rows. Only requests whose inputs agree beyond the batch dimension share a
pass (variable-size inputs run apart), requests are never split, and a batcher serves one
model version, so requests of different models never mix. A model without a batch dimension
gets a batcher of ``max_size`` 1: one request per pass.

If a pass of several requests fails, each request is run again on its own, so that only the
request whose data the model cannot take gets the error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from services.inference import metrics

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class _Item:
    inputs: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future[Arrays]

    def fits(self, other: _Item) -> bool:
        """Whether the two can be stacked: same inputs, same shapes beyond the first axis."""
        return all(
            a.shape[1:] == other.inputs[name].shape[1:] and a.dtype == other.inputs[name].dtype
            for name, a in self.inputs.items()
        )


class Batcher:
    """Coalesces ``predict`` calls into forward passes of at most ``max_size`` rows."""

    def __init__(
        self,
        forward: Callable[[Mapping[str, np.ndarray]], Arrays],
        executor: Executor,
        max_size: int,
        max_wait_s: float,
        runtime: str = "",
    ) -> None:
        self._forward = forward
        self._executor = executor
        self._max_size = max(1, max_size)
        self._max_wait_s = max(0.0, max_wait_s)
        self._forward_duration = metrics.FORWARD_DURATION.labels(runtime)
        self._queue: deque[_Item | None] = deque()  # None: close() was called
        self._wakeup: asyncio.Future[None] | None = None  # the batcher waits for a request
        self._carry: _Item | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # predict() calls not answered yet: those queued, running, and being queued.
        self._pending = 0

    async def predict(self, inputs: Mapping[str, np.ndarray], rows: int) -> Arrays:
        """The model's outputs for ``inputs`` (``rows`` rows each), computed in some batch."""
        loop = asyncio.get_running_loop()
        if self._closed:  # a request that got this version just before it was unloaded
            return await loop.run_in_executor(self._executor, self._timed, inputs, rows)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="batcher")
        future: asyncio.Future[Arrays] = loop.create_future()
        self._put(_Item(inputs, rows, future))
        self._pending += 1
        try:
            return await future
        finally:
            self._pending -= 1

    def expect(self) -> None:
        """Say that a predict() call is on its way (its caller is still preparing it), so a
        batch forming now waits for it; ``arrived()`` ends that."""
        self._pending += 1

    def arrived(self) -> None:
        self._pending -= 1

    async def close(self) -> None:
        """Answer everything queued, then stop."""
        self._closed = True
        if self._task is not None:
            self._put(None)
            await self._task

    def _put(self, item: _Item | None) -> None:
        self._queue.append(item)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _wait(self, deadline: float | None) -> None:
        """Until a request is queued, or the loop's clock passes ``deadline``. (A future and
        a timer: asyncio.wait_for would make a task per wait.)"""
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup = loop.create_future()
        timer = None if deadline is None else loop.call_at(deadline, _wake, wakeup)
        try:
            await wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    async def _run(self) -> None:
        stopping = False
        while not stopping or self._carry is not None:
            batch, stopping = await self._collect(stopping)
            if batch:
                await self._execute(batch)

    async def _collect(self, stopping: bool) -> tuple[list[_Item], bool]:
        """The next batch, and whether close()'s marker was reached."""
        first = self._carry
        self._carry = None
        if first is None:
            if stopping:
                return [], True
            while not self._queue:
                await self._wait(None)
            first = self._queue.popleft()
        if first is None:
            return [], True
        batch, rows = [first], first.rows
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait_s
        while rows < self._max_size and not stopping:
            if not self._queue:
                # Wait only for requests that are on their way: none is, when every call
                # not yet answered is in this batch already.
                if loop.time() >= deadline or self._pending <= len(batch):
                    break
                await self._wait(deadline)
                if not self._queue:
                    break
            item = self._queue.popleft()
            if item is None:
                stopping = True
            elif rows + item.rows > self._max_size or not first.fits(item):
                self._carry = item  # starts the next batch; requests are never split
                break
            else:
                batch.append(item)
                rows += item.rows
        return batch, stopping

    async def _execute(self, batch: list[_Item]) -> None:
        live = [item for item in batch if not item.future.done()]  # callers may have gone
        if not live:
            return
        loop = asyncio.get_running_loop()
        if len(live) == 1:
            inputs, rows = live[0].inputs, live[0].rows
        else:
            inputs = {name: np.concatenate([i.inputs[name] for i in live]) for name in
                      live[0].inputs}  # fmt: skip
            rows = sum(i.rows for i in live)
        try:
            outputs = await loop.run_in_executor(self._executor, self._timed, inputs, rows)
        except Exception as exc:
            if len(live) > 1:  # find the request the model cannot take; answer the others
                for item in live:
                    await self._execute([item])
                return
            if not live[0].future.done():
                live[0].future.set_exception(exc)
            return
        start = 0
        for item in live:
            end = start + item.rows
            if not item.future.done():
                item.future.set_result(
                    outputs
                    if len(live) == 1
                    else {name: value[start:end] for name, value in outputs.items()}
                )
            start = end

    def _timed(self, inputs: Mapping[str, np.ndarray], rows: int) -> Arrays:
        started = time.perf_counter()
        out = self._forward(inputs)
        self._forward_duration.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(rows)
        return out


def _wake(wakeup: asyncio.Future[None]) -> None:
    if not wakeup.done():
        wakeup.set_result(None)
