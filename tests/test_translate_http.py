"""The http backend against a LibreTranslate-shaped STAND-IN server on loopback (not the real
LibreTranslate: see tests/libretranslate_standin.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from terra.config import TranslateConfig
from terra.translate.backends import HttpTranslator, translate_endpoint

from .libretranslate_standin import LibreTranslateStandIn


@pytest.fixture
async def standin() -> AsyncIterator[LibreTranslateStandIn]:
    server = await LibreTranslateStandIn().start()
    yield server
    await server.close()


def config(url: str, **values: Any) -> TranslateConfig:
    base: dict[str, Any] = {"enabled": True, "url": url, "retry_backoff_s": 0.01, "timeout_s": 5.0}
    return TranslateConfig(**(base | values))


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_url_may_name_the_root_or_the_endpoint() -> None:
    assert translate_endpoint("http://h:5000") == "http://h:5000/translate"
    assert translate_endpoint("http://h:5000/") == "http://h:5000/translate"
    assert translate_endpoint("http://h/lt/translate") == "http://h/lt/translate"


async def test_translates_in_batches_of_batch_size(standin: LibreTranslateStandIn) -> None:
    translator = await HttpTranslator.open(config(standin.url, batch_size=4, api_key="k"))
    texts = [f"текст {i}" for i in range(10)] + ["первое предложение"]
    try:
        result = await translator.translate(texts, "ru", "en")
    finally:
        await translator.close()
    assert result == [f"<en> текст {i}" for i in range(10)] + ["first sentence"]
    # 11 texts in 3 requests (4 + 4 + 3), never one request per text
    assert sorted(len(r["q"]) for r in standin.requests) == [3, 4, 4]
    assert {(r["source"], r["target"], r["format"], r["api_key"]) for r in standin.requests} == {
        ("ru", "en", "text", "k")
    }


async def test_retries_overload_with_backoff_then_succeeds(standin: LibreTranslateStandIn) -> None:
    standin.fail_with = [503, 429]
    translator = await HttpTranslator.open(config(standin.url, retries=2))
    try:
        assert await translator.translate(["last sentence"], "en", "ru") == [
            "последнее предложение"
        ]
    finally:
        await translator.close()
    assert len(standin.requests) == 3


async def test_gives_up_after_the_retries(
    standin: LibreTranslateStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    standin.fail_with = [502, 502, 502]
    translator = await HttpTranslator.open(config(standin.url, retries=1, batch_size=2))
    try:
        assert await translator.translate(["a", "b"], "en", "ru") == [None, None]
    finally:
        await translator.close()
    assert len(standin.requests) == 2
    assert "answered 502" in caplog.text and "gave up after 2 attempt(s)" in caplog.text


async def test_a_refusal_is_not_retried(standin: LibreTranslateStandIn) -> None:
    standin.api_key = "right"
    translator = await HttpTranslator.open(config(standin.url, api_key="wrong", retries=3))
    try:
        assert await translator.translate(["a"], "en", "ru") == [None]
    finally:
        await translator.close()
    assert len(standin.requests) == 1


async def test_a_failed_batch_leaves_the_other_batches_translated(
    standin: LibreTranslateStandIn,
) -> None:
    standin.fail_with = [400]  # the first request to arrive is refused (concurrency 1: the first)
    translator = await HttpTranslator.open(config(standin.url, batch_size=2, concurrency=1))
    try:
        result = await translator.translate(["a", "b", "c"], "en", "ru")
    finally:
        await translator.close()
    assert result == [None, None, "<ru> c"]


async def test_a_service_that_is_down_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    translator = await HttpTranslator.open(config(url, retries=2))
    try:
        started = time.monotonic()
        assert await translator.translate(["a", "b"], "en", "ru") == [None, None]
    finally:
        await translator.close()
    assert time.monotonic() - started < 2
    assert f"the translator at {url}/translate is unreachable" in caplog.text
    assert "gave up after 3 attempt(s)" in caplog.text


async def test_a_slow_service_times_out(
    standin: LibreTranslateStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    standin.delay_s = 2.0
    translator = await HttpTranslator.open(config(standin.url, timeout_s=0.1, retries=1))
    try:
        started = time.monotonic()
        assert await translator.translate(["a"], "en", "ru") == [None]
    finally:
        await translator.close()
    assert time.monotonic() - started < 1.5
    # Each of the two attempts was cut by the timeout (the client's own count: on a busy box
    # the stand-in may not have read the second request's body within 0.1 s).
    assert "(TimeoutError: ); gave up after 2 attempt(s)" in caplog.text
