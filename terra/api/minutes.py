"""GET /minutes/{conference_id}: the IVA Terra offline minutes (thin: validate, ask, serialise)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from terra import keys
from terra.api.auth import require_viewer
from terra.api.errors import BadRequest, MinutesBusy, NotFound, ServerError
from terra.api.respond import json_response
from terra.config import zone_of
from terra.jobs.runner import QueueFull
from terra.minutes.formats import CONTENT_TYPES, FORMATS, render
from terra.minutes.service import MinutesService, State
from terra.params import validate_id

# The spec's texts, word for word.
NOT_FOUND = "Conference minutes status file not found"
QUEUEPLACING = {
    "status": "queueplacing",
    "message_en": "Compiling task of minutes has been placed to the Queue",
    "message_ru": "Задача формирования протокола поставлена в очередь",
}
RUNNING = {
    "status": "running",
    "message_en": "Task of compiling of minutes is still under way",
    "message_ru": "Идет процесс формирования протокола",
}


async def minutes(request: web.Request) -> web.Response:
    """404 when nothing was spooled; ``queueplacing`` on the call that queues a compile;
    ``running`` (with the queue time and progress) until it is done; then the protocol."""
    config = request.app[keys.CONFIG]
    # A server token, or a viewer's (a viewer token or this conference's signed link), as the
    # minutes viewer page passes on.
    require_viewer(request, request.match_info["conference_id"])
    conference_id = validate_id("conference_id", request.match_info["conference_id"])
    fmt = (request.query.get("format") or "xml").strip().lower()
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(FORMATS)}, got {fmt[:20]!r}")

    try:
        answer = await request.app[keys.MINUTES].request(conference_id)
    except QueueFull as e:
        raise MinutesBusy(f"{e}: ask for these minutes again later") from e
    if answer.state is State.NOT_FOUND:
        raise NotFound(NOT_FOUND)
    if answer.state is State.QUEUED_NOW:
        return json_response(QUEUEPLACING)
    if answer.state is State.RUNNING:
        job = answer.job
        assert job is not None
        return json_response(
            {**RUNNING, "timestamp": job.queued_at, "progress": round(job.progress, 3)}
        )
    if answer.state is State.FAILED:
        assert answer.job is not None
        raise ServerError(
            f"compiling the minutes failed: {answer.job.error}; "
            "new audio for the conference queues a fresh compile"
        )
    assert answer.minutes is not None
    body = render(answer.minutes, fmt, zone_of(config.stream.timezone))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPES[fmt]})


async def minutes_ctx(app: web.Application) -> AsyncIterator[None]:
    """The minutes service. Goes after the recognizer's context: it submits to its scheduler,
    and stops (leaving running jobs to resume at start-up) before the scheduler does."""
    config = app[keys.CONFIG]
    service = MinutesService(
        config.minutes,
        config.jobs,
        Path(config.spool.dir),
        app[keys.SCHEDULER].submit,
        decode=app[keys.DECODE],
        model=config.model.name,
        zone=zone_of(config.stream.timezone),
        fsync=config.spool.fsync,
    )
    app[keys.MINUTES] = service
    await service.start()
    yield
    await service.stop()


def add_routes(app: web.Application) -> None:
    app.router.add_get("/minutes/{conference_id}", minutes)
