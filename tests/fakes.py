"""A fake recognition engine for the fast test tier (``pytest -m "not model"``).

``FakeEngine`` is a fake, not a model: it implements the RecognitionEngine protocol without
Whisper, so HTTP contract and validation tests run in seconds on a machine without the
model. What the tests there check (status codes, validation, spooling, the answer's shape)
does not depend on what was said; tests of recognition itself keep the real model
(``@pytest.mark.model``).

Its text is deterministic and derived from the audio: every 0.5 s window whose RMS is at
least ``VOICED_RMS`` says one word, picked by the window's energy; silent windows say
nothing. Each word is one segment ``<|t0|> word <|t1|>`` timed at its window, so the live
path's commit code (segments agreed by two passes over the same audio) sees the same words
at the same times on every pass, and commits them as the real engine would.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from terra.audio import SAMPLE_RATE, Samples
from terra.recognizer.types import (
    DropReason,
    Recognition,
    RecognitionRequest,
    Segment,
    Word,
)

WINDOW_SAMPLES = SAMPLE_RATE // 2  # one word per 0.5 s of voiced audio
VOICED_RMS = 0.01
SECONDS_PER_TIMESTAMP = 0.02
TIMESTAMP_BEGIN = 50_364  # as Whisper's <|0.00|>: tokens at or above it are timestamps
STEPS_PER_WINDOW = round(WINDOW_SAMPLES / SAMPLE_RATE / SECONDS_PER_TIMESTAMP)
WORDS = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliett",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
)


def fake_words(audio: Samples) -> list[tuple[int, str]]:
    """(window index, word) for each voiced window of ``audio``: what FakeEngine says."""
    said = []
    for index in range(audio.size // WINDOW_SAMPLES):
        window = audio[index * WINDOW_SAMPLES : (index + 1) * WINDOW_SAMPLES]
        rms = float(np.sqrt(np.mean(np.square(window, dtype=np.float64))))
        if rms >= VOICED_RMS:
            said.append((index, WORDS[int(rms * 100) % len(WORDS)]))
    return said


def fake_text(audio: Samples, task: str = "transcribe") -> str:
    """The text FakeEngine gives for ``audio`` (with Whisper's leading space)."""
    words = [w.upper() if task == "translate" else w for _, w in fake_words(audio)]
    return "".join(" " + w for w in words)


class FakeEngine:
    """A fake RecognitionEngine: deterministic words from audio energy (see the module)."""

    def __init__(self, language: str = "en") -> None:
        self.language = language
        self.calls = 0  # model calls, as the scheduler made them
        self.requests = 0
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {w: i + 1 for i, w in enumerate(WORDS)}
        self._words: dict[int, str] = {i: w for w, i in self._ids.items()}

    # -- the protocol ----------------------------------------------------------------------
    def batch_key(self, request: RecognitionRequest) -> tuple[float, int]:
        return (30.0, max(request.options.beam_size, request.options.num_hypotheses))

    def recognize(self, requests: Sequence[RecognitionRequest]) -> list[Recognition]:
        with self._lock:
            self.calls += 1
            self.requests += len(requests)
        return [self._recognize(r) for r in requests]

    def encode_text(self, text: str) -> tuple[int, ...]:
        return tuple(self._token(w) for w in text.split())

    def decode_text(self, tokens: Sequence[int]) -> str:
        return "".join(" " + self._words[t] for t in tokens if t < TIMESTAMP_BEGIN)

    # -- internals -------------------------------------------------------------------------
    def _token(self, word: str) -> int:
        with self._lock:
            token = self._ids.get(word)
            if token is None:
                token = self._ids[word] = len(self._ids) + 1
                self._words[token] = word
            return token

    def _recognize(self, request: RecognitionRequest) -> Recognition:
        said = fake_words(request.audio)
        tokens: list[int] = []
        segments = []
        for index, word in said:
            if request.options.task == "translate":
                word = word.upper()
            start = index * WINDOW_SAMPLES / SAMPLE_RATE
            end = (index + 1) * WINDOW_SAMPLES / SAMPLE_RATE
            step = round(start / SECONDS_PER_TIMESTAMP)
            tokens += [
                TIMESTAMP_BEGIN + step,
                self._token(word),
                TIMESTAMP_BEGIN + step + STEPS_PER_WINDOW,
            ]
            words = (Word(start, end, " " + word, 0.9),) if request.options.word_timestamps else ()
            segments.append(Segment(start, end, " " + word, words))
        text = "".join(s.text for s in segments)
        alternatives = tuple(
            text + " " + WORDS[n] for n in range(1, request.options.num_hypotheses)
        )
        return Recognition(
            text=text,
            tokens=tuple(tokens),
            language=request.language or self.language,
            language_probability=1.0,
            no_speech_prob=0.0 if said else 1.0,
            avg_logprob=-0.2,
            compression_ratio=1.0,
            window_s=30.0,
            dropped_reason=None if said else DropReason.NO_SPEECH,
            segments=tuple(segments),
            alternatives=alternatives,
        )


def recognition_of(text: str) -> Recognition:
    """A Recognition of ``text`` and nothing else, for tests that only pass one along."""
    return Recognition(
        text=text,
        tokens=(),
        language="en",
        language_probability=1.0,
        no_speech_prob=0.0,
        avg_logprob=0.0,
        compression_ratio=1.0,
        window_s=1.0,
    )


class RecordedSleeps:
    """A fake ``asyncio.sleep`` for retry tests: records each delay and returns at once, so
    a test checks the backoff's delays without waiting them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
