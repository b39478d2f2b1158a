"""Recognition requests waiting for the model, most urgent first.

Both recognizer backends (the local ``scheduler`` and the Ray ``ray_client``) queue their
requests here until they take them (into a model call, or to the cluster). The rules:

- order: by priority (final, progress, background), then by arrival;
- coalescing: a request with the ``coalesce_key`` of a waiting one replaces it (the
  replaced future resolves to ``None``) and keeps its place in line and its arrival time,
  so a talker whose requests keep being replaced is never pushed behind everybody;
- shedding: at ``max_queue`` waiting requests, a new non-final request resolves to
  ``None`` at once; finals are never shed nor coalesced away by the queue;
- withdraw: drops the waiting request with a key (its future resolves to ``None``);
- a request whose future its caller cancelled leaves the queue.

``owed_final_s`` (the audio of the waiting finals) is the live service's overload signal:
past ``recognizer.overload_finals_s`` it asks for cheaper finals, past
``recognizer.max_owed_final_s`` for none (see ``live.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

from terra.audio import SAMPLE_RATE
from terra.config import RecognizerConfig
from terra.metrics import Metrics
from terra.recognizer.types import Priority, Recognition, RecognitionRequest


@dataclass(slots=True, eq=False)  # entries are removed by identity, never compared by value
class Waiting:
    request: RecognitionRequest
    future: asyncio.Future[Recognition | None]
    seq: int
    enqueued_at: float  # time.perf_counter() when it (or the request it replaced) came
    coalesce_key: str | None = None

    def order(self) -> tuple[int, int]:
        return (int(self.request.priority), self.seq)


class WaitingQueue:
    """The waiting requests of one recognizer backend (used on the event loop only)."""

    def __init__(self, max_queue: int, metrics: Metrics) -> None:
        self._max_queue = max_queue
        self._metrics = metrics
        self._entries: list[Waiting] = []
        self._by_key: dict[str, Waiting] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def queued_finals(self) -> int:
        return sum(1 for e in self._entries if e.request.priority is Priority.FINAL)

    @property
    def owed_final_s(self) -> float:
        """Seconds of audio in the waiting finals: the work owed to them."""
        finals = (e.request for e in self._entries if e.request.priority is Priority.FINAL)
        return sum(r.audio.size for r in finals) / SAMPLE_RATE

    def saturated(self, max_queued_finals: int, saturated_wait_s: float) -> bool:
        """Finals reach ``max_queued_finals``, or one has waited ``saturated_wait_s``."""
        finals = [e for e in self._entries if e.request.priority is Priority.FINAL]
        if len(finals) >= max_queued_finals:
            return True
        oldest = min((e.enqueued_at for e in finals), default=time.perf_counter())
        return time.perf_counter() - oldest >= saturated_wait_s

    def submit(
        self, request: RecognitionRequest, coalesce_key: str | None = None
    ) -> asyncio.Future[Recognition | None]:
        """Queue a request; the future resolves to None if it is superseded, withdrawn or
        shed, else to whatever the backend sets once it has taken it."""
        future: asyncio.Future[Recognition | None] = asyncio.get_running_loop().create_future()
        replaced = self._by_key.pop(coalesce_key, None) if coalesce_key is not None else None
        if replaced is not None:
            seq, enqueued_at = replaced.seq, replaced.enqueued_at
            self._drop(replaced)
        else:
            seq, enqueued_at = next(self._seq), time.perf_counter()
        if len(self._entries) >= self._max_queue and request.priority is not Priority.FINAL:
            future.set_result(None)
            self._metrics.dropped_requests.labels(request.priority.name.lower()).inc()
            return future
        entry = Waiting(request, future, seq, enqueued_at, coalesce_key)
        self._entries.append(entry)
        if coalesce_key is not None:
            self._by_key[coalesce_key] = entry
        future.add_done_callback(lambda done: self._abandoned(entry) if done.cancelled() else None)
        return future

    def is_waiting(self, coalesce_key: str) -> bool:
        """Whether a request with this key is queued (not yet taken)."""
        return coalesce_key in self._by_key

    def withdraw(self, coalesce_key: str) -> None:
        """Drop the waiting request with this key, if any (its future resolves to None)."""
        entry = self._by_key.pop(coalesce_key, None)
        if entry is not None:
            self._drop(entry)

    def in_order(self) -> list[Waiting]:
        """The waiting requests, most urgent first (the queue is unchanged)."""
        return sorted(self._entries, key=Waiting.order)

    def first(self) -> Waiting:
        """The most urgent waiting request (the queue is unchanged; it must not be empty)."""
        return min(self._entries, key=Waiting.order)

    def take(self, entries: Iterable[Waiting]) -> None:
        """Remove these entries: the backend now answers their futures."""
        for entry in entries:
            self._entries.remove(entry)
            if entry.coalesce_key is not None and self._by_key.get(entry.coalesce_key) is entry:
                del self._by_key[entry.coalesce_key]

    def cancel_all(self) -> None:
        """Cancel every waiting future and empty the queue (the backend stops)."""
        for entry in self._entries:
            if not entry.future.done():
                entry.future.cancel()
        self._entries.clear()
        self._by_key.clear()

    def _abandoned(self, entry: Waiting) -> None:
        """Its caller went away while it waited (its future was cancelled: a job canceled or
        failed, a server stopping): nobody wants its result, so no model time goes to it."""
        if any(e is entry for e in self._entries):
            self.take([entry])

    def _drop(self, entry: Waiting) -> None:
        self._entries.remove(entry)
        if not entry.future.done():
            entry.future.set_result(None)
        self._metrics.dropped_requests.labels("superseded").inc()


class QueuedRecognizer:
    """What both ``Recognizer`` backends do before a request is taken: ``submit``,
    ``is_waiting``, ``withdraw`` and the load signals, over one WaitingQueue. A backend
    takes requests from ``self._waiting`` when ``self._wakeup`` is set."""

    def __init__(self, config: RecognizerConfig, metrics: Metrics) -> None:
        self._limits = config
        self._metrics = metrics
        self._waiting = WaitingQueue(config.max_queue, metrics)
        self._wakeup = asyncio.Event()

    @property
    def depth(self) -> int:
        """Requests waiting (a backend adds those it has taken and not answered)."""
        return len(self._waiting)

    @property
    def queued_finals(self) -> int:
        return self._waiting.queued_finals

    @property
    def owed_final_s(self) -> float:
        """Seconds of audio in the finals waiting (not yet taken)."""
        return self._waiting.owed_final_s

    @property
    def saturated(self) -> bool:
        """Work arrives faster than it is done: finals wait past ``saturated_wait_s`` or
        reach ``max_queued_finals``. A load balancer should send no new conferences here."""
        return self._waiting.saturated(
            self._limits.max_queued_finals, self._limits.saturated_wait_s
        )

    def submit(
        self, request: RecognitionRequest, coalesce_key: str | None = None
    ) -> asyncio.Future[Recognition | None]:
        """Queue a request; the future resolves to its Recognition, or None if superseded,
        withdrawn or shed (see the module's rules)."""
        future = self._waiting.submit(request, coalesce_key)
        self._metrics.queue_depth.set(self.depth)
        self._wakeup.set()
        return future

    def is_waiting(self, coalesce_key: str) -> bool:
        """Whether a request with this key is queued (not yet taken)."""
        return self._waiting.is_waiting(coalesce_key)

    def _answer(self, entry: Waiting, result: Recognition | None) -> None:
        """A taken request's result, set unless it already failed or was cancelled, and its
        latency (queue wait plus recognition) observed."""
        if entry.future.done():
            return
        self._metrics.request_latency.labels(entry.request.priority.name.lower()).observe(
            time.perf_counter() - entry.enqueued_at
        )
        entry.future.set_result(result)

    def withdraw(self, coalesce_key: str) -> None:
        """Drop the waiting request with this key, if any (its future resolves to None)."""
        self._waiting.withdraw(coalesce_key)
        self._metrics.queue_depth.set(self.depth)
