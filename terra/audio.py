"""Audio decoding, resampling and PCM helpers. Pure: no I/O beyond the bytes handed in.

Inside terra all audio is float32 mono at 16 kHz and time is counted in integer samples.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr
from numpy.typing import NDArray

SAMPLE_RATE = 16_000

Samples = NDArray[np.float32]


class AudioDecodeError(ValueError):
    """The bytes are not audio that terra can read."""


def ms_to_samples(ms: float) -> int:
    return int(round(ms * SAMPLE_RATE / 1000))


def samples_to_ms(samples: int) -> int:
    return int(round(samples * 1000 / SAMPLE_RATE))


@dataclass(frozen=True, slots=True)
class AudioLimits:
    """What a decoder accepts, checked against the declared format before any sample is
    decoded, and again while decoding (a header may lie): ``max_seconds`` of audio in all
    (summed over the tracks when channels are kept apart), rates and channel counts."""

    max_seconds: float
    min_rate: int = 4_000
    max_rate: int = 384_000
    max_channels: int = 8

    def check_format(self, rate: int, channels: int) -> None:
        if not self.min_rate <= rate <= self.max_rate:
            raise AudioDecodeError(
                f"the sample rate {rate} Hz is out of range ({self.min_rate}..{self.max_rate})"
            )
        if not 1 <= channels <= self.max_channels:
            raise AudioDecodeError(f"{channels} channels are out of range (1..{self.max_channels})")

    def max_frames(self, rate: int, tracks: int) -> int:
        return int(self.max_seconds * rate / max(tracks, 1))

    def check_frames(self, frames: int, rate: int, tracks: int) -> None:
        if frames > self.max_frames(rate, tracks):
            raise AudioTooLong(
                f"the audio lasts {frames / rate:.1f} s"
                + (f" on {tracks} channels" if tracks > 1 else "")
                + f": more than the {self.max_seconds:g} s allowed"
            )


class AudioTooLong(AudioDecodeError):
    """The audio (as declared or as decoded) is longer than the limit: a 413."""


# Decoding runs block by block: a block of this many frames at its own rate is the most
# held at once besides the 16 kHz output.
BLOCK_FRAMES = 64 * 1024

Block = NDArray[np.float32]  # (frames, channels) at the source rate


def decode_blocks(
    blocks: Iterable[Block], rate: int, channels: int, split: bool, limits: AudioLimits
) -> list[Samples]:
    """(frames, channels) blocks to 16 kHz tracks (one per channel when ``split``, else one
    down-mixed), resampled as a stream, refused as soon as they pass ``limits``."""
    limits.check_format(rate, channels)
    tracks = channels if split else 1
    max_frames = limits.max_frames(rate, tracks)
    resamplers = (
        [soxr.ResampleStream(rate, SAMPLE_RATE, 1, quality="HQ") for _ in range(tracks)]
        if rate != SAMPLE_RATE
        else None
    )
    parts: list[list[Samples]] = [[] for _ in range(tracks)]
    total = 0
    for block in blocks:
        total += block.shape[0]
        if total > max_frames:
            limits.check_frames(total, rate, tracks)
        for t in range(tracks):
            column = block[:, t] if split else block.mean(axis=1, dtype=np.float32)
            column = np.ascontiguousarray(column, dtype=np.float32)
            parts[t].append(resamplers[t].resample_chunk(column) if resamplers else column.copy())
    if resamplers:
        for t in range(tracks):
            parts[t].append(resamplers[t].resample_chunk(np.zeros(0, np.float32), last=True))
    return [
        np.concatenate(p).astype(np.float32, copy=False) if p else np.zeros(0, np.float32)
        for p in parts
    ]


def _reason(error: Exception) -> str:
    """libsndfile's reason alone: its full message names the object read from (a BytesIO
    and its memory address, or a server path), none of the client's business."""
    reason = getattr(error, "error_string", None)
    return reason if isinstance(reason, str) and reason else str(error)


def open_container(data: bytes) -> sf.SoundFile:
    try:
        return sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioDecodeError(f"cannot decode audio: {_reason(e)}") from e


def check_container(f: sf.SoundFile, split: bool, limits: AudioLimits) -> None:
    """An open container's declared rate, channels and length against ``limits`` (before
    anything is decoded)."""
    limits.check_format(f.samplerate, f.channels)
    if f.frames < 2**62:  # libsndfile's "unknown" is SF_COUNT_MAX
        limits.check_frames(f.frames, f.samplerate, f.channels if split else 1)


def decode_container(data: bytes, split: bool, limits: AudioLimits) -> list[Samples]:
    """Anything soundfile reads: its declared rate, channels and length are checked against
    ``limits`` before decoding, which then runs in blocks of BLOCK_FRAMES."""
    if not data:
        raise AudioDecodeError("the audio file is empty")
    with open_container(data) as f:
        check_container(f, split, limits)
        try:
            return decode_blocks(
                f.blocks(BLOCK_FRAMES, dtype="float32", always_2d=True),
                f.samplerate,
                f.channels,
                split,
                limits,
            )
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise AudioDecodeError(f"cannot decode audio: {_reason(e)}") from e


def decode_audio(data: bytes, limits: AudioLimits) -> Samples:
    """Decode any container soundfile reads (WAV PCM16/32/float, FLAC, OGG, ...) to 16 kHz
    mono, within ``limits``."""
    return decode_container(data, split=False, limits=limits)[0]


def pcm16_blocks(data: bytes, channels: int) -> Iterator[Block]:
    """Raw little-endian PCM16 as (frames, channels) float32 blocks."""
    if len(data) % (2 * channels):
        raise AudioDecodeError("raw PCM16 length is not a whole number of frames")
    step = BLOCK_FRAMES * 2 * channels
    view = memoryview(data)
    for at in range(0, len(data), step):
        pcm = np.frombuffer(view[at : at + step], dtype="<i2").reshape(-1, channels)
        yield (pcm.astype(np.float32) / 32768.0).astype(np.float32, copy=False)


def to_mono_16k(frames: NDArray[np.float32], rate: int) -> Samples:
    """Down-mix (frames, channels) to mono and resample to 16 kHz with soxr (HQ)."""
    mono = frames.mean(axis=1, dtype=np.float32) if frames.ndim == 2 else frames
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate != SAMPLE_RATE and mono.size:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    return mono


def to_pcm16(samples: Samples) -> bytes:
    """float32 [-1, 1] to little-endian PCM16 bytes (what webrtcvad and WAV files take)."""
    clipped = np.clip(samples, -1.0, 1.0)
    return (clipped * 32767.0).astype("<i2").tobytes()


def encode_wav(samples: Samples) -> bytes:
    """16 kHz mono PCM16 WAV bytes."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buffer.getvalue()
