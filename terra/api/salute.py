"""The SaluteSpeech async dialect: upload, async_recognize, task:get/cancel, data:download.

Answers are wrapped as ``{"status": 200, "result": {...}}``; errors as
``{"status": <code>, "message": ...}`` (registered with the error middleware by path prefix).
Task states map onto the job store's: queued → NEW, running → RUNNING, succeeded → DONE,
failed → ERROR, canceled → CANCELED. ``response_file_id`` is the task's id.

The result file is a JSON list of utterances in SaluteSpeech's shape::

    [{"results": [{"text": "какая погода", "normalized_text": "Какая погода?",
                   "start": "0.420s", "end": "1.980s", "word_alignments": []}],
      "eou": true, "eou_reason": "ORGANIC", "channel": 0,
      "processed_audio_start": "0.420s", "processed_audio_end": "1.980s",
      "speaker_info": {"speaker_id": -1, "main_speaker_confidence": 1.0},
      "language": "ru"}]

``normalized_text`` is Whisper's text as it comes (cased, punctuated, digits); ``text`` is the
same lower-cased without punctuation. Times are protobuf Duration strings, as SaluteSpeech's.
``results`` holds up to ``hypotheses_count`` hypotheses, best first: the other beam
hypotheses of the utterance's chunk (given when the chunk is one utterance; a chunk Whisper
splits into several keeps only its best). ``speaker_id`` is the channel when speaker
separation is on.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from aiohttp import web

from terra import keys
from terra.api.auth import require_bearer
from terra.api.errors import (
    ERROR_BODIES,
    BadRequest,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    Unauthorized,
)
from terra.api.form import BodyLimits, read_json
from terra.api.respond import json_response
from terra.audio import AudioLimits
from terra.files.codecs import ENCODINGS, check_file
from terra.files.salute import SaluteOptions, salute_service
from terra.files.service import FileJobService
from terra.files.upload import UploadStalled, UploadTooLarge, request_body
from terra.jobs.runner import QueueFull
from terra.jobs.store import Job, JobStatus
from terra.params import LANGUAGES

PREFIX = "/rest/v1/"
SALUTE = web.AppKey("salute", FileJobService)

_STATUS = {
    JobStatus.QUEUED: "NEW",
    JobStatus.RUNNING: "RUNNING",
    JobStatus.SUCCEEDED: "DONE",
    JobStatus.FAILED: "ERROR",
    JobStatus.CANCELED: "CANCELED",
}
_LANGUAGE = re.compile(r"^([a-z]{2,3})(?:-[A-Za-z]{2,4})?$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")
# A hint is a word or a short phrase; Whisper reads only the last 223 prompt tokens anyway.
MAX_HINT_WORDS = 100
MAX_HINT_CHARS = 200


# -- options ------------------------------------------------------------------------------
def _duration_ms(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise BadRequest(f'options.{name} must be a duration such as "7s"')
    number: int | float | str
    if isinstance(value, int | float):
        number, unit = value, "s"
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if not match:
            raise BadRequest(f'options.{name} must be a duration such as "7s", got {value!r}')
        number, unit = match.group(1), match.group(2) or "s"
    try:
        ms = float(number) * {"ms": 1, "s": 1000, "m": 60_000}[unit]
    except OverflowError:  # an integer past a float's range
        ms = math.inf
    if not math.isfinite(ms):  # 1e999, Infinity, NaN, a digit string past a float's range
        raise BadRequest(f"options.{name} must be a finite duration, got {str(value)[:20]!r}")
    return int(ms)


def _int(options: dict[str, Any], name: str, default: int | None, low: int, high: int) -> Any:
    value = options.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadRequest(f"options.{name} must be an integer")
    try:
        number = int(value)
    except ValueError as e:
        raise BadRequest(f"options.{name} must be an integer") from e
    if not low <= number <= high:
        raise BadRequest(f"options.{name} must be {low}..{high}")
    return number


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"options.{name} must be true or false")
    return value


def parse_options(raw: Any) -> SaluteOptions:
    """Validate the request's ``options`` (a 400 names the first bad field)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequest("options must be an object")
    language = str(raw.get("language", "ru-RU"))
    match = _LANGUAGE.fullmatch(language)
    if not match or match.group(1).lower() not in LANGUAGES:
        raise BadRequest(
            f"options.language: expected a code Whisper knows such as ru-RU, got {language[:20]!r}"
        )
    encoding = str(raw.get("audio_encoding", "PCM_S16LE")).upper()
    if encoding not in ENCODINGS:
        raise BadRequest(
            f"options.audio_encoding: {encoding!r} is not one of {', '.join(sorted(ENCODINGS))}"
        )
    hints = raw.get("hints") or {}
    if not isinstance(hints, dict):
        raise BadRequest("options.hints must be an object")
    words = hints.get("words") or []
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise BadRequest("options.hints.words must be a list of strings")
    words = words[:MAX_HINT_WORDS]
    if any(len(w) > MAX_HINT_CHARS for w in words):
        raise BadRequest(
            f"options.hints.words: each word or phrase must be at most {MAX_HINT_CHARS} characters"
        )
    separation = raw.get("speaker_separation_options") or {}
    if not isinstance(separation, dict):
        raise BadRequest("options.speaker_separation_options must be an object")
    default_rate = (
        16000 if encoding == "PCM_S16LE" else 8000 if encoding in ("ALAW", "MULAW") else None
    )
    return SaluteOptions(
        language=match.group(1).lower(),
        audio_encoding=encoding,
        sample_rate=_int(raw, "sample_rate", default_rate, 1000, 192_000),
        channels_count=_int(raw, "channels_count", 1, 1, 8),
        hypotheses_count=_int(raw, "hypotheses_count", 1, 1, 10),
        enable_profanity_filter=_bool(
            raw.get("enable_profanity_filter", False), "enable_profanity_filter"
        ),
        no_speech_timeout_ms=_duration_ms(raw.get("no_speech_timeout", "7s"), "no_speech_timeout"),
        max_speech_timeout_ms=_duration_ms(
            raw.get("max_speech_timeout", "20s"), "max_speech_timeout"
        ),
        eou_timeout_ms=(
            _duration_ms(hints["eou_timeout"], "hints.eou_timeout")
            if "eou_timeout" in hints
            else None
        ),
        words=tuple(words),
        separate_speakers=_bool(
            separation.get("enable", False), "speaker_separation_options.enable"
        ),
    )


async def salute_ctx(app: web.Application) -> AsyncIterator[None]:
    """The SaluteSpeech job service; after the recognizer's context (it submits there)."""
    config = app[keys.CONFIG]
    service = salute_service(
        config.files,
        config.jobs,
        app[keys.DECODE].files,
        app[keys.ENGINE],
        app[keys.SCHEDULER].submit,
        config.spool.fsync,
    )
    app[SALUTE] = service
    await service.start()
    yield
    await service.stop()


# -- handlers -----------------------------------------------------------------------------
def _authorize(request: web.Request) -> None:
    try:
        require_bearer(request)
    except Unauthorized as e:  # SaluteSpeech says only this
        raise Unauthorized("Unauthorized") from e


def _ok(result: dict[str, Any]) -> web.Response:
    return json_response({"status": 200, "result": result})


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).astimezone().isoformat()


def task_json(job: Job) -> dict[str, Any]:
    updated = max(t for t in (job.created_at, job.started_at, job.finished_at) if t is not None)
    task: dict[str, Any] = {
        "id": job.id,
        "created_at": _time(job.created_at),
        "updated_at": _time(updated),
        "status": _STATUS[job.status],
    }
    if job.status is JobStatus.SUCCEEDED:
        task["response_file_id"] = job.id
    if job.status is JobStatus.FAILED:
        task["error"] = job.error or "internal error"
    return task


async def upload(request: web.Request) -> web.Response:
    """POST /rest/v1/data:upload: the body is the audio."""
    _authorize(request)
    config = request.app[keys.CONFIG]
    limit = config.files.max_upload_bytes
    idle_s = config.server.body_timeout_s  # the longest wait for the next byte
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge("Payload too large")
    try:
        async with asyncio.timeout(idle_s):
            first = await request.content.readany()
    except TimeoutError as e:
        raise RequestTimeout(f"no byte of the body arrived for {idle_s:g} s") from e
    if not first:
        raise BadRequest("the request body (the audio file) is empty")
    try:
        # Streamed to disk: a 100 MiB upload is never held in memory.
        body = request_body(first, request.content, idle_s)
        file_id = await request.app[SALUTE].save_upload(body, limit)
    except UploadTooLarge as e:
        raise PayloadTooLarge("Payload too large") from e
    except UploadStalled as e:
        raise RequestTimeout(str(e)) from e
    return _ok({"request_file_id": file_id})


async def async_recognize(request: web.Request) -> web.Response:
    """POST /rest/v1/speech:async_recognize: a task for an uploaded file."""
    _authorize(request)
    body = await read_json(request, BodyLimits.of(request.app[keys.CONFIG].server))
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    options = parse_options(body.get("options"))
    file_id = body.get("request_file_id")
    if not file_id or not isinstance(file_id, str):
        raise BadRequest("request_file_id must not be empty")
    service = request.app[SALUTE]
    path = service.upload_path(file_id)
    if path is None:
        raise NotFound(f"file {file_id} not found")
    limits = AudioLimits(max_seconds=request.app[keys.CONFIG].files.max_audio_s)
    # the declared format, before a task is made (400/413)
    await asyncio.to_thread(check_file, path, options.audio_format(), limits)
    try:
        job = await service.create(request_file_id=file_id, options=options.to_json())
    except QueueFull as e:
        raise TooManyRequests("Too Many Requests") from e
    return _ok(task_json(job))


async def _task(request: web.Request) -> Job:
    task_id = request.query.get("id", "")
    if not task_id:
        raise BadRequest("Id must not be empty")
    job = await request.app[SALUTE].get(task_id)
    if job is None:
        raise NotFound(f"task {task_id} not found")
    return job


async def task_get(request: web.Request) -> web.Response:
    """GET /rest/v1/task:get?id=: the task's state."""
    _authorize(request)
    return _ok(task_json(await _task(request)))


async def task_cancel(request: web.Request) -> web.Response:
    """POST /rest/v1/task:cancel?id=: cancel a task that is still NEW."""
    _authorize(request)
    job = await _task(request)
    canceled, ok = await request.app[SALUTE].cancel(job.id, running_too=False)
    if canceled is None:
        raise NotFound(f"task {job.id} not found")
    if not ok:
        raise BadRequest(f"task is {_STATUS[canceled.status]}: only a NEW task can be canceled")
    return _ok(task_json(canceled))


async def download(request: web.Request) -> web.Response:
    """GET /rest/v1/data:download?response_file_id=: the result file."""
    _authorize(request)
    file_id = request.query.get("response_file_id", "")
    if not file_id:
        raise BadRequest("response_file_id must not be empty")
    path = request.app[SALUTE].result_path(file_id)
    if path is None:
        raise NotFound(f"file {file_id} not found")
    body = await asyncio.to_thread(path.read_bytes)
    return web.Response(body=body, content_type="application/json", charset="utf-8")


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"status": status, "message": message}


def add_routes(app: web.Application) -> None:
    app.setdefault(ERROR_BODIES, {})[PREFIX] = _error_body
    app.router.add_post("/rest/v1/data:upload", upload)
    app.router.add_post("/rest/v1/speech:async_recognize", async_recognize)
    app.router.add_get("/rest/v1/task:get", task_get)
    app.router.add_post("/rest/v1/task:cancel", task_cancel)
    app.router.add_get("/rest/v1/data:download", download)
