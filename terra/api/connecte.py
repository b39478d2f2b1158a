"""The connecte predictions dialect: ``POST /api/v1/{company}/{model}``, ``GET
/api/v1/predictions/{id}``, ``POST /api/v1/predictions/{id}/cancel``.

A prediction is a file job (kind ``connecte``) in the job store. Its status: ``queued``
while it waits, ``starting`` while its audio is fetched and decoded, ``processing`` while it
is recognized, then ``succeeded``, ``failed`` (with ``error``) or ``canceled``. ``Prefer:
SYNC`` holds the answer until the end or ``Request-Timeout`` seconds; a ``Webhook-URL`` gets
the prediction POSTed once it ends, retried with backoff on connection errors, 429 and 5xx.

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
from dataclasses import dataclass
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
from terra.audio import SAMPLE_RATE, AudioDecodeError, AudioLimits
from terra.config import FilesConfig
from terra.files.codecs import decode_channels
from terra.files.fetch import Fetcher, FetchError, decode_data_uri
from terra.files.service import FileJobService, JobFailed, QueueFull
from terra.files.transcribe import FileOptions, Utterance, transcribe
from terra.files.upload import in_memory
from terra.jobs import Job, JobStatus
from terra.params import LANGUAGES

log = logging.getLogger(__name__)

KIND = "connecte"


@dataclass(slots=True)
class _State:
    """What the process knows beside the job store: phases, SYNC waiters, webhook tasks."""

    service: FileJobService
    fetcher: Fetcher
    phase: dict[str, str]
    waiters: dict[str, list[asyncio.Future[None]]]
    webhooks: set[asyncio.Task[None]]


CONNECTE = web.AppKey("connecte", _State)

_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "canceled",
}


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
        _check_http_url(audio, "audio")
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
        "model": str(body.get("model") or ""),
        "language": language,
        "diarize": body.get("diarize", False),
        "speakers": speakers,
        "word_timestamp": body.get("word_timestamp", False),
        "translate": body.get("translate", False) or task == "translate",
        "task": task,
    }


# -- the job ------------------------------------------------------------------------------
def _options(config: FilesConfig, language: str | None, task: str, words: bool) -> FileOptions:
    return FileOptions(
        language=language,
        task=task,
        beam_size=config.beam_size,
        word_timestamps=words,
        chunking=config.chunking,
        max_in_flight=config.max_in_flight,
    )


def _segment(u: Utterance, diarize: bool, words: bool) -> dict[str, Any]:
    segment: dict[str, Any] = {"start": u.start_s, "end": u.end_s, "text": u.text}
    if diarize:
        segment["speaker"] = f"SPEAKER_{u.channel:02d}"
    if words:
        segment["words"] = [
            {
                "start": w.start_s,
                "end": w.end_s,
                "word": w.text.strip(),
                "probability": w.probability,
            }
            for w in u.words
        ]
    return segment


def _runner(app: web.Application) -> Any:
    async def run(job: Job) -> dict[str, Any]:
        config = app[keys.CONFIG].files
        state = app[CONNECTE]
        params = job.params["input"]
        state.phase[job.id] = "starting"
        try:
            upload = job.params.get("upload")
            if upload:  # a data: URI, saved when the prediction was created
                path = state.service.upload_path(str(upload))
                if path is None:
                    raise JobFailed("the uploaded audio is gone (expired?)")
                data = await asyncio.to_thread(path.read_bytes)
            else:
                data = await state.fetcher.get(params["audio"])
            tracks = await asyncio.to_thread(
                decode_channels,
                data,
                "WAV",
                None,
                1,
                params["diarize"],
                AudioLimits(max_seconds=config.max_audio_s),
            )
        except FetchError as e:
            raise JobFailed(str(e)) from e
        except AudioDecodeError as e:
            raise JobFailed(str(e)) from e
        state.phase[job.id] = "processing"
        language = None if params["language"] == "auto" else params["language"]
        submit = app[keys.SCHEDULER].submit
        utterances = await transcribe(
            tracks, _options(config, language, "transcribe", params["word_timestamp"]), submit
        )
        detected = utterances[0].language if utterances else (language or "")
        translation = None
        if params["translate"]:
            translated = await transcribe(
                tracks, _options(config, language or detected or None, "translate", False), submit
            )
            translation = " ".join(u.text for u in translated)
        audio_s = max(t.size for t in tracks) / SAMPLE_RATE
        return {
            "output": {
                "segments": [
                    _segment(u, params["diarize"], params["word_timestamp"]) for u in utterances
                ],
                "transcription": " ".join(u.text for u in utterances),
                "translation": translation,
                "detected_language": detected,
            },
            "audio_s": round(audio_s, 3),
        }

    return run


def _ended(app: web.Application, job: Job) -> None:
    """A prediction reached a terminal state: wake SYNC waiters, send its webhook."""
    state = app[CONNECTE]
    state.phase.pop(job.id, None)
    for waiter in state.waiters.pop(job.id, []):
        if not waiter.done():
            waiter.set_result(None)
    url = job.params.get("webhook")
    if url:
        task = asyncio.create_task(_send_webhook(app, job, str(url)))
        state.webhooks.add(task)
        task.add_done_callback(state.webhooks.discard)


async def _send_webhook(app: web.Application, job: Job, url: str) -> None:
    """POST the prediction to ``url`` until it is taken (2xx-4xx but 429), with backoff."""
    config = app[keys.CONFIG].files
    state = app[CONNECTE]
    payload = await prediction_json(state.service, job)
    delay = config.webhook_backoff_s
    for attempt in range(1, config.webhook_tries + 1):
        try:
            status = await state.fetcher.post_json(url, payload)
            if status != 429 and status < 500:
                log.info("webhook for %s: HTTP %d (try %d)", job.id, status, attempt)
                return
            reason = f"HTTP {status}"
        except FetchError as e:
            log.warning("webhook for %s refused: %s", job.id, e)
            return
        except Exception as e:  # a task boundary: connection errors are retried
            reason = f"{type(e).__name__}: {e}"
        log.info("webhook for %s failed (%s), try %d: retrying", job.id, reason, attempt)
        await asyncio.sleep(delay)
        delay = min(delay * 2, config.webhook_backoff_max_s)
    log.warning("webhook for %s given up after %d tries", job.id, config.webhook_tries)


async def connecte_ctx(app: web.Application) -> AsyncIterator[None]:
    """The predictions service; after the recognizer's context (it submits there)."""
    config = app[keys.CONFIG]
    files = config.files
    service = FileJobService(
        files, KIND, _runner(app), fsync=config.spool.fsync, listener=lambda j: _ended(app, j)
    )
    fetcher = Fetcher(files.url_allow, files.url_max_bytes, files.url_timeout_s)
    app[CONNECTE] = _State(service, fetcher, {}, {}, set())
    await service.start()
    yield
    await service.stop()
    for task in list(app[CONNECTE].webhooks):
        task.cancel()
    await asyncio.gather(*app[CONNECTE].webhooks, return_exceptions=True)
    await fetcher.close()


# -- serialisation ------------------------------------------------------------------------
def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def prediction_json(
    service: FileJobService, job: Job, phase: str | None = None
) -> dict[str, Any]:
    config_cost = float(job.params.get("cost_per_audio_s", 0.0))
    status = _STATUS.get(job.status) or phase or "processing"
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
    state = request.app[CONNECTE]
    body = await prediction_json(state.service, job, state.phase.get(job.id))
    return json_response(body, status=status)


def model_map(entries: Sequence[str], served: str) -> dict[str, str]:
    """``files.connecte_models``: ``company/model`` (the served model) or ``company/model=NAME``."""
    mapping = {}
    for entry in entries:
        name, _, model = entry.partition("=")
        mapping[name.strip()] = model.strip() or served
    return mapping


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
    webhook = request.headers.get("Webhook-URL", "")
    if webhook:
        _check_http_url(webhook, "Webhook-URL")
    state = request.app[CONNECTE]
    upload = ""
    if prediction_input["audio"].startswith("data:"):
        # Kept as an upload, not in the job's status file; the echo names its size.
        try:
            data = decode_data_uri(prediction_input["audio"], config.url_max_bytes)
        except FetchError as e:
            raise BadRequest(str(e)) from e
        upload = await state.service.save_upload(in_memory(data), len(data))
        header = prediction_input["audio"].partition(",")[0]
        prediction_input["audio"] = f"{header},<{len(data)} bytes>"
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        job = await state.service.create(
            input=prediction_input,
            upload=upload,
            model=name,
            webhook=webhook,
            cost_per_audio_s=config.cost_per_audio_s,
        )
    except QueueFull as e:
        raise TooManyRequests(str(e)) from e
    if prefer == "SYNC":
        state.waiters.setdefault(job.id, []).append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), max(0.0, timeout_s))
        except TimeoutError:
            pass
        finally:
            waiting = state.waiters.get(job.id, [])
            if waiter in waiting:
                waiting.remove(waiter)
        job = await state.service.get(job.id) or job
    return await _answer(request, job, 201)


async def get(request: web.Request) -> web.Response:
    """GET /api/v1/predictions/{id}."""
    _authorize(request)
    job = await request.app[CONNECTE].service.get(request.match_info["id"])
    if job is None:
        raise NotFound("prediction not found")
    return await _answer(request, job)


async def cancel(request: web.Request) -> web.Response:
    """POST /api/v1/predictions/{id}/cancel: idempotent; an ended prediction stays as it is."""
    _authorize(request)
    service = request.app[CONNECTE].service
    job, _ = await service.cancel(request.match_info["id"], running_too=True)
    if job is None:
        raise NotFound("prediction not found")
    return await _answer(request, job)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/predictions/{id}", get)
    app.router.add_post("/api/v1/predictions/{id}/cancel", cancel)
    app.router.add_post("/api/v1/{company}/{model}", create)
