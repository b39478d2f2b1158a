"""Token helpers over a faster-whisper model's tokenizer, shared by both engines. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import tokenizers


class WhisperVocabulary:
    """Text <-> tokens with a Whisper model's tokenizer (no inference)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._hf = tokenizer
        self._eot = self._special("<|endoftext|>")

    def _special(self, token: str) -> int:
        found = self._hf.token_to_id(token)
        if found is None:
            raise ValueError(f"not a Whisper tokenizer: no {token}")
        return int(found)

    def encode_text(self, text: str) -> tuple[int, ...]:
        """Text tokens of ``text`` (no special tokens), e.g. for a previous-text prompt."""
        return tuple(int(t) for t in self._hf.encode(text, add_special_tokens=False).ids)

    def decode_text(self, tokens: Sequence[int]) -> str:
        """The text of text tokens (timestamps and special tokens are skipped)."""
        decoded: str = self._hf.decode([t for t in tokens if t < self._eot])
        return decoded


def load_vocabulary(model_dir: Path) -> WhisperVocabulary:
    """The vocabulary of an installed model folder, without loading the model (front ends
    whose recognizer runs elsewhere)."""
    return WhisperVocabulary(tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json")))
