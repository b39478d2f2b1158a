"""Committing the settled start of a long combination, so later passes only see its tail.

A progress pass decodes with timestamp tokens; its segments are compared with the previous
pass over the same audio. The leading segments whose text the previous pass said too (ending
well before the live edge) are committed: their text is kept, their audio is trimmed away, and
the committed text becomes the next passes' context (Whisper's previous-text prompt). This
is whisper_streaming's LocalAgreement, applied at Whisper's own segment boundaries. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

SECONDS_PER_TIMESTAMP = 0.02


@dataclass(frozen=True, slots=True)
class TimedSegment:
    start_s: float
    end_s: float
    tokens: tuple[int, ...]  # text tokens only


def split_segments(tokens: tuple[int, ...], timestamp_begin: int) -> list[TimedSegment]:
    """Segments between timestamp token pairs: ``<|t0|> text <|t1|>`` (unclosed tail dropped)."""
    segments: list[TimedSegment] = []
    start: float | None = None
    text: list[int] = []
    for token in tokens:
        if token >= timestamp_begin:
            time_s = (token - timestamp_begin) * SECONDS_PER_TIMESTAMP
            if start is None:
                start, text = time_s, []
            else:
                if text:
                    segments.append(TimedSegment(start, time_s, tuple(text)))
                start, text = None, []
        elif start is not None:
            text.append(token)
    return segments


def agreed_count(
    previous: list[TimedSegment],
    current: list[TimedSegment],
    audio_s: float,
    edge_guard_s: float,
) -> int:
    """How many leading segments of the current pass the previous pass said too: their text
    tokens start the previous pass's text (LocalAgreement-2, cut at the current pass's
    segment ends), each ending before the live edge. The previous pass may have cut the same
    words into other segments: over a shorter buffer Whisper often says one long segment."""
    said = tuple(t for s in previous for t in s.tokens)
    count = 0
    at = 0
    for segment in current:
        end = at + len(segment.tokens)
        if said[at:end] != segment.tokens or segment.end_s > audio_s - edge_guard_s:
            break
        at = end
        count += 1
    return count


def settled_count(current: list[TimedSegment], audio_s: float, guard_s: float) -> int:
    """Leading segments of one pass that end at least ``guard_s`` before the live edge."""
    count = 0
    for segment in current:
        if segment.end_s > audio_s - guard_s:
            break
        count += 1
    return count


def shift(segments: list[TimedSegment], seconds: float) -> list[TimedSegment]:
    """The same segments timed from ``seconds`` later (after a commit trimmed the audio)."""
    return [TimedSegment(s.start_s - seconds, s.end_s - seconds, s.tokens) for s in segments]
