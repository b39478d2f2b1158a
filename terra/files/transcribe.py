"""Recognize decoded tracks: VAD regions per channel, chunks of whole utterances, requests
through the recognizer scheduler at background priority, timed utterances back.

The VAD planning is terra.chunking's, as for the minutes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from terra.audio import SAMPLE_RATE, Samples
from terra.chunking import ChunkOptions, plan_track
from terra.recognizer.options import DecodeOptions
from terra.recognizer.types import (
    Priority,
    Recognition,
    RecognitionRequest,
    Vocabulary,
    Word,
)
from terra.retry import Submit, until_taken
from terra.tasks import gather_or_cancel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FileOptions:
    """Per-file recognition settings (the dialects map their parameters onto these)."""

    decode: DecodeOptions  # the files pass's (files.beam_size), with the job's task and words
    language: str | None = None  # None: detect per chunk
    prompt_tokens: tuple[int, ...] = ()
    chunking: ChunkOptions = ChunkOptions()
    max_in_flight: int = 3


@dataclass(frozen=True, slots=True)
class Utterance:
    """Text of one channel between ``start_s`` and ``end_s`` (seconds from the file's start)."""

    channel: int
    start_s: float
    end_s: float
    text: str
    language: str
    words: tuple[Word, ...] = ()
    alternatives: tuple[str, ...] = ()  # other hypotheses of a chunk that is one utterance


def plan(track: Samples, options: FileOptions) -> list[tuple[int, int]]:
    """Sample ranges ``[start, end)`` to recognize: VAD speech joined into utterance chunks."""
    return [(c.start, c.end) for c in plan_track(track, options.chunking)]


async def transcribe(
    tracks: Sequence[Samples], options: FileOptions, submit: Submit
) -> list[Utterance]:
    """All channels' utterances, ordered by start time then channel."""
    plans = await asyncio.gather(*(asyncio.to_thread(plan, t, options) for t in tracks))
    gate = asyncio.Semaphore(options.max_in_flight)

    async def one(channel: int, start: int, end: int) -> list[Utterance]:
        request = RecognitionRequest(
            audio=tracks[channel][start:end],
            language=options.language,
            priority=Priority.BACKGROUND,
            options=options.decode,
            prompt_tokens=options.prompt_tokens,
        )
        async with gate:
            result = await until_taken(submit, request)
        return utterances_of(result, channel, start, end)

    # One failed chunk fails the file with none of the others left running (they would go
    # on sending the rest of the file to the recognizer for a job that has failed).
    parts = await gather_or_cancel(
        one(c, s, e) for c, ranges in enumerate(plans) for s, e in ranges
    )
    found = [u for part in parts for u in part]
    return sorted(found, key=lambda u: (u.start_s, u.channel))


def utterances_of(result: Recognition, channel: int, start: int, end: int) -> list[Utterance]:
    """A chunk's result as utterances: one per timed segment (the chunk when untimed)."""
    if result.dropped_reason or not result.text.strip():
        return []
    offset = start / SAMPLE_RATE
    chunk_end = end / SAMPLE_RATE
    out = []
    for segment in result.segments:
        text = segment.text.strip()
        if not text:
            continue
        words = tuple(
            Word(
                round(offset + w.start_s, 3),
                round(min(chunk_end, offset + w.end_s), 3),
                w.text,
                w.probability,
            )
            for w in segment.words
        )
        out.append(
            Utterance(
                channel,
                round(offset + segment.start_s, 3),
                round(min(chunk_end, offset + segment.end_s), 3),
                text,
                result.language,
                words,
            )
        )
    if not out:
        out.append(
            Utterance(
                channel, round(offset, 3), round(chunk_end, 3), result.text.strip(), result.language
            )
        )
    if len(out) == 1 and result.alternatives:
        # n-best hypotheses are of the whole chunk: they fit only a chunk that is one utterance
        out[0] = dataclasses.replace(
            out[0], alternatives=tuple(a.strip() for a in result.alternatives)
        )
    return out


def hint_tokens(engine: Vocabulary, words: Sequence[str]) -> tuple[int, ...]:
    """Hint words as Whisper previous-text tokens, made with the engine's own tokenizer."""
    text = ", ".join(w.strip() for w in words if w.strip())
    if not text:
        return ()
    return engine.encode_text(" " + text)
