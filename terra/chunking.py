"""One chunking model: speech found by webrtcvad, joined into chunks of whole utterances.

:class:`ChunkOptions` is the one set of chunking settings (as faster-whisper's
``VadOptions``): the minutes (``minutes.chunking``) and the file dialects
(``files.chunking``, adjusted per request by SaluteSpeech's timeouts) configure it. The
planner works on webrtcvad frames of ``FRAME_MS``: :func:`plan_track` runs the VAD over a
whole track; :func:`plan_flags` plans from flags already computed (the minutes compiler
runs the VAD fragment by fragment as it lays out the timeline). Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from terra.audio import SAMPLE_RATE, Samples
from terra.vad import FrameVad

FRAME_MS = 30
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000


@dataclass(frozen=True, slots=True)
class ChunkOptions:
    """How speech is found and joined into chunks (see config.yaml's ``chunking:``)."""

    vad_aggressiveness: int = 2  # webrtcvad 0 (lenient) .. 3 (strict)
    min_speech_ms: int = 250  # shorter speech is noise
    min_silence_ms: int = 500  # this much non-speech ends a speech region
    speech_pad_ms: int = 300  # audio kept around each speech region
    chunk_join_ms: int = 2000  # regions closer than this are recognized together
    max_chunk_s: float = 25.0  # up to this length (Whisper's window is 30 s)

    def vad(self) -> FrameVad:
        """A fresh webrtcvad framer with these settings."""
        return FrameVad(self.vad_aggressiveness, FRAME_MS)

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are usable)."""
        found = []
        if not 0 <= self.vad_aggressiveness <= 3:
            found.append("vad_aggressiveness must be 0..3")
        if not 1.0 <= self.max_chunk_s <= 28.0:
            found.append("max_chunk_s: 1 to 28 (Whisper's window less the margin)")
        return found


@dataclass(frozen=True, slots=True)
class PlannedChunk:
    """Samples ``[start, end)`` to recognize together, counted from the flags' first frame,
    and the pieces to recognize one by one if the whole goes wrong (may be empty)."""

    start: int
    end: int
    fallback: tuple[tuple[int, int], ...] = ()


def frames(ms: float) -> int:
    """A duration as a whole number of VAD frames (at least one)."""
    return max(1, round(ms / FRAME_MS))


def plan_flags(
    flags: NDArray[np.bool_], options: ChunkOptions, min_split_s: float | None = None
) -> list[PlannedChunk]:
    """Chunks of the audio whose VAD frames are ``flags``. A single region at least
    ``min_split_s`` long gets its two halves as fallback (never, when None)."""
    regions = speech_regions(
        flags,
        frames(options.min_speech_ms),
        frames(options.min_silence_ms),
        frames(options.speech_pad_ms),
    )
    max_frames = frames(options.max_chunk_s * 1000)
    min_split = max_frames if min_split_s is None else frames(min_split_s * 1000)
    planned = plan_chunks(regions, flags, max_frames, frames(options.chunk_join_ms), min_split)
    return [
        PlannedChunk(
            start * FRAME_SAMPLES,
            end * FRAME_SAMPLES,
            tuple((a * FRAME_SAMPLES, b * FRAME_SAMPLES) for a, b in fallback),
        )
        for start, end, fallback in planned
    ]


def plan_track(
    track: Samples, options: ChunkOptions, min_split_s: float | None = None
) -> list[PlannedChunk]:
    """Run the VAD over a whole track and plan its chunks."""
    _, flags = options.vad().frames(track)
    return plan_flags(flags, options, min_split_s)


# -- frames -> regions -> chunks -----------------------------------------------------------


def speech_regions(
    flags: NDArray[np.bool_], min_speech: int, min_silence: int, pad: int
) -> list[tuple[int, int]]:
    """Frame ranges ``[start, end)`` of speech: runs of speech frames joined across pauses
    shorter than ``min_silence``, dropped when shorter than ``min_speech``, padded by ``pad``."""
    if flags.size == 0:
        return []
    padded = np.concatenate(([False], flags, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    runs = [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]
    joined: list[tuple[int, int]] = []
    for start, end in runs:
        if joined and start - joined[-1][1] < min_silence:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    kept = [(start, end) for start, end in joined if end - start >= min_speech]
    regions: list[tuple[int, int]] = []
    for i, (start, end) in enumerate(kept):
        # Padding never crosses the middle of the pause to the next region: two utterances
        # stay two (a chunk may join them, but its fallback recognizes them one by one).
        low = (kept[i - 1][1] + start) // 2 if i else 0
        high = (end + kept[i + 1][0]) // 2 if i + 1 < len(kept) else flags.size
        regions.append((max(low, start - pad), min(high, end + pad)))
    return regions


def split_long(
    start: int, end: int, flags: NDArray[np.bool_], max_frames: int
) -> list[tuple[int, int]]:
    """Cut a region longer than ``max_frames`` in the middle of its longest pause within the
    second half of each allowed stretch (a hard cut where there is none)."""
    pieces = []
    while end - start > max_frames:
        low, high = start + max_frames // 2, start + max_frames
        window = ~flags[low:high]
        cut = high
        if window.any():
            padded = np.concatenate(([False], window, [False])).astype(np.int8)
            edges = np.flatnonzero(np.diff(padded))
            runs = list(zip(edges[::2], edges[1::2]))
            s, e = max(runs, key=lambda r: (r[1] - r[0], r[0]))
            cut = low + int(s + e) // 2
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def plan_chunks(
    regions: list[tuple[int, int]],
    flags: NDArray[np.bool_],
    max_frames: int,
    join_frames: int,
    min_split_frames: int,
) -> list[tuple[int, int, tuple[tuple[int, int], ...]]]:
    """Join consecutive regions closer than ``join_frames`` into chunks of at most
    ``max_frames`` (pauses inside included: Whisper reads whole utterances with context).

    Each chunk comes with its fallback: the regions it joined, or for a single region at
    least ``min_split_frames`` long, its two halves cut at a pause in its middle third."""
    joined: list[list[tuple[int, int]]] = []
    for region in regions:
        for start, end in split_long(*region, flags, max_frames):
            last = joined[-1] if joined else None
            if last and start - last[-1][1] <= join_frames and end - last[0][0] <= max_frames:
                last.append((start, end))
            else:
                joined.append([(start, end)])
    chunks = []
    for pieces in joined:
        start, end = pieces[0][0], pieces[-1][1]
        if len(pieces) > 1:
            fallback = tuple(pieces)
        elif end - start >= min_split_frames:
            fallback = tuple(split_long(start, end, flags, max(1, (end - start) * 2 // 3)))
        else:
            fallback = ()
        chunks.append((start, end, fallback))
    return chunks
