"""Audio decoding, resampling and PCM helpers. Pure: no I/O beyond the bytes handed in.

Inside terra all audio is float32 mono at 16 kHz and time is counted in integer samples.
"""

from __future__ import annotations

import io

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


def decode_audio(data: bytes) -> Samples:
    """Decode any container soundfile reads (WAV PCM16/32/float, FLAC, OGG, ...) to 16 kHz mono."""
    if not data:
        raise AudioDecodeError("the audio file is empty")
    frames, rate = read_container(data)
    return to_mono_16k(frames, rate)


def read_container(data: bytes, what: str = "audio") -> tuple[NDArray[np.float32], int]:
    """The (frames, channels) float32 samples and the rate of a file soundfile reads."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = int(f.samplerate)
            frames: NDArray[np.float32] = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioDecodeError(f"cannot decode {what}: {e}") from e
    return frames, rate


def decode_raw_pcm16(data: bytes, channels: int = 1) -> NDArray[np.float32]:
    """Raw little-endian PCM16 as (frames, channels) float32 at its own rate."""
    if len(data) % (2 * channels):
        raise AudioDecodeError("raw PCM16 length is not a whole number of frames")
    pcm = np.frombuffer(data, dtype="<i2").reshape(-1, channels)
    return (pcm.astype(np.float32) / 32768.0).astype(np.float32)


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
