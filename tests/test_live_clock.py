"""LiveService on an injected clock: what time alone decides (a quiet talker's combination
closed and its final asked for, an idle session expired) happens when the test moves the
clock and calls ``tick``, with no sleeps. FakeEngine (tests/fakes.py) is a fake: these are
the live service's timers, not recognition."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from terra.audio import SAMPLE_RATE
from terra.config import Config, StreamConfig, load_config
from terra.live import LiveListener, LiveService
from terra.metrics import Metrics, create_metrics
from terra.params import FragmentParams
from terra.recognizer.options import decode_passes
from terra.recognizer.scheduler import RecognizerScheduler
from terra.spool import Spool
from tests.fakes import FakeEngine, fake_text
from tests.test_overload import VOICED


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Left:
    def __init__(self) -> None:
        self.left: list[tuple[str, str]] = []

    def participant_joined(self, conference_id: str, participant_id: str, name: str) -> None:
        pass

    def participant_left(self, conference_id: str, participant_id: str) -> None:
        self.left.append((conference_id, participant_id))

    def text(self, elem: object, name: str) -> None:
        pass


def fragment(
    second: int,
    samples: np.ndarray,
    participant: str = "p",
    language: str = "en",
    captions: str | None = None,
) -> tuple[FragmentParams, np.ndarray]:
    """The fields and audio of ``participant``'s fragment at ``second``: ``live.process(*...)``."""
    return FragmentParams(
        "conf", participant, participant.upper(), 1_719_512_467.0 + second,
        f"{participant}-{second}", language, captions, True, False,
    ), samples.astype(np.float32)  # fmt: skip


@dataclass
class Clocked:
    """A LiveService on a Clock, with its (not yet started) scheduler and metrics."""

    live: LiveService
    scheduler: RecognizerScheduler
    clock: Clock
    metrics: Metrics


def clocked_service(
    tmp_path: Path,
    engine: FakeEngine,
    config: Config,
    stream: StreamConfig,
    listener: LiveListener | None = None,
) -> Clocked:
    clock = Clock()
    metrics = create_metrics()
    # No batch window: the scheduler would wait it out in real time (batch_wait_ms, beside
    # the injected clock) before every pass; a pass here batches what is already waiting.
    batching = dataclasses.replace(config.recognizer, batch_wait_ms=0)
    scheduler = RecognizerScheduler(engine, batching, metrics)
    live = LiveService(
        stream,
        config.recognizer,
        decode_passes(config),
        scheduler,
        Spool(tmp_path),
        metrics,
        engine,
        listener,
        clock,
    )
    return Clocked(live, scheduler, clock, metrics)


async def test_a_moved_clock_closes_a_quiet_talker_and_expires_the_session(
    tmp_path: Path,
) -> None:
    engine = FakeEngine()
    listener = Left()
    stream = StreamConfig(answer_wait_ms=0, idle_close_ms=4_000, session_ttl_s=60)
    clocked = clocked_service(tmp_path, engine, load_config(None, environ={}), stream, listener)
    live, scheduler, clock = clocked.live, clocked.scheduler, clocked.clock
    await scheduler.start()
    try:
        for second in range(3):
            await live.process(*fragment(second, VOICED))
            clock.now += 1.0
        live.tick()
        assert all(e.status == "progress" for e in await live.process(*fragment(3, VOICED)))
        # The talker goes quiet (sends nothing): at idle_close_ms on the clock its
        # combination closes and its final is asked for.
        clock.now += 3.9
        live.tick()
        assert live.snapshot()["pending_finals"] == 0
        clock.now += 0.2
        live.tick()
        session = next(iter(live._sessions.values()))
        await asyncio.gather(*session.in_flight)
        answer = session.stream.take_answer()
        assert [e.status for e in answer] == ["final"]
        # Four seconds said: the words of its half-second windows, less the VAD's trigger.
        said = fake_text(np.concatenate([VOICED] * 4)).split()
        assert set(answer[0].text.split()) == set(said)
        assert len(said) - 2 <= len(answer[0].text.split()) <= len(said)
        # An hour of wall time is one step of the clock: past session_ttl_s it expires.
        clock.now += 55.0
        live.tick()
        assert listener.left == []
        clock.now += 2.0
        live.tick()
        assert listener.left == [("conf", "p")] and live.snapshot()["participants"] == 0
    finally:
        await live.stop()
        await scheduler.stop()


async def test_a_final_whose_request_was_cancelled_is_settled_with_the_live_text(
    tmp_path: Path,
) -> None:
    """Both recognizer backends cancel the requests still queued when they stop. Here the
    real scheduler stops while the live service still runs (the app stops the live service
    first: this is a defence), with a final queued: the final is settled with the progress
    text the talker had. It stayed unsettled, so pending_finals stayed 1 and every later
    answer of that participant was held back (finals are delivered in order)."""
    stream = StreamConfig(answer_wait_ms=0, idle_close_ms=4_000, progress_min_interval_ms=0)
    clocked = clocked_service(tmp_path, FakeEngine(), load_config(None, environ={}), stream)
    live, scheduler, clock = clocked.live, clocked.scheduler, clocked.clock
    await scheduler.start()
    try:
        for second in range(3):
            await live.process(*fragment(second, VOICED))
            await asyncio.gather(*live._sessions[("conf", "p")].in_flight)  # each pass settles
            clock.now += 1.0
        session = live._sessions[("conf", "p")]
        assert session.stream.open is not None
        said = session.stream.open.text
        assert said.strip()
        clock.now += 4.1
        live.tick()  # the talker went quiet: its final is queued
        await scheduler.stop()  # ... and cancelled
        await asyncio.gather(*session.in_flight, return_exceptions=True)
        assert live.snapshot()["pending_finals"] == 0
        assert [(e.status, e.text) for e in session.stream.take_answer()] == [("final", said)]
    finally:
        await live.stop()
        await scheduler.stop()


async def test_words_committed_past_a_max_length_cut_are_said_once(tmp_path: Path) -> None:
    """A combination that reaches stream.max_combination_ms is cut at its last pause, and what
    follows goes on in the next one. Progress passes may already have committed words past
    that pause; the cut never goes back before them (they were in both finals: the first
    said more words than its audio held, the second said them again)."""
    half = SAMPLE_RATE // 2
    # A level per half second (FakeEngine says one word per half second, chosen by level),
    # and a 0.3 s pause at 12 s: the last pause before the 16 s maximum.
    levels = [((j % 12) + 3.5) / 100 * np.sqrt(2) for j in range(40)]
    speech = (np.repeat(levels, half) * np.sin(np.arange(20 * SAMPLE_RATE) * 0.05)).astype(
        np.float32
    )
    speech[12 * SAMPLE_RATE : int(12.3 * SAMPLE_RATE)] = 0
    stream = StreamConfig(
        answer_wait_ms=0,
        idle_close_ms=4_000,
        progress_min_interval_ms=0,
        max_combination_ms=16_000,
        pause_ms=2_000,
    )
    clocked = clocked_service(tmp_path, FakeEngine(), load_config(None, environ={}), stream)
    live, clock = clocked.live, clocked.clock
    await clocked.scheduler.start()
    finals = []
    try:
        for second in range(20):
            samples = speech[second * SAMPLE_RATE : (second + 1) * SAMPLE_RATE]
            finals += [
                e for e in await live.process(*fragment(second, samples)) if e.status == "final"
            ]
            await asyncio.gather(*live._sessions[("conf", "p")].in_flight)  # each pass settles
            clock.now += 1.0
        clock.now += 4.1
        live.tick()
        session = live._sessions[("conf", "p")]
        await asyncio.gather(*session.in_flight)
        finals += [e for e in session.stream.take_answer() if e.status == "final"]
    finally:
        await live.stop()
        await clocked.scheduler.stop()
    assert len(finals) == 2
    windows = [e.duration * SAMPLE_RATE // 1000 // half for e in finals]
    words = [e.text.split() for e in finals]
    # No final says more words than its audio has half seconds, and together they say each
    # half second of the 20 s (less the pause's) at most once.
    assert all(len(w) <= n for w, n in zip(words, windows)), (words, windows)
    assert len(words[0]) + len(words[1]) <= 40
