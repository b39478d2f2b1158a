"""The recognizer on a Ray cluster, seen from a front end (``recognizer.backend: ray``).

Requests wait here, most urgent first (final, progress, background), until fewer than
``cluster.max_in_flight`` are at the cluster; while they wait, a newer progress request
replaces an older one with the same key and ``withdraw`` drops one, as with the local
scheduler. Sent requests go to the Serve app (``ray_app``) through a DeploymentHandle; Serve
routes each to a replica, whose own scheduler batches it with others. A request whose
replica died (kill -9, a lost node) is sent again, to whichever replica Serve picks, for
``cluster.retry_s``: no final is lost, and live text resumes once a replica answers.

Audio travels as float32 numpy arrays inside the pickled request (Ray serializes numpy
buffers out of band, without copying them into the pickle).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError

from terra.config import ClusterConfig, RecognizerConfig
from terra.metrics import Metrics
from terra.recognizer.types import Priority, Recognition, RecognitionRequest

log = logging.getLogger(__name__)

_RESEND_DELAY_S = (0.1, 0.25, 0.5, 1.0, 2.0)  # then 2 s until retry_s has passed


def connect(config: ClusterConfig) -> Any:
    """Join the Ray cluster as a driver and return the recognizer app's DeploymentHandle
    (blocking; the app must have been deployed by ``terra recognizer``)."""
    if not ray.is_initialized():
        ray.init(address=config.address, namespace=config.namespace, log_to_driver=False)
    try:
        return serve.get_app_handle(config.app_name)
    except Exception as e:  # Serve raises a bare RayServeException for a missing app
        raise RuntimeError(
            f"no Ray Serve app {config.app_name!r} at {config.address!r}: "
            f"deploy it with `terra recognizer` ({e})"
        ) from e


@dataclass(slots=True, eq=False)  # entries are removed by identity, never compared by value
class _Entry:
    request: RecognitionRequest
    future: asyncio.Future[Recognition | None]
    seq: int
    enqueued_at: float
    coalesce_key: str | None = None
    attempts: int = field(default=0)

    def order(self) -> tuple[int, int]:
        return (int(self.request.priority), self.seq)


class RayRecognizer:
    """The ``Recognizer`` of a front end whose model runs in a Ray Serve app."""

    def __init__(
        self,
        handle: Any,  # ray.serve.handle.DeploymentHandle of the recognizer app
        config: ClusterConfig,
        recognizer_config: RecognizerConfig,
        metrics: Metrics,
    ) -> None:
        self._handle = handle
        self._config = config
        self._recognizer_config = recognizer_config
        self._metrics = metrics
        self._pending: list[_Entry] = []
        self._by_key: dict[str, _Entry] = {}
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._in_flight = 0
        self._dispatcher: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()

    @property
    def depth(self) -> int:
        return len(self._pending) + self._in_flight

    @property
    def queued_finals(self) -> int:
        return sum(1 for e in self._pending if e.request.priority is Priority.FINAL)

    @property
    def saturated(self) -> bool:
        """As the local scheduler's: finals at the bound, or one waiting too long."""
        finals = [e for e in self._pending if e.request.priority is Priority.FINAL]
        if len(finals) >= self._recognizer_config.max_queued_finals:
            return True
        oldest = min((e.enqueued_at for e in finals), default=time.perf_counter())
        return time.perf_counter() - oldest >= self._recognizer_config.saturated_wait_s

    def submit(
        self, request: RecognitionRequest, coalesce_key: str | None = None
    ) -> asyncio.Future[Recognition | None]:
        """Queue a request; the future resolves to its Recognition, or None if superseded."""
        future: asyncio.Future[Recognition | None] = asyncio.get_running_loop().create_future()
        if coalesce_key is not None and coalesce_key in self._by_key:
            self._drop(self._by_key.pop(coalesce_key))
        if len(self._pending) >= self._recognizer_config.max_queue:
            if request.priority is not Priority.FINAL:
                future.set_result(None)
                self._metrics.dropped_requests.labels(request.priority.name.lower()).inc()
                return future
        entry = _Entry(request, future, next(self._seq), time.perf_counter(), coalesce_key)
        self._pending.append(entry)
        if coalesce_key is not None:
            self._by_key[coalesce_key] = entry
        self._metrics.queue_depth.set(self.depth)
        self._wakeup.set()
        return future

    def is_waiting(self, coalesce_key: str) -> bool:
        return coalesce_key in self._by_key

    def withdraw(self, coalesce_key: str) -> None:
        entry = self._by_key.pop(coalesce_key, None)
        if entry is not None:
            self._drop(entry)
            self._metrics.queue_depth.set(self.depth)

    def _drop(self, entry: _Entry) -> None:
        self._pending.remove(entry)
        if not entry.future.done():
            entry.future.set_result(None)
        self._metrics.dropped_requests.labels("superseded").inc()

    async def _dispatch(self) -> None:
        while True:
            while not self._pending or self._in_flight >= self._config.max_in_flight:
                await self._wakeup.wait()
                self._wakeup.clear()
            entry = min(self._pending, key=_Entry.order)
            self._pending.remove(entry)
            if entry.coalesce_key is not None and self._by_key.get(entry.coalesce_key) is entry:
                del self._by_key[entry.coalesce_key]
            self._in_flight += 1
            task = asyncio.create_task(self._send(entry), name="recognizer-send")
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _send(self, entry: _Entry) -> None:
        deadline = time.monotonic() + self._config.retry_s
        try:
            while True:
                entry.attempts += 1
                try:
                    result: Recognition | None = await self._handle.recognize.remote(entry.request)
                    break
                except RayActorError as e:  # the replica died with the request, or before it
                    if time.monotonic() >= deadline:
                        self._fail(entry, e)
                        return
                    self._metrics.resent_requests.inc()
                    delay = _RESEND_DELAY_S[min(entry.attempts, len(_RESEND_DELAY_S)) - 1]
                    log.warning(
                        "recognizer replica lost a %s request (attempt %d); sending it again",
                        entry.request.priority.name.lower(),
                        entry.attempts,
                    )
                    await asyncio.sleep(delay)
                except Exception as e:  # the recognizer failed on it: fail it, keep serving
                    log.exception("recognizer request failed")
                    self._fail(entry, e)
                    return
            self._metrics.request_latency.labels(entry.request.priority.name.lower()).observe(
                time.perf_counter() - entry.enqueued_at
            )
            if not entry.future.done():
                entry.future.set_result(result)
        finally:
            if not entry.future.done():  # cancelled by stop()
                entry.future.cancel()
            self._in_flight -= 1
            self._metrics.queue_depth.set(self.depth)
            self._wakeup.set()

    @staticmethod
    def _fail(entry: _Entry, error: BaseException) -> None:
        if not entry.future.done():
            entry.future.set_exception(RuntimeError(f"recognizer failed: {error}"))

    async def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch(), name="recognizer-dispatch")

    async def stop(self) -> None:
        tasks = [*self._sends, *([self._dispatcher] if self._dispatcher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for entry in self._pending:
            if not entry.future.done():
                entry.future.cancel()
        self._pending.clear()
        self._by_key.clear()
