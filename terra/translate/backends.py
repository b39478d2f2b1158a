"""Translator backends: a LibreTranslate-compatible HTTP service, or local CTranslate2 models.

Both take a whole list of texts in one direction and batch it themselves; a text that
could not be translated comes back as None (the reason is logged), so one failed batch
never fails a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from terra.config import TranslateConfig
from terra.files.fetch import read_at_most
from terra.retry import Backoff, Retryable, retryable_status, retrying

if TYPE_CHECKING:
    import ctranslate2
    import sentencepiece

log = logging.getLogger(__name__)
# An answer is read up to this plus 24 bytes per character the batch may hold (a translation
# up to 4x as long as its text, each character up to 6 bytes as a JSON \u escape): a broken
# or hostile translator never costs more memory than that.
ANSWER_BASE_BYTES = 64 * 1024

Direction = tuple[str, str]
DIRECTIONS: tuple[Direction, ...] = (("ru", "en"), ("en", "ru"))

# Answers worth another try: the service is overloaded or restarting.
RETRY_MAX_S = 30.0  # the backoff's cap (translate.retry_backoff_s doubles up to this)


class TranslatorError(Exception):
    """A backend could not translate (service down, bad answer, model failure)."""


class TranslatorUnavailable(TranslatorError):
    """The service did not answer after all the retries (down, hung or overloaded)."""


class _ServiceDown(Retryable):
    """Unreachable, timed out, or an answer that says the service is unavailable (408, 429,
    502, 503, 504), not that it failed on these texts (500 may be one text crashing it)."""


_DOWN_STATUSES = frozenset({408, 429, 502, 503, 504})


class Translator(Protocol):
    """Translates batches of texts; owned by the application's cleanup context."""

    def directions(self) -> frozenset[Direction]:
        """The (source, target) pairs this backend can translate."""
        ...

    async def translate(self, texts: Sequence[str], source: str, target: str) -> list[str | None]:
        """One result per text, in order; None where that text could not be translated."""
        ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- http


def translate_endpoint(url: str) -> str:
    """``TRANSLATOR_URL`` may be the service's root or its ``/translate`` endpoint."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/translate") else url + "/translate"


class HttpTranslator:
    """A LibreTranslate-compatible service: ``POST /translate`` with ``q``, ``source``, ``target``.

    ``q`` is sent as a list of up to ``batch_size`` texts (LibreTranslate answers
    ``translatedText`` as a list in the same order). Connection errors, timeouts and
    408/429/5xx answers are retried ``retries`` times with exponential backoff; other
    answers are not. At most ``concurrency`` requests are in flight at once, for all
    clients of terra together. Once one batch of a call has given up on the service
    (unreachable, timed out, or 408/429/502/503/504 to the last try), the call's batches not
    yet sent are not sent (a hung service costs a request one batch's retries, not every
    batch's); a batch that fails otherwise (a 500, a refusal) fails alone.
    """

    def __init__(self, config: TranslateConfig, session: aiohttp.ClientSession) -> None:
        self._config = config
        self._endpoint = translate_endpoint(config.url)
        self._session = session
        self._limit = asyncio.Semaphore(config.concurrency)

    @classmethod
    async def open(cls, config: TranslateConfig) -> HttpTranslator:
        """Create the client session (inside the running loop)."""
        timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        return cls(config, aiohttp.ClientSession(timeout=timeout, raise_for_status=False))

    def directions(self) -> frozenset[Direction]:
        return frozenset(DIRECTIONS)

    async def translate(self, texts: Sequence[str], source: str, target: str) -> list[str | None]:
        size = self._config.batch_size
        chunks = [list(texts[i : i + size]) for i in range(0, len(texts), size)]
        given_up = asyncio.Event()  # a batch of this call gave up on the service
        answers = await asyncio.gather(
            *(self._translate_chunk(c, source, target, given_up) for c in chunks)
        )
        return [text for answer in answers for text in answer]

    async def close(self) -> None:
        await self._session.close()

    async def _translate_chunk(
        self, texts: list[str], source: str, target: str, given_up: asyncio.Event
    ) -> list[str | None]:
        async with self._limit:
            if given_up.is_set():
                log.debug(
                    "%d texts %s->%s not sent: the service gave up", len(texts), source, target
                )
                return [None] * len(texts)
            try:
                return list(await self._post(texts, source, target))
            except TranslatorError as e:
                if isinstance(e, TranslatorUnavailable):
                    given_up.set()
                log.warning(
                    "translation %s->%s of %d texts failed: %s", source, target, len(texts), e
                )
                return [None] * len(texts)

    async def _post(self, texts: list[str], source: str, target: str) -> list[str]:
        body: dict[str, Any] = {"q": texts, "source": source, "target": target, "format": "text"}
        if self._config.api_key:
            body["api_key"] = self._config.api_key
        policy = Backoff(self._config.retry_backoff_s, RETRY_MAX_S, self._config.retries + 1)
        try:
            async for attempt in retrying(policy):
                with attempt:
                    return await self._post_once(body, len(texts))
        except _ServiceDown as e:
            raise TranslatorUnavailable(f"{e}; gave up after {policy.tries} attempt(s)") from e
        except Retryable as e:
            raise TranslatorError(f"{e}; gave up after {policy.tries} attempt(s)") from e
        raise AssertionError("unreachable: retrying returns or raises")

    async def _post_once(self, body: dict[str, Any], count: int) -> list[str]:
        try:
            async with self._session.post(self._endpoint, json=body) as response:
                if response.status == 200:
                    limit = ANSWER_BASE_BYTES + count * self._config.max_content_chars * 24
                    raw = await read_at_most(response, limit)
                    if len(raw) > limit:  # not retried: the same texts would get the same
                        raise TranslatorError(f"{self._endpoint} answered over {limit} bytes")
                    return _parse_libretranslate(raw, count)
                detail = (await read_at_most(response, 200))[:200].decode("utf-8", "replace")
                failure = f"{self._endpoint} answered {response.status}: {detail}"
                if response.status in _DOWN_STATUSES:
                    raise _ServiceDown(failure)
                if retryable_status(response.status):
                    raise Retryable(failure)
                raise TranslatorError(failure)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _ServiceDown(
                f"the translator at {self._endpoint} is unreachable ({type(e).__name__}: {e})"
            ) from e


def _parse_libretranslate(raw: bytes, count: int) -> list[str]:
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep to parse
        raise TranslatorError(f"the translator's answer is not JSON: {raw[:100]!r}") from e
    translated = answer.get("translatedText") if isinstance(answer, dict) else None
    if isinstance(translated, str) and count == 1:
        translated = [translated]
    if (
        not isinstance(translated, list)
        or len(translated) != count
        or not all(isinstance(t, str) for t in translated)
    ):
        raise TranslatorError(
            f"the translator's answer has no translatedText list of {count}: {raw[:200]!r}"
        )
    for text in translated:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800"): not text
            raise TranslatorError(f"the translator's answer is not text: {raw[:200]!r}") from e
    return translated


# --------------------------------------------------------------------------- ctranslate2


class Tokenizer(Protocol):
    """Turns texts into the token strings a CTranslate2 model reads, and back."""

    def encode(self, texts: Sequence[str]) -> list[list[str]]: ...

    def target_prefix(self, count: int) -> list[list[str]] | None:
        """Tokens every hypothesis must start with (NLLB's language code), or None."""
        ...

    def decode(self, hypotheses: Sequence[Sequence[str]]) -> list[str]: ...


_SPECIAL = frozenset({"</s>", "<s>", "<pad>", "<unk>"})


def _load_spm(path: Path) -> sentencepiece.SentencePieceProcessor:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(path))


class MarianTokenizer:
    """OPUS-MT (Marian): ``source.spm`` for the input, ``target.spm`` for the output."""

    def __init__(self, folder: Path) -> None:
        self._source = _load_spm(folder / "source.spm")
        self._target = _load_spm(folder / "target.spm")

    def encode(self, texts: Sequence[str]) -> list[list[str]]:
        pieces: list[list[str]] = self._source.encode(list(texts), out_type=str)
        return [p + ["</s>"] for p in pieces]

    def target_prefix(self, count: int) -> list[list[str]] | None:
        return None

    def decode(self, hypotheses: Sequence[Sequence[str]]) -> list[str]:
        return [
            str(self._target.decode([t for t in tokens if t not in _SPECIAL]))
            for tokens in hypotheses
        ]


NLLB_CODES = {"ru": "rus_Cyrl", "en": "eng_Latn"}


class NllbTokenizer:
    """NLLB-200 / M2M: one ``sentencepiece.bpe.model``, language codes as tokens."""

    def __init__(self, folder: Path, source: str, target: str) -> None:
        self._spm = _load_spm(folder / "sentencepiece.bpe.model")
        self._source = NLLB_CODES[source]
        self._target = NLLB_CODES[target]

    def encode(self, texts: Sequence[str]) -> list[list[str]]:
        pieces: list[list[str]] = self._spm.encode(list(texts), out_type=str)
        return [[self._source, *p, "</s>"] for p in pieces]

    def target_prefix(self, count: int) -> list[list[str]] | None:
        return [[self._target] for _ in range(count)]

    def decode(self, hypotheses: Sequence[Sequence[str]]) -> list[str]:
        skip = _SPECIAL | set(NLLB_CODES.values())
        return [
            str(self._spm.decode([t for t in tokens if t not in skip])) for tokens in hypotheses
        ]


def load_tokenizer(folder: Path, source: str, target: str) -> Tokenizer:
    """The tokenizer a converted model folder carries (see README: --copy_files)."""
    if (folder / "source.spm").is_file() and (folder / "target.spm").is_file():
        return MarianTokenizer(folder)
    if (folder / "sentencepiece.bpe.model").is_file():
        return NllbTokenizer(folder, source, target)
    raise TranslatorError(
        f"{folder} has neither source.spm + target.spm (OPUS-MT) nor sentencepiece.bpe.model "
        "(NLLB): convert with --copy_files (see README, Translation)"
    )


@dataclass(frozen=True, slots=True)
class _Model:
    translator: ctranslate2.Translator
    tokenizer: Tokenizer
    folder: Path


def resolve_model_folder(name: str, models_dir: Path) -> Path:
    """A folder as given, or one under ``models_dir`` (``opus-mt-ru-en`` → models/opus-mt-ru-en)."""
    for candidate in (Path(name), models_dir / name):
        if (candidate / "model.bin").is_file():
            return candidate
    raise TranslatorError(
        f"no CTranslate2 model at {name!r} (nor under {models_dir}/): see README, Translation"
    )


class CTranslate2Translator:
    """Local Marian/OPUS-MT or NLLB models converted for CTranslate2, loaded once.

    Generation is blocking and runs in a worker thread (``asyncio.to_thread``); a call's
    texts go to ``translate_batch`` together, which sorts them by length and cuts them
    into batches of ``batch_size``.
    """

    def __init__(self, config: TranslateConfig, models: dict[Direction, _Model]) -> None:
        self._config = config
        self._models = models

    @classmethod
    def load(cls, config: TranslateConfig, models_dir: Path) -> CTranslate2Translator:
        """Load the configured models (blocking: call it off the event loop)."""
        import ctranslate2

        loaded: dict[Path, ctranslate2.Translator] = {}
        models: dict[Direction, _Model] = {}
        for direction, name in (
            (("ru", "en"), config.model_ru_en),
            (("en", "ru"), config.model_en_ru),
        ):
            if not name:
                continue
            folder = resolve_model_folder(name, models_dir).resolve()
            if folder not in loaded:  # one NLLB folder may serve both directions
                started = time.perf_counter()
                try:
                    loaded[folder] = ctranslate2.Translator(
                        str(folder),
                        device=config.device,
                        compute_type=config.compute_type,
                        inter_threads=1,
                        intra_threads=config.cpu_threads,
                    )
                except (RuntimeError, ValueError) as e:
                    raise TranslatorError(f"cannot load the translation model {folder}: {e}") from e
                log.info(
                    "translation model %s loaded in %.2f s", folder, time.perf_counter() - started
                )
            models[direction] = _Model(loaded[folder], load_tokenizer(folder, *direction), folder)
        if not models:
            raise TranslatorError("translate.model_ru_en and translate.model_en_ru are both empty")
        return cls(config, models)

    def directions(self) -> frozenset[Direction]:
        return frozenset(self._models)

    async def translate(self, texts: Sequence[str], source: str, target: str) -> list[str | None]:
        model = self._models.get((source, target))
        if model is None or not texts:
            return [None] * len(texts)
        try:
            return list(await asyncio.to_thread(self._generate, model, list(texts)))
        except TranslatorError as e:
            log.warning("translation %s->%s of %d texts failed: %s", source, target, len(texts), e)
            return [None] * len(texts)

    async def close(self) -> None:
        loaded = {id(m.translator): m.translator for m in self._models.values()}
        self._models = {}
        for translator in loaded.values():
            translator.unload_model()

    def _generate(self, model: _Model, texts: list[str]) -> list[str]:
        """The blocking part: tokenize, one batched ``translate_batch``, detokenize."""
        config = self._config
        try:
            limit = config.max_input_tokens
            # Truncate keeping the closing </s> (CTranslate2's own truncation would drop it).
            source = [
                t if len(t) <= limit else t[: limit - 1] + t[-1:]
                for t in model.tokenizer.encode(texts)
            ]
            results = model.translator.translate_batch(
                source,
                target_prefix=model.tokenizer.target_prefix(len(texts)),
                max_batch_size=config.batch_size,
                beam_size=config.beam_size,
                max_input_length=config.max_input_tokens,
                max_decoding_length=config.max_output_tokens,
            )
        except (RuntimeError, ValueError) as e:
            raise TranslatorError(f"{model.folder}: {e}") from e
        return model.tokenizer.decode([r.hypotheses[0] for r in results])


async def open_translator(config: TranslateConfig, models_dir: Path) -> Translator | None:
    """The configured backend, or None when translation is off or not configured."""
    if not config.enabled:
        return None
    if config.backend == "http":
        if not config.url.strip():
            return None
        return await HttpTranslator.open(config)
    if not (config.model_ru_en or config.model_en_ru):
        return None
    return await asyncio.to_thread(CTranslate2Translator.load, config, models_dir)
