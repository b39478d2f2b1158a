"""Progress text under overload is shared among the talkers: no talker starves.

The live service and the real scheduler run on an injected clock, and the test is the
recognizer's capacity: each simulated second every talker sends a fragment, and the test
lets the scheduler make only a third as many model calls as there are talkers (one worker,
batches of one), so most fragments cannot get a pass of their own. The recognizer is
FakeEngine (tests/fakes.py), a fake: this is about who gets the model's time, not what it
says. Nothing sleeps: the clock is moved and ``tick`` called, and the model calls are made
by the test (``_run_one``), one at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from terra.config import RecognizerConfig, StreamConfig, load_config
from terra.live import LiveService
from terra.metrics import create_metrics
from terra.params import FragmentParams
from terra.recognizer.options import decode_passes
from terra.recognizer.scheduler import RecognizerScheduler
from terra.recognizer.types import Priority, Recognition, RecognitionRequest
from terra.spool import Spool
from tests.fakes import FakeEngine, fake_text
from tests.test_live_clock import Clock
from tests.test_overload import VOICED

TALKERS = 6
SECONDS = 24
CALLS_PER_SECOND = 2  # a third of the passes asked for


class ByTalker(FakeEngine):
    """FakeEngine that records, for each progress request, which talker it came from (the
    word of its last window: each talker speaks at its own level, so says its own word)."""

    def __init__(self) -> None:
        super().__init__()
        self.progress: list[str] = []

    def recognize(self, requests: Sequence[RecognitionRequest]) -> list[Recognition]:
        for r in requests:
            words = fake_text(r.audio).split()
            if r.priority is Priority.PROGRESS and words:
                self.progress.append(words[-1])
        return super().recognize(requests)


def fragment(talker: int, second: int, samples: np.ndarray) -> tuple[FragmentParams, np.ndarray]:
    return FragmentParams(
        "conf", f"t{talker}", f"T{talker}", 1_719_512_467.0 + second, f"t{talker}-{second}",
        "en", None, True, False,
    ), samples.astype(np.float32)  # fmt: skip


async def _one_loop_turn() -> None:
    """Let the tasks whose model call just resolved settle (one turn of the event loop; no
    time passes on any clock)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_overloaded_talkers_share_progress_passes_evenly(tmp_path: Path) -> None:
    engine = ByTalker()
    clock = Clock()
    metrics = create_metrics()
    recognizer = dataclasses.replace(
        RecognizerConfig(), workers=1, max_batch_size=1, batch_wait_ms=0
    )
    scheduler = RecognizerScheduler(engine, recognizer, metrics)
    live = LiveService(
        StreamConfig(answer_wait_ms=0, progress_min_interval_ms=1000),
        recognizer,
        decode_passes(load_config(None, environ={})),
        scheduler,
        Spool(tmp_path),
        metrics,
        engine,
        clock=clock,
    )
    levels = [0.03 + 0.015 * i for i in range(TALKERS)]
    voices = [(level / 0.1 * VOICED).astype(np.float32) for level in levels]
    words = [fake_text(voice).split()[-1] for voice in voices]
    assert len(set(words)) == TALKERS
    listed: list[set[str]] = [set() for _ in range(TALKERS)]
    loop = asyncio.get_running_loop()
    try:
        for second in range(SECONDS):
            for talker in range(TALKERS):
                answer = await live.process(*fragment(talker, second, voices[talker]))
                for elem in answer:
                    if elem.status == "progress" and elem.text.strip():
                        listed[talker] |= set(elem.post_ids)
            clock.now += 1.0
            live.tick()
            for _ in range(CALLS_PER_SECOND):
                if scheduler.depth:
                    await scheduler._run_one(loop)
                    await _one_loop_turn()
    finally:
        await live.stop()
        await scheduler.stop()

    order = engine.progress  # the talker of each pass, in the order the model made them
    passes = [order.count(word) for word in words]
    assert sum(passes) <= TALKERS * SECONDS // 2, "not overloaded: most fragments had a pass"
    # Even shares: nobody gets under half of the busiest talker's passes...
    assert min(passes) >= max(passes) / 2, passes
    # ... and nobody waits long: between two passes of one talker, at most two of everybody
    # else's (a queue served oldest first, one request per talker waiting).
    for word in words:
        at = [i for i, w in enumerate(order) if w == word]
        assert at and at[0] < 2 * TALKERS, (word, at)
        assert max(b - a for a, b in zip(at, at[1:])) <= 2 * TALKERS, (word, at)
    # Every talker saw progress text made from its audio, including its recent fragments.
    for talker in range(TALKERS):
        recent = {f"t{talker}-{s}" for s in range(SECONDS - 6, SECONDS)}
        assert listed[talker] & recent, (talker, sorted(listed[talker])[-5:])
