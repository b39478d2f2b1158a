"""Decode an uploaded file into one 16 kHz float32 track per channel. Pure: bytes in, arrays out.

Containers (WAV, FLAC, OGG Opus, MP3) go through soundfile (libsndfile >= 1.1 reads MP3);
raw PCM16 and G.711 A-law/mu-law are decoded here with numpy (``audioop`` is deprecated).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from terra.audio import AudioDecodeError, Samples, decode_raw_pcm16, read_container, to_mono_16k

CONTAINER_ENCODINGS = frozenset({"OPUS", "MP3", "FLAC", "WAV", "OGG"})
RAW_ENCODINGS = frozenset({"PCM_S16LE", "ALAW", "MULAW"})
ENCODINGS = CONTAINER_ENCODINGS | RAW_ENCODINGS


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


def decode_g711(data: bytes, encoding: str, channels: int) -> NDArray[np.float32]:
    """8-bit G.711 (``ALAW`` or ``MULAW``) as (frames, channels) float32."""
    if len(data) % channels:
        raise AudioDecodeError("G.711 length is not a whole number of frames")
    codes = np.frombuffer(data, dtype=np.uint8)
    return _G711[encoding][codes].reshape(-1, channels)


def decode_channels(
    data: bytes, encoding: str, sample_rate: int | None, channels: int, split: bool
) -> list[Samples]:
    """The file as 16 kHz tracks: one per channel when ``split``, else one down-mixed track.

    Raw encodings need ``sample_rate`` (PCM16 also accepts a WAV file: its header wins);
    containers carry their own rate and channel count.
    """
    if not data:
        raise AudioDecodeError("the audio file is empty")
    if encoding not in ENCODINGS:
        raise AudioDecodeError(f"unsupported audio_encoding {encoding!r}")
    frames: NDArray[np.float32]
    if encoding in RAW_ENCODINGS and not data.startswith(b"RIFF"):
        if not sample_rate or sample_rate < 1000:
            raise AudioDecodeError(f"sample_rate is required for {encoding}")
        rate = sample_rate
        if encoding == "PCM_S16LE":
            frames = decode_raw_pcm16(data, channels)
        else:
            frames = decode_g711(data, encoding, channels)
    else:
        frames, rate = read_container(data, f"{encoding} audio")
    if frames.shape[0] == 0:
        raise AudioDecodeError("the audio file holds no samples")
    if not split or frames.shape[1] == 1:
        return [to_mono_16k(frames, rate)]
    return [to_mono_16k(np.ascontiguousarray(frames[:, c]), rate) for c in range(frames.shape[1])]
