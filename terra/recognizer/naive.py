"""The baseline recognizer the popular faster-whisper streaming servers use, for benchmarks.

Each request is one ``WhisperModel.transcribe()`` over the whole pending buffer: a 30 s
padded window, one request at a time, no batching (``recognizer.mode: naive``). It keeps
the same beam sizes and languages as terra's engine so that only the window and the
batching differ when the two are compared.
"""

from __future__ import annotations

from collections.abc import Sequence

from faster_whisper import WhisperModel

from terra.recognizer.engine import MAX_WINDOW_S
from terra.recognizer.types import Recognition, RecognitionRequest
from terra.recognizer.vocabulary import WhisperVocabulary


class NaiveEngine(WhisperVocabulary):
    def __init__(self, model: WhisperModel) -> None:
        super().__init__(model.hf_tokenizer)
        self._model = model

    def batch_key(self, request: RecognitionRequest) -> tuple[float, int]:
        return (MAX_WINDOW_S, id(request))  # never shares a call

    def recognize(self, requests: Sequence[RecognitionRequest]) -> list[Recognition]:
        return [self._one(request) for request in requests]

    def _one(self, request: RecognitionRequest) -> Recognition:
        segments, info = self._model.transcribe(
            request.audio,
            language=request.language,
            task=request.options.task,
            beam_size=request.options.beam_size,
            condition_on_previous_text=False,
        )
        listed = list(segments)  # the generator runs the model: consume it here, in the worker
        text = "".join(s.text for s in listed)
        return Recognition(
            text=text,
            tokens=tuple(t for s in listed for t in s.tokens),
            language=info.language,
            language_probability=float(info.language_probability),
            no_speech_prob=max((s.no_speech_prob for s in listed), default=0.0),
            avg_logprob=min((s.avg_logprob for s in listed), default=0.0),
            compression_ratio=max((s.compression_ratio for s in listed), default=0.0),
            window_s=MAX_WINDOW_S,
        )
