"""The connecte predictions dialect: ``POST /api/v1/{company}/{model}``, ``GET
/api/v1/predictions/{id}``, ``POST /api/v1/predictions/{id}/cancel``.

A prediction is a file job (kind ``connecte``) in the job store. Its status: ``queued``
while it waits, ``starting`` while its audio is fetched and decoded, ``processing`` while it
is recognized, then ``succeeded``, ``failed`` (with ``error``) or ``canceled``. ``Prefer:
SYNC`` holds the answer until the end or ``Request-Timeout`` seconds; a ``Webhook-URL`` gets
the prediction POSTed once it ends ``succeeded`` or ``failed`` (not ``canceled``), retried
with backoff on connection errors, 429 and 5xx.

Output: ``segments`` (start/end/text, ``words`` with ``word_timestamp``, ``speaker`` with
``diarize``: one speaker per channel — there is no voice-based diarization), ``transcription``,
``translation`` (English, by Whisper's translate task, when ``translate`` or
``task: translate``; otherwise null) and ``detected_language``. Errors are ``{"detail": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from yarl import URL

from terra import keys
from terra.api.auth import require_bearer
from terra.api.errors import BadRequest, NotFound, TooManyRequests
from terra.api.form import BodyLimits, read_json
from terra.api.respond import json_response
from terra.audio import AudioDecodeError, AudioLimits
from terra.files.codecs import check_file
from terra.files.connecte import ConnecteService, audio_format
from terra.files.fetch import FetchError, decode_data_uri
from terra.files.upload import in_memory
from terra.jobs.runner import QueueFull
from terra.jobs.store import Job, JobStatus
from terra.params import LANGUAGES

log = logging.getLogger(__name__)

KIND = "connecte"


CONNECTE = web.AppKey("connecte", ConnecteService)
# Kept in the prediction's record and echoed at every read: bounded (a data: URI is stored
# apart, as an upload).
MAX_URL_CHARS = 8192
MAX_MODEL_CHARS = 256


# -- input --------------------------------------------------------------------------------
def _check_http_url(value: str, name: str) -> None:
    """400 unless ``value`` is an http(s) URL with a host that can be encoded (IDNA)."""
    if not value.startswith(("http://", "https://")):
        raise BadRequest(f"{name} must be an http(s) URL")
    try:
        host = URL(value).raw_host
    except (ValueError, UnicodeError) as e:
        raise BadRequest(f"{name} is not a valid URL: {e}") from e
    if not host:
        raise BadRequest(f"{name} has no host")


def parse_input(body: Any) -> dict[str, Any]:
    """The request body, validated and with defaults filled (it is echoed as ``input``)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    audio = body.get("audio")
    if not isinstance(audio, str) or not audio:
        raise BadRequest("audio is required: an http(s) URL or a data: URI")
    if not audio.startswith(("http://", "https://", "data:")):
        raise BadRequest("audio must be an http(s) URL or a data: URI")
    if not audio.startswith("data:"):
        if len(audio) > MAX_URL_CHARS:
            raise BadRequest(f"audio: a URL of at most {MAX_URL_CHARS} characters")
        _check_http_url(audio, "audio")
    model = str(body.get("model") or "")
    if len(model) > MAX_MODEL_CHARS:
        raise BadRequest(f"model: a name of at most {MAX_MODEL_CHARS} characters")
    language = str(body.get("language") or "auto").lower()
    if language != "auto" and language not in LANGUAGES:
        raise BadRequest(
            f"language must be 'auto' or a code Whisper knows such as 'ru', got {language[:20]!r}"
        )
    task = str(body.get("task") or "transcribe")
    if task not in ("transcribe", "translate"):
        raise BadRequest("task must be 'transcribe' or 'translate'")
    for name in ("diarize", "word_timestamp", "translate"):
        if not isinstance(body.get(name, False), bool):
            raise BadRequest(f"{name} must be true or false")
    speakers = body.get("speakers", 1)
    if isinstance(speakers, bool) or not isinstance(speakers, int) or not 1 <= speakers <= 8:
        raise BadRequest("speakers must be an integer 1..8")
    return {
        "audio": audio,
        "model": model,
        "language": language,
        "diarize": body.get("diarize", False),
        "speakers": speakers,
        "word_timestamp": body.get("word_timestamp", False),
        "translate": body.get("translate", False) or task == "translate",
        "task": task,
    }


async def connecte_ctx(app: web.Application) -> AsyncIterator[None]:
    """The predictions service; after the recognizer's context (it submits there)."""
    config = app[keys.CONFIG]

    async def payload(job: Job) -> dict[str, Any]:
        return await prediction_json(job)

    service = ConnecteService(
        config.files,
        config.jobs,
        app[keys.DECODE].files,
        app[keys.SCHEDULER].submit,
        payload,
        fsync=config.spool.fsync,
    )
    app[CONNECTE] = service
    await service.start()
    yield
    await service.stop()


# -- serialisation ------------------------------------------------------------------------
def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def prediction_json(job: Job, phase: str | None = None) -> dict[str, Any]:
    config_cost = float(job.params.get("cost_per_audio_s", 0.0))
    # cog's names are the job's, but for a running one: its phase (starting, processing)
    running = job.status is JobStatus.RUNNING
    status = (phase or "processing") if running else job.status.value
    output = None
    audio_s = 0.0
    if job.status is JobStatus.SUCCEEDED and job.result_path:
        try:
            stored = json.loads(await asyncio.to_thread(Path(job.result_path).read_bytes))
            output, audio_s = stored["output"], float(stored["audio_s"])
        except (OSError, ValueError, KeyError) as e:
            log.warning("prediction %s: result unreadable (%s)", job.id, e)
    end = job.finished_at if job.finished_at is not None else time.time()
    runtime = round(end - job.started_at, 3) if job.started_at is not None else 0.0
    prediction: dict[str, Any] = {
        "id": job.id,
        "input": job.params["input"],
        "status": status,
        "output": output,
        "error": job.error if job.status is JobStatus.FAILED else None,
        "source": "api",
        "runtime": runtime,
        "cost": round(audio_s * config_cost, 6),
        "created_at": _time(job.created_at),
    }
    if job.finished_at is not None:
        prediction["completed_at"] = _time(job.finished_at)
    return prediction


# -- handlers -----------------------------------------------------------------------------
def _authorize(request: web.Request) -> None:
    require_bearer(request)


async def _answer(request: web.Request, job: Job, status: int = 200) -> web.Response:
    body = await prediction_json(job, request.app[CONNECTE].phase.get(job.id))
    return json_response(body, status=status)


def model_map(entries: Sequence[str], served: str) -> dict[str, str]:
    """``files.connecte_models``: ``company/model`` (the served model) or ``company/model=NAME``."""
    mapping = {}
    for entry in entries:
        name, _, model = entry.partition("=")
        mapping[name.strip()] = model.strip() or served
    return mapping


async def _check_declared(service: ConnecteService, upload: str, split: bool, max_s: float) -> None:
    """A data: URI's declared format and length, as the job would check them, answered now
    (400/413) rather than by a failed prediction; the refused upload is removed."""
    path = service.jobs.upload_path(upload)
    if path is None:
        return
    try:
        await asyncio.to_thread(check_file, path, audio_format(split), AudioLimits(max_s))
    except AudioDecodeError:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise


async def create(request: web.Request) -> web.Response:
    """POST /api/v1/{company}/{model}: a prediction; ``Prefer: SYNC`` waits for its end."""
    _authorize(request)
    config = request.app[keys.CONFIG].files
    name = f"{request.match_info['company']}/{request.match_info['model']}"
    served = request.app[keys.CONFIG].model.name
    mapped = model_map(config.connecte_models, served).get(name)
    if mapped is None:
        raise NotFound(f"model {name} not found")
    if mapped != served:
        raise NotFound(
            f"model {name} maps to {mapped!r}, which this server does not run (it runs "
            f"{served!r}; one model per server)"
        )
    body = await read_json(
        request, BodyLimits.of(request.app[keys.CONFIG].server, config.max_upload_bytes)
    )
    prediction_input = parse_input(body)
    prefer = request.headers.get("Prefer", "ASYNC").strip().upper()
    if prefer not in ("SYNC", "ASYNC"):
        raise BadRequest("Prefer must be SYNC or ASYNC")
    try:
        timeout_s = float(request.headers.get("Request-Timeout", config.sync_timeout_s))
    except ValueError as e:
        raise BadRequest("Request-Timeout must be a number of seconds") from e
    if not math.isfinite(timeout_s):
        raise BadRequest("Request-Timeout must be a finite number of seconds")
    # A wait past a proxy's response timeout would be cut with a 504 (deploy/haproxy.cfg).
    timeout_s = min(timeout_s, config.max_sync_timeout_s)
    webhook = request.headers.get("Webhook-URL", "")
    if webhook:
        _check_http_url(webhook, "Webhook-URL")
    service = request.app[CONNECTE]
    upload = ""
    if prediction_input["audio"].startswith("data:"):
        # Kept as an upload, not in the job's status file; the echo names its size.
        try:
            data = decode_data_uri(prediction_input["audio"], config.url_max_bytes)
        except FetchError as e:
            raise BadRequest(str(e)) from e
        upload = await service.jobs.save_upload(in_memory(data), len(data))
        await _check_declared(service, upload, prediction_input["diarize"], config.max_audio_s)
        header = prediction_input["audio"].partition(",")[0]
        prediction_input["audio"] = f"{header},<{len(data)} bytes>"
    try:
        job = await service.jobs.create(
            input=prediction_input,
            upload=upload,
            model=name,
            webhook=webhook,
            cost_per_audio_s=config.cost_per_audio_s,
        )
    except QueueFull as e:
        raise TooManyRequests(str(e)) from e
    if prefer == "SYNC":
        job = await service.jobs.runner.wait(job.id, timeout_s) or job
    return await _answer(request, job, 201)


async def get(request: web.Request) -> web.Response:
    """GET /api/v1/predictions/{id}."""
    _authorize(request)
    job = await request.app[CONNECTE].jobs.get(request.match_info["id"])
    if job is None:
        raise NotFound("prediction not found")
    return await _answer(request, job)


async def cancel(request: web.Request) -> web.Response:
    """POST /api/v1/predictions/{id}/cancel: idempotent; an ended prediction stays as it is."""
    _authorize(request)
    service = request.app[CONNECTE].jobs
    job, _ = await service.cancel(request.match_info["id"], running_too=True)
    if job is None:
        raise NotFound("prediction not found")
    return await _answer(request, job)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/predictions/{id}", get)
    app.router.add_post("/api/v1/predictions/{id}/cancel", cancel)
    app.router.add_post("/api/v1/{company}/{model}", create)
