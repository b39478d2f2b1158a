"""CTranslate2 Whisper behind a blocking, batched call with windows fitted to the audio.

Whisper was trained on 30 s windows, but CTranslate2 accepts fewer feature frames, and the
encoder cost scales with them. A window cut tight to the speech makes Whisper loop, so each
request gets at least ``trailing_margin_s`` of silence after its audio, the window is rounded
up to a length bucket (so requests can share a batch), and generation is capped at a token
budget proportional to the audio. See DESIGN.md, "Where the speed is".
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from numpy.typing import NDArray

from terra.audio import SAMPLE_RATE, Samples
from terra.config import ModelConfig, RecognizerConfig
from terra.recognizer import guards
from terra.recognizer.types import Recognition, RecognitionRequest

log = logging.getLogger(__name__)

FRAMES_PER_SECOND = 100  # Whisper's mel hop is 10 ms
MAX_WINDOW_S = 30.0
MAX_DECODER_TOKENS = 448


@dataclass(frozen=True, slots=True)
class EngineTimings:
    batch_size: int
    window_s: float
    seconds: float


def load_whisper(model_path: str, config: ModelConfig) -> WhisperModel:
    """Load a faster-whisper model from a folder (or a hub name when downloads are allowed)."""
    try:
        return WhisperModel(
            model_path,
            device=config.device,
            compute_type=config.compute_type,
            cpu_threads=config.cpu_threads,
            local_files_only=not config.allow_download,
        )
    except (RuntimeError, ValueError, OSError) as e:
        raise RuntimeError(
            f"cannot load Whisper model {model_path!r} "
            f"on {config.device}/{config.compute_type}: {e}"
        ) from e


class WhisperEngine:
    """Fitted-window, batched Whisper recognition. Thread-compatible, not thread-safe."""

    def __init__(self, model: WhisperModel, config: RecognizerConfig) -> None:
        self._model = model
        self._ct2: ctranslate2.models.Whisper = model.model
        self._config = config
        self._buckets = tuple(sorted(min(b, MAX_WINDOW_S) for b in config.window_buckets_s))
        self.multilingual = bool(model.model.is_multilingual)
        self.last_timings: list[EngineTimings] = []
        self._word_starts: dict[int, bool] = {}

    # -- window sizing -------------------------------------------------------------------
    def window_seconds(self, n_samples: int) -> float:
        needed = n_samples / SAMPLE_RATE + self._config.trailing_margin_s
        for bucket in self._buckets:
            if needed <= bucket:
                return bucket
        return MAX_WINDOW_S

    def token_budget(self, n_samples: int) -> int:
        seconds = n_samples / SAMPLE_RATE
        budget = math.ceil(self._config.tokens_per_second * seconds) + self._config.tokens_extra
        return min(budget, MAX_DECODER_TOKENS // 2)

    def batch_key(self, request: RecognitionRequest) -> tuple[float, int]:
        return (self.window_seconds(request.audio.size), request.beam_size)

    # -- recognition ---------------------------------------------------------------------
    def recognize(self, requests: Sequence[RecognitionRequest]) -> list[Recognition]:
        """Recognize requests, batching those that share a window length and beam size."""
        results: list[Recognition | None] = [None] * len(requests)
        groups: dict[tuple[float, int], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self.batch_key(request), []).append(index)
        self.last_timings = []
        for (window_s, beam_size), indices in groups.items():
            started = time.perf_counter()
            batch = [requests[i] for i in indices]
            for i, result in zip(indices, self._recognize_group(batch, window_s, beam_size)):
                results[i] = result
            self.last_timings.append(
                EngineTimings(len(batch), window_s, time.perf_counter() - started)
            )
        return [r for r in results if r is not None]

    def _features(self, audio: Samples, window_s: float) -> NDArray[np.float32]:
        window_samples = int(window_s * SAMPLE_RATE)
        padded = np.zeros(window_samples, dtype=np.float32)
        n = min(audio.size, window_samples)
        padded[:n] = audio[-n:] if audio.size > window_samples else audio
        features = self._model.feature_extractor(padded, padding=0)
        frames = int(window_s * FRAMES_PER_SECOND)
        out = np.zeros((features.shape[0], frames), dtype=np.float32)
        take = min(frames, features.shape[1])
        out[:, :take] = features[:, :take]
        return out

    def _detect_languages(
        self, features: ctranslate2.StorageView, needs: list[int]
    ) -> dict[int, tuple[str, float]]:
        if not needs or not self.multilingual:
            return {i: ("en", 1.0) for i in needs}
        detected = self._ct2.detect_language(features)
        allowed = set(self._config.detect_languages)
        out: dict[int, tuple[str, float]] = {}
        for i in needs:
            candidates = [(t[2:-2], float(p)) for t, p in detected[i] if t[2:-2] in allowed]
            language, probability = max(candidates, key=lambda c: c[1], default=("", 0.0))
            if probability >= self._config.language_confidence:
                out[i] = (language, probability)
            else:  # not sure: decode in the configured language, report the doubt
                out[i] = (self._config.language_fallback, probability)
        return out

    def _tokenizer(self, language: str, task: str) -> Tokenizer:
        return Tokenizer(
            self._model.hf_tokenizer,
            self.multilingual,
            task=task if self.multilingual else None,
            language=language if self.multilingual else None,
        )

    def _recognize_group(
        self, batch: list[RecognitionRequest], window_s: float, beam_size: int
    ) -> list[Recognition]:
        stacked = np.stack([self._features(r.audio, window_s) for r in batch])
        features = ctranslate2.StorageView.from_array(stacked)
        needs_detection = [i for i, r in enumerate(batch) if r.language is None]
        detected = self._detect_languages(features, needs_detection)

        prompts: list[list[int]] = []
        tokenizers: list[Tokenizer] = []
        languages: list[tuple[str, float]] = []
        max_length = 0
        for i, request in enumerate(batch):
            language, probability = detected.get(i, (request.language or "en", 1.0))
            tokenizer = self._tokenizer(language, request.task)
            prompt = list(tokenizer.sot_sequence)
            # CTranslate2 applies the timestamp rules from the first generated token, so
            # after a text prefix it would force a timestamp and start over: a request with
            # a prefix is decoded without timestamps.
            if request.prefix_tokens or not self._config.use_timestamp_tokens:
                prompt.append(tokenizer.no_timestamps)
            prompt.extend(request.prefix_tokens)
            prompts.append(prompt)
            tokenizers.append(tokenizer)
            languages.append((language, probability))
            max_length = max(
                max_length, len(request.prefix_tokens) + self.token_budget(request.audio.size)
            )

        generated = self._ct2.generate(
            features,
            prompts,
            beam_size=beam_size,
            # Measured with CTranslate2 4.8: Whisper generate returns at most max_length / 2
            # tokens, so the budget is passed doubled (and the result trimmed to it below).
            max_length=min(2 * max_length, MAX_DECODER_TOKENS),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=[-1],
            max_initial_timestamp_index=50,
        )
        return [
            self._to_recognition(request, result, tokenizer, language, window_s)
            for request, result, tokenizer, language in zip(batch, generated, tokenizers, languages)
        ]

    def _to_recognition(
        self,
        request: RecognitionRequest,
        result: ctranslate2.models.WhisperGenerationResult,
        tokenizer: Tokenizer,
        language: tuple[str, float],
        window_s: float,
    ) -> Recognition:
        new_tokens = [int(t) for t in result.sequences_ids[0]]
        tokens = tuple(request.prefix_tokens) + tuple(new_tokens)
        own_budget = len(request.prefix_tokens) + self.token_budget(request.audio.size)
        tokens = tokens[:own_budget]
        text_tokens = [t for t in tokens if t < tokenizer.eot]
        text = tokenizer.decode(text_tokens)
        seq_len = max(len(new_tokens), 1)
        avg_logprob = float(result.scores[0]) * seq_len / (seq_len + 1)
        no_speech_prob = float(result.no_speech_prob)
        ratio = guards.compression_ratio(text)
        dropped = ""
        cfg = self._config
        if no_speech_prob > cfg.no_speech_threshold and avg_logprob < cfg.logprob_threshold:
            dropped = "no_speech"
        elif no_speech_prob > cfg.no_speech_drop_threshold:
            dropped = "no_speech"
        elif guards.is_known_hallucination(text) or guards.is_sound_caption(text):
            dropped = "known_hallucination"
        if dropped:
            text, tokens = "", ()
        elif ratio > cfg.compression_ratio_threshold:
            collapsed = guards.collapse_repeats(text)
            log.info("collapsed a repetition loop (ratio %.2f): %r", ratio, text[:80])
            text = collapsed
            # The tokens no longer match the text: never feed a loop back as a prefix.
            tokens = ()
        else:
            text = guards.collapse_repeats(text)
        return Recognition(
            text=text,
            tokens=tokens,
            language=language[0],
            language_probability=language[1],
            no_speech_prob=no_speech_prob,
            avg_logprob=avg_logprob,
            compression_ratio=ratio,
            window_s=window_s,
            dropped_reason=dropped,
        )

    def timestamp_begin(self) -> int:
        return int(self._tokenizer("en", "transcribe").timestamp_begin)

    def starts_word(self, token: int) -> bool:
        """Whether a text token begins a new word (its text starts with a space)."""
        cached = self._word_starts.get(token)
        if cached is None:
            piece = self._model.hf_tokenizer.decode([token])
            cached = self._word_starts[token] = piece[:1].isspace()
        return cached
