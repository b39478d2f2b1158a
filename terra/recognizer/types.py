"""What flows into and out of the recognizer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from terra.audio import Samples


class Priority(IntEnum):
    """Lower runs first: finals settle text users are waiting on; progress can be late."""

    FINAL = 0
    PROGRESS = 1
    BACKGROUND = 2


@dataclass(frozen=True, slots=True)
class RecognitionRequest:
    audio: Samples
    language: str | None  # None: detect, then lock
    priority: Priority
    beam_size: int
    prefix_tokens: tuple[int, ...] = ()
    task: str = "transcribe"


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
    dropped_reason: str = ""


class RecognitionEngine(Protocol):
    """A blocking recognizer; only the scheduler calls it, from its worker thread."""

    def batch_key(self, request: RecognitionRequest) -> tuple[float, int]:
        """Requests with equal keys can share one model call."""
        ...

    def recognize(self, requests: Sequence[RecognitionRequest]) -> list[Recognition]: ...

    def timestamp_begin(self) -> int:
        """The first timestamp token id (tokens at or above it are not text)."""
        ...

    def starts_word(self, token: int) -> bool:
        """Whether a text token begins a new word."""
        ...
