"""The ctranslate2 backend on tiny models the tests build (random weights, real layouts).

The words are meaningless; what is asserted is the mechanics: loading (by path or by name
under models_dir, once per folder), tokenizing for OPUS-MT and NLLB, one batched
``translate_batch`` per call run off the event loop, detokenizing, and failures.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

from terra.config import TranslateConfig
from terra.translate.backends import (
    CTranslate2Translator,
    MarianTokenizer,
    NllbTokenizer,
    TranslatorError,
    load_tokenizer,
)

from .tiny_translation import CORPUS, build_marian, build_nllb


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("translation-models")
    build_marian(root / "opus-mt-ru-en")
    build_nllb(root / "nllb")
    return root


def config(**values: Any) -> TranslateConfig:
    base: dict[str, Any] = {"enabled": True, "backend": "ctranslate2", "max_output_tokens": 24}
    return TranslateConfig(**(base | values))


class SpyTranslator:
    """Wraps a loaded ``ctranslate2.Translator`` and records how it is called."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[dict[str, Any]] = []

    def translate_batch(self, source: list[list[str]], **options: Any) -> Any:
        self.calls.append({"source": source, "thread": threading.get_ident(), **options})
        return self.inner.translate_batch(source, **options)

    def unload_model(self) -> None:
        self.inner.unload_model()


def spy_on(translator: CTranslate2Translator, direction: tuple[str, str]) -> SpyTranslator:
    model = translator._models[direction]
    spy = SpyTranslator(model.translator)
    translator._models[direction] = dataclasses.replace(model, translator=spy)
    return spy


def test_marian_tokenizer_round_trips_and_ends_with_eos(models: Path) -> None:
    tokenizer = load_tokenizer(models / "opus-mt-ru-en", "ru", "en")
    assert isinstance(tokenizer, MarianTokenizer)
    encoded = tokenizer.encode(CORPUS)
    assert all(tokens[-1] == "</s>" and len(tokens) > 2 for tokens in encoded)
    assert encoded[0][0].startswith("▁")  # SentencePiece pieces, not ids
    assert tokenizer.target_prefix(2) is None
    assert tokenizer.decode(encoded) == CORPUS  # </s> dropped, pieces joined back


def test_nllb_tokenizer_adds_language_codes(models: Path) -> None:
    tokenizer = load_tokenizer(models / "nllb", "en", "ru")
    assert isinstance(tokenizer, NllbTokenizer)
    encoded = tokenizer.encode(["last sentence"])
    assert encoded[0][0] == "eng_Latn" and encoded[0][-1] == "</s>"
    assert tokenizer.target_prefix(2) == [["rus_Cyrl"], ["rus_Cyrl"]]
    assert tokenizer.decode([["rus_Cyrl", *encoded[0][1:]]]) == ["last sentence"]


def test_a_folder_without_a_tokenizer_is_refused(models: Path, tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes((models / "nllb" / "model.bin").read_bytes())
    with pytest.raises(TranslatorError, match="--copy_files"):
        load_tokenizer(tmp_path, "ru", "en")


def test_a_missing_model_is_a_clear_error(models: Path) -> None:
    with pytest.raises(TranslatorError, match="no CTranslate2 model at 'opus-mt-en-ru'"):
        CTranslate2Translator.load(config(model_en_ru="opus-mt-en-ru"), models)


async def test_marian_model_by_name_translates_a_batch_in_one_call_off_the_loop(
    models: Path,
) -> None:
    # "opus-mt-ru-en" is found under models_dir, as `ct2-transformers-converter` leaves it.
    translator = CTranslate2Translator.load(
        config(model_ru_en="opus-mt-ru-en", batch_size=4, beam_size=2), models
    )
    assert translator.directions() == frozenset({("ru", "en")})
    spy = spy_on(translator, ("ru", "en"))
    try:
        batched = await translator.translate(CORPUS, "ru", "en")
        singles = [(await translator.translate([text], "ru", "en"))[0] for text in CORPUS]
        again = await translator.translate(CORPUS, "ru", "en")
        assert await translator.translate(["x"], "en", "ru") == [None]  # no en->ru model
    finally:
        await translator.close()

    assert len(batched) == len(CORPUS) and all(isinstance(t, str) for t in batched)
    assert batched != CORPUS  # generated, not echoed
    assert batched == singles == again  # batching and padding change nothing; deterministic
    first = spy.calls[0]
    assert len(spy.calls) == 1 + len(CORPUS) + 1  # the whole list went in one call
    assert first["thread"] != threading.get_ident()  # generation ran off the event loop
    assert (first["max_batch_size"], first["beam_size"], first["max_decoding_length"]) == (4, 2, 24)
    assert first["source"][0][-1] == "</s>" and first["target_prefix"] is None


async def test_one_nllb_folder_serves_both_directions_loaded_once(models: Path) -> None:
    nllb = str(models / "nllb")
    translator = CTranslate2Translator.load(config(model_ru_en=nllb, model_en_ru=nllb), models)
    assert translator.directions() == frozenset({("ru", "en"), ("en", "ru")})
    assert (
        translator._models[("ru", "en")].translator is translator._models[("en", "ru")].translator
    )
    spy = spy_on(translator, ("en", "ru"))
    try:
        result = await translator.translate(
            ["last sentence", "Thank you all for coming."], "en", "ru"
        )
        to_en = await translator.translate(["первое предложение"], "ru", "en")
    finally:
        await translator.close()
    texts = [text for text in result + to_en if text is not None]
    assert len(result) == 2 and len(to_en) == 1 and len(texts) == 3
    assert not any("rus_Cyrl" in text or "eng_Latn" in text for text in texts)
    (call,) = spy.calls
    assert call["source"][0][0] == "eng_Latn"
    assert call["target_prefix"] == [["rus_Cyrl"], ["rus_Cyrl"]]


async def test_a_generation_failure_leaves_texts_untranslated(
    models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    translator = CTranslate2Translator.load(
        config(model_ru_en=str(models / "opus-mt-ru-en")), models
    )

    class Broken:
        def translate_batch(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("out of memory")

    model = translator._models[("ru", "en")]
    translator._models[("ru", "en")] = dataclasses.replace(model, translator=Broken())
    assert await translator.translate(["первое предложение"], "ru", "en") == [None]
    assert "out of memory" in caplog.text
    model.translator.unload_model()


async def test_long_parcels_are_truncated_keeping_the_end_of_sentence(models: Path) -> None:
    translator = CTranslate2Translator.load(
        config(model_ru_en=str(models / "opus-mt-ru-en"), max_input_tokens=8), models
    )
    spy = spy_on(translator, ("ru", "en"))
    try:
        (result,) = await translator.translate([" ".join(CORPUS[:4])], "ru", "en")
    finally:
        await translator.close()
    assert isinstance(result, str)
    (source,) = spy.calls[0]["source"]
    assert len(source) == 8 and source[-1] == "</s>"
