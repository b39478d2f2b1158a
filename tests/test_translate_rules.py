"""The spec's translation rules, payload validation and language detection (no server)."""

from __future__ import annotations

import asyncio
import csv
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from terra.config import ConfigError, TranslateConfig, load_config
from terra.translate.backends import Direction
from terra.translate.langid import UNKNOWN, LanguageDetector
from terra.translate.service import (
    PayloadError,
    Status,
    TranslationItem,
    TranslationService,
    parse_payload,
    translation_direction,
)

from .conftest import SPEECH


@pytest.fixture(scope="module")
def detector() -> LanguageDetector:
    return LanguageDetector(min_score=TranslateConfig().detect_min_score)


# -- language detection ------------------------------------------------------------------


def manifest_transcripts() -> list[tuple[str, str]]:
    """(lang, transcript) of every clip of real speech in the shared data with a transcript."""
    with open(SPEECH / "manifest.tsv", encoding="utf-8") as f:
        rows = [(r["lang"], r["transcript"]) for r in csv.DictReader(f, delimiter="\t")]
    return [(lang, text) for lang, text in rows if text.strip()]


def test_detects_every_russian_and_english_transcript_of_the_shared_speech(
    detector: LanguageDetector,
) -> None:
    rows = [(lang, text) for lang, text in manifest_transcripts() if lang in ("ru", "en")]
    assert (
        sum(lang == "ru" for lang, _ in rows) >= 5 and sum(lang == "en" for lang, _ in rows) >= 20
    )
    wrong = [(lang, text) for lang, text in rows if detector.detect(text) != lang]
    assert wrong == []


def test_other_languages_of_the_shared_speech_are_unknown(detector: LanguageDetector) -> None:
    others = [(lang, text) for lang, text in manifest_transcripts() if lang not in ("ru", "en")]
    assert {lang for lang, _ in others} >= {"de", "fr", "ja"}
    assert [detector.detect(text) for _, text in others] == [UNKNOWN] * len(others)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("первое предложение", "ru"),  # the spec's example
        ("last sentence", "en"),  # the spec's example
        ("Доброе утро, коллеги, начинаем совещание.", "ru"),
        ("Бюджет проекта утвердят в понедельник", "ru"),
        ("Спасибо", "ru"),
        ("ЗДРАВСТВУЙТЕ", "ru"),
        ("Good morning everyone, let us begin.", "en"),
        ("The project budget will be approved on Monday", "en"),
        ("Ok, let us start", "en"),
    ],
)
def test_detects_real_sentences(detector: LanguageDetector, text: str, expected: str) -> None:
    assert detector.detect(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "12345 678",
        "!!! ??? ...",
        "🙂🙂🙂",
        "qwzx vbnm plkj",  # keyboard mash: fastText knows none of its n-grams
        "ghjk fdsa qwer",
        "zxcvbnm",
        "xyzzy",
        "ываыва фыв",
        "Der Hund schläft im Garten.",
        "這是一個句子",
    ],
)
def test_nonsense_and_other_languages_are_unknown(detector: LanguageDetector, text: str) -> None:
    assert detector.detect(text) == UNKNOWN


def test_a_language_must_be_written_in_its_script(detector: LanguageDetector) -> None:
    # Russian in Latin letters (transliteration) is not called Russian.
    assert detector.detect("privet kak dela u tebya segodnya") != "ru"


# -- the spec's rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("from_lang", "to_lang", "skip_en", "skip_ru", "expected"),
    [
        ("ru", "en", False, False, ("ru", "en")),
        ("en", "ru", False, False, ("en", "ru")),
        ("ru", "EN", False, False, ("ru", "en")),
        ("en", "en", False, False, None),
        ("ru", "ru", False, False, None),
        ("en", "en", True, False, ("ru", "en")),  # SKIP_CHECK_EN: to en whatever the source
        ("ru", "ru", False, True, ("en", "ru")),  # SKIP_CHECK_RU: to ru whatever the source
        ("en", "en", False, True, None),
        ("unknown", "en", True, True, None),  # never from unknown
        ("unknown", "ru", True, True, None),
        ("de", "en", True, True, None),
        ("ru", "unknown", True, True, None),  # the spec's third example
        ("en", "de", True, True, None),
    ],
)
def test_translation_direction(
    from_lang: str, to_lang: str, skip_en: bool, skip_ru: bool, expected: Direction | None
) -> None:
    assert (
        translation_direction(from_lang, to_lang, skip_check_en=skip_en, skip_check_ru=skip_ru)
        == expected
    )


# -- payload validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (None, "must be a list"),
        ({"from_lang": "ru"}, "must be a list"),
        ("[]", "must be a list"),
        (["text"], "payload[0] must be an object"),
        ([{"to_lang": "en", "content": "x"}], "payload[0].from_lang is required"),
        ([{"from_lang": "ru", "content": "x"}], "payload[0].to_lang is required"),
        (
            [
                {"from_lang": "ru", "to_lang": "en", "content": "x"},
                {"from_lang": "ru", "to_lang": "en"},
            ],
            "payload[1].content is required",
        ),
        (
            [{"from_lang": "ru", "to_lang": "en", "content": 5}],
            "payload[0].content must be a string",
        ),
        ([{"from_lang": None, "to_lang": "en", "content": "x"}], "from_lang must be a string"),
        ([{"from_lang": "ru", "to_lang": ["en"], "content": "x"}], "to_lang must be a string"),
        ([{"from_lang": "ru", "to_lang": "en", "content": "x" * 11}], "longer than 10 characters"),
        ([{"from_lang": "ru", "to_lang": "en", "content": "x"}] * 4, "at most 3"),
    ],
)
def test_parse_payload_refuses_malformed_payloads(payload: Any, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_payload(payload, max_items=3, max_content_chars=10)


def test_parse_payload_normalises_from_lang_and_keeps_other_keys() -> None:
    items = parse_payload(
        [{"from_lang": " AUTO ", "to_lang": "en", "content": "x", "uuid": "u-1", "status": "?"}],
        max_items=3,
        max_content_chars=10,
    )
    assert items == [TranslationItem("auto", "en", "x", {"uuid": "u-1"})]


# -- the service with a recording backend ----------------------------------------------------


class RecordingTranslator:
    """A backend that uppercases and records each call (a test double, not a stand-in server)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[list[str], str, str]] = []
        self.fail = fail

    def directions(self) -> frozenset[Direction]:
        return frozenset({("ru", "en"), ("en", "ru")})

    async def translate(self, texts: Sequence[str], source: str, target: str) -> list[str | None]:
        self.calls.append((list(texts), source, target))
        return [None if self.fail else f"{target}:{t.upper()}" for t in texts]

    async def close(self) -> None:
        pass


async def test_service_groups_by_direction_deduplicates_and_keeps_order(
    detector: LanguageDetector,
) -> None:
    backend = RecordingTranslator()
    service = TranslationService(backend, detector, TranslateConfig(enabled=True))
    items = [
        TranslationItem("auto", "en", "первое предложение"),
        TranslationItem("auto", "ru", "last sentence"),
        TranslationItem("auto", "unknown", "last sentence"),
        TranslationItem("ru", "en", "первое предложение"),  # the same text: translated once
        TranslationItem("auto", "en", "qwzx vbnm plkj"),
        TranslationItem("en", "ru", "   "),  # nothing to translate
        TranslationItem("ru", "en", "второе", {"uuid": "u-2"}),
    ]
    result = await service.translate(items)
    assert sorted(backend.calls) == [
        (["last sentence"], "en", "ru"),
        (["первое предложение", "второе"], "ru", "en"),
    ]
    assert [r.to_json() for r in result] == [
        {
            "from_lang": "ru",
            "to_lang": "en",
            "content": "en:ПЕРВОЕ ПРЕДЛОЖЕНИЕ",
            "status": "processed",
        },
        {"from_lang": "en", "to_lang": "ru", "content": "ru:LAST SENTENCE", "status": "processed"},
        {
            "from_lang": "en",
            "to_lang": "unknown",
            "content": "last sentence",
            "status": "not_processed",
        },
        {
            "from_lang": "ru",
            "to_lang": "en",
            "content": "en:ПЕРВОЕ ПРЕДЛОЖЕНИЕ",
            "status": "processed",
        },
        {
            "from_lang": "unknown",
            "to_lang": "en",
            "content": "qwzx vbnm plkj",
            "status": "not_processed",
        },
        {"from_lang": "en", "to_lang": "ru", "content": "   ", "status": "not_processed"},
        {
            "uuid": "u-2",
            "from_lang": "ru",
            "to_lang": "en",
            "content": "en:ВТОРОЕ",
            "status": "processed",
        },
    ]


async def test_service_returns_originals_when_the_backend_fails(detector: LanguageDetector) -> None:
    service = TranslationService(RecordingTranslator(fail=True), detector, TranslateConfig())
    result = await service.translate([TranslationItem("ru", "en", "первое предложение")])
    assert [(r.content, r.status) for r in result] == [("первое предложение", Status.NOT_PROCESSED)]


class GatedDetector:
    """The real detector, made to wait in ``detect`` until the event loop sets ``gate``: if
    detection ran on the loop, the loop could not set it and every wait would time out."""

    def __init__(self, real: LanguageDetector) -> None:
        self.real = real
        self.gate = threading.Event()
        self.waits: list[bool] = []

    def detect(self, text: str) -> str:
        if not self.waits:
            self.waits.append(self.gate.wait(timeout=5.0))
        return self.real.detect(text)


async def test_service_detects_large_payloads_off_the_loop(detector: LanguageDetector) -> None:
    backend = RecordingTranslator()
    gated = GatedDetector(detector)
    service = TranslationService(backend, gated, TranslateConfig())  # type: ignore[arg-type]
    items = [TranslationItem("auto", "en", f"Кошка номер {i} сидит на окне") for i in range(200)]
    # Runs only when the loop gets control back while the items are being detected.
    asyncio.get_running_loop().call_soon(gated.gate.set)
    result = await service.translate(items)
    assert gated.waits == [True]  # the loop set the gate: it stayed responsive
    assert {r.from_lang for r in result} == {"ru"} and len(backend.calls) == 1


# -- configuration -------------------------------------------------------------------------


def test_spec_environment_variables_override_the_file() -> None:
    config = load_config(
        None,
        environ={
            "USE_TRANSLATOR": "true",
            "TRANSLATOR_URL": "http://127.0.0.1:5000",
            "SKIP_CHECK_EN": "true",
            "SKIP_CHECK_RU": "false",
            "TERRA_TRANSLATOR_BACKEND": "http",
        },
        overrides={"translate": {"enabled": False}},
    )
    # explicit overrides win over the environment; the rest comes from it
    assert config.translate.enabled is False
    assert config.translate.url == "http://127.0.0.1:5000"
    assert (config.translate.skip_check_en, config.translate.skip_check_ru) == (True, False)
    assert load_config(None, environ={"USE_TRANSLATOR": "1"}).translate.enabled is True


def test_bad_translate_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="translate.backend"):
        load_config(None, environ={"TERRA_TRANSLATOR_BACKEND": "google"})
    with pytest.raises(ConfigError, match="USE_TRANSLATOR|translate.enabled"):
        load_config(None, environ={"USE_TRANSLATOR": "maybe"})
