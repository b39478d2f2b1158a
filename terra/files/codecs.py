"""Decode an uploaded file into one 16 kHz float32 track per channel. Pure: bytes in, arrays out.

Containers (WAV, FLAC, OGG Opus, MP3) go through soundfile (libsndfile >= 1.1 reads MP3);
raw PCM16 and G.711 A-law/mu-law are decoded here with numpy (``audioop`` is deprecated).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from numpy.typing import NDArray

from terra.audio import (
    BLOCK_FRAMES,
    AudioDecodeError,
    AudioLimits,
    Block,
    Samples,
    check_container,
    decode_blocks,
    decode_container,
    pcm16_blocks,
)

CONTAINER_ENCODINGS = frozenset({"OPUS", "MP3", "FLAC", "WAV", "OGG"})
RAW_ENCODINGS = frozenset({"PCM_S16LE", "ALAW", "MULAW"})
ENCODINGS = CONTAINER_ENCODINGS | RAW_ENCODINGS


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """An upload's declared format: its ``encoding`` (one of ENCODINGS), the sample rate and
    channel count of raw samples (a container's own header wins), and whether each channel
    is a track of its own (``split``) or all are mixed down into one."""

    encoding: str
    sample_rate: int | None = None
    channels: int = 1
    split: bool = False


def _mulaw_table() -> NDArray[np.float32]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = (((u & 0x0F) << 3) + 0x84) << exponent
    linear = np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84)
    return (linear / 32768.0).astype(np.float32)


def _alaw_table() -> NDArray[np.float32]:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    linear = np.where(a & 0x80, magnitude, -magnitude)
    return (linear / 32768.0).astype(np.float32)


_G711 = {"MULAW": _mulaw_table(), "ALAW": _alaw_table()}


def g711_blocks(data: bytes, encoding: str, channels: int) -> Iterator[Block]:
    """8-bit G.711 (``ALAW`` or ``MULAW``) as (frames, channels) float32 blocks."""
    if len(data) % channels:
        raise AudioDecodeError("G.711 length is not a whole number of frames")
    table = _G711[encoding]
    step = BLOCK_FRAMES * channels
    view = memoryview(data)
    for at in range(0, len(data), step):
        yield table[np.frombuffer(view[at : at + step], dtype=np.uint8)].reshape(-1, channels)


def decode_channels(data: bytes, declared: AudioFormat, limits: AudioLimits) -> list[Samples]:
    """The file as 16 kHz tracks: one per channel when ``split``, else one down-mixed track.

    Raw encodings need ``sample_rate`` (PCM16 also accepts a WAV file: its header wins);
    containers carry their own rate and channel count. The declared rate, channels and
    duration are checked against ``limits`` before anything is decoded; decoding runs in
    blocks, so only the 16 kHz output is ever whole in memory.
    """
    if not data:
        raise AudioDecodeError("the audio file is empty")
    if _is_raw(declared.encoding, data[:4]):
        rate, frames = _check_raw(len(data), declared, limits)
        if frames == 0:
            raise AudioDecodeError("the audio file holds no samples")
        channels = declared.channels
        blocks = (
            pcm16_blocks(data, channels)
            if declared.encoding == "PCM_S16LE"
            else g711_blocks(data, declared.encoding, channels)
        )
        return decode_blocks(blocks, rate, channels, declared.split, limits)
    tracks = decode_container(data, declared.split, limits)
    if tracks[0].size == 0:
        raise AudioDecodeError("the audio file holds no samples")
    return tracks


def check_file(path: Path, declared: AudioFormat, limits: AudioLimits) -> None:
    """The limits :func:`decode_channels` would refuse, from the file's size and header
    alone (AudioDecodeError, AudioTooLong), so a client hears them when it asks, not from
    the job. A file that is no audio at all is left to the job to report."""
    with open(path, "rb") as f:
        head = f.read(4)
        size = f.seek(0, 2)
    if _is_raw(declared.encoding, head):
        _check_raw(size, declared, limits)
        return
    try:
        container = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return  # not audio at all: the task reports it (an ERROR task, as SaluteSpeech does)
    with container:
        check_container(container, declared.split, limits)


def _is_raw(encoding: str, head: bytes) -> bool:
    """Whether a file starting with ``head`` is read as raw samples of ``encoding`` (a WAV
    header makes PCM16 a container); an encoding terra does not know is refused."""
    if encoding not in ENCODINGS:
        raise AudioDecodeError(f"unsupported audio_encoding {encoding!r}")
    return encoding in RAW_ENCODINGS and not head.startswith(b"RIFF")


def _check_raw(size: int, declared: AudioFormat, limits: AudioLimits) -> tuple[int, int]:
    """The rate and the frames of ``size`` bytes of raw samples, refused when the rate is
    missing or the declared rate, channels or length are out of ``limits``."""
    rate, channels = declared.sample_rate, declared.channels
    if not rate:
        raise AudioDecodeError(f"sample_rate is required for {declared.encoding}")
    limits.check_format(rate, channels)
    width = 2 if declared.encoding == "PCM_S16LE" else 1
    frames = size // (width * channels)
    limits.check_frames(frames, rate, channels if declared.split else 1)
    return rate, frames
