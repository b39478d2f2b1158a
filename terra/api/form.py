"""Reading multipart bodies the way real Terra clients send them.

The spec's clients write ``Content-Disposition: name="token"`` without ``form-data;``,
which aiohttp's part properties reject, so the header is parsed here directly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, web
from aiohttp.multipart import BadContentDispositionHeader, parse_content_disposition

from terra.api.errors import BadRequest, PayloadTooLarge


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


async def _read_part(part: BodyPartReader, budget: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(64 * 1024):
        size += len(chunk)
        if size > budget:
            raise PayloadTooLarge("the request body is larger than the configured limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: web.Request, max_bytes: int) -> Form:
    """Read a multipart or urlencoded body, refusing more than ``max_bytes`` of content."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge("the request body is larger than the configured limit")
    form = Form()
    content_type = request.content_type
    if content_type.startswith("multipart/"):
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError) as e:
            raise BadRequest(f"malformed multipart body: {e}") from e
        budget = max_bytes
        while True:
            try:
                part = await reader.next()
            except ValueError as e:
                raise BadRequest(f"malformed multipart body: {e}") from e
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not supported")
            name, filename = _disposition(part.headers.get("Content-Disposition", ""))
            data = await _read_part(part, budget)
            budget -= len(data)
            if not name:
                continue
            if filename is not None:
                form.files[name] = UploadedFile(filename=filename, data=data)
            else:
                form.fields[name] = data.decode("utf-8", errors="replace").strip()
    elif content_type == "application/x-www-form-urlencoded":
        body = await request.content.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise PayloadTooLarge("the request body is larger than the configured limit")
        form.fields.update(parse_qsl(body.decode("utf-8", errors="replace")))
    return form
