"""Committing agreed segments (pure functions of recognizer/commit.py)."""

from __future__ import annotations

from terra.recognizer.commit import TimedSegment, agreed_count, settled_count, shift, split_segments

TS = 50364  # <|0.00|>; each further id is 0.02 s later


def ts(seconds: float) -> int:
    return TS + round(seconds / 0.02)


def test_split_segments_keeps_closed_pairs_and_drops_the_open_tail() -> None:
    tokens = (ts(0), 1, 2, ts(1.5), ts(1.5), 3, ts(2.0), ts(2.0), 4)
    assert split_segments(tokens, TS) == [
        TimedSegment(0.0, 1.5, (1, 2)),
        TimedSegment(1.5, 2.0, (3,)),
    ]


def test_a_segment_the_previous_pass_said_inside_a_longer_one_is_agreed() -> None:
    previous = [TimedSegment(0.0, 4.0, (1, 2, 3, 4))]
    current = [TimedSegment(0.0, 2.5, (1, 2)), TimedSegment(2.5, 6.0, (3, 4, 5))]
    assert agreed_count(previous, current, audio_s=6.0, edge_guard_s=1.0) == 1


def test_disagreement_or_the_live_edge_stops_the_commit() -> None:
    previous = [TimedSegment(0.0, 4.0, (1, 2, 3, 4))]
    changed = [TimedSegment(0.0, 2.5, (1, 9)), TimedSegment(2.5, 6.0, (3, 4))]
    assert agreed_count(previous, changed, audio_s=6.0, edge_guard_s=1.0) == 0
    near_edge = [TimedSegment(0.0, 2.5, (1, 2)), TimedSegment(2.5, 5.5, (3, 4))]
    assert agreed_count(previous, near_edge, audio_s=6.0, edge_guard_s=1.0) == 1
    assert agreed_count([], near_edge, audio_s=6.0, edge_guard_s=1.0) == 0


def test_settled_count_and_shift() -> None:
    segments = [TimedSegment(0.0, 2.0, (1,)), TimedSegment(2.0, 5.0, (2,))]
    assert settled_count(segments, audio_s=7.0, guard_s=3.0) == 1
    assert shift(segments[1:], 2.0) == [TimedSegment(0.0, 3.0, (2,))]
