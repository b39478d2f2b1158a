"""The participant stream (VAD + combination rules) on real speech and exact silence."""

from __future__ import annotations

import numpy as np
import pytest

from terra.audio import SAMPLE_RATE
from terra.config import StreamConfig
from terra.stream import (
    CloseReason,
    Combination,
    CombinationState,
    Fragment,
    ParticipantStream,
)

from .conftest import clip, load_clip

T0 = 1_700_000_000.0
SILENCE = np.zeros(SAMPLE_RATE * 2, np.float32)


def feed(
    stream: ParticipantStream,
    samples: np.ndarray,
    start: float = T0,
    chunk_s: float = 2.0,
    prefix: str = "f",
) -> list[Combination]:
    closed: list[Combination] = []
    chunk = int(chunk_s * SAMPLE_RATE)
    for i, offset in enumerate(range(0, samples.size, chunk)):
        update = stream.add(
            Fragment(
                f"{prefix}{i}", start + offset / SAMPLE_RATE, samples[offset : offset + chunk]
            ),
            now=offset / SAMPLE_RATE,
        )
        closed.extend(update.closed)
    return closed


def test_silence_opens_nothing() -> None:
    stream = ParticipantStream(StreamConfig(), "c", "p")
    assert feed(stream, np.zeros(10 * SAMPLE_RATE, np.float32)) == []
    assert stream.open is None and stream.outbox == []


def test_speech_then_pause_closes_one_combination() -> None:
    speech = load_clip(clip("clips/pisets/test_sound_ru.wav").path)  # 3.2 s, one phrase
    stream = ParticipantStream(StreamConfig(), "c", "p")
    closed = feed(stream, np.concatenate([speech, SILENCE]))
    assert len(closed) == 1
    combination = closed[0]
    assert combination.close_reason is CloseReason.PAUSE
    assert combination.state is CombinationState.CLOSED
    assert 1.5 < combination.duration_ms / 1000 < 3.5
    assert combination.post_ids == ["f0", "f1"]
    # The combination starts where the speech starts, not at the fragment.
    assert T0 < combination.start_time < T0 + 1.0


def test_pause_length_decides_how_speech_is_split() -> None:
    speech = load_clip(clip("clips/speechbrain/spk1_snt1.wav").path)
    gap = np.zeros(int(0.9 * SAMPLE_RATE), np.float32)
    audio = np.concatenate([speech, gap, speech, SILENCE])
    short_pause = ParticipantStream(StreamConfig(pause_ms=600), "c", "p")
    long_pause = ParticipantStream(StreamConfig(pause_ms=1500), "c", "p")
    assert len(feed(short_pause, audio)) == 2
    assert len(feed(long_pause, audio)) == 1


def test_max_length_closes_and_the_next_combination_continues() -> None:
    speech = load_clip(clip("clips/faster_whisper/jfk.flac").path)
    stream = ParticipantStream(StreamConfig(max_combination_ms=5_000, pause_ms=2_000), "c", "p")
    closed = feed(stream, np.concatenate([speech, SILENCE, SILENCE]))
    assert len(closed) >= 2
    assert closed[0].close_reason is CloseReason.MAX_LENGTH
    assert all(c.duration_ms <= 5_000 for c in closed)
    # Back to back: each starts where the previous one ended (no audio lost in between).
    first, second = closed[0], closed[1]
    assert second.start_time == pytest.approx(
        first.start_time + first.length / SAMPLE_RATE, abs=0.031
    )


def test_gap_in_the_timeline_closes_the_combination() -> None:
    speech = load_clip(clip("clips/faster_whisper/jfk.flac").path)[: 4 * SAMPLE_RATE]
    stream = ParticipantStream(StreamConfig(), "c", "p")
    assert feed(stream, speech) == []
    assert stream.open is not None
    update = stream.add(Fragment("later", T0 + 60.0, SILENCE), now=4.0)
    assert update.held  # maybe an earlier fragment is still on its way
    closed = stream.tick(now=4.0 + 1.0, reorder_ms=400)
    assert [c.close_reason for c in closed] == [CloseReason.GAP]


def test_out_of_order_fragment_is_held_until_the_hole_is_filled() -> None:
    speech = load_clip(clip("clips/faster_whisper/jfk.flac").path)
    two = 2 * SAMPLE_RATE
    in_order = ParticipantStream(StreamConfig(), "c", "p")
    feed(in_order, speech[: 3 * two])
    shuffled = ParticipantStream(StreamConfig(), "c", "p")
    shuffled.add(Fragment("f0", T0, speech[:two]), now=0.0)
    assert shuffled.add(Fragment("f2", T0 + 4.0, speech[2 * two : 3 * two]), now=0.1).held
    assert not shuffled.add(Fragment("f1", T0 + 2.0, speech[two : 2 * two]), now=0.2).held
    assert shuffled.open is not None and in_order.open is not None
    assert shuffled.open.post_ids == in_order.open.post_ids == ["f0", "f1", "f2"]
    np.testing.assert_array_equal(shuffled.open.audio, in_order.open.audio)


def test_late_fragment_is_refused_by_the_live_timeline() -> None:
    stream = ParticipantStream(StreamConfig(), "c", "p")
    feed(stream, np.zeros(6 * SAMPLE_RATE, np.float32))
    assert stream.add(Fragment("old", T0, SILENCE), now=7.0).late


def test_idle_sender_closes_the_open_combination() -> None:
    speech = load_clip(clip("clips/faster_whisper/jfk.flac").path)[: 4 * SAMPLE_RATE]
    stream = ParticipantStream(StreamConfig(idle_close_ms=3_000), "c", "p")
    feed(stream, speech)
    assert stream.tick(now=4.0, reorder_ms=400) == []
    closed = stream.tick(now=2.0 + 3.5, reorder_ms=400)
    assert [c.close_reason for c in closed] == [CloseReason.IDLE]


def test_late_fragments_do_not_keep_a_combination_open() -> None:
    """A sender whose clock stepped back keeps posting, but every fragment is behind the
    timeline (spooled only): the combination open at the step gets no more audio, and
    closes idle_close_ms after the last fragment that reached it (it used to stay open, its
    final never asked for, as long as late fragments kept coming)."""
    speech = load_clip(clip("clips/faster_whisper/jfk.flac").path)[: 4 * SAMPLE_RATE]
    stream = ParticipantStream(StreamConfig(idle_close_ms=3_000), "c", "p")
    feed(stream, speech)  # fed at now 0.0 and 2.0
    assert stream.open is not None
    closed = []
    for k in range(2, 6):
        now = 2.0 * k
        assert stream.add(Fragment(f"late{k}", T0 - 100.0 + now, speech[:SAMPLE_RATE]), now).late
        closed += stream.tick(now=now + 0.1, reorder_ms=400)
    assert [c.close_reason for c in closed] == [CloseReason.IDLE]
    assert stream.open is None


def test_answer_lists_undelivered_finals_in_order_then_progress() -> None:
    speech = load_clip(clip("clips/speechbrain/spk1_snt1.wav").path)
    gap = np.zeros(SAMPLE_RATE, np.float32)
    stream = ParticipantStream(StreamConfig(), "c", "p")
    closed = feed(stream, np.concatenate([speech, gap, speech, gap, speech[:SAMPLE_RATE]]))
    assert len(closed) == 2 and stream.open is not None
    stream.open.text = " the child"
    # The second final is ready first: it may not overtake the first, so everything still
    # shows as progress (the first with no text yet).
    stream.set_final(closed[1], " second")
    answer = stream.take_answer()
    assert [(e.status, e.text) for e in answer] == [
        ("progress", ""),
        ("progress", " second"),
        ("progress", " the child"),
    ]
    stream.set_final(closed[0], " first")
    answer = stream.take_answer()
    assert [(e.status, e.text) for e in answer] == [
        ("final", " first"),
        ("final", " second"),
        ("progress", " the child"),
    ]
    assert [e.status for e in stream.take_answer()] == ["progress"]  # finals go out once


def test_progress_lists_the_fragments_its_text_was_made_from_and_final_lists_all() -> None:
    """The post_ids rule: a client knows a fragment is transcribed when a TextElem lists it."""
    speech = load_clip(clip("clips/faster_whisper/jfk.flac").path)
    stream = ParticipantStream(StreamConfig(), "c", "p")
    feed(stream, speech[: 2 * SAMPLE_RATE])
    combination = stream.open
    assert combination is not None and combination.post_ids == ["f0"]
    assert stream.take_answer()[0].post_ids == ()  # no text yet: it covers nothing
    assert stream.covered("f0") is False
    version, made_from = combination.version, tuple(combination.post_ids)
    feed(stream, speech[2 * SAMPLE_RATE : 4 * SAMPLE_RATE], start=T0 + 2.0, prefix="g")
    assert combination.post_ids == ["f0", "g0"]
    stream.set_progress(combination, version, " and so", made_from)
    (elem,) = stream.take_answer()
    assert (elem.status, elem.post_ids) == ("progress", ("f0",))
    assert stream.covered("f0") is True and stream.covered("g0") is False
    assert stream.covered("never-sent") is None
    rest = np.concatenate([speech[4 * SAMPLE_RATE :], SILENCE])
    closed = feed(stream, rest, start=T0 + 4.0, prefix="h")
    assert closed == [combination]
    stream.set_final(combination, " and so my fellow americans")
    final = stream.take_answer()[0]
    assert final.status == "final" and final.post_ids == tuple(combination.post_ids)
    assert {"f0", "g0", "h0"} <= set(final.post_ids)


def test_pre_roll_keeps_copies_not_views_into_fragments() -> None:
    """A view into a fragment would keep the whole fragment alive (#11 row 5)."""
    stream = ParticipantStream(StreamConfig(), "c", "p")
    fragment = np.zeros(2 * SAMPLE_RATE, np.float32)
    stream.add(Fragment("f0", T0, fragment), now=0.0)
    kept = [chunk for chunk, _ in stream._pre_roll]
    assert kept and all(chunk.base is None for chunk in kept)


def test_a_fragment_far_ahead_does_not_silence_the_live_text() -> None:
    """One fragment stamped 10 minutes ahead (#11 row 8) is set aside; the fragments that
    follow on the real timeline still reach the live text. Two that continue each other far
    ahead are a real jump (a long mute): the timeline moves."""
    speech = load_clip(clip("clips/faster_whisper/jfk.flac").path)
    two = 2 * SAMPLE_RATE
    stream = ParticipantStream(StreamConfig(), "c", "p")
    feed(stream, speech[:two])
    combination = stream.open
    assert combination is not None
    assert stream.add(Fragment("future", T0 + 600.0, speech[two : 2 * two]), now=2.0).ahead
    update = stream.add(Fragment("next", T0 + 2.0, speech[two : 2 * two]), now=2.1)
    assert not (update.late or update.ahead or update.held)
    assert stream.open is combination and combination.post_ids == ["f0", "next"]
    assert stream.add(Fragment("j0", T0 + 900.0, speech[:two]), now=3.0).ahead
    jumped = stream.add(Fragment("j1", T0 + 902.0, speech[two : 2 * two]), now=3.1)
    assert not (jumped.late or jumped.ahead or jumped.held)
    later = [*stream.outbox, *([stream.open] if stream.open else [])]
    assert any("j0" in c.post_ids for c in later)  # the set-aside fragment was fed first
    assert stream.add(Fragment("old", T0 + 4.0, speech[:two]), now=3.2).late  # it moved
