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
from terra.config import zone_of
from terra.live import FragmentInput
from terra.params import (
    clean_name,
    parse_bool,
    parse_filename,
    parse_language,
    parse_timestamp,
    validate_id,
)


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
    zone = zone_of(config.stream.timezone)
    from_name = parse_filename(audio.filename)
    conference_id = validate_id(
        "conference_id",
        param("conference_id") or (from_name.conference_id if from_name else None),
    )
    participant_id = validate_id(
        "participant_id",
        param("participant_id") or (from_name.participant_id if from_name else None),
    )
    start_time = parse_timestamp(
        param("timestamp_float"),
        from_name,
        zone,
        now=time.time(),
        max_skew_s=config.stream.max_clock_skew_s,
    )
    language = parse_language("lang1", param("lang1"))
    participant_name = clean_name(param("participant_name"), "UNKNOWN")
    online = parse_bool("online", param("online"), default=False)
    offline = parse_bool("offline", param("offline"), default=True)
    post_id = param("post_id") or None  # empty: no id (not one id shared by every fragment)
    if post_id is not None and len(post_id) > 256:
        raise BadRequest("post_id is longer than 256 characters")
    captions = (param("lang2") or config.stream.captions or "").strip().lower() or None
    if captions not in (None, "en"):
        raise BadRequest("lang2 (live captions) supports only en: Whisper translates to English")

    live = request.app[keys.LIVE]
    place = live.admit(conference_id, participant_id)  # before any work on the audio
    if place is None:
        raise ParticipantsFull(
            f"this server has its {config.stream.max_participants} live participants: "
            "try again later or another server"
        )
    with place:  # a new participant's, until its session exists
        limits = AudioLimits(max_seconds=config.stream.max_fragment_ms / 1000)
        samples = await asyncio.to_thread(decode_audio, audio.data, limits)

        fragment = FragmentInput(
            conference_id=conference_id,
            participant_id=participant_id,
            participant_name=participant_name,
            start_time=start_time,
            post_id=post_id,
            language=language,
            captions=captions,
            online=online,
            offline=offline,
            samples=samples,
        )
        elems = await live.process(fragment)
    return json_response([e.to_json() for e in elems])


def add_routes(app: web.Application) -> None:
    quiet_spec_dispositions()
    app.router.add_post("/process", process)
