"""The IVA Terra dialect's POST /process (GET /minutes and /translate_to_any: api/minutes.py,
api/translate.py)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from terra import keys
from terra.api.auth import check_token, query_token
from terra.api.errors import BadRequest, ParticipantsFull
from terra.api.form import BodyLimits, quiet_spec_dispositions, read_form
from terra.api.respond import json_response
from terra.audio import AudioLimits, decode_audio
from terra.params import parse_fragment_params


async def process(request: web.Request) -> web.Response:
    """POST /process: spool a fragment and/or answer with the participant's TextElems."""
    config = request.app[keys.CONFIG]
    tokens = config.server.tokens
    if query_token(request) is not None:  # checked before a byte of the body is read
        check_token(tokens, query_token(request))

    def early_token(name: str, value: str) -> None:
        if name == "token" and query_token(request) is None:
            check_token(tokens, value)  # a bad token field stops the read here

    form = await read_form(request, BodyLimits.of(config.server), on_field=early_token)

    def param(name: str) -> str | None:
        return form.fields.get(name) or request.query.get(name)

    check_token(tokens, param("token"))
    audio = form.files.get("audiofile")
    if audio is None:
        raise BadRequest("audiofile is required (a multipart file part)")
    params = parse_fragment_params(param, audio.filename, config.stream, now=time.time())

    live = request.app[keys.LIVE]
    place = live.admit(params.conference_id, params.participant_id)  # before any work on the audio
    if place is None:
        raise ParticipantsFull(
            f"this server has its {config.stream.max_participants} live participants: "
            "try again later or another server"
        )
    with place:  # a new participant's, until its session exists
        limits = AudioLimits(max_seconds=config.stream.max_fragment_ms / 1000)
        samples = await asyncio.to_thread(decode_audio, audio.data, limits)
        elems = await live.process(params, samples)
    return json_response([e.to_json() for e in elems])


def add_routes(app: web.Application) -> None:
    quiet_spec_dispositions()
    app.router.add_post("/process", process)
