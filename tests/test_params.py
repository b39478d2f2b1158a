"""Request parameter validation (pure)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from terra.params import (
    ParamError,
    is_safe_id,
    parse_bool,
    parse_filename,
    parse_timestamp,
    validate_id,
)


@pytest.mark.parametrize("value", ["a", "trash6bb3f34f-b29a-4d62-ba73-8489777a18de", "A_b-9" * 25])
def test_valid_ids(value: str) -> None:
    assert validate_id("conference_id", value) == value


@pytest.mark.parametrize(
    "value", ["", None, "../x", "a/b", "a b", "é", "a" * 129, "a.b", "a:b", "a\n", "a\r\n", "\na"]
)
def test_invalid_ids(value: str | None) -> None:
    with pytest.raises(ParamError):
        validate_id("conference_id", value)


def test_spec_filename() -> None:
    name = (
        "trash6bb3f34f-b29a-4d62-ba73-8489777a18de:a-58c277ff-9af4-48c7-8d5f-f13e7304a7e9"
        "_20240628_14_20_15_123456.wav"
    )
    info = parse_filename(name)
    assert info is not None
    assert info.conference_id == "trash6bb3f34f-b29a-4d62-ba73-8489777a18de"
    assert info.participant_id == "58c277ff-9af4-48c7-8d5f-f13e7304a7e9"
    assert info.local_time == datetime(2024, 6, 28, 14, 20, 15, 123456)


def test_a_trailing_newline_is_not_an_id() -> None:
    # re.match(r"^...$") accepts "a\n": the one rule uses fullmatch.
    assert is_safe_id("conf-1")
    assert not is_safe_id("conf-1\n")
    assert parse_filename("c:a-p_20240101_00_00_00_000001.wav\n") is None


def test_participant_id_with_underscores() -> None:
    info = parse_filename("c:a-p_1_x_20240101_00_00_00_000001.wav")
    assert info is not None and info.participant_id == "p_1_x"


@pytest.mark.parametrize(
    "name",
    [
        None,
        "",
        "fragment.wav",
        "c:a-p_20241301_00_00_00_000000.wav",
        "c-p_20240101_00_00_00_000000.wav",
    ],
)
def test_filenames_without_a_time(name: str | None) -> None:
    assert parse_filename(name) is None


def test_timestamp_prefers_the_parameter_then_the_file_name() -> None:
    info = parse_filename("c:a-p_20240627_21_21_07_782414.wav")
    moscow = ZoneInfo("Europe/Moscow")
    assert parse_timestamp("1719512467.5", info, moscow) == 1719512467.5
    assert parse_timestamp("0", info, moscow) == pytest.approx(1719512467.782414)
    assert parse_timestamp(None, info, moscow) == pytest.approx(1719512467.782414)
    with pytest.raises(ParamError, match="does not carry a time"):
        parse_timestamp("0", None, moscow)
    for bad in ("nan", "-5", "inf", "abc"):
        with pytest.raises(ParamError):
            parse_timestamp(bad, info, moscow)


def test_booleans() -> None:
    assert parse_bool("online", "TRUE", False) is True
    assert parse_bool("online", "0", True) is False
    assert parse_bool("online", None, True) is True
    with pytest.raises(ParamError):
        parse_bool("online", "maybe", True)
