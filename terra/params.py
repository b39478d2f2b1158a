"""Validation of the Terra request parameters. Pure: strings in, values or ParamError out."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from faster_whisper.tokenizer import _LANGUAGE_CODES

from terra.config import StreamConfig, zone_of

# The one id rule (conferences, participants, jobs, post keys): ids become folder and file
# names. Always applied with fullmatch: ``$`` in re.match would let a trailing "\n" through.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")


def is_safe_id(value: str) -> bool:
    """Whether ``value`` is ``[A-Za-z0-9_-]{1,128}``, whole (no trailing newline)."""
    return ID_PATTERN.fullmatch(value) is not None


# {conf_id}:a-{participant_id}_{YYYYMMDD}_{HH}_{MM}_{SS}_{micro}.wav
FILENAME_PATTERN = re.compile(
    r"^(?P<conference>[^:/\\]+):a-(?P<participant>[^:/\\]+)_"
    r"(?P<date>\d{8})_(?P<hour>\d{2})_(?P<minute>\d{2})_(?P<second>\d{2})_(?P<micro>\d{6})"
    r"\.[A-Za-z0-9]+$"
)

# Whisper's languages (faster-whisper's list): the only codes the tokenizer takes.
LANGUAGES = frozenset(_LANGUAGE_CODES)

# No time before 1970 or after 2106 (unsigned 32-bit seconds) is a fragment's time, whatever
# the configured window around the server's clock.
LATEST_TIME = float(2**32)

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ParamError(ValueError):
    """A request parameter is missing or malformed; the message names it."""


@dataclass(frozen=True, slots=True)
class FilenameInfo:
    conference_id: str
    participant_id: str
    local_time: datetime


def validate_id(name: str, value: str | None) -> str:
    """Ids become folder names: only ``[A-Za-z0-9_-]{1,128}`` is accepted."""
    if value is None or value == "":
        raise ParamError(f"{name} is required")
    if not is_safe_id(value):
        raise ParamError(f"{name} must match [A-Za-z0-9_-]{{1,128}}, got {value[:140]!r}")
    return value


def parse_language(name: str, value: str | None) -> str | None:
    """A Whisper language code (``ru``, ``en``, ...), or None for absent/``auto`` (detect).
    Anything else is refused: an unknown code would fail the whole batch it rides in."""
    if value is None:
        return None
    code = value.strip().lower()
    if code in ("", "auto"):
        return None
    if code not in LANGUAGES:
        raise ParamError(
            f"{name} must be a language code Whisper knows (such as ru or en), got {value[:20]!r}"
        )
    return code


def clean_name(value: str | None, default: str, max_chars: int = 256) -> str:
    """A display name safe for XML, JSON and logs: control characters, surrogates and
    non-characters become spaces, runs of white space one space, ends stripped."""
    if not value:
        return default
    kept = []
    for char in value[: max_chars * 2]:
        category = unicodedata.category(char)
        if category in ("Cc", "Cs", "Cn", "Zl", "Zp"):
            kept.append(" ")
        else:
            kept.append(char)
    cleaned = " ".join("".join(kept).split())[:max_chars].strip()
    return cleaned or default


def parse_bool(name: str, value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ParamError(f"{name} must be true or false, got {value[:40]!r}")


def parse_filename(filename: str | None) -> FilenameInfo | None:
    """The spec's fragment file name, or None if it does not follow the format."""
    if not filename:
        return None
    match = FILENAME_PATTERN.fullmatch(filename.rsplit("/", 1)[-1])
    if match is None:
        return None
    try:
        moment = datetime.strptime(
            f"{match['date']} {match['hour']}:{match['minute']}:{match['second']}.{match['micro']}",
            "%Y%m%d %H:%M:%S.%f",
        )
    except ValueError:
        return None
    return FilenameInfo(match["conference"], match["participant"], moment)


def to_unix(local_time: datetime, zone: ZoneInfo | None) -> float:
    """A naive local time (as in file names) to unix seconds."""
    if zone is not None:
        return local_time.replace(tzinfo=zone).timestamp()
    return local_time.timestamp()


def check_time(moment: float, now: float | None, max_skew_s: float, source: str) -> float:
    """``moment`` if it is a plausible fragment time: after 1970 and before 2106, and within
    ``max_skew_s`` of ``now`` when both are given (0: no window)."""
    if not 0 < moment < LATEST_TIME:
        raise ParamError(f"{source} {moment!r} is not a time between 1970 and 2106")
    if now is not None and max_skew_s > 0 and abs(moment - now) > max_skew_s:
        raise ParamError(
            f"{source} {moment:.3f} is {moment - now:+.0f} s from the server's clock "
            f"(at most {max_skew_s:g} s either way)"
        )
    return moment


def parse_timestamp(
    value: str | None,
    filename: FilenameInfo | None,
    zone: ZoneInfo | None,
    now: float | None = None,
    max_skew_s: float = 0.0,
) -> float:
    """``timestamp_float`` if given and non-zero, else the time in the file name; either
    must pass :func:`check_time`."""
    if value is not None and value.strip() != "":
        try:
            number = float(value)
        except ValueError as e:
            raise ParamError(f"timestamp_float must be a number, got {value[:40]!r}") from e
        if not math.isfinite(number) or number < 0:
            raise ParamError(f"timestamp_float must be a finite positive number, got {value!r}")
        if number > 0:
            return check_time(number, now, max_skew_s, "timestamp_float")
    if filename is None:
        raise ParamError(
            "timestamp_float is absent or 0 and the audiofile name does not carry a time "
            "({conf_id}:a-{participant_id}_{YYYYMMDD}_{HH}_{MM}_{SS}_{micro}.wav)"
        )
    return check_time(to_unix(filename.local_time, zone), now, max_skew_s, "the file name's time")


@dataclass(frozen=True, slots=True)
class FragmentParams:
    """What a POST /process fragment says besides its audio, validated."""

    conference_id: str
    participant_id: str
    participant_name: str
    start_time: float
    post_id: str | None
    language: str | None  # lang1 when the client sent one
    captions: str | None  # "en": add English translations to finals
    online: bool
    offline: bool


def parse_fragment_params(
    param: Callable[[str], str | None],
    filename: str | None,
    stream: StreamConfig,
    now: float,
) -> FragmentParams:
    """The fragment's fields from ``param`` (a field or query value by name, None when
    absent) and the audio file's name, which may carry the ids and the time."""
    from_name = parse_filename(filename)
    post_id = param("post_id") or None  # empty: no id (not one id shared by every fragment)
    if post_id is not None and len(post_id) > 256:
        raise ParamError("post_id is longer than 256 characters")
    captions = (param("lang2") or stream.captions or "").strip().lower() or None
    if captions not in (None, "en"):
        raise ParamError("lang2 (live captions) supports only en: Whisper translates to English")
    return FragmentParams(
        conference_id=validate_id(
            "conference_id",
            param("conference_id") or (from_name.conference_id if from_name else None),
        ),
        participant_id=validate_id(
            "participant_id",
            param("participant_id") or (from_name.participant_id if from_name else None),
        ),
        participant_name=clean_name(param("participant_name"), "UNKNOWN"),
        start_time=parse_timestamp(
            param("timestamp_float"),
            from_name,
            zone_of(stream.timezone),
            now=now,
            max_skew_s=stream.max_clock_skew_s,
        ),
        post_id=post_id,
        language=parse_language("lang1", param("lang1")),
        captions=captions,
        online=parse_bool("online", param("online"), default=False),
        offline=parse_bool("offline", param("offline"), default=True),
    )
