"""Audio limits before decoding (issue 11, rows 1-3): the declared rate, channels and length
are checked before a sample is decoded, and decoding runs in blocks (a lying header is
caught while decoding). Pure: bytes in, arrays or AudioDecodeError out."""

from __future__ import annotations

import io
import resource
import struct

import numpy as np
import pytest
import soundfile as sf
import soxr

from terra.audio import (
    BLOCK_FRAMES,
    SAMPLE_RATE,
    AudioDecodeError,
    AudioLimits,
    AudioTooLong,
    decode_audio,
)
from terra.files.codecs import AudioFormat, decode_channels

FRAGMENT = AudioLimits(max_seconds=30.0)


def wav_header(rate: int, channels: int, data_bytes: int, bits: int = 16) -> bytes:
    block = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, bits)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def encoded(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_wav_declared_at_1_hz_is_refused_before_decoding() -> None:
    # Row 1: 29 KB whose header says 1 Hz (4 h once resampled to 16 kHz).
    data = wav_header(1, 1, 29_000) + bytes(29_000)
    with pytest.raises(AudioDecodeError, match="sample rate 1 Hz is out of range"):
        decode_audio(data, FRAGMENT)


def test_a_long_fragment_is_too_long_before_decoding() -> None:
    # 8 kHz declared: 29 KB is 1.8 s, fine; 600 KB is 37.5 s, over 30 s.
    assert decode_audio(wav_header(8000, 1, 29_000) + bytes(29_000), FRAGMENT).size == 29_000
    with pytest.raises(AudioTooLong, match="more than the 30 s allowed"):
        decode_audio(wav_header(8000, 1, 600_000) + bytes(600_000), FRAGMENT)


def test_a_flac_bomb_is_refused_from_its_header() -> None:
    # Row 2: a FLAC of long silence is tiny; its STREAMINFO gives the length away.
    silence = np.zeros(SAMPLE_RATE * 600, np.int16)  # 10 min (12 h in the probe)
    data = encoded(silence, SAMPLE_RATE, "FLAC")
    assert len(data) < 200_000
    before = peak_rss_mb()
    with pytest.raises(AudioTooLong, match="600.0 s"):
        decode_audio(data, FRAGMENT)
    assert peak_rss_mb() - before < 20


def test_too_many_channels_and_rates_out_of_range() -> None:
    with pytest.raises(AudioDecodeError, match="channels are out of range"):
        decode_audio(wav_header(16000, 9, 18) + bytes(18), FRAGMENT)
    with pytest.raises(AudioDecodeError, match="out of range"):
        decode_audio(wav_header(1_000_000, 1, 2000) + bytes(2000), FRAGMENT)


def test_blocks_resample_like_one_call() -> None:
    rng = np.random.default_rng(1)
    stereo = (rng.standard_normal((3 * BLOCK_FRAMES + 123, 2)) * 0.1).astype(np.float32)
    data = encoded(stereo, 44_100, subtype="FLOAT")
    got = decode_audio(data, FRAGMENT)
    whole = soxr.resample(stereo.mean(axis=1), 44_100, SAMPLE_RATE, quality="HQ")
    assert abs(got.size - whole.size) <= 2
    n = min(got.size, whole.size)
    assert np.max(np.abs(got[:n] - whole[:n])) < 1e-3


def test_raw_g711_at_1000_hz_is_refused_before_decoding() -> None:
    # Row 3: 20 MiB of mu-law declared at 1000 Hz.
    data = bytes(20 * 1024 * 1024)
    limits = AudioLimits(max_seconds=3 * 3600.0)
    before = peak_rss_mb()
    with pytest.raises(AudioDecodeError, match="1000 Hz is out of range"):
        decode_channels(data, AudioFormat("MULAW", 1000, 1), limits)
    with pytest.raises(AudioTooLong, match="on 2 channels"):
        decode_channels(
            data, AudioFormat("MULAW", 8000, 2, split=True), AudioLimits(max_seconds=600)
        )
    assert peak_rss_mb() - before < 20


def test_raw_pcm_splits_channels_in_blocks() -> None:
    left = np.full(BLOCK_FRAMES * 2 + 7, 1000, np.int16)
    right = np.full(BLOCK_FRAMES * 2 + 7, -2000, np.int16)
    data = np.stack([left, right], axis=1).astype("<i2").tobytes()
    a, b = decode_channels(data, AudioFormat("PCM_S16LE", SAMPLE_RATE, 2, split=True), FRAGMENT)
    assert a.size == b.size == left.size
    assert np.allclose(a, 1000 / 32768) and np.allclose(b, -2000 / 32768)
    (mono,) = decode_channels(data, AudioFormat("PCM_S16LE", SAMPLE_RATE, 2), FRAGMENT)
    assert np.allclose(mono, -500 / 32768)
