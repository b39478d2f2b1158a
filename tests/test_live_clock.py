"""LiveService on an injected clock: what time alone decides (a quiet talker's combination
closed and its final asked for, an idle session expired) happens when the test moves the
clock and calls ``tick``, with no sleeps. FakeEngine (tests/fakes.py) is a fake: these are
the live service's timers, not recognition."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from terra.config import Config, StreamConfig, load_config
from terra.live import FragmentInput, LiveListener, LiveService
from terra.metrics import Metrics, create_metrics
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
    second: int, samples: np.ndarray, participant: str = "p", language: str = "en"
) -> FragmentInput:
    return FragmentInput(
        "conf", participant, participant.upper(), 1_719_512_467.0 + second,
        f"{participant}-{second}", language, None, True, False, samples.astype(np.float32),
    )  # fmt: skip


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
    scheduler = RecognizerScheduler(engine, config.recognizer, metrics)
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
            await live.process(fragment(second, VOICED))
            clock.now += 1.0
        live.tick()
        assert all(e.status == "progress" for e in await live.process(fragment(3, VOICED)))
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
