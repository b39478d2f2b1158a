"""Reading request bodies within limits: multipart and urlencoded forms the way real Terra
clients send them, raw uploads and JSON.

Every reader counts the bytes that arrive, however the body is framed (a Content-Length
over the limit is refused before reading; a chunked body is cut off as soon as it passes
it), caps the number of multipart parts, and gives up with a 408 when the whole body has
not arrived within ``timeout_s`` (a client that trickles bytes holds nothing for long).

The spec's clients write ``Content-Disposition: name="token"`` without ``form-data;``,
which aiohttp's part properties reject, so the header is parsed here directly.
"""

from __future__ import annotations

import asyncio
import json
import re
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, parse_content_disposition

from terra.api.errors import BadRequest, PayloadTooLarge, RequestTimeout
from terra.config import ServerConfig

TOO_LARGE = "the request body is larger than the configured limit"
HEAD_BYTES = 64 * 1024  # what read_body shows on_head of a longer body
_FIRST_KEY = re.compile(rb'\s*\{\s*"(?P<key>[A-Za-z_]{1,64})"\s*:\s*"')


@dataclass(frozen=True, slots=True)
class BodyLimits:
    max_bytes: int
    max_parts: int = 64
    timeout_s: float = 60.0
    max_json_depth: int = 32

    @classmethod
    def of(cls, server: ServerConfig, max_bytes: int | None = None) -> BodyLimits:
        return cls(
            max_bytes=server.max_upload_bytes if max_bytes is None else max_bytes,
            max_parts=server.max_form_parts,
            timeout_s=server.body_timeout_s,
            max_json_depth=server.max_json_depth,
        )


@dataclass(frozen=True, slots=True)
class UploadedFile:
    filename: str
    data: bytes


@dataclass(slots=True)
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)


def quiet_spec_dispositions() -> None:
    """aiohttp warns on every part of a spec-shaped request; for Terra clients that is normal."""
    warnings.filterwarnings("ignore", category=BadContentDispositionHeader)


def _disposition(header: str) -> tuple[str | None, str | None]:
    """(name, filename) from a Content-Disposition value, with or without ``form-data;``."""
    value = header.strip()
    first = value.split(";", 1)[0].strip()
    if "=" in first:  # no disposition type: the spec's `name="token"`
        value = "form-data; " + value
    _, params = parse_content_disposition(value)
    return params.get("name"), params.get("filename")


@asynccontextmanager
async def _deadline(limits: BodyLimits) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(limits.timeout_s):
            yield
    except TimeoutError as e:
        raise RequestTimeout(
            f"the request body did not arrive within {limits.timeout_s:g} s"
        ) from e


def _check_declared(request: web.Request, limits: BodyLimits) -> None:
    if request.content_length is not None and request.content_length > limits.max_bytes:
        raise PayloadTooLarge(TOO_LARGE)


def _check_received(request: web.Request, limits: BodyLimits) -> None:
    """Bytes received so far, multipart framing and headers included."""
    if request.content.total_bytes > limits.max_bytes:
        raise PayloadTooLarge(TOO_LARGE)


async def _read_part(request: web.Request, part: BodyPartReader, limits: BodyLimits) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(64 * 1024):
        size += len(chunk)
        if size > limits.max_bytes:
            raise PayloadTooLarge(TOO_LARGE)
        _check_received(request, limits)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(
    request: web.Request,
    limits: BodyLimits,
    on_field: Callable[[str, str], None] | None = None,
) -> Form:
    """Read a multipart or urlencoded body within ``limits``. ``on_field(name, value)`` is
    called as each text field arrives (e.g. to check the token before the file part)."""
    _check_declared(request, limits)
    form = Form()
    content_type = request.content_type
    async with _deadline(limits):
        if content_type.startswith("multipart/"):
            try:
                await _read_multipart(request, limits, form, on_field)
            except HttpProcessingError as e:  # a part's headers that are not headers
                raise BadRequest(f"malformed multipart body: {e.message}") from e
        elif content_type == "application/x-www-form-urlencoded":
            body = await read_body(request, limits)
            for name, value in parse_qsl(body.decode("utf-8", errors="replace")):
                form.fields[name] = value
                if on_field is not None:
                    on_field(name, value)
    return form


async def _read_multipart(
    request: web.Request,
    limits: BodyLimits,
    form: Form,
    on_field: Callable[[str, str], None] | None,
) -> None:
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError) as e:
        raise BadRequest(f"malformed multipart body: {e}") from e
    parts = 0
    while True:
        try:
            part = await reader.next()
        except ValueError as e:
            raise BadRequest(f"malformed multipart body: {e}") from e
        if part is None:
            break
        parts += 1
        if parts > limits.max_parts:
            raise BadRequest(f"the multipart body has more than {limits.max_parts} parts")
        _check_received(request, limits)
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart bodies are not supported")
        name, filename = _disposition(part.headers.get("Content-Disposition", ""))
        data = await _read_part(request, part, limits)
        if not name:
            continue
        if filename is not None:
            form.files[name] = UploadedFile(filename=filename, data=data)
        else:
            value = data.decode("utf-8", errors="replace").strip()
            form.fields[name] = value
            if on_field is not None:
                on_field(name, value)


async def read_body(
    request: web.Request, limits: BodyLimits, on_head: Callable[[bytes], None] | None = None
) -> bytes:
    """The whole body, or 413 as soon as more than ``limits.max_bytes`` has arrived.

    ``on_head(first bytes)`` is called once, when the first HEAD_BYTES of a longer body have
    arrived (e.g. to check a token at its start before the rest is read); it may raise."""
    _check_declared(request, limits)
    parts: list[bytes] = []
    size = 0
    async with _deadline(limits):
        while chunk := await request.content.read(256 * 1024):
            size += len(chunk)
            if size > limits.max_bytes:
                raise PayloadTooLarge(TOO_LARGE)
            if on_head is not None and size - len(chunk) < HEAD_BYTES <= size:
                on_head((b"".join(parts) + chunk)[:HEAD_BYTES])
            parts.append(chunk)
    return b"".join(parts)


def leading_string(head: bytes, key: str) -> str | None:
    """The value of ``key`` when it is the first key of the JSON object ``head`` starts and
    its string value is complete in ``head`` (``{"token": "..."``, as Terra clients write
    it); None otherwise."""
    match = _FIRST_KEY.match(head)
    if match is None or match["key"] != key.encode():
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(
            head[match.end() - 1 :].decode("utf-8", errors="replace")
        )
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item)
    return deepest


# A \uD800-\uDFFF escape: the only way a lone surrogate (not text) gets into parsed JSON.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_json(raw: bytes | str, max_depth: int, what: str = "the body") -> Any:
    """A JSON document, or BadRequest: malformed, not UTF-8, nested deeper than
    ``max_depth`` (a 200k-deep body is refused, not a RecursionError), or holding a string
    with a lone surrogate (``"\\ud800"``: not text, it cannot be stored or answered)."""
    try:
        value = json.loads(raw)
    except RecursionError as e:
        raise BadRequest(f"{what} nests deeper than {max_depth} levels") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from e
    if json_depth(value) > max_depth:
        raise BadRequest(f"{what} nests deeper than {max_depth} levels")
    encoded = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if _SURROGATE_ESCAPE.search(encoded) and _has_lone_surrogate(value):
        raise BadRequest(f"{what} holds a lone UTF-16 surrogate (\\uD800-\\uDFFF): not text")
    return value


async def read_json(request: web.Request, limits: BodyLimits) -> Any:
    """The body as JSON within ``limits`` (size, time, depth)."""
    return parse_json(await read_body(request, limits), limits.max_json_depth)
