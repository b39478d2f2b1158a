"""The engine's two kinds of settings: load-time (EngineSettings) and per call
(DecodeOptions), built from the configuration in one place; the keys that moved into
recognizer.window / recognizer.decoding / recognizer.agreement still read at their old place."""

from __future__ import annotations

import logging

import pytest

from terra.config import Config, ConfigError, load_config
from terra.recognizer.options import (
    AgreementOptions,
    DecodeOptions,
    DecodeRules,
    WindowOptions,
    decode_passes,
    engine_settings,
)
from tests.conftest import ROOT


def test_the_shipped_config_reads_the_nested_sections() -> None:
    config = load_config(ROOT / "config.yaml", environ={})
    assert config.recognizer.window == WindowOptions()
    assert config.recognizer.decoding == DecodeRules()
    assert config.recognizer.agreement == AgreementOptions()


def test_old_flat_keys_still_work_with_a_warning_naming_the_new_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = {
        "window_buckets_s": [6, 30],
        "no_speech_threshold": 0.5,
        "detect_languages": ["ru", "en"],
        "language_confidence": 0.4,
        "decoding": {"language_confidence": 0.8},
        # The agreement's keys; three of them were renamed as they moved.
        "commit": False,
        "commit_edge_guard_s": 0.5,
        "commit_force_after_s": 4.0,
        "prompt_max_words": 20,
        "agreement": {"prompt_max_words": 30},
    }
    with caplog.at_level(logging.WARNING, logger="terra.config"):
        config = load_config(None, environ={}, overrides={"recognizer": old})
    assert config.recognizer.window.window_buckets_s == (6.0, 30.0)
    assert config.recognizer.decoding.no_speech_threshold == 0.5
    assert config.recognizer.decoding.detect_languages == ("ru", "en")
    assert config.recognizer.decoding.language_confidence == 0.8  # the new place wins
    assert config.recognizer.agreement == AgreementOptions(
        commit=False, edge_guard_s=0.5, force_after_s=4.0, prompt_max_words=30
    )
    messages = " ".join(r.getMessage() for r in caplog.records)
    for new in (
        "recognizer.window.window_buckets_s",
        "recognizer.decoding.no_speech_threshold",
        "recognizer.decoding.detect_languages",
        "recognizer.decoding.language_confidence",
        "recognizer.agreement.commit",
        "recognizer.agreement.edge_guard_s",
        "recognizer.agreement.force_after_s",
        "recognizer.agreement.prompt_max_words",
    ):
        assert f"set {new} instead" in messages


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="recognizer.window.window_buckets_s"):
        load_config(None, environ={}, overrides={"recognizer": {"window_buckets_s": [40]}})
    with pytest.raises(ConfigError, match="final_beam_size"):
        load_config(None, environ={}, overrides={"recognizer": {"final_beam_size": 0}})
    with pytest.raises(ConfigError, match="overload_final_beam_size"):
        load_config(None, environ={}, overrides={"recognizer": {"overload_final_beam_size": 0}})
    with pytest.raises(ConfigError, match="overload_finals_s"):
        load_config(None, environ={}, overrides={"recognizer": {"overload_finals_s": -1}})
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(None, environ={}, overrides={"recognizer": {"decoding": {"beam_size": 2}}})


def test_each_pass_gets_its_options_from_the_config() -> None:
    config = load_config(
        None,
        environ={},
        overrides={
            "recognizer": {
                "progress_beam_size": 2,
                "final_beam_size": 4,
                "overload_final_beam_size": 2,
            },
            "minutes": {"beam_size": 6, "word_timestamps": False},
            "files": {"beam_size": 3},
        },
    )
    rules = config.recognizer.decoding
    passes = decode_passes(config)
    # Word times for the agreement (recognizer.agreement.commit, on by default); a looping progress
    # pass is not decoded again (every other pass is).
    assert passes.progress == DecodeOptions(
        beam_size=2, word_timestamps=True, retry_loops=False, rules=rules
    )
    assert passes.final == DecodeOptions(beam_size=4, rules=rules)
    assert passes.translate == DecodeOptions(beam_size=4, task="translate", rules=rules)
    # Finals asked for past recognizer.overload_finals_s of owed audio, and their captions.
    assert passes.overload_final == DecodeOptions(beam_size=2, rules=rules)
    assert passes.overload_translate == DecodeOptions(beam_size=2, task="translate", rules=rules)
    assert passes.detect == DecodeOptions(beam_size=1, rules=rules)
    assert passes.minutes == DecodeOptions(beam_size=6, word_timestamps=False, rules=rules)
    assert passes.files == DecodeOptions(beam_size=3, rules=rules)
    assert decode_passes(Config()).minutes.word_timestamps  # the default: words timed


def test_engine_settings_are_the_model_section_and_the_window() -> None:
    config = load_config(
        None,
        environ={"TERRA_DEVICE": "cuda", "TERRA_CPU_THREADS": "3"},
        overrides={"recognizer": {"workers": 4, "window": {"trailing_margin_s": 1.5}}},
    )
    settings = engine_settings(config, "/models/base")
    assert (settings.model_path, settings.device, settings.cpu_threads) == (
        "/models/base",
        "cuda",
        3,
    )
    assert settings.compute_type == config.model.compute_type
    assert settings.workers == 4
    assert settings.window == WindowOptions(trailing_margin_s=1.5)
    assert engine_settings(config, "/models/base", workers=1).workers == 1
