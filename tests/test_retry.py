"""The one retry policy (terra.retry): which answers retry, the doubling, the cap, the tries,
the time bound. Delays are recorded by an injected sleep, never waited (the time bound's
test waits its tenth of a second: tenacity reads the clock itself)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from terra.recognizer.options import DecodeOptions
from terra.recognizer.types import Priority, Recognition, RecognitionRequest
from terra.retry import Backoff, Retryable, retryable_status, retrying, until_taken

from .fakes import RecordedSleeps, recognition_of


def test_which_http_answers_retry() -> None:
    assert all(retryable_status(s) for s in (408, 429, 500, 502, 503, 504, 599))
    assert not any(retryable_status(s) for s in (200, 201, 204, 301, 400, 401, 404, 410, 422))


async def test_delays_double_up_to_the_cap_and_the_tries_are_counted() -> None:
    sleeps = RecordedSleeps()
    calls = 0
    with pytest.raises(Retryable, match="still down"):
        async for attempt in retrying(Backoff(0.5, 4.0, tries=7), sleep=sleeps):
            with attempt:
                calls += 1
                raise Retryable("still down")
    assert calls == 7
    assert sleeps.delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


async def test_a_time_bound_ends_the_tries() -> None:
    calls = 0
    with pytest.raises(Retryable, match="still down"):
        async for attempt in retrying(Backoff(0.01, 0.02, within_s=0.1)):
            with attempt:
                calls += 1
                raise Retryable("still down")
    assert 2 <= calls <= 11  # tried again while 0.1 s lasted (at least 0.01 s apart), then not


async def test_other_failures_are_not_retried_and_success_ends_it() -> None:
    sleeps = RecordedSleeps()
    with pytest.raises(ValueError):
        async for attempt in retrying(Backoff(0.5, 4.0, tries=5), sleep=sleeps):
            with attempt:
                raise ValueError("a bad request stays bad")
    assert sleeps.delays == []

    answers = iter([Retryable("503"), Retryable("429"), "taken"])
    result = None
    async for attempt in retrying(Backoff(1.0, 60.0, tries=5), sleep=sleeps):
        with attempt:
            answer = next(answers)
            if isinstance(answer, Exception):
                raise answer
            result = answer
    assert result == "taken" and sleeps.delays == [1.0, 2.0]


async def test_a_dropped_recognition_is_sent_again_until_taken() -> None:
    sleeps = RecordedSleeps()
    request = RecognitionRequest(
        audio=np.zeros(16000, dtype=np.float32),
        language="en",
        priority=Priority.BACKGROUND,
        options=DecodeOptions(),
    )
    recognition = recognition_of("ok")
    answers: list[Recognition | None] = [None] * 6 + [recognition]
    sent: list[RecognitionRequest] = []

    def submit(r: RecognitionRequest) -> asyncio.Future[Recognition | None]:
        sent.append(r)
        future: asyncio.Future[Recognition | None] = asyncio.get_running_loop().create_future()
        future.set_result(answers.pop(0))
        return future

    assert await until_taken(submit, request, sleep=sleeps) is recognition
    assert sent == [request] * 7
    assert sleeps.delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]  # RESUBMIT: no limit, 10 s cap
