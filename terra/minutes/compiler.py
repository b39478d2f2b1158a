"""The minutes compiler: spooled fragments -> participant timelines -> VAD -> recognition ->
phrases of every participant in time order.

The planning and phrasing helpers are pure; :class:`MinutesCompiler` is async orchestration
that reads the spool and runs the VAD in a thread (``asyncio.to_thread``) and awaits the
recognizer for each batch of chunks, as the file dialects do.

Each participant is recognized on their own track, so two people talking at once stay two
phrases. Speech regions found by webrtcvad are joined into chunks of whole utterances (up
to ``max_chunk_s``, pauses included) and recognized with beam search, timestamp tokens and,
optionally, the participant's previous text as context and word timestamps; phrases are
then cut at pauses and sentence ends. Recognition is injected (``recognize``, awaited): the
server passes its scheduler (background priority); the command line and the benchmark call
the engine itself through :func:`in_thread`.

Time inside is counted in samples at 16 kHz from the conference origin (the earliest
fragment of anyone); seconds appear only in the phrases.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from terra.audio import SAMPLE_RATE, AudioLimits, Samples, decode_audio, ms_to_samples
from terra.chunking import plan_flags
from terra.config import MinutesConfig
from terra.minutes.types import Minutes, Phrase, Speaker
from terra.recognizer.options import DecodePasses
from terra.recognizer.types import Priority, Recognition, RecognitionRequest, Word
from terra.spool import StoredParticipant, conference_digest, read_conference

log = logging.getLogger(__name__)

Recognize = Callable[[Sequence[RecognitionRequest]], Awaitable[Sequence[Recognition]]]
BlockingRecognize = Callable[[Sequence[RecognitionRequest]], Sequence[Recognition]]
Progress = Callable[[float], None]

# Fragments whose start is this close to the end of the previous one continue its run
# (clients' clocks jitter); a larger hole is silence.
CONTIGUOUS_TOLERANCE_MS = 60
# The share of progress given to reading and VAD; recognition takes the rest.
READ_SHARE = 0.1
# A single speech region at least this long can be split in two when its text looks wrong.
MIN_SPLIT_S = 4.0
# Above this the text of a chunk is re-recognized in pieces (the engine's own collapse
# threshold, 2.4, is for live text; a minutes compile can afford a second look).
RETRY_COMPRESSION_RATIO = 2.0
# Language detection of a participant without lang1 reads this much of their speech.
DETECT_S = 28.0
_SENTENCE_END = (".", "!", "?", "…", "。", "！", "？")


class NothingSpooled(LookupError):
    """The conference has no spooled audio."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a fragment's samples ``[skip:skip+length]`` lie on the timeline."""

    offset: int
    skip: int
    length: int
    path: Path


@dataclass(frozen=True, slots=True)
class Chunk:
    participant: int  # index into the participants
    start: int  # samples from the origin
    end: int
    # Shorter pieces to recognize one by one when the whole looks like a decoding failure.
    fallback: tuple[tuple[int, int], ...] = ()


@dataclass(slots=True)
class _Run:
    """Contiguous fragments: where they start, and the VAD's frame flags over them."""

    start: int
    flags: list[NDArray[np.bool_]] = field(default_factory=list)


@dataclass(slots=True)
class Track:
    """One participant: where their audio lies, and what is left to recognize."""

    stored: StoredParticipant
    placements: list[Placement] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    next_chunk: int = 0
    language: str | None = None
    context: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class CompileResult:
    minutes: Minutes
    digest: str  # of the spooled input it was compiled from (spool.conference_digest)
    speech_s: float  # audio given to the recognizer
    seconds: float


# -- pure helpers: recognitions -> phrases ------------------------------------------------


def looks_wrong(result: Recognition, max_compression_ratio: float) -> bool:
    """Whisper's failure modes that survive the engine's guards: a loop that repeats a phrase,
    text much more repetitive than speech, or a decoding it was itself unsure of."""
    if result.dropped_reason or not result.text.strip():
        return False
    if result.compression_ratio > max_compression_ratio or result.avg_logprob < -1.0:
        return True
    words = [w.strip(".,!?;:…«»\"'()-–—").lower() for w in result.text.split()]
    words = [w for w in words if w]
    for n in range(2, 7):
        seen: dict[tuple[str, ...], int] = {}
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            seen[gram] = seen.get(gram, 0) + 1
            if seen[gram] >= (2 if n >= 4 else 3):
                return True
    return False


def _ends_sentence(text: str) -> bool:
    return text.rstrip().endswith(_SENTENCE_END)


def phrases_of(
    recognition: Recognition,
    participant_id: str,
    chunk_start_s: float,
    chunk_end_s: float,
    phrase_pause_s: float,
    sentence_pause_s: float,
) -> list[Phrase]:
    """Cut a chunk's text into phrases at pauses and at sentence ends followed by a pause.

    Words are used when the recognizer timed them; otherwise each timestamp segment is one
    unit, and text without segments is one phrase spanning the chunk."""
    units: list[Word] = []
    for segment in recognition.segments:
        if segment.words:
            units.extend(segment.words)
        elif segment.text.strip():
            units.append(Word(segment.start_s, segment.end_s, " " + segment.text.strip(), 1.0))
    if not units and recognition.text.strip():
        units.append(Word(0.0, chunk_end_s - chunk_start_s, recognition.text, 1.0))
    groups: list[list[Word]] = []
    for unit in units:
        if groups:
            previous = groups[-1][-1]
            gap = unit.start_s - previous.end_s
            if gap >= phrase_pause_s or (gap >= sentence_pause_s and _ends_sentence(previous.text)):
                groups.append([unit])
                continue
            groups[-1].append(unit)
        else:
            groups.append([unit])
    phrases = []
    for group in groups:
        text = " ".join("".join(w.text for w in group).split())
        if not text:
            continue
        start = min(max(chunk_start_s + group[0].start_s, chunk_start_s), chunk_end_s)
        end = min(max(chunk_start_s + group[-1].end_s, start), chunk_end_s)
        phrases.append(
            Phrase(participant_id, round(start, 3), round(end, 3), text, recognition.language)
        )
    return phrases


# -- reading the spool -------------------------------------------------------------------


class _AudioCache:
    """The few fragments last decoded (chunks are read in time order)."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._items: OrderedDict[Path, Samples] = OrderedDict()

    def get(self, path: Path) -> Samples:
        samples = self._items.get(path)
        if samples is None:
            samples = read_fragment(path)
            self._items[path] = samples
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(path)
        return samples


# Spooled fragments are terra's own 16 kHz WAVs, each at most one POST long.
SPOOLED_LIMITS = AudioLimits(max_seconds=3600.0)


def read_fragment(path: Path) -> Samples:
    """A spooled fragment as 16 kHz mono; an unreadable one is logged and read as nothing."""
    try:
        return decode_audio(path.read_bytes(), SPOOLED_LIMITS)
    except (OSError, ValueError) as e:
        log.warning("spooled fragment %s is unreadable (%s): skipped", path, e)
        return np.zeros(0, dtype=np.float32)


def read_range(
    placements: Sequence[Placement], start: int, end: int, cache: _AudioCache
) -> Samples:
    """The timeline's samples ``[start, end)``; holes are silence."""
    out = np.zeros(max(0, end - start), dtype=np.float32)
    for placement in placements:
        p_start, p_end = placement.offset, placement.offset + placement.length
        if p_end <= start or p_start >= end:
            continue
        samples = cache.get(placement.path)
        lo, hi = max(p_start, start), min(p_end, end)
        source = samples[placement.skip + lo - p_start : placement.skip + hi - p_start]
        out[lo - start : lo - start + source.size] = source
    return out


# -- the compiler --------------------------------------------------------------------------


class MinutesCompiler:
    """Compiles conferences (its settings are fixed, each compile's input and progress are
    the call's); cancel the task that awaits :meth:`compile` to stop one."""

    def __init__(
        self, config: MinutesConfig, recognize: Recognize, *, decode: DecodePasses, model: str = ""
    ) -> None:
        """``decode``: the options of the language detection and the minutes' passes."""
        self._config = config
        self._recognize = recognize
        self._decode = decode
        self._language_confidence = decode.minutes.rules.language_confidence
        self._model = model

    async def compile(
        self, spool_root: Path, conference_id: str, progress: Progress | None = None
    ) -> CompileResult:
        """``progress(fraction)`` is told how far the compile is, from 0 to 1."""
        report = progress or (lambda _: None)
        started = time.perf_counter()
        stored = await asyncio.to_thread(read_conference, spool_root, conference_id)
        if not stored:
            raise NothingSpooled(conference_id)
        digest = conference_digest(stored)
        origin_us = min(p.fragments[0].start_us for p in stored)
        tracks = [Track(p, language=p.language) for p in stored]
        total_bytes = sum(f.size for p in stored for f in p.fragments) or 1
        read_bytes = 0
        audio_samples = 0
        end_sample = 0
        for index, track in enumerate(tracks):
            runs = await asyncio.to_thread(self._place, track, origin_us)
            for placement in track.placements:
                audio_samples += placement.length
                end_sample = max(end_sample, placement.offset + placement.length)
            read_bytes += sum(f.size for f in track.stored.fragments)
            report(READ_SHARE * read_bytes / total_bytes)
            track.chunks = self._find_chunks(runs, index)
        cache = _AudioCache()
        await self._detect_languages(tracks, cache)
        phrases = await self._recognize_all(tracks, cache, report)
        phrases.sort(key=lambda p: (p.start_s, p.end_s, p.participant_id))
        origin = origin_us / 1_000_000
        minutes = Minutes(
            conference_id=conference_id,
            start_time=origin,
            end_time=origin + end_sample / SAMPLE_RATE,
            participants=tuple(
                Speaker(t.stored.participant_id, t.stored.name, t.language) for t in tracks
            ),
            phrases=tuple(phrases),
            audio_s=round(audio_samples / SAMPLE_RATE, 3),
            generated_at=time.time(),
            model=self._model,
        )
        speech = sum(c.end - c.start for t in tracks for c in t.chunks) / SAMPLE_RATE
        report(1.0)
        return CompileResult(minutes, digest, speech, time.perf_counter() - started)

    # -- timeline and VAD ----------------------------------------------------------------
    def _place(self, track: Track, origin_us: int) -> list[_Run]:
        """Lay the fragments on the timeline in runs of contiguous fragments (filling
        ``track.placements``) and run the VAD over each run."""
        config = self._config
        tolerance = ms_to_samples(CONTIGUOUS_TOLERANCE_MS)
        runs: list[_Run] = []
        vad = config.chunking.vad()
        expected: int | None = None
        for fragment in track.stored.fragments:
            samples = read_fragment(fragment.path)
            offset = round((fragment.start_us - origin_us) * SAMPLE_RATE / 1_000_000)
            skip = 0
            if expected is not None and abs(offset - expected) <= tolerance:
                offset = expected  # the same run: trust its own sample count over the clock
            elif expected is not None and offset < expected:
                skip = expected - offset  # overlaps what is already there: keep the new part
                offset = expected
            else:
                vad = config.chunking.vad()
                runs.append(_Run(offset))
            length = max(0, samples.size - skip)
            if length == 0:
                continue
            _, flags = vad.frames(samples[skip:])
            runs[-1].flags.append(flags)
            track.placements.append(Placement(offset, skip, length, fragment.path))
            expected = offset + length
        return runs

    def _find_chunks(self, runs: list[_Run], index: int) -> list[Chunk]:
        chunks: list[Chunk] = []
        for run in runs:
            flags = np.concatenate(run.flags) if run.flags else np.zeros(0, dtype=np.bool_)
            chunks.extend(
                Chunk(
                    index,
                    run.start + planned.start,
                    run.start + planned.end,
                    tuple((run.start + a, run.start + b) for a, b in planned.fallback),
                )
                for planned in plan_flags(flags, self._config.chunking, MIN_SPLIT_S)
            )
        return chunks

    # -- recognition ---------------------------------------------------------------------
    async def _detect_languages(self, tracks: list[Track], cache: _AudioCache) -> None:
        """A participant without lang1 gets the language of up to DETECT_S of their speech:
        a few seconds of one chunk are often too little for Whisper to be sure."""
        pending = [t for t in tracks if t.language is None and t.chunks]
        step = self._config.max_in_flight
        for group in (pending[i : i + step] for i in range(0, len(pending), step)):
            samples = await asyncio.to_thread(self._speech_samples, group, cache)
            requests = [
                RecognitionRequest(
                    audio=audio,
                    language=None,
                    priority=Priority.BACKGROUND,
                    options=self._decode.detect,
                )
                for audio in samples
            ]
            for track, result in zip(group, await self._recognize(requests)):
                if result.language_probability >= self._language_confidence:
                    track.language = result.language
                log.info(
                    "participant %s: language %s (p=%.2f)",
                    track.stored.participant_id,
                    track.language or "not sure",
                    result.language_probability,
                )

    def _speech_samples(self, tracks: Sequence[Track], cache: _AudioCache) -> list[Samples]:
        return [self._speech_sample(track, cache) for track in tracks]

    @staticmethod
    def _speech_sample(track: Track, cache: _AudioCache) -> Samples:
        pieces, total = [], 0
        limit = int(DETECT_S * SAMPLE_RATE)
        for chunk in track.chunks:
            take = min(chunk.end - chunk.start, limit - total)
            if take <= 0:
                break
            pieces.append(read_range(track.placements, chunk.start, chunk.start + take, cache))
            total += take
        return np.concatenate(pieces)

    async def _recognize_all(
        self, tracks: list[Track], cache: _AudioCache, progress: Progress
    ) -> list[Phrase]:
        total = sum(c.end - c.start for t in tracks for c in t.chunks) or 1
        done = 0
        phrases: list[Phrase] = []
        while True:
            batch = self._next_batch(tracks)
            if not batch:
                return phrases
            ranges = [(c.participant, c.start, c.end) for c in batch]
            requests = await asyncio.to_thread(self._requests, tracks, ranges, cache, True)
            results = list(await self._recognize(requests))
            retry = [
                (i, piece)
                for i, (chunk, result) in enumerate(zip(batch, results))
                if chunk.fallback and looks_wrong(result, RETRY_COMPRESSION_RATIO)
                for piece in chunk.fallback
            ]
            pieces: dict[int, list[tuple[int, int, Recognition]]] = {}
            if retry:
                log.info(
                    "re-recognizing %d chunk(s) in %d pieces",
                    len({i for i, _ in retry}),
                    len(retry),
                )
                ranges = [(batch[i].participant, a, b) for i, (a, b) in retry]
                again = await asyncio.to_thread(self._requests, tracks, ranges, cache, False)
                retried = await self._recognize(again)
                for (i, (a, b)), result in zip(retry, retried):
                    pieces.setdefault(i, []).append((a, b, result))
            for i, (chunk, result) in enumerate(zip(batch, results)):
                track = tracks[chunk.participant]
                track.next_chunk += 1
                parts = pieces.get(i, [(chunk.start, chunk.end, result)])
                for start, end, part in parts:
                    phrases.extend(self._phrases(track, start, end, part))
                done += chunk.end - chunk.start
            progress(READ_SHARE + (1 - READ_SHARE) * done / total)

    def _requests(
        self,
        tracks: Sequence[Track],
        ranges: Sequence[tuple[int, int, int]],
        cache: _AudioCache,
        context: bool,
    ) -> list[RecognitionRequest]:
        """Requests for ``(participant, start, end)`` ranges (reads audio: in a thread)."""
        return [self._request(tracks[p], a, b, cache, context=context) for p, a, b in ranges]

    def _request(
        self, track: Track, start: int, end: int, cache: _AudioCache, *, context: bool
    ) -> RecognitionRequest:
        config = self._config
        return RecognitionRequest(
            audio=read_range(track.placements, start, end, cache),
            language=track.language,
            priority=Priority.BACKGROUND,
            options=self._decode.minutes,
            prompt_tokens=track.context if context and config.context else (),
        )

    def _phrases(self, track: Track, start: int, end: int, result: Recognition) -> list[Phrase]:
        """Learn the language and context from a result, and cut it into phrases."""
        if track.language is None and result.language_probability >= self._language_confidence:
            track.language = result.language
        if self._config.context:
            track.context = result.tokens if result.text.strip() else ()
        return phrases_of(
            result,
            track.stored.participant_id,
            start / SAMPLE_RATE,
            end / SAMPLE_RATE,
            self._config.phrase_pause_ms / 1000,
            self._config.sentence_pause_ms / 1000,
        )

    def _next_batch(self, tracks: list[Track]) -> list[Chunk]:
        """The earliest waiting chunks; with context, one per participant (each needs the text
        of the one before)."""
        candidates: list[Chunk] = []
        for track in tracks:
            waiting = track.chunks[track.next_chunk :]
            candidates.extend(waiting[:1] if self._config.context else waiting)
        candidates.sort(key=lambda c: c.start)
        return candidates[: self._config.max_in_flight]


def in_thread(recognize: BlockingRecognize) -> Recognize:
    """A blocking ``recognize`` (the engine itself) as the compiler's awaited one, run in a
    thread: for the command line and benchmarks (the server passes its scheduler)."""

    async def run(requests: Sequence[RecognitionRequest]) -> Sequence[Recognition]:
        return await asyncio.to_thread(recognize, requests)

    return run
