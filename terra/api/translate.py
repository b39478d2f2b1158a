"""The IVA Terra dialect: POST /translate_to_any (thin: read, authorise, validate, translate)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from terra import keys
from terra.api.auth import check_token, query_token
from terra.api.errors import BadRequest
from terra.api.form import (
    HEAD_BYTES,
    BodyLimits,
    leading_string,
    parse_json,
    read_body,
    read_form,
)
from terra.api.respond import json_response
from terra.translate.service import PayloadError, parse_payload

# The spec's 404 body: a bare JSON string, not {"detail": ...}.
DISABLED = "TRANSLATOR DISABLED OR URL IS NOT CONFIGURED"
_BODY_SHAPE = 'the body must be a JSON object {"token": ..., "payload": [...]}'


async def _read_fields(
    request: web.Request, limits: BodyLimits, tokens: tuple[str, ...]
) -> tuple[dict[str, Any], str | None]:
    """The request's fields and, if the body is malformed, why (reported after the token).
    A token field, or a JSON body's leading ``"token"``, is checked as soon as it is read,
    before the rest of a long body."""

    def early_field(name: str, value: str) -> None:
        if name == "token" and value:
            check_token(tokens, value)

    def early_head(head: bytes) -> None:
        token = leading_string(head, "token")
        if token:
            check_token(tokens, token)

    content_type = request.content_type
    if content_type.startswith("multipart/") or content_type == "application/x-www-form-urlencoded":
        form = await read_form(request, limits, on_field=early_field)
        fields: dict[str, Any] = dict(form.fields)
        if "payload" in fields:
            try:
                fields["payload"] = parse_json(
                    fields["payload"], limits.max_json_depth, "the payload field"
                )
            except BadRequest as e:
                return fields, e.detail
        return fields, None
    raw = await read_body(request, limits, early_head)
    try:
        body = parse_json(raw, limits.max_json_depth)
    except BadRequest as e:
        # A leading "token" is still the client's: judged first, then the body (400).
        token = leading_string(raw[:HEAD_BYTES], "token")
        return ({"token": token} if token else {}), f"{_BODY_SHAPE} ({e.detail})"
    return (body, None) if isinstance(body, dict) else ({}, _BODY_SHAPE)


async def translate_to_any(request: web.Request) -> web.Response:
    """POST /translate_to_any: translate each parcel of ``payload`` per the spec's rules."""
    config = request.app[keys.CONFIG]
    if query_token(request) is not None:  # checked before a byte of the body is read
        check_token(config.server.tokens, query_token(request))
    fields, malformed = await _read_fields(
        request, BodyLimits.of(config.server), config.server.tokens
    )
    token = fields.get("token")
    check_token(config.server.tokens, token if token else query_token(request))
    service = request.app.get(keys.TRANSLATION)
    if service is None:
        return json_response(DISABLED, status=404)
    if malformed:
        raise BadRequest(malformed)
    if "payload" not in fields:
        raise BadRequest("payload is required")
    try:
        items = parse_payload(
            fields["payload"],
            max_items=config.translate.max_items,
            max_content_chars=config.translate.max_content_chars,
        )
    except PayloadError as e:
        raise BadRequest(str(e)) from e
    translated = await service.translate(items)
    return json_response({"payload": [item.to_json() for item in translated]})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/translate_to_any", translate_to_any)
