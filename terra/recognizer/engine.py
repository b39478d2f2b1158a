"""CTranslate2 Whisper behind a blocking, batched call with windows fitted to the audio.

Whisper was trained on 30 s windows, but CTranslate2 accepts fewer feature frames, and the
encoder cost scales with them. A window cut tight to the speech makes Whisper loop, so each
request gets at least ``trailing_margin_s`` of silence after its audio, the window is rounded
up to a length bucket (so requests can share a batch), and generation is capped at a token
budget proportional to the audio. See DESIGN.md, "Where the speed is".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from numpy.typing import NDArray

from terra.audio import SAMPLE_RATE, Samples
from terra.recognizer import guards
from terra.recognizer.options import EngineSettings
from terra.recognizer.types import (
    DropReason,
    Recognition,
    RecognitionRequest,
    Segment,
    Word,
)
from terra.recognizer.vocabulary import WhisperVocabulary

log = logging.getLogger(__name__)

FRAMES_PER_SECOND = 100  # Whisper's mel hop is 10 ms
MAX_WINDOW_S = 30.0
MAX_DECODER_TOKENS = 448
MAX_PROMPT_TOKENS = MAX_DECODER_TOKENS // 2 - 1  # previous-text context, as Whisper does
SECONDS_PER_TIMESTAMP = 0.02  # one timestamp token step
SAMPLES_PER_FRAME = SAMPLE_RATE // FRAMES_PER_SECOND
_PREPEND_PUNCTUATION = "\"'“¿([{-«"
_APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、»"


def load_whisper(settings: EngineSettings) -> WhisperModel:
    """Load a faster-whisper model from a folder (or a hub name when downloads are allowed).

    ``settings.workers`` model replicas serve that many concurrent calls (CTranslate2
    inter_threads).
    """
    try:
        return WhisperModel(
            settings.model_path,
            device=settings.device,
            compute_type=settings.compute_type,
            # 0: every worker may use every core. A lone call then has them all, and workers
            # busy at once share them: measured with 2 workers on 2 cores
            # (benchmarks/results/profile_layouts.md), a lone 4 s pass 0.68 -> 0.50 s, two
            # at once 2.62 -> 2.47 passes/s, against one thread each.
            cpu_threads=settings.cpu_threads or max(1, os.cpu_count() or 1),
            num_workers=settings.workers,
            local_files_only=not settings.allow_download,
        )
    except (RuntimeError, ValueError, OSError) as e:
        raise RuntimeError(
            f"cannot load Whisper model {settings.model_path!r} "
            f"on {settings.device}/{settings.compute_type}: {e}"
        ) from e


def generation_limit(prompt_length: int, budget: int) -> int:
    """CTranslate2's ``max_length`` that lets Whisper generate ``budget`` tokens after a
    prompt of ``prompt_length`` tokens (the result is trimmed to the budget afterwards).

    Measured with CTranslate2 4.8 (tests/test_engine.py): generate returns at most
    ``min(max_length / 2, max_length - prompt_length + 1)`` tokens, so a long previous-text
    context with the plain budget would leave no room at all.
    """
    return min(max(2 * budget, budget + prompt_length - 1), MAX_DECODER_TOKENS)


class Stage(StrEnum):
    """Where a model call's time goes (``EngineTimings.wall``/``cpu``)."""

    FEATURES = "features"  # log-mel spectrogram (faster-whisper's FeatureExtractor)
    ENCODE = "encode"  # the encoder over the window
    DETECT = "detect"  # language detection (requests without a language)
    GENERATE = "generate"  # the decoder: prompt, greedy or beam search
    ALIGN = "align"  # word timestamps (faster-whisper's add_word_timestamps: DTW)
    OTHER = "other"  # the rest: tokenizers, guards, segments (Python)


@dataclass(frozen=True, slots=True)
class EngineTimings:
    """One model call of :meth:`WhisperEngine.recognize_timed`: its wall time, and the wall
    and process CPU seconds of each stage (CPU: of the whole process, so it means the
    call's own cost only while no other call runs)."""

    batch_size: int
    window_s: float
    seconds: float
    wall: Mapping[Stage, float] = field(default_factory=dict)
    cpu: Mapping[Stage, float] = field(default_factory=dict)


class _StageClock:
    """Adds up the wall and process CPU time of each stage of one model call."""

    def __init__(self) -> None:
        self.wall: dict[Stage, float] = dict.fromkeys(Stage, 0.0)
        self.cpu: dict[Stage, float] = dict.fromkeys(Stage, 0.0)
        self._wall0 = time.perf_counter()
        self._cpu0 = time.process_time()

    @contextmanager
    def stage(self, stage: Stage) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[stage] += time.perf_counter() - wall
            self.cpu[stage] += time.process_time() - cpu

    def timings(self, batch_size: int, window_s: float) -> EngineTimings:
        seconds = time.perf_counter() - self._wall0
        cpu = time.process_time() - self._cpu0
        self.wall[Stage.OTHER] = max(0.0, seconds - sum(self.wall.values()))
        self.cpu[Stage.OTHER] = max(0.0, cpu - sum(self.cpu.values()))
        return EngineTimings(batch_size, window_s, seconds, dict(self.wall), dict(self.cpu))


class WhisperEngine(WhisperVocabulary):
    """Fitted-window, batched Whisper recognition.

    ``settings`` are the load-time ones (the model was loaded with them, and the window
    fitting); how each request is decoded comes with it (``RecognitionRequest.options``).
    Safe for as many concurrent calls as the model has workers (``settings.workers``): the
    shared state is the CTranslate2 model and read-mostly caches."""

    def __init__(self, model: WhisperModel, settings: EngineSettings) -> None:
        super().__init__(model.hf_tokenizer)
        self._model = model
        self._ct2: ctranslate2.models.Whisper = model.model
        self._window = settings.window
        self._buckets = tuple(sorted(min(b, MAX_WINDOW_S) for b in self._window.window_buckets_s))
        self.multilingual = bool(model.model.is_multilingual)

    # -- window sizing -------------------------------------------------------------------
    def window_seconds(self, n_samples: int) -> float:
        needed = n_samples / SAMPLE_RATE + self._window.trailing_margin_s
        for bucket in self._buckets:
            if needed <= bucket:
                return bucket
        return MAX_WINDOW_S

    def token_budget(self, n_samples: int) -> int:
        seconds = n_samples / SAMPLE_RATE
        budget = math.ceil(self._window.tokens_per_second * seconds) + self._window.tokens_extra
        return min(budget, MAX_DECODER_TOKENS // 2)

    def batch_key(self, request: RecognitionRequest) -> tuple[float, int]:
        """Requests with equal keys share a model call. Windows up to ``batch_window_s``
        share one key (the call pads them to its longest): decoding dominates the cost of a
        short window, and decoding is what batching makes cheaper."""
        window_s = self.window_seconds(request.audio.size)
        shared_s = next((b for b in self._buckets if b >= self._window.batch_window_s), 0.0)
        key_s = shared_s if window_s <= shared_s else window_s
        options = request.options
        return (key_s, max(options.beam_size, options.num_hypotheses))

    # -- recognition ---------------------------------------------------------------------
    def recognize(self, requests: Sequence[RecognitionRequest]) -> list[Recognition]:
        """Recognize requests, batching those that share a key (see ``batch_key``)."""
        return self.recognize_timed(requests)[0]

    def recognize_timed(
        self, requests: Sequence[RecognitionRequest]
    ) -> tuple[list[Recognition], list[EngineTimings]]:
        """``recognize``, and the size, window and time (by stage) of each model call it made
        (returned, not kept: worker threads call the engine at once)."""
        results: list[Recognition | None] = [None] * len(requests)
        # CTranslate2 needs <|startoftranscript|> at one position across a batch: requests
        # with context share a call with their contexts cut to the shortest among them, and
        # a context too short to be worth that cut is dropped instead.
        # An n-best request needs its own call too (one num_hypotheses per call), and so does
        # one decoded without timestamp tokens.
        contexts = [self._context(r) for r in requests]
        groups: dict[tuple[float, int, bool, int, bool], list[int]] = {}
        for index, request in enumerate(requests):
            if len(contexts[index]) < self._window.min_context_tokens:
                contexts[index] = ()
            key = (
                *self.batch_key(request),
                bool(contexts[index]),
                request.options.num_hypotheses,
                request.options.rules.use_timestamp_tokens,
            )
            groups.setdefault(key, []).append(index)
        timings: list[EngineTimings] = []
        for (_, beam_size, _, _, timestamps), indices in groups.items():
            clock = _StageClock()
            batch = [requests[i] for i in indices]
            shortest = min(len(contexts[i]) for i in indices)
            batch_contexts = [contexts[i][len(contexts[i]) - shortest :] for i in indices]
            window_s = max(self.window_seconds(r.audio.size) for r in batch)
            recognized = self._recognize_group(
                batch, batch_contexts, window_s, beam_size, timestamps, clock
            )
            if timestamps:
                recognized = self._retry_loops(
                    batch, batch_contexts, window_s, beam_size, recognized, clock
                )
            for i, result in zip(indices, recognized):
                results[i] = result
            timings.append(clock.timings(len(batch), window_s))
        return [r for r in results if r is not None], timings

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
        self, features: ctranslate2.StorageView, batch: list[RecognitionRequest]
    ) -> dict[int, tuple[str, float]]:
        """The language of each request without one (by its options' rules)."""
        needs = [i for i, r in enumerate(batch) if r.language is None]
        if not needs or not self.multilingual:
            return {i: ("en", 1.0) for i in needs}
        detected = self._ct2.detect_language(features)
        out: dict[int, tuple[str, float]] = {}
        for i in needs:
            rules = batch[i].options.rules
            allowed = set(rules.detect_languages)
            candidates = [(t[2:-2], float(p)) for t, p in detected[i] if t[2:-2] in allowed]
            language, probability = max(candidates, key=lambda c: c[1], default=("", 0.0))
            if probability >= rules.language_confidence:
                out[i] = (language, probability)
            else:  # not sure: decode in the configured language, report the doubt
                out[i] = (rules.language_fallback, probability)
        return out

    def _tokenizer(self, language: str, task: str) -> Tokenizer:
        return Tokenizer(
            self._model.hf_tokenizer,
            self.multilingual,
            task=task if self.multilingual else None,
            language=language if self.multilingual else None,
        )

    def _recognize_group(
        self,
        batch: list[RecognitionRequest],
        contexts: list[tuple[int, ...]],
        window_s: float,
        beam_size: int,
        timestamps: bool,
        clock: _StageClock,
    ) -> list[Recognition]:
        features = self._encode(batch, window_s, clock)
        with clock.stage(Stage.DETECT):
            detected = self._detect_languages(features, batch)

        prompts: list[list[int]] = []
        tokenizers: list[Tokenizer] = []
        languages: list[tuple[str, float]] = []
        max_length = 0
        for i, (request, context) in enumerate(zip(batch, contexts)):
            language, probability = detected.get(i, (request.language or "en", 1.0))
            tokenizer = self._tokenizer(language, request.options.task)
            prompt = [tokenizer.sot_prev, *context] if context else []
            prompt.extend(tokenizer.sot_sequence)
            if not timestamps:
                prompt.append(tokenizer.no_timestamps)
            prompts.append(prompt)
            tokenizers.append(tokenizer)
            languages.append((language, probability))
            max_length = max(
                max_length,
                generation_limit(len(prompt), self.token_budget(request.audio.size)),
            )

        with clock.stage(Stage.GENERATE):
            generated = self._ct2.generate(
                features,
                prompts,
                beam_size=beam_size,
                num_hypotheses=batch[0].options.num_hypotheses,
                max_length=max_length,
                return_scores=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=[-1],
                max_initial_timestamp_index=50,
            )
        recognitions = [
            self._to_recognition(request, result, tokenizer, language, window_s)
            for request, result, tokenizer, language in zip(batch, generated, tokenizers, languages)
        ]
        if any(r.options.word_timestamps for r in batch):
            with clock.stage(Stage.ALIGN):
                recognitions = self._add_words(batch, recognitions, tokenizers, features)
        return recognitions

    def _retry_loops(
        self,
        batch: list[RecognitionRequest],
        contexts: list[tuple[int, ...]],
        window_s: float,
        beam_size: int,
        recognized: list[Recognition],
        clock: _StageClock,
    ) -> list[Recognition]:
        """Decode again, in Whisper's full 30 s window, the items that came back as a
        repetition loop. Beam search with timestamps in a shorter window can restart the text
        after a timestamp (measured on planerka_ru/anna.flac 0.3-13 s in a 20 s window:
        compression ratio 6.9; in 30 s: 1.6). faster-whisper's answer is a temperature
        fallback; this one keeps the beam and the timestamps."""
        loops = [
            j
            for j, (request, r) in enumerate(zip(batch, recognized))
            if r.compression_ratio > request.options.rules.compression_ratio_threshold
            and request.options.retry_loops
        ]
        if not loops or window_s >= MAX_WINDOW_S:
            return recognized
        retried = self._recognize_group(
            [batch[j] for j in loops],
            [contexts[j] for j in loops],
            MAX_WINDOW_S,
            beam_size,
            True,
            clock,
        )
        out = list(recognized)
        for j, again in zip(loops, retried):
            if again.compression_ratio < out[j].compression_ratio:
                out[j] = again
        return out

    def _encode(
        self, batch: list[RecognitionRequest], window_s: float, clock: _StageClock
    ) -> ctranslate2.StorageView:
        """The encoder output of a batch; generation and alignment both read it.

        On the CPU the items are encoded one at a time and stacked: measured with base int8
        on one thread, a 10 s window costs 70 ms alone and 123 ms per item in a batch of 4.
        """
        with clock.stage(Stage.FEATURES):
            features = [self._features(r.audio, window_s) for r in batch]
        with clock.stage(Stage.ENCODE):
            if self._ct2.device != "cpu" or len(batch) == 1:
                stacked = ctranslate2.StorageView.from_array(np.stack(features))
                return self._ct2.encode(stacked, to_cpu=False)
            encoded = [
                np.asarray(self._ct2.encode(ctranslate2.StorageView.from_array(f[np.newaxis])))
                for f in features
            ]
            return ctranslate2.StorageView.from_array(np.ascontiguousarray(np.concatenate(encoded)))

    def _to_recognition(
        self,
        request: RecognitionRequest,
        result: ctranslate2.models.WhisperGenerationResult,
        tokenizer: Tokenizer,
        language: tuple[str, float],
        window_s: float,
    ) -> Recognition:
        new_tokens = [int(t) for t in result.sequences_ids[0]]
        tokens = tuple(new_tokens)[: self.token_budget(request.audio.size)]
        text_tokens = [t for t in tokens if t < tokenizer.eot]
        text = tokenizer.decode(text_tokens)
        seq_len = max(len(new_tokens), 1)
        avg_logprob = float(result.scores[0]) * seq_len / (seq_len + 1)
        no_speech_prob = float(result.no_speech_prob)
        ratio = guards.compression_ratio(text)
        rules = request.options.rules
        dropped = guards.drop_reason(text, no_speech_prob, avg_logprob, rules)
        if dropped:
            text, tokens = "", ()
        elif ratio > rules.compression_ratio_threshold:
            collapsed = guards.collapse_repeats(text)
            log.debug("collapsed a repetition loop (ratio %.2f): %r", ratio, text[:80])
            text = collapsed
            # The tokens no longer match the text: never feed a loop back as a prompt.
            tokens = ()
        else:
            text = guards.collapse_repeats(text)
        if dropped or not text.strip():
            segments: tuple[Segment, ...] = ()
        elif not tokens:
            segments = (Segment(0.0, request.audio.size / SAMPLE_RATE, text),)
        else:
            segments = tuple(
                self._segment(tokenizer, part) for part in self._split(request, tokens, tokenizer)
            )
            segments = tuple(s for s in segments if s.text.strip())
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
            segments=segments,
            alternatives=self._alternatives(result, tokenizer, dropped),
        )

    def _context(self, request: RecognitionRequest) -> tuple[int, ...]:
        """The text tokens of ``prompt_tokens`` (timestamps and specials dropped), the last
        MAX_PROMPT_TOKENS of them: a previous Recognition's tokens may be passed as they are."""
        if not request.prompt_tokens:
            return ()
        text = tuple(t for t in request.prompt_tokens if t < self._eot)
        return text[-MAX_PROMPT_TOKENS:]

    @staticmethod
    def _alternatives(
        result: ctranslate2.models.WhisperGenerationResult,
        tokenizer: Tokenizer,
        dropped: DropReason | None,
    ) -> tuple[str, ...]:
        """The texts of the 2nd..nth beam hypotheses (n-best), when asked for. Hypotheses that
        differ only in their timestamp tokens read the same: each text is given once."""
        if dropped:
            return ()
        seen: set[str] = set()
        texts = []
        for sequence in result.sequences_ids:
            text = guards.collapse_repeats(
                tokenizer.decode([t for t in sequence if t < tokenizer.eot])
            )
            if text.strip() and text.strip() not in seen:
                seen.add(text.strip())
                texts.append(text)
        return tuple(texts[1:])

    # -- segments and word timestamps ---------------------------------------------------
    def _split(
        self, request: RecognitionRequest, tokens: Sequence[int], tokenizer: Tokenizer
    ) -> list[_TokenSegment]:
        """Cut decoded tokens at timestamp tokens; text without a closing one runs to the end."""
        duration_s = request.audio.size / SAMPLE_RATE
        begin = tokenizer.timestamp_begin
        parts: list[_TokenSegment] = []
        start = 0.0
        current: list[int] = []
        for token in tokens:
            if token >= begin:
                moment = min((token - begin) * SECONDS_PER_TIMESTAMP, duration_s)
                if current:
                    parts.append(_TokenSegment(start, max(moment, start), current))
                    current = []
                start = moment
            elif token < tokenizer.eot:
                current.append(token)
        if current:
            parts.append(_TokenSegment(start, duration_s, current))
        return parts

    @staticmethod
    def _segment(tokenizer: Tokenizer, part: _TokenSegment) -> Segment:
        text = tokenizer.decode(part.tokens)
        if guards.is_known_hallucination(text) or guards.is_sound_caption(text):
            text = ""
        return Segment(part.start_s, part.end_s, guards.collapse_repeats(text))

    def _add_words(
        self,
        batch: list[RecognitionRequest],
        recognitions: list[Recognition],
        tokenizers: list[Tokenizer],
        encoded: ctranslate2.StorageView,
    ) -> list[Recognition]:
        """Time every word of the requests that asked for it (one align call per item), with
        faster-whisper's own ``add_word_timestamps`` on this call's encoder output: its DTW
        over the alignment heads (``find_alignment``), its caps on words stretched across a
        pause, its punctuation merge, and its segment edges taken from the words."""
        out = list(recognitions)
        for i, (request, recognition) in enumerate(zip(batch, recognitions)):
            if not request.options.word_timestamps or not recognition.tokens:
                continue
            tokenizer = tokenizers[i]
            parts = self._split(request, recognition.tokens, tokenizer)
            if not parts:
                continue
            # faster-whisper's segment dicts: times inside the window (seek 0), tokens.
            timed: list[dict[str, Any]] = [
                {"seek": 0, "start": p.start_s, "end": p.end_s, "tokens": p.tokens} for p in parts
            ]
            item = encoded if len(batch) == 1 else _batch_item(encoded, i)
            num_frames = max(1, min(request.audio.size // SAMPLES_PER_FRAME, 3000))
            try:
                self._model.add_word_timestamps(
                    [timed],
                    tokenizer,
                    item,
                    num_frames,
                    _PREPEND_PUNCTUATION,
                    _APPEND_PUNCTUATION,
                    last_speech_timestamp=0.0,
                )
            except IndexError:  # an empty alignment path: faster-whisper indexes past its end
                timed = [{**t, "words": []} for t in timed]
            segments = []
            for part, aligned in zip(parts, timed):
                segment = self._segment(tokenizer, part)
                if not segment.text.strip():
                    continue
                words = tuple(
                    Word(
                        float(w["start"]), float(w["end"]), str(w["word"]), float(w["probability"])
                    )
                    for w in aligned.get("words", ())
                )
                if words:
                    start_s, end_s = float(aligned["start"]), float(aligned["end"])
                    segment = Segment(start_s, end_s, segment.text, words)
                segments.append(segment)
            out[i] = dataclasses.replace(recognition, segments=tuple(segments))
        return out


@dataclass(slots=True)
class _TokenSegment:
    start_s: float
    end_s: float
    tokens: list[int]


def _batch_item(encoded: ctranslate2.StorageView, index: int) -> ctranslate2.StorageView:
    """One item of a batched encoder output, as a batch of one."""
    if encoded.device != "cpu":
        encoded = encoded.to_device(ctranslate2.Device.cpu)
    array = np.asarray(encoded)
    return ctranslate2.StorageView.from_array(np.ascontiguousarray(array[index : index + 1]))
