"""The one place where async code meets the blocking recognizer.

Requests from all participants wait in one priority queue; each of ``recognizer.workers``
workers takes the most urgent request plus other waiting requests that can share its model
call (see the engine's ``batch_key``), up to ``max_batch_size`` and no more than its share
when other workers are idle. Progress requests are coalesced per participant: a newer one
replaces a waiting older one, whose future resolves to ``None``. Finals are never coalesced
nor dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from terra.audio import SAMPLE_RATE
from terra.config import RecognizerConfig
from terra.metrics import Metrics
from terra.recognizer.types import Priority, Recognition, RecognitionEngine, RecognitionRequest

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)  # entries are removed by identity, never compared by value
class _Entry:
    request: RecognitionRequest
    future: asyncio.Future[Recognition | None]
    seq: int
    enqueued_at: float
    coalesce_key: str | None = None
    batch_key: tuple[float, int] = field(default=(0.0, 0))

    def order(self) -> tuple[int, int]:
        return (int(self.request.priority), self.seq)


class RecognizerScheduler:
    """Batches recognition requests across participants onto one blocking engine."""

    def __init__(self, engine: RecognitionEngine, config: RecognizerConfig, metrics: Metrics):
        self._engine = engine
        self._config = config
        self._metrics = metrics
        self._pending: list[_Entry] = []
        self._by_key: dict[str, _Entry] = {}
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, config.workers), thread_name_prefix="recognizer"
        )
        self._workers: list[asyncio.Task[None]] = []
        self._busy = 0  # workers inside a model call

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def queued_finals(self) -> int:
        return sum(1 for e in self._pending if e.request.priority is Priority.FINAL)

    @property
    def oldest_wait_s(self) -> float:
        """How long the request that has waited longest has been waiting (0 when none)."""
        if not self._pending:
            return 0.0
        return time.perf_counter() - min(e.enqueued_at for e in self._pending)

    @property
    def saturated(self) -> bool:
        """Work arrives faster than it is done: finals wait past ``saturated_wait_s`` or
        reach ``max_queued_finals``. A load balancer should send no new conferences here."""
        finals = [e for e in self._pending if e.request.priority is Priority.FINAL]
        if len(finals) >= self._config.max_queued_finals:
            return True
        oldest = min((e.enqueued_at for e in finals), default=time.perf_counter())
        return time.perf_counter() - oldest >= self._config.saturated_wait_s

    def submit(
        self, request: RecognitionRequest, coalesce_key: str | None = None
    ) -> asyncio.Future[Recognition | None]:
        """Queue a request; the future resolves to its Recognition, or None if superseded."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Recognition | None] = loop.create_future()
        seq = next(self._seq)
        if coalesce_key is not None and coalesce_key in self._by_key:
            replaced = self._by_key.pop(coalesce_key)
            # The newer request takes the older one's place in line: a talker whose
            # requests keep being replaced is never pushed behind everybody (no starvation).
            seq, enqueued_at = replaced.seq, replaced.enqueued_at
            self._drop(replaced)
        else:
            enqueued_at = time.perf_counter()
        if len(self._pending) >= self._config.max_queue:
            if request.priority is not Priority.FINAL:
                future.set_result(None)
                self._metrics.dropped_requests.labels(request.priority.name.lower()).inc()
                return future
        entry = _Entry(
            request=request,
            future=future,
            seq=seq,
            enqueued_at=enqueued_at,
            coalesce_key=coalesce_key,
            batch_key=self._engine.batch_key(request),
        )
        self._pending.append(entry)
        if coalesce_key is not None:
            self._by_key[coalesce_key] = entry
        self._metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()
        return future

    def is_waiting(self, coalesce_key: str) -> bool:
        """Whether a request with this key is queued (not yet taken into a model call)."""
        return coalesce_key in self._by_key

    def withdraw(self, coalesce_key: str) -> None:
        """Drop the waiting request with this key, if any (its future resolves to None)."""
        entry = self._by_key.pop(coalesce_key, None)
        if entry is not None:
            self._drop(entry)
            self._metrics.queue_depth.set(len(self._pending))

    def _drop(self, entry: _Entry) -> None:
        self._pending.remove(entry)
        if not entry.future.done():
            entry.future.set_result(None)
        self._metrics.dropped_requests.labels("superseded").inc()

    def _take_batch(self) -> list[_Entry]:
        if not self._pending:  # another worker took it meanwhile
            return []
        self._pending.sort(key=_Entry.order)
        head = self._pending[0]
        batch = [e for e in self._pending if e.batch_key == head.batch_key]
        # Idle workers share the waiting work: on the CPU a call's time grows with its batch,
        # so two half batches side by side answer sooner than one whole batch.
        idle = max(1, max(1, self._config.workers) - self._busy)
        batch = batch[: min(self._config.max_batch_size, math.ceil(len(batch) / idle))]
        for entry in batch:
            self._pending.remove(entry)
            if entry.coalesce_key is not None and self._by_key.get(entry.coalesce_key) is entry:
                del self._by_key[entry.coalesce_key]
        self._metrics.queue_depth.set(len(self._pending))
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                await self._wakeup.wait()
                self._wakeup.clear()
            while self._pending:
                try:
                    await self._run_one(loop)
                except asyncio.CancelledError:
                    raise
                except Exception:  # the worker is a task boundary: log, never die silently
                    log.exception("recognizer scheduler step failed; continuing")

    async def _run_one(self, loop: asyncio.AbstractEventLoop) -> None:
        await self._gather_burst()
        batch = self._take_batch()
        if batch:
            await self._execute(loop, batch)

    async def _gather_burst(self) -> None:
        """Wait until requests stop arriving (a quiet ``batch_wait_ms``), at most
        ``batch_burst_ms``: fragments posted at the same moment share a batch, and a burst
        is shared out whole among the idle workers instead of its first few requests."""
        quiet_s = self._config.batch_wait_ms / 1000
        if quiet_s <= 0:
            return
        deadline = time.perf_counter() + max(self._config.batch_burst_ms / 1000, quiet_s)
        seen = -1
        while seen != len(self._pending) and len(self._pending) < self._config.max_batch_size:
            if time.perf_counter() >= deadline:
                return
            seen = len(self._pending)
            await asyncio.sleep(quiet_s)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: Sequence[_Entry]) -> None:
        requests = [e.request for e in batch]
        started = time.perf_counter()
        self._busy += 1
        try:
            results = await self._recognize_isolated(loop, batch)
        finally:
            self._busy -= 1
        elapsed = time.perf_counter() - started
        if log.isEnabledFor(logging.DEBUG):  # the lists below are built only when logged
            log.debug(
                "model call: %d request(s) %s, waited %s ms, ran %.0f ms, %d busy",
                len(batch),
                [
                    f"{e.request.priority.name[0]}{e.request.audio.size / SAMPLE_RATE:.1f}s"
                    for e in batch
                ],
                [round((started - e.enqueued_at) * 1000) for e in batch],
                elapsed * 1000,
                self._busy,
            )
        self._metrics.batch_size.observe(len(batch))
        self._metrics.batch_seconds.observe(elapsed)
        audio_s = sum(r.audio.size for r in requests) / SAMPLE_RATE
        self._metrics.audio_seconds.inc(audio_s)
        for entry, result in zip(batch, results):
            if entry.future.done():  # failed alone (its exception is set) or cancelled
                continue
            self._metrics.request_latency.labels(entry.request.priority.name.lower()).observe(
                time.perf_counter() - entry.enqueued_at
            )
            if not entry.future.done():
                entry.future.set_result(result)

    async def _recognize_isolated(
        self, loop: asyncio.AbstractEventLoop, batch: Sequence[_Entry]
    ) -> list[Recognition | None]:
        """The batch's results; when the call fails, each request is tried again alone, so
        a request that fails fails alone (its future gets the error, the others their text).
        Entries that failed get None here."""
        requests = [e.request for e in batch]
        try:
            return list(
                await loop.run_in_executor(self._executor, self._engine.recognize, requests)
            )
        except Exception as e:  # a task boundary: isolate the failure, keep serving
            if len(batch) == 1:
                log.exception("recognizer request failed")
                if not batch[0].future.done():
                    batch[0].future.set_exception(RuntimeError(f"recognizer failed: {e}"))
                return [None]
            log.warning("recognizer batch of %d failed (%s): retrying each alone", len(batch), e)
        out: list[Recognition | None] = []
        for entry in batch:
            out.extend(await self._recognize_isolated(loop, [entry]))
        return out

    async def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._run(), name=f"recognizer-scheduler-{i}")
            for i in range(max(1, self._config.workers))
        ]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for entry in self._pending:
            if not entry.future.done():
                entry.future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)
