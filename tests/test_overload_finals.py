"""The overload degrade of live finals (recognizer.overload_finals_s): a final asked for
while the finals already waiting hold that much audio is decoded with the overload beam
(greedy) instead of the finals' beam; it still gets all its audio, is never dropped, and
once the owed finals drain, finals are beam finals again.

LiveService on an injected clock (combinations closed by ``tick``), its scheduler started
only once the finals are queued, so what is owed at each close is exact. The recognizer is
FakeEngine (tests/fakes.py), a fake that records each request's beam: this is the live
service's rule, not recognition."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from terra.audio import SAMPLE_RATE
from terra.config import StreamConfig, load_config
from terra.live import Session
from terra.recognizer.types import Priority, Recognition, RecognitionRequest
from tests.fakes import FakeEngine, fake_text
from tests.test_live_clock import Clocked, clocked_service, fragment
from tests.test_overload import VOICED


class Beams(FakeEngine):
    """FakeEngine that records each final it decodes: (language, beam size, audio seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.finals: list[tuple[str | None, int, float]] = []

    def recognize(self, requests: Sequence[RecognitionRequest]) -> list[Recognition]:
        for r in requests:
            if r.priority is Priority.FINAL:
                self.finals.append((r.language, r.options.beam_size, r.audio.size / SAMPLE_RATE))
        return super().recognize(requests)


# Each talker's language is its name, so the engine's record tells the talkers apart.
TALKERS = ("t0", "t1", "t2", "t3")
STREAM_DEFAULT_INTERVAL_MS = StreamConfig().progress_min_interval_ms
SAID = fake_text(np.concatenate([VOICED] * 3)).split()  # what each talker says in 3 s


def owed_finals_service(
    tmp_path: Path, engine: FakeEngine, recognizer: dict[str, float], progress_min_interval_ms: int
) -> Clocked:
    config = load_config(None, environ={}, overrides={"recognizer": recognizer})
    stream = StreamConfig(
        answer_wait_ms=0, idle_close_ms=4_000, progress_min_interval_ms=progress_min_interval_ms
    )
    return clocked_service(tmp_path, engine, config, stream)


def sessions(clocked: Clocked) -> list[Session]:
    return [clocked.live._sessions[("conf", t)] for t in TALKERS]


async def settle(clocked: Clocked) -> None:
    await asyncio.gather(*(t for s in sessions(clocked) for t in s.in_flight))


async def talk(clocked: Clocked, *, passes: bool) -> None:
    """Every talker speaks for 3 s. ``passes``: the live passes of each second run before
    the next (the scheduler is running); else nothing is decoded."""
    for second in range(3):
        for talker in TALKERS:
            await clocked.live.process(*fragment(second, VOICED, talker, language=talker))
        if passes:
            await settle(clocked)
        clocked.clock.now += 1.0


def go_quiet(clocked: Clocked) -> None:
    """All talkers go quiet: their combinations close on one tick, one after the other,
    before any final is decoded."""
    clocked.clock.now += 4.1
    clocked.live.tick()


def final_of(session: Session) -> str:
    (final,) = [e for e in session.stream.take_answer() if e.status == "final"]
    return final.text


async def test_finals_past_the_owed_audio_bound_are_greedy_whole_and_all_delivered(
    tmp_path: Path,
) -> None:
    engine = Beams()
    overload = {"overload_finals_s": 5.0, "final_beam_size": 3}
    clocked = owed_finals_service(tmp_path, engine, overload, STREAM_DEFAULT_INTERVAL_MS)
    live, scheduler, clock = clocked.live, clocked.scheduler, clocked.clock
    try:
        # The scheduler is not started while the combinations close: each final is owed.
        await talk(clocked, passes=False)
        go_quiet(clocked)
        assert scheduler.queued_finals == 4
        await scheduler.start()
        await settle(clocked)
        # Each final asked for while the finals before it held under 5 s of audio is a beam
        # final; past that, greedy.
        decoded = {language: (beam, seconds) for language, beam, seconds in engine.finals}
        assert set(decoded) == set(TALKERS)
        owed = 0.0
        for talker in TALKERS:
            beam, seconds = decoded[talker]
            assert beam == (3 if owed < 5.0 else 1), (talker, owed)
            assert seconds >= 2.5  # the whole combination, greedy or not
            owed += seconds
        beams = [decoded[t][0] for t in TALKERS]
        assert beams[0] == 3 and beams[-1] == 1  # the bound was crossed
        overloaded = clocked.metrics.registry.get_sample_value("terra_overload_finals_total")
        assert overloaded == beams.count(1)
        # Every final delivered, with the words of all its audio.
        for session in sessions(clocked):
            text = final_of(session)
            assert set(text.split()) == set(SAID)
            assert len(SAID) - 2 <= len(text.split()) <= len(SAID)
        assert scheduler.owed_final_s == 0.0
        # Drained: the next final is a beam final again.
        engine.finals.clear()
        for second in range(10, 13):
            await live.process(*fragment(second, VOICED, "t0", language="t0"))
            clock.now += 1.0
        clock.now += 4.1
        live.tick()
        await settle(clocked)
        assert [(language, beam) for language, beam, _ in engine.finals] == [("t0", 3)]
    finally:
        await live.stop()
        await scheduler.stop()


async def test_finals_past_the_owed_bound_are_settled_from_the_live_text_without_a_model_call(
    tmp_path: Path,
) -> None:
    """recognizer.max_owed_final_s: once the finals waiting hold that much audio, a final is
    not queued; it is settled at once with the text its live passes made, so the owed work
    (memory, and the drain after an overload) stays bounded. Every final is still delivered."""
    engine = Beams()
    bound = {"overload_finals_s": 100.0, "max_owed_final_s": 5.0}
    clocked = owed_finals_service(tmp_path, engine, bound, STREAM_DEFAULT_INTERVAL_MS)
    scheduler = clocked.scheduler
    try:
        # Nothing is decoded (the scheduler is not started): no talker has live text yet.
        await talk(clocked, passes=False)
        go_quiet(clocked)
        # Two finals (2 x 3 s of audio) reach the 5 s bound; the others are not queued.
        assert scheduler.queued_finals == 2
        assert scheduler.owed_final_s < 5.0 + 3.5
        await scheduler.start()
        await settle(clocked)
        decoded = sorted(str(language) for language, _, _ in engine.finals)
        assert decoded == ["t0", "t1"]
        unrecognized = clocked.metrics.registry.get_sample_value("terra_unrecognized_finals_total")
        assert unrecognized == 2
        for talker, session in zip(TALKERS, sessions(clocked)):
            finals = [e for e in session.stream.take_answer() if e.status == "final"]
            assert session.stream.pending_finals == 0  # settled, none left owed
            if talker in decoded:
                (final,) = finals
                assert set(final.text.split()) == set(SAID)
            else:  # settled from the live text, which is empty (no pass ever ran for it)
                assert all(not e.text.strip() for e in finals)
        assert scheduler.owed_final_s == 0.0
    finally:
        await clocked.live.stop()
        await scheduler.stop()


async def test_a_final_past_the_owed_bound_is_the_text_its_live_passes_made(
    tmp_path: Path,
) -> None:
    """The same bound with the live passes running: the finals settled without a model call
    carry the progress text their talkers already had (here all of their words)."""
    engine = Beams()
    bound = {"overload_finals_s": 100.0, "max_owed_final_s": 5.0}
    clocked = owed_finals_service(tmp_path, engine, bound, progress_min_interval_ms=0)
    await clocked.scheduler.start()
    try:
        # The finals are asked for one after the other before any is decoded, so t0 and t1
        # (0 s, then 3 s owed) are queued, t2 and t3 are not.
        await talk(clocked, passes=True)
        texts = {t: s.stream.open.text for t, s in zip(TALKERS, sessions(clocked)) if s.stream.open}
        assert set(texts) == set(TALKERS) and all(texts.values())
        go_quiet(clocked)
        await settle(clocked)
        assert sorted(str(language) for language, _, _ in engine.finals) == ["t0", "t1"]
        for talker, session in zip(TALKERS, sessions(clocked)):
            if talker in ("t2", "t3"):
                assert final_of(session) == texts[talker]
    finally:
        await clocked.live.stop()
        await clocked.scheduler.stop()


async def test_an_english_speakers_caption_past_the_owed_bound_is_its_text(
    tmp_path: Path,
) -> None:
    """Live captions (lang2=en) of an English speaker are the final's text itself; a final
    settled from the live text past recognizer.max_owed_final_s keeps that rule (its caption
    was empty: the bound's caption stand-in was taken for a failed translation)."""
    engine = Beams()
    bound = {"overload_finals_s": 100.0, "max_owed_final_s": 2.0}
    clocked = owed_finals_service(tmp_path, engine, bound, progress_min_interval_ms=0)
    live = clocked.live
    await clocked.scheduler.start()
    talkers = ("a", "b")
    try:
        for second in range(3):
            for talker in talkers:
                await live.process(*fragment(second, VOICED, talker, captions="en"))
            await asyncio.gather(
                *(t for p in talkers for t in live._sessions[("conf", p)].in_flight)
            )
            clocked.clock.now += 1.0
        go_quiet(clocked)
        # a's final is queued (nothing owed yet); b's is past the 2 s bound: not decoded.
        await asyncio.gather(*(t for p in talkers for t in live._sessions[("conf", p)].in_flight))
        assert len(engine.finals) == 1
        for talker in talkers:
            (final,) = [
                e
                for e in live._sessions[("conf", talker)].stream.take_answer()
                if e.status == "final"
            ]
            assert final.text.strip(), talker
            assert final.translation == final.text, talker
    finally:
        await live.stop()
        await clocked.scheduler.stop()
