"""Guards against Whisper's known failure modes: text from silence and repetition loops."""

from __future__ import annotations

import re
import zlib

from terra.recognizer.options import DecodeRules
from terra.recognizer.types import DropReason

# Whole outputs Whisper is known to invent on silence or noise (subtitle credits, sign-offs).
KNOWN_HALLUCINATIONS = frozenset(
    {
        "продолжение следует",
        "субтитры сделал dimatorzok",
        "субтитры создавал dimatorzok",
        "редактор субтитров а семкин корректор а егорова",
        "спасибо за просмотр",
        "thank you for watching",
        "thanks for watching",
        "thank you",
        "you",
    }
)

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
# A unit of 2-12 characters repeated four times or more inside a word ("кандидамидамидамид").
_SUBWORD_LOOP = re.compile(r"(\S{2,12}?)\1{3,}")


def is_sound_caption(text: str) -> bool:
    """Subtitle-style sound events: "ТРЕВОЖНАЯ МУЗЫКА", "[MUSIC]", "(аплодисменты)", "*смех*"."""
    stripped = text.strip()
    if not stripped:
        return False
    if stripped[0] in "[(*♪" and stripped[-1] in "])*♪":
        return True
    letters = [c for c in stripped if c.isalpha()]
    return len(letters) >= 4 and all(c.isupper() for c in letters)


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def is_known_hallucination(text: str) -> bool:
    return normalise(text) in KNOWN_HALLUCINATIONS


def collapse_subword_loops(text: str) -> str:
    return _SUBWORD_LOOP.sub(r"\1", text)


def collapse_repeats(
    text: str, max_repeats: int = 2, max_ngram: int = 8, phrase_words: int = 4
) -> str:
    """Keep at most ``max_repeats`` consecutive copies of a short n-gram ("5 5 5 5" -> "5 5")
    and one copy of a phrase of ``phrase_words`` or more words (Whisper's "sentence twice")."""
    text = collapse_subword_loops(text)
    words = text.split()
    if len(words) < max_repeats + 1:
        return text
    changed = True
    while changed:
        changed = False
        for n in range(1, max_ngram + 1):
            i = 0
            out: list[str] = []
            while i < len(words):
                gram = [normalise(w) for w in words[i : i + n]]
                if len(gram) < n:
                    out.extend(words[i:])
                    break
                copies = 1
                while [normalise(w) for w in words[i + copies * n : i + (copies + 1) * n]] == gram:
                    copies += 1
                if copies == 1:
                    out.append(words[i])
                    i += 1
                    continue
                keep = 1 if n >= phrase_words else min(copies, max_repeats)
                out.extend(words[i : i + n * keep])
                if copies > keep:
                    changed = True
                i += n * copies
            words = out
    collapsed = " ".join(words)
    return (" " + collapsed) if text.startswith(" ") and collapsed else collapsed


def drop_reason(
    text: str, no_speech_prob: float, avg_logprob: float, rules: DecodeRules
) -> DropReason | None:
    """Why a decoded text is thrown away, or None to keep it: Whisper says no speech (and
    was unsure of its text, or says it very clearly), or the text is a known hallucination
    or a sound caption."""
    if no_speech_prob > rules.no_speech_threshold and avg_logprob < rules.logprob_threshold:
        return DropReason.NO_SPEECH
    if no_speech_prob > rules.no_speech_drop_threshold:
        return DropReason.NO_SPEECH
    if is_known_hallucination(text) or is_sound_caption(text):
        return DropReason.KNOWN_HALLUCINATION
    return None
