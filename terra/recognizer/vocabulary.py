"""Token helpers over a faster-whisper model's tokenizer, shared by both engines. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from faster_whisper import WhisperModel


class WhisperVocabulary:
    """Text <-> tokens for a loaded Whisper model (no inference)."""

    def __init__(self, model: WhisperModel) -> None:
        self._hf = model.hf_tokenizer
        self._eot = int(self._hf.token_to_id("<|endoftext|>"))
        self._timestamp_begin = int(self._hf.token_to_id("<|0.00|>"))
        self._word_starts: dict[int, bool] = {}

    def timestamp_begin(self) -> int:
        """The first timestamp token id (tokens at or above it are not text)."""
        return self._timestamp_begin

    def starts_word(self, token: int) -> bool:
        """Whether a text token begins a new word (its text starts with a space)."""
        cached = self._word_starts.get(token)
        if cached is None:
            piece: str = self._hf.decode([token])
            cached = self._word_starts[token] = piece[:1].isspace()
        return cached

    def encode_text(self, text: str) -> tuple[int, ...]:
        """Text tokens of ``text`` (no special tokens), e.g. for a previous-text prompt."""
        return tuple(int(t) for t in self._hf.encode(text, add_special_tokens=False).ids)

    def decode_text(self, tokens: Sequence[int]) -> str:
        """The text of text tokens (timestamps and special tokens are skipped)."""
        decoded: str = self._hf.decode([t for t in tokens if t < self._eot])
        return decoded
