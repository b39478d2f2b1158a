"""The connecte predictions' jobs: fetch or read the audio, recognize, translate; webhooks.

A prediction is a job of kind ``connecte`` on the shared job runner. Its phase while it
runs (``starting`` while its audio is fetched and decoded, ``processing`` while it is
recognized) is known to the front end running it. A prediction that ends with a
``Webhook-URL`` is POSTed there (:mod:`terra.files.webhooks`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from terra.audio import SAMPLE_RATE, AudioDecodeError, AudioLimits
from terra.config import FilesConfig, JobsConfig
from terra.files.codecs import AudioFormat, decode_channels
from terra.files.fetch import Fetcher, FetchError
from terra.files.service import FileJobService
from terra.files.transcribe import FileOptions, Utterance, transcribe
from terra.files.webhooks import Payload, Webhooks
from terra.jobs.runner import JobFailed
from terra.jobs.store import Job
from terra.recognizer.options import DecodeOptions
from terra.retry import Sleep, Submit

log = logging.getLogger(__name__)

KIND = "connecte"


def audio_format(diarize: bool) -> AudioFormat:
    """A prediction's audio: a file that says its own format (a container: WAV, FLAC, OGG,
    MP3); with ``diarize``, each channel is a speaker's track."""
    return AudioFormat("WAV", split=diarize)


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
    """Predictions: the job service, the audio fetcher, the webhooks, phases."""

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
        self.phase: dict[str, str] = {}
        self.fetcher = Fetcher(config.url_allow, config.url_max_bytes, config.url_timeout_s)
        self.webhooks = Webhooks(config, payload, sleep=sleep)
        self.jobs = FileJobService(
            config,
            jobs,
            KIND,
            self._recognize,
            upload_param="upload",
            fsync=fsync,
            notifier=self.webhooks,
        )

    async def start(self) -> None:
        await self.jobs.start()

    async def stop(self) -> None:
        await self.jobs.stop()
        await self.fetcher.close()
        await self.webhooks.close()

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
                    audio_format(params["diarize"]),
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
        transcription = " ".join(u.text for u in utterances)
        return {
            "output": {
                "segments": [
                    segment_json(u, params["diarize"], params["word_timestamp"]) for u in utterances
                ],
                "transcription": transcription,
                # The spec's examples spell the key so: a client written from them reads it.
                "transcirption": transcription,
                "translation": translation,
                "detected_language": detected,
            },
            "audio_s": round(audio_s, 3),
        }
