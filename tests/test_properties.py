"""Property-based tests (hypothesis) of the input layer: whatever arrives, the parsers and
decoders either give a valid value or raise their own error (a 4xx), never anything else.

Example counts come from the hypothesis profile (tests/conftest.py): few in the fast tier,
more in the whole suite (scripts/test: ``--hypothesis-profile=ci``)."""

from __future__ import annotations

import asyncio
import io
import json
import struct
from typing import Any
from unittest import mock

import numpy as np
import pytest
from aiohttp import StreamReader
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from terra.api.connecte import parse_input
from terra.api.errors import ApiError, BadRequest
from terra.api.form import BodyLimits, parse_json, read_form
from terra.api.salute import parse_options
from terra.audio import SAMPLE_RATE, AudioDecodeError, AudioLimits, decode_audio
from terra.files.codecs import AudioFormat, decode_channels
from terra.params import (
    ID_PATTERN,
    LANGUAGES,
    ParamError,
    clean_name,
    is_safe_id,
    parse_filename,
    parse_language,
    parse_timestamp,
    validate_id,
)
from terra.translate.service import PayloadError, parse_payload

LIMITS = AudioLimits(max_seconds=30.0)

# What st.text() draws from by default (every code point UTF-8 can carry: all but the
# surrogates), named: hypothesis then takes it from its Unicode table instead of scanning
# the UTF-8 codec, which cost 2.4 s on every fresh clone's first run.
UNICODE = st.characters(exclude_categories=["Cs"])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(UNICODE, max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(UNICODE, max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


# -- parameters and ids -------------------------------------------------------------------
@given(st.text(UNICODE, max_size=140))
def test_ids_are_the_one_rule(value: str) -> None:
    ok = ID_PATTERN.fullmatch(value) is not None
    assert is_safe_id(value) is ok
    if ok:
        assert validate_id("id", value) == value and "\n" not in value
    else:
        with pytest.raises(ParamError):
            validate_id("id", value)


@given(st.text(UNICODE, max_size=40), st.one_of(st.none(), st.text(UNICODE, max_size=80)))
def test_timestamps_parse_or_are_param_errors(value: str, filename: str | None) -> None:
    try:
        moment = parse_timestamp(value, parse_filename(filename), None, now=1.8e9, max_skew_s=86400)
    except ParamError:
        return
    assert abs(moment - 1.8e9) <= 86400


@given(st.text(UNICODE, max_size=12))
def test_languages_are_whisper_codes(value: str) -> None:
    try:
        code = parse_language("lang1", value)
    except ParamError:
        return
    assert code is None or code in LANGUAGES


@given(st.text(UNICODE, max_size=300))
def test_clean_names_are_valid_xml(value: str) -> None:
    name = clean_name(value, "UNKNOWN")
    assert name and name == name.strip() and len(name) <= 256
    assert not any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in name)
    element = etree.Element("participant", name=name)  # lxml refuses what XML cannot hold
    assert etree.fromstring(etree.tostring(element)).get("name") == name


# -- decoders -----------------------------------------------------------------------------
def wav(rate: int, channels: int, bits: int, data: bytes, declared: int | None = None) -> bytes:
    block = max(channels * bits // 8, 1)
    size = len(data) if declared is None else declared
    return (
        b"RIFF"
        + struct.pack("<I", (36 + size) & 0xFFFFFFFF)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
        + b"data"
        + struct.pack("<I", size & 0xFFFFFFFF)
        + data
    )


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 40),
    st.sampled_from([8, 16, 24, 32, 7]),
    st.binary(max_size=4000),
    st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)
def test_wav_headers_decode_or_refuse(
    rate: int, channels: int, bits: int, data: bytes, declared: int | None
) -> None:
    try:
        samples = decode_audio(wav(rate, channels, bits, data, declared), LIMITS)
    except AudioDecodeError:
        return
    assert samples.dtype == np.float32
    assert samples.size <= LIMITS.max_seconds * SAMPLE_RATE + SAMPLE_RATE


@given(st.binary(max_size=2000))
def test_any_bytes_decode_or_refuse(data: bytes) -> None:
    try:
        samples = decode_audio(data, LIMITS)
    except AudioDecodeError:
        return
    assert samples.dtype == np.float32


@given(
    st.sampled_from(["PCM_S16LE", "ALAW", "MULAW"]),
    st.integers(0, 400_000),
    st.integers(1, 10),
    st.booleans(),
    st.binary(max_size=6000),
)
def test_raw_decoders_give_the_declared_length(
    encoding: str, rate: int, channels: int, split: bool, data: bytes
) -> None:
    try:
        tracks = decode_channels(data, AudioFormat(encoding, rate, channels, split), LIMITS)
    except AudioDecodeError:
        return
    width = 2 if encoding == "PCM_S16LE" else 1
    frames = len(data) // (width * channels)
    assert len(tracks) == (channels if split else 1)
    for track in tracks:
        assert abs(track.size - frames * SAMPLE_RATE / rate) <= 2
        assert np.all(np.abs(track) <= 1.5)


# -- the multipart reader -----------------------------------------------------------------
async def _read(body: bytes, content_type: str, limits: BodyLimits) -> Any:
    protocol = mock.Mock(_reading_paused=False)
    payload = StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(body)
    payload.feed_eof()
    request = make_mocked_request(
        "POST",
        "/process",
        headers={"Content-Type": content_type},
        payload=payload,
    )
    return await read_form(request, limits)


def multipart(fields: list[tuple[str, bytes, str | None]], boundary: str = "xYz") -> bytes:
    out = io.BytesIO()
    for name, value, filename in fields:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.write(f"Content-Disposition: {disposition}\r\n\r\n".encode())
        out.write(value + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


names = st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=8)


@given(
    st.lists(
        st.tuples(
            names, st.binary(max_size=300).filter(lambda b: b"--xYz" not in b), st.booleans()
        ),
        max_size=8,
        unique_by=lambda t: t[0],
    )
)
def test_multipart_round_trip(parts: list[tuple[str, bytes, bool]]) -> None:
    fields = [(n, v, "f.wav" if is_file else None) for n, v, is_file in parts]
    form = asyncio.run(
        _read(multipart(fields), "multipart/form-data; boundary=xYz", BodyLimits(max_bytes=10**6))
    )
    for name, value, filename in fields:
        if filename is None:
            assert form.fields[name] == value.decode("utf-8", errors="replace").strip()
        else:
            assert form.files[name].data == value


@given(st.binary(max_size=3000), st.integers(1, 20), st.integers(100, 5000))
def test_multipart_garbage_is_a_4xx(body: bytes, max_parts: int, max_bytes: int) -> None:
    limits = BodyLimits(max_bytes=max_bytes, max_parts=max_parts)
    try:
        asyncio.run(_read(b"--xYz\r\n" + body, "multipart/form-data; boundary=xYz", limits))
    except ApiError as e:
        assert 400 <= e.status < 500


# -- the dialects' JSON bodies ------------------------------------------------------------
@given(json_values)
def test_translate_payloads(value: Any) -> None:
    try:
        items = parse_payload(value, max_items=50, max_content_chars=100)
    except PayloadError:
        return
    assert len(items) <= 50


@given(json_values)
def test_salute_options(value: Any) -> None:
    try:
        options = parse_options(value)
    except BadRequest:
        return
    assert options.language in LANGUAGES


@given(json_values)
def test_connecte_inputs(value: Any) -> None:
    try:
        parsed = parse_input(value)
    except BadRequest:
        return
    assert parsed["language"] == "auto" or parsed["language"] in LANGUAGES


@given(st.integers(1, 5000))
def test_json_depth_is_refused_not_a_crash(depth: int) -> None:
    text = "[" * depth + "]" * depth
    try:
        value = parse_json(text, max_depth=32)
    except BadRequest as e:
        assert depth > 32 and "deeper than 32" in e.detail
        return
    assert depth <= 32 and json.dumps(value) == text.replace("][", "], [")
