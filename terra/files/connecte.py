"""The connecte predictions' jobs: fetch or read the audio, recognize, translate; webhooks.

A prediction is a job of kind ``connecte`` on the shared job runner. Its phase while it
runs (``starting`` while its audio is fetched and decoded, ``processing`` while it is
recognized) is known to the front end running it. A prediction that ends with a
``Webhook-URL`` is POSTed there under the job's lease, retried by the one retry policy
(:mod:`terra.retry`) on connection errors, timeouts, 408, 429 and 5xx; a webhook a restart
interrupted is sent again by whoever takes the job next. Webhooks have their own connection
pool, timeout and answer-size limit, apart from the audio downloads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from terra.audio import SAMPLE_RATE, AudioDecodeError, AudioLimits
from terra.config import FilesConfig, JobsConfig
from terra.files.codecs import decode_channels
from terra.files.fetch import Fetcher, FetchError
from terra.files.service import FileJobService
from terra.files.transcribe import FileOptions, Utterance, transcribe
from terra.jobs.runner import JobFailed
from terra.jobs.store import Job
from terra.recognizer.options import DecodeOptions
from terra.retry import Backoff, Retryable, Sleep, Submit, retryable_status, retrying

log = logging.getLogger(__name__)

KIND = "connecte"

# The prediction as the webhook sends it (the API's serialisation).
Payload = Callable[[Job], Awaitable[dict[str, Any]]]


def file_options(
    config: FilesConfig, decode: DecodeOptions, language: str | None, task: str, words: bool
) -> FileOptions:
    return FileOptions(
        decode=dataclasses.replace(decode, task=task, word_timestamps=words),
        language=language,
        chunking=config.chunking,
        max_in_flight=config.max_in_flight,
    )


def segment_json(u: Utterance, diarize: bool, words: bool) -> dict[str, Any]:
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


class ConnecteService:
    """Predictions: the job service, the audio fetcher, the webhook client, phases."""

    def __init__(
        self,
        config: FilesConfig,
        jobs: JobsConfig,
        decode: DecodeOptions,
        submit: Submit,
        payload: Payload,
        *,
        fsync: bool = True,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._config = config
        self._decode = decode
        self._submit = submit
        self._payload = payload
        self._sleep = sleep
        self.phase: dict[str, str] = {}
        self.fetcher = Fetcher(config.url_allow, config.url_max_bytes, config.url_timeout_s)
        # Webhooks: their own pool, a short timeout, and only the head of an answer read.
        self.hooks = Fetcher(
            config.url_allow, config.webhook_max_response_bytes, config.webhook_timeout_s
        )
        self.backoff = Backoff(
            config.webhook_backoff_s, config.webhook_backoff_max_s, config.webhook_tries
        )
        self.jobs = FileJobService(
            config,
            jobs,
            KIND,
            self._recognize,
            fsync=fsync,
            notify=self.send_webhook,
            wants_notice=lambda job: bool(job.params.get("webhook")),
        )

    async def start(self) -> None:
        await self.jobs.start()

    async def stop(self) -> None:
        await self.jobs.stop()
        await self.fetcher.close()
        await self.hooks.close()

    async def _recognize(self, job: Job) -> dict[str, Any]:
        params = job.params["input"]
        self.phase[job.id] = "starting"
        try:
            try:
                upload = job.params.get("upload")
                if upload:  # a data: URI, saved when the prediction was created
                    path = self.jobs.upload_path(str(upload))
                    if path is None:
                        raise JobFailed("the uploaded audio is gone (expired?)")
                    data = await asyncio.to_thread(path.read_bytes)
                else:
                    data = await self.fetcher.get(params["audio"])
                tracks = await asyncio.to_thread(
                    decode_channels,
                    data,
                    "WAV",
                    None,
                    1,
                    params["diarize"],
                    AudioLimits(max_seconds=self._config.max_audio_s),
                )
            except (FetchError, AudioDecodeError) as e:
                raise JobFailed(str(e)) from e
            self.phase[job.id] = "processing"
            return await self._transcribe(tracks, params)
        finally:
            self.phase.pop(job.id, None)

    async def _transcribe(self, tracks: Any, params: dict[str, Any]) -> dict[str, Any]:
        config = self._config
        language = None if params["language"] == "auto" else params["language"]
        utterances = await transcribe(
            tracks,
            file_options(config, self._decode, language, "transcribe", params["word_timestamp"]),
            self._submit,
        )
        detected = utterances[0].language if utterances else (language or "")
        translation = None
        if params["translate"]:
            translated = await transcribe(
                tracks,
                file_options(
                    config, self._decode, language or detected or None, "translate", False
                ),
                self._submit,
            )
            translation = " ".join(u.text for u in translated)
        audio_s = max(t.size for t in tracks) / SAMPLE_RATE
        return {
            "output": {
                "segments": [
                    segment_json(u, params["diarize"], params["word_timestamp"]) for u in utterances
                ],
                "transcription": " ".join(u.text for u in utterances),
                "translation": translation,
                "detected_language": detected,
            },
            "audio_s": round(audio_s, 3),
        }

    async def send_webhook(self, job: Job) -> None:
        """POST the ended prediction to its ``Webhook-URL`` until it is taken (any answer
        :func:`terra.retry.retryable_status` does not retry) or the tries are spent."""
        url = str(job.params["webhook"])
        payload = await self._payload(job)
        try:
            async for attempt in retrying(self.backoff, sleep=self._sleep):
                with attempt:
                    try:
                        status = await self.hooks.post_json(url, payload)
                    except FetchError:
                        raise  # refused by the address guard: never retried
                    except Exception as e:  # connection errors and timeouts are retried
                        raise Retryable(f"{type(e).__name__}: {e}") from e
                    if retryable_status(status):
                        raise Retryable(f"HTTP {status}")
                    log.info(
                        "webhook for %s: HTTP %d (try %d)",
                        job.id,
                        status,
                        attempt.retry_state.attempt_number,
                    )
        except FetchError as e:
            log.warning("webhook for %s refused: %s", job.id, e)
        except Retryable as e:
            log.warning("webhook for %s given up after %d tries: %s", job.id, self.backoff.tries, e)
