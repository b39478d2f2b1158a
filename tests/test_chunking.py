"""One chunking model: ChunkOptions in the config (nested section, old flat keys still read),
and the one planner the minutes and the file dialects share."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from terra.audio import SAMPLE_RATE
from terra.chunking import FRAME_SAMPLES, ChunkOptions, plan_flags, plan_track
from terra.config import ConfigError, load_config

from .conftest import SPEECH, load_clip

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_config_reads_the_nested_sections() -> None:
    config = load_config(ROOT / "config.yaml", environ={})
    assert config.minutes.chunking == ChunkOptions()
    assert config.files.chunking == ChunkOptions()


def test_nested_keys_are_read(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("files:\n  chunking:\n    max_chunk_s: 12\n    min_silence_ms: 700\n")
    chunking = load_config(path, environ={}).files.chunking
    assert (chunking.max_chunk_s, chunking.min_silence_ms) == (12.0, 700)
    assert chunking.chunk_join_ms == ChunkOptions().chunk_join_ms


def test_old_flat_keys_still_work_with_a_warning_naming_the_new_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "minutes:\n  max_chunk_s: 10\n  vad_aggressiveness: 3\n"
        "files:\n  min_speech_ms: 100\n  chunking:\n    min_speech_ms: 400\n"
    )
    with caplog.at_level(logging.WARNING, logger="terra.config"):
        config = load_config(path, environ={})
    assert config.minutes.chunking.max_chunk_s == 10.0
    assert config.minutes.chunking.vad_aggressiveness == 3
    assert config.files.chunking.min_speech_ms == 400  # the new place wins
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "minutes.chunking.max_chunk_s" in messages
    assert "minutes.chunking.vad_aggressiveness" in messages
    assert "files.chunking.min_speech_ms" in messages


def test_bad_chunking_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="minutes.chunking.max_chunk_s"):
        load_config(None, environ={}, overrides={"minutes": {"chunking": {"max_chunk_s": 40}}})
    with pytest.raises(ConfigError, match="files.chunking.vad_aggressiveness"):
        load_config(None, environ={}, overrides={"files": {"vad_aggressiveness": 5}})
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(None, environ={}, overrides={"files": {"chunking": {"frame_ms": 20}}})
    with pytest.raises(ConfigError, match="mapping"):
        load_config(None, environ={}, overrides={"files": {"chunking": 5}})


def test_plan_track_on_real_speech() -> None:
    options = ChunkOptions(max_chunk_s=8.0)
    track = load_clip(SPEECH / "long" / "en_60s.wav")
    chunks = plan_track(track, options)
    assert len(chunks) >= 60 // 8
    assert all(c.end - c.start <= 8 * SAMPLE_RATE for c in chunks)
    assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:]))
    assert all(c.start % FRAME_SAMPLES == 0 and c.end <= track.size for c in chunks)
    assert plan_track(np.zeros(5 * SAMPLE_RATE, np.float32), options) == []
    # A single region long enough gets its halves as fallback only when asked (joined
    # regions always fall back to themselves).
    _, flags = options.vad().frames(track)
    assert plan_flags(flags, options) == chunks
    unsplit = sum(1 for c in chunks if c.fallback)
    split = sum(1 for c in plan_flags(flags, options, min_split_s=4.0) if c.fallback)
    assert split > unsplit
