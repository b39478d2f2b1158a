"""What the rest of terra calls to get audio recognized, wherever the model runs.

Two implementations: ``scheduler.RecognizerScheduler`` (the model in this process, the
default) and ``ray_client.RayRecognizer`` (a Ray Serve app on a cluster,
``recognizer.backend: ray``). app.py chooses one.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from terra.recognizer.types import Recognition, RecognitionRequest


class Recognizer(Protocol):
    @property
    def depth(self) -> int:
        """Requests waiting (a load signal: live progress slows down as it grows)."""
        ...

    @property
    def queued_finals(self) -> int:
        """Final requests waiting (at ``recognizer.max_queued_finals`` live progress stops)."""
        ...

    @property
    def owed_final_s(self) -> float:
        """Seconds of audio in the finals waiting: past ``recognizer.overload_finals_s`` live
        finals are decoded cheaper (``recognizer.overload_final_beam_size``), past
        ``recognizer.max_owed_final_s`` settled from the live text without a model call."""
        ...

    @property
    def saturated(self) -> bool:
        """Finals wait past ``recognizer.saturated_wait_s`` or reach ``max_queued_finals``:
        the box should take no new conferences (/healthz 503)."""
        ...

    def submit(
        self, request: RecognitionRequest, coalesce_key: str | None = None
    ) -> asyncio.Future[Recognition | None]:
        """Queue a request; the future resolves to its Recognition, or None if superseded
        (a newer request with the same ``coalesce_key``) or shed under load (never a
        final)."""
        ...

    def is_waiting(self, coalesce_key: str) -> bool:
        """Whether a request with this key is still waiting (can still be withdrawn)."""
        ...

    def withdraw(self, coalesce_key: str) -> None:
        """Drop the waiting request with this key, if any (its future resolves to None)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
