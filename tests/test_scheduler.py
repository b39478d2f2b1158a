"""The recognizer scheduler on the real engine: how waiting work is shared and withdrawn."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import pytest

from terra.audio import SAMPLE_RATE
from terra.config import RecognizerConfig
from terra.metrics import create_metrics
from terra.recognizer.engine import WhisperEngine
from terra.recognizer.options import DecodeOptions
from terra.recognizer.scheduler import RecognizerScheduler
from terra.recognizer.types import Priority, RecognitionRequest

from .conftest import clip, load_clip

pytestmark = pytest.mark.model


def _calls(engine: WhisperEngine, log: list[int]) -> WhisperEngine:
    """The same engine, recording the size of every model call it is given."""
    recognize = engine.recognize

    class Recording:
        def __getattr__(self, name: str) -> object:
            return getattr(engine, name)

        def recognize(self, requests: list[RecognitionRequest]) -> object:
            log.append(len(requests))
            return recognize(requests)

    return Recording()  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def running(
    engine: WhisperEngine, calls: list[int], workers: int
) -> AsyncIterator[RecognizerScheduler]:
    config = dataclasses.replace(RecognizerConfig(), workers=workers)
    scheduler = RecognizerScheduler(_calls(engine, calls), config, create_metrics())
    await scheduler.start()
    try:
        yield scheduler
    finally:
        await scheduler.stop()


async def test_idle_workers_split_the_waiting_work(engine: WhisperEngine) -> None:
    audio = load_clip(clip("clips/faster_whisper/jfk.flac").path)[: 4 * SAMPLE_RATE]
    calls: list[int] = []
    async with running(engine, calls, workers=2) as scheduler:
        futures = [
            scheduler.submit(RecognitionRequest(audio, "en", Priority.PROGRESS, DecodeOptions()))
            for _ in range(4)
        ]
        results = [await f for f in futures]
    assert all(r is not None and "fellow americans" in r.text.lower() for r in results)
    assert sorted(calls) == [2, 2]  # not one call of 4 while the other worker idles


async def test_a_withdrawn_request_is_never_recognized(engine: WhisperEngine) -> None:
    audio = load_clip(clip("clips/faster_whisper/jfk.flac").path)[: 4 * SAMPLE_RATE]
    calls: list[int] = []
    async with running(engine, calls, workers=1) as scheduler:
        first = scheduler.submit(RecognitionRequest(audio, "en", Priority.FINAL, DecodeOptions()))
        waiting = scheduler.submit(
            RecognitionRequest(audio, "en", Priority.PROGRESS, DecodeOptions()), coalesce_key="c1"
        )
        assert scheduler.is_waiting("c1")
        scheduler.withdraw("c1")
        assert not scheduler.is_waiting("c1")
        assert await waiting is None
        assert await first is not None
    assert calls == [1]


async def test_model_seconds_say_which_kind_of_request_took_the_time(
    engine: WhisperEngine,
) -> None:
    audio = load_clip(clip("clips/faster_whisper/jfk.flac").path)[: 4 * SAMPLE_RATE]
    metrics = create_metrics()
    config = dataclasses.replace(RecognizerConfig(), workers=1)
    scheduler = RecognizerScheduler(engine, config, metrics)
    await scheduler.start()
    try:
        # A beam-3 final and a greedy progress pass never share a call (batch_key).
        final = scheduler.submit(
            RecognitionRequest(audio, "en", Priority.FINAL, DecodeOptions(beam_size=3))
        )
        progress = scheduler.submit(
            RecognitionRequest(audio, "en", Priority.PROGRESS, DecodeOptions())
        )
        assert await final is not None and await progress is not None
    finally:
        await scheduler.stop()

    def seconds(priority: str) -> float:
        value = metrics.registry.get_sample_value(
            "terra_recognizer_model_seconds_total", {"priority": priority}
        )
        return value or 0.0

    calls = metrics.registry.get_sample_value("terra_recognizer_batch_seconds_sum") or 0.0
    assert seconds("final") > 0 and seconds("progress") > 0
    assert seconds("final") + seconds("progress") == pytest.approx(calls)
