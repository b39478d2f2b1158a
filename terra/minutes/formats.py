"""Minutes as XML (the IVA Terra protocol, schema in minutes.xsd), JSON, SRT, WebVTT and
Markdown. Pure: a Minutes in, UTF-8 bytes out.

Every format carries the same content: the conference, its participants and each phrase
with its speaker, language and times (ISO 8601 with the zone's offset, unix seconds, and
seconds from the conference start).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from lxml import etree

from terra.minutes.types import FORMAT_VERSION, Minutes, Phrase

XSD_PATH = Path(__file__).with_name("minutes.xsd")
_LANGUAGE = re.compile(r"^[a-z]{2,8}$")
# What XML 1.0 cannot carry (lxml refuses it): C0 controls but tab, newline and carriage
# return, surrogates, U+FFFE and U+FFFF. Recognized text may hold them (byte-level tokens).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

CONTENT_TYPES = {
    "xml": "application/xml; charset=utf-8",
    "json": "application/json; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "md": "text/markdown; charset=utf-8",
}
FORMATS = tuple(CONTENT_TYPES)


def iso_time(unix_seconds: float, zone: ZoneInfo | None) -> str:
    """ISO 8601 with milliseconds and the offset of ``zone`` (the server's zone if None)."""
    moment = (
        datetime.fromtimestamp(unix_seconds, zone)
        if zone
        else datetime.fromtimestamp(unix_seconds).astimezone()
    )
    return moment.isoformat(timespec="milliseconds")


def _seconds(value: float) -> str:
    return f"{value:.3f}"


def _phrase_fields(minutes: Minutes, phrase: Phrase, zone: ZoneInfo | None) -> dict[str, str]:
    start = minutes.start_time + phrase.start_s
    end = minutes.start_time + phrase.end_s
    return {
        "participant_id": phrase.participant_id,
        "speaker": minutes.speaker(phrase.participant_id).name,
        "language": phrase.language,
        "start": iso_time(start, zone),
        "end": iso_time(end, zone),
        "start_float": _seconds(start),
        "end_float": _seconds(end),
        "start_s": _seconds(phrase.start_s),
        "end_s": _seconds(phrase.end_s),
    }


def to_xml(minutes: Minutes, zone: ZoneInfo | None = None) -> bytes:
    root = etree.Element(
        "minutes",
        version=str(FORMAT_VERSION),
        conference_id=minutes.conference_id,
        start=iso_time(minutes.start_time, zone),
        end=iso_time(minutes.end_time, zone),
        start_float=_seconds(minutes.start_time),
        end_float=_seconds(minutes.end_time),
        duration_s=_seconds(minutes.duration_s),
        generated=iso_time(minutes.generated_at, zone),
    )
    if minutes.model:
        root.set("model", minutes.model)
    participants = etree.SubElement(root, "participants")
    for speaker in minutes.participants:
        element = etree.SubElement(
            participants, "participant", id=speaker.participant_id, name=speaker.name
        )
        if speaker.language and _LANGUAGE.fullmatch(speaker.language):
            element.set("language", speaker.language)
    phrases = etree.SubElement(root, "phrases")
    for number, phrase in enumerate(minutes.phrases, start=1):
        element = etree.SubElement(
            phrases, "phrase", id=str(number), **_phrase_fields(minutes, phrase, zone)
        )
        element.text = _NOT_XML.sub("", phrase.text)
    data: bytes = etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
    return data


def to_json(minutes: Minutes, zone: ZoneInfo | None = None) -> bytes:
    document: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "conference_id": minutes.conference_id,
        "start": iso_time(minutes.start_time, zone),
        "end": iso_time(minutes.end_time, zone),
        "start_float": round(minutes.start_time, 3),
        "end_float": round(minutes.end_time, 3),
        "duration_s": round(minutes.duration_s, 3),
        "generated": iso_time(minutes.generated_at, zone),
        "model": minutes.model,
        "participants": [
            {"id": s.participant_id, "name": s.name, "language": s.language}
            for s in minutes.participants
        ],
        "phrases": [
            {
                "id": number,
                **{
                    key: float(value) if key.endswith(("_float", "_s")) else value
                    for key, value in _phrase_fields(minutes, phrase, zone).items()
                },
                "text": phrase.text,
            }
            for number, phrase in enumerate(minutes.phrases, start=1)
        ],
    }
    return (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


# A line break in cue text (with the blanks around it): a blank line would end the cue.
_LINE_BREAK = re.compile("[ \t]*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]\\s*")


def _cue_text(text: str) -> str:
    """A phrase's text on one line: an SRT or WebVTT cue ends at a blank line."""
    return _LINE_BREAK.sub(" ", text)


def _cue_end(phrase: Phrase) -> float:
    # A cue needs a visible duration even when the phrase was timed as an instant.
    return max(phrase.end_s, phrase.start_s + 0.5)


def to_srt(minutes: Minutes, zone: ZoneInfo | None = None) -> bytes:
    blocks = []
    for number, phrase in enumerate(minutes.phrases, start=1):
        name = minutes.speaker(phrase.participant_id).name
        blocks.append(
            f"{number}\n{_clock(phrase.start_s, ',')} --> {_clock(_cue_end(phrase), ',')}\n"
            f"{name}: {_cue_text(phrase.text)}\n"
        )
    return "\n".join(blocks).encode("utf-8")


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(minutes: Minutes, zone: ZoneInfo | None = None) -> bytes:
    lines = ["WEBVTT", ""]
    for number, phrase in enumerate(minutes.phrases, start=1):
        name = _vtt_escape(minutes.speaker(phrase.participant_id).name)
        lines += [
            str(number),
            f"{_clock(phrase.start_s, '.')} --> {_clock(_cue_end(phrase), '.')}",
            f"<v {name}>{_vtt_escape(_cue_text(phrase.text))}",
            "",
        ]
    return "\n".join(lines).encode("utf-8")


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>#|"})


def _md(text: str) -> str:
    return text.translate(_MD_SPECIAL)


def to_md(minutes: Minutes, zone: ZoneInfo | None = None) -> bytes:
    names = ", ".join(
        _md(s.name) + (f" ({s.language})" if s.language else "") for s in minutes.participants
    )
    lines = [
        f"# Minutes of {_md(minutes.conference_id)}",
        "",
        f"- Start: {iso_time(minutes.start_time, zone)}",
        f"- End: {iso_time(minutes.end_time, zone)}",
        f"- Duration: {_clock(minutes.duration_s, '.')[:-4]}",
        f"- Participants: {names}",
        "",
    ]
    for phrase in minutes.phrases:
        name = _md(minutes.speaker(phrase.participant_id).name)
        lines.append(f"**[{_clock(phrase.start_s, '.')[:-4]}] {name}:** {_md(phrase.text)}  ")
    return ("\n".join(lines).rstrip() + "\n").encode("utf-8")


RENDERERS: dict[str, Callable[[Minutes, ZoneInfo | None], bytes]] = {
    "xml": to_xml,
    "json": to_json,
    "srt": to_srt,
    "vtt": to_vtt,
    "md": to_md,
}


def render(minutes: Minutes, fmt: str, zone: ZoneInfo | None = None) -> bytes:
    """``fmt`` is one of FORMATS; raises KeyError otherwise."""
    return RENDERERS[fmt](minutes, zone)


def schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(XSD_PATH)))


def validate_xml(data: bytes) -> list[str]:
    """Errors of ``data`` against minutes.xsd (empty when valid)."""
    xsd = schema()
    try:
        document = etree.fromstring(data)
    except etree.XMLSyntaxError as e:
        return [str(e)]
    if xsd.validate(document):
        return []
    return [f"line {e.line}: {e.message}" for e in xsd.error_log]
