"""The rules of ``POST /translate_to_any``: what is translated, in which direction, in batches.

From the IVA Terra spec ("API для перевода текста"):
- ``auto`` is replaced by the detected ``ru``/``en``, or ``unknown``; nothing is
  translated from ``unknown``;
- ru→en when ``to_lang`` is ``en`` and (``from_lang`` is ``ru`` or ``SKIP_CHECK_EN``);
- en→ru when ``to_lang`` is ``ru`` and (``from_lang`` is ``en`` or ``SKIP_CHECK_RU``);
- everything else comes back as it was, ``not_processed``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from terra.config import TranslateConfig
from terra.translate.backends import Direction, Translator
from terra.translate.langid import LANGUAGES, LanguageDetector

log = logging.getLogger(__name__)

AUTO = "auto"
# A letter or a digit: a parcel without one (blanks, zero-width and format characters, emoji,
# punctuation) has nothing to translate and comes back as it was.
_TRANSLATABLE = re.compile(r"[^\W_]")
# Detection of more texts than this moves to a thread (about 35 µs a sentence).
_DETECT_INLINE_ITEMS = 64


class Status(enum.StrEnum):
    PROCESSED = "processed"
    NOT_PROCESSED = "not_processed"


class PayloadError(ValueError):
    """The request's payload does not have the spec's shape."""


@dataclass(frozen=True, slots=True)
class TranslationItem:
    """One parcel of the payload; ``extra`` holds its other keys (``uuid``), echoed back."""

    from_lang: str
    to_lang: str
    content: str
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TranslatedItem:
    from_lang: str
    to_lang: str
    content: str
    status: Status
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.extra,
            "from_lang": self.from_lang,
            "to_lang": self.to_lang,
            "content": self.content,
            "status": self.status.value,
        }


_KEYS = ("from_lang", "to_lang", "content")


def parse_payload(raw: Any, *, max_items: int, max_content_chars: int) -> list[TranslationItem]:
    """Validate the request's ``payload``: a list of objects with three string keys."""
    if not isinstance(raw, list):
        raise PayloadError("payload must be a list of {from_lang, to_lang, content} objects")
    if len(raw) > max_items:
        raise PayloadError(f"payload has {len(raw)} items; at most {max_items} are accepted")
    items = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise PayloadError(f"payload[{index}] must be an object")
        for key in _KEYS:
            if key not in entry:
                raise PayloadError(f"payload[{index}].{key} is required")
            if not isinstance(entry[key], str):
                raise PayloadError(f"payload[{index}].{key} must be a string")
        if len(entry["content"]) > max_content_chars:
            raise PayloadError(
                f"payload[{index}].content is longer than {max_content_chars} characters"
            )
        items.append(
            TranslationItem(
                from_lang=entry["from_lang"].strip().lower(),
                to_lang=entry["to_lang"],
                content=entry["content"],
                extra={k: v for k, v in entry.items() if k not in _KEYS and k != "status"},
            )
        )
    return items


def translation_direction(
    from_lang: str, to_lang: str, *, skip_check_en: bool, skip_check_ru: bool
) -> Direction | None:
    """The spec's rule: which model direction (if any) a parcel is sent through.

    ``from_lang`` is already resolved (never ``auto``). The skip flags send a parcel of
    either known language through the model of its target, as the spec says; its warning
    about SKIP_CHECK_RU (Russian fed to the en→ru model) is the operator's to heed.
    """
    if from_lang not in LANGUAGES:  # unknown, or a language terra does not translate
        return None
    target = to_lang.strip().lower()
    if target == "en" and (from_lang == "ru" or skip_check_en):
        return ("ru", "en")
    if target == "ru" and (from_lang == "en" or skip_check_ru):
        return ("en", "ru")
    return None


class TranslationService:
    """Detects, decides and sends each direction's texts to the backend in one call."""

    def __init__(
        self, translator: Translator, detector: LanguageDetector, config: TranslateConfig
    ) -> None:
        self._translator = translator
        self._detector = detector
        self._config = config

    async def translate(self, items: Sequence[TranslationItem]) -> list[TranslatedItem]:
        """The answer's payload, in the order of ``items``."""
        languages = await self._source_languages(items)
        available = self._translator.directions()
        # direction -> distinct texts -> indexes of the items that carry them
        plan: dict[Direction, dict[str, list[int]]] = {}
        for index, (item, language) in enumerate(zip(items, languages)):
            direction = translation_direction(
                language,
                item.to_lang,
                skip_check_en=self._config.skip_check_en,
                skip_check_ru=self._config.skip_check_ru,
            )
            if (
                direction is None
                or direction not in available
                or not _TRANSLATABLE.search(item.content)
            ):
                continue
            plan.setdefault(direction, {}).setdefault(item.content, []).append(index)

        results: list[str | None] = [None] * len(items)
        directions = list(plan)
        answers = await asyncio.gather(
            *(self._translator.translate(list(plan[d]), *d) for d in directions)
        )
        for direction, answer in zip(directions, answers):
            for indexes, text in zip(plan[direction].values(), answer):
                if text is not None and not text.strip():
                    text = None  # nothing made of a text with words: that text failed
                for index in indexes:
                    results[index] = text
        failed = sum(len(ix) for d in directions for ix in plan[d].values()) - sum(
            r is not None for r in results
        )
        if failed:
            log.warning("%d of %d parcels left untranslated by the backend", failed, len(items))

        return [
            TranslatedItem(
                from_lang=language,
                to_lang=item.to_lang,
                content=item.content if text is None else text,
                status=Status.NOT_PROCESSED if text is None else Status.PROCESSED,
                extra=item.extra,
            )
            for item, language, text in zip(items, languages, results)
        ]

    async def _source_languages(self, items: Sequence[TranslationItem]) -> list[str]:
        auto = [i for i, item in enumerate(items) if item.from_lang == AUTO]
        texts = [items[i].content for i in auto]
        if len(texts) > _DETECT_INLINE_ITEMS:
            detected = await asyncio.to_thread(lambda: [self._detector.detect(t) for t in texts])
        else:
            detected = [self._detector.detect(t) for t in texts]
        languages = [item.from_lang for item in items]
        for index, language in zip(auto, detected):
            languages[index] = language
        return languages
