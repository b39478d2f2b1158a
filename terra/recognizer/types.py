"""What flows into and out of the recognizer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Protocol

from terra.audio import Samples
from terra.recognizer.options import DecodeOptions


class Priority(IntEnum):
    """Lower runs first: finals settle text users are waiting on; progress can be late."""

    FINAL = 0
    PROGRESS = 1
    BACKGROUND = 2


# eq=False: requests are equal only to themselves. Value equality would compare the audio
# arrays, which numpy refuses (ValueError), and the scheduler's list.remove() compares a
# request with every one queued before it.
@dataclass(frozen=True, slots=True, eq=False)
class RecognitionRequest:
    """Audio to recognize, its data (language, previous text), and how to decode it."""

    audio: Samples
    language: str | None  # None: detect (by options.rules), then lock
    priority: Priority
    options: DecodeOptions  # beam, task, word timestamps...: terra.recognizer.options
    # Text said before this audio (Whisper's <|startofprev|> context), e.g. the tokens of the
    # previous Recognition: the engine keeps the text tokens, at most the last 223. Empty: none.
    prompt_tokens: tuple[int, ...] = ()


class DropReason(StrEnum):
    """Why the engine's guards threw a recognition's text away (guards.drop_reason)."""

    NO_SPEECH = "no_speech"  # Whisper's no-speech probability says silence or noise
    KNOWN_HALLUCINATION = "known_hallucination"  # a phrase it invents on silence, a caption


@dataclass(frozen=True, slots=True)
class Word:
    """A word and its time inside the request's audio (seconds from its first sample)."""

    start_s: float
    end_s: float
    text: str
    probability: float


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of text between two timestamp tokens, timed inside the request's audio."""

    start_s: float
    end_s: float
    text: str
    words: tuple[Word, ...] = ()


@dataclass(frozen=True, slots=True)
class Recognition:
    text: str
    tokens: tuple[int, ...]
    language: str
    language_probability: float
    no_speech_prob: float
    avg_logprob: float
    compression_ratio: float
    window_s: float
    dropped_reason: DropReason | None = None  # None: kept
    # Filled when the text was decoded with timestamp tokens (one segment spanning the
    # audio otherwise); words only when the request's options asked for word_timestamps.
    segments: tuple[Segment, ...] = ()
    alternatives: tuple[str, ...] = ()


class Vocabulary(Protocol):
    """Whisper's tokens and text, without inference (front ends need only this)."""

    def encode_text(self, text: str) -> tuple[int, ...]:
        """Text tokens of ``text`` (no special tokens)."""
        ...

    def decode_text(self, tokens: Sequence[int]) -> str:
        """The text of a token sequence (non-text tokens skipped)."""
        ...


class RecognitionEngine(Vocabulary, Protocol):
    """A blocking recognizer; only the scheduler calls it, from its worker thread."""

    def batch_key(self, request: RecognitionRequest) -> tuple[float, int]:
        """Requests with equal keys can share one model call."""
        ...

    def recognize(self, requests: Sequence[RecognitionRequest]) -> list[Recognition]: ...
