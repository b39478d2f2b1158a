"""SaluteSpeech async tasks: the options, the job (decode, recognize with hints), the result.

A task is a job of kind ``salute`` on the shared job runner (see :mod:`terra.files.service`).
The result file is a JSON list of utterances in SaluteSpeech's shape (see
:mod:`terra.api.salute`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terra.audio import AudioDecodeError, AudioLimits
from terra.config import FilesConfig, JobsConfig
from terra.files.codecs import AudioFormat, decode_channels
from terra.files.service import FileJobService
from terra.files.transcribe import FileOptions, Utterance, hint_tokens, transcribe
from terra.jobs.runner import JobFailed
from terra.jobs.store import Job
from terra.recognizer.options import DecodeOptions
from terra.recognizer.types import Vocabulary
from terra.retry import Submit

KIND = "salute"

_WORD = re.compile(r"\w+", re.UNICODE)
_PUNCTUATION = re.compile(r"[^\w\s'-]+", re.UNICODE)


@dataclass(frozen=True, slots=True)
class SaluteOptions:
    """The ``options`` of speech:async_recognize, validated (durations in ms)."""

    language: str = "ru"
    audio_encoding: str = "PCM_S16LE"
    sample_rate: int | None = None
    channels_count: int = 1
    hypotheses_count: int = 1
    enable_profanity_filter: bool = False
    no_speech_timeout_ms: int = 7000
    max_speech_timeout_ms: int = 20000
    eou_timeout_ms: int | None = None
    words: tuple[str, ...] = ()
    separate_speakers: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def audio_format(self) -> AudioFormat:
        """The upload's declared format: with more than one channel, a track each (the
        speakers are told apart by channel)."""
        return AudioFormat(
            self.audio_encoding, self.sample_rate, self.channels_count, self.channels_count > 1
        )


def file_options(
    options: SaluteOptions, config: FilesConfig, decode: DecodeOptions, prompt: tuple[int, ...]
) -> FileOptions:
    """Salute's timeouts as VAD settings: ``max_speech_timeout`` caps an utterance's length,
    ``hints.eou_timeout`` is the pause that ends one, and no utterance spans a stretch without
    speech longer than ``no_speech_timeout``."""
    chunking = config.chunking
    return FileOptions(
        decode=dataclasses.replace(decode, num_hypotheses=options.hypotheses_count),
        language=options.language,
        prompt_tokens=prompt,
        chunking=dataclasses.replace(
            chunking,
            min_silence_ms=options.eou_timeout_ms or chunking.min_silence_ms,
            chunk_join_ms=min(chunking.chunk_join_ms, options.no_speech_timeout_ms),
            max_chunk_s=min(chunking.max_chunk_s, max(1.0, options.max_speech_timeout_ms / 1000)),
        ),
        max_in_flight=config.max_in_flight,
    )


# -- results ------------------------------------------------------------------------------
def mask_profanity(text: str, stems: Sequence[str]) -> str:
    """Replace every word that starts with one of ``stems`` by asterisks of its length."""
    lowered = tuple(s.lower() for s in stems)

    def mask(match: re.Match[str]) -> str:
        word = match.group(0)
        return "*" * len(word) if word.lower().startswith(lowered) else word

    return _WORD.sub(mask, text) if lowered else text


def plain_text(text: str) -> str:
    """SaluteSpeech's ``text``: lower case, no punctuation."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def result_json(
    utterances: Sequence[Utterance], options: SaluteOptions, profanity: Sequence[str]
) -> list[dict[str, Any]]:
    out = []
    for u in utterances:
        normalized, text = u.text, plain_text(u.text)
        start, end = _duration(u.start_s), _duration(u.end_s)
        hypotheses = [(text, normalized)] + [
            (plain_text(a), a) for a in u.alternatives[: max(0, options.hypotheses_count - 1)]
        ]
        if options.enable_profanity_filter:
            hypotheses = [
                (mask_profanity(t, profanity), mask_profanity(n, profanity)) for t, n in hypotheses
            ]
        out.append(
            {
                "results": [
                    {
                        "text": t,
                        "normalized_text": n,
                        "start": start,
                        "end": end,
                        "word_alignments": [],
                    }
                    for t, n in hypotheses
                ],
                "eou": True,
                "eou_reason": "ORGANIC",
                "channel": u.channel,
                "processed_audio_start": start,
                "processed_audio_end": end,
                "speaker_info": {
                    "speaker_id": u.channel if options.separate_speakers else -1,
                    "main_speaker_confidence": 1.0,
                },
                "language": u.language,
            }
        )
    return out


# -- the job ------------------------------------------------------------------------------
def salute_service(
    config: FilesConfig,
    jobs: JobsConfig,
    decode: DecodeOptions,
    engine: Vocabulary,
    submit: Submit,
    fsync: bool = True,
) -> FileJobService:
    """The SaluteSpeech task service: its jobs decode the upload and recognize it."""
    service: FileJobService

    async def recognize(job: Job) -> list[dict[str, Any]]:
        options = SaluteOptions(**job.params["options"])
        path = service.upload_path(str(job.params["request_file_id"]))
        if path is None:
            raise JobFailed("the uploaded file is gone (expired?)")
        try:
            tracks = await asyncio.to_thread(
                lambda: decode_channels(
                    Path(path).read_bytes(),
                    options.audio_format(),
                    AudioLimits(max_seconds=config.max_audio_s),
                )
            )
        except AudioDecodeError as e:
            raise JobFailed(str(e)) from e
        prompt = hint_tokens(engine, options.words)
        utterances = await transcribe(tracks, file_options(options, config, decode, prompt), submit)
        return result_json(utterances, options, config.profanity_words)

    service = FileJobService(
        config, jobs, KIND, recognize, upload_param="request_file_id", fsync=fsync
    )
    return service
