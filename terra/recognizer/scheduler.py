"""The one place where async code meets the blocking recognizer.

Requests from all participants wait in one priority queue (``waiting.WaitingQueue``); each
of ``recognizer.workers`` workers takes the most urgent request plus other waiting requests
that can share its model call (see the engine's ``batch_key``), up to ``max_batch_size`` and
no more than its share when other workers are idle. Progress requests are coalesced per
participant: a newer one replaces a waiting older one, whose future resolves to ``None``.
Finals are never coalesced nor dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

from terra.audio import SAMPLE_RATE
from terra.config import RecognizerConfig
from terra.metrics import Metrics
from terra.recognizer.types import Recognition, RecognitionEngine, RecognitionRequest
from terra.recognizer.waiting import QueuedRecognizer, Waiting
from terra.tasks import cancel_and_wait

log = logging.getLogger(__name__)


async def recognize_isolated(
    loop: asyncio.AbstractEventLoop,
    executor: Executor,
    engine: RecognitionEngine,
    requests: Sequence[RecognitionRequest],
) -> list[Recognition | Exception]:
    """One model call for ``requests`` in ``executor``; when it fails, each request is tried
    again alone, so a request that fails fails alone: the error stands in its place. An
    engine that answers another number of results than it was given requests (an engine
    bug: which result is whose is unknown) fails every request of the call."""
    try:
        results: list[Recognition | Exception] = list(
            await loop.run_in_executor(executor, engine.recognize, requests)
        )
    except Exception as e:  # a task boundary: isolate the failure, keep serving
        if len(requests) == 1:
            log.exception("recognizer request failed")
            return [RuntimeError(f"recognizer failed: {e}")]
        log.warning("recognizer batch of %d failed (%s): retrying each alone", len(requests), e)
    else:
        if len(results) == len(requests):
            return results
        message = (
            f"recognizer failed: the engine answered {len(results)} results "
            f"for {len(requests)} requests"
        )
        log.error(message)
        return [RuntimeError(message) for _ in requests]
    out: list[Recognition | Exception] = []
    for request in requests:
        out.extend(await recognize_isolated(loop, executor, engine, [request]))
    return out


class RecognizerScheduler(QueuedRecognizer):
    """Batches recognition requests across participants onto one blocking engine."""

    def __init__(self, engine: RecognitionEngine, config: RecognizerConfig, metrics: Metrics):
        super().__init__(config, metrics)
        self._engine = engine
        self._config = config
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, config.workers), thread_name_prefix="recognizer"
        )
        self._workers: list[asyncio.Task[None]] = []
        self._busy = 0  # workers inside a model call

    def _take_batch(self) -> list[Waiting]:
        waiting = self._waiting.in_order()
        if not waiting:  # another worker took it meanwhile
            return []
        head = self._engine.batch_key(waiting[0].request)
        batch = [e for e in waiting if self._engine.batch_key(e.request) == head]
        # Idle workers share the waiting work: on the CPU a call's time grows with its batch,
        # so two half batches side by side answer sooner than one whole batch.
        idle = max(1, max(1, self._config.workers) - self._busy)
        batch = batch[: min(self._config.max_batch_size, math.ceil(len(batch) / idle))]
        self._waiting.take(batch)
        self._metrics.queue_depth.set(len(self._waiting))
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                await self._wakeup.wait()
                self._wakeup.clear()
            while self._waiting:
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
        while seen != len(self._waiting) and len(self._waiting) < self._config.max_batch_size:
            if time.perf_counter() >= deadline:
                return
            seen = len(self._waiting)
            await asyncio.sleep(quiet_s)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: Sequence[Waiting]) -> None:
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
        for request in requests:
            self._metrics.model_seconds.labels(request.priority.name.lower()).inc(
                elapsed / len(requests)
            )
        audio_s = sum(r.audio.size for r in requests) / SAMPLE_RATE
        self._metrics.audio_seconds.inc(audio_s)
        for entry, result in zip(batch, results):
            self._answer(entry, result)  # not one that failed alone (its exception is set)

    async def _recognize_isolated(
        self, loop: asyncio.AbstractEventLoop, batch: Sequence[Waiting]
    ) -> list[Recognition | None]:
        """The batch's results; a request that fails fails alone: its future gets the error
        (the others their text) and None stands in its place here."""
        results = await recognize_isolated(
            loop, self._executor, self._engine, [e.request for e in batch]
        )
        out: list[Recognition | None] = []
        for entry, result in zip(batch, results):
            if isinstance(result, Exception):
                if not entry.future.done():
                    entry.future.set_exception(result)
                out.append(None)
            else:
                out.append(result)
        return out

    async def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._run(), name=f"recognizer-scheduler-{i}")
            for i in range(max(1, self._config.workers))
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._workers)
        self._waiting.cancel_all()
        self._executor.shutdown(wait=True, cancel_futures=True)
