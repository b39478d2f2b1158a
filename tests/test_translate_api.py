"""POST /translate_to_any end to end through the real server on loopback.

The http backend talks to a LibreTranslate-shaped STAND-IN on loopback (not LibreTranslate
itself: see tests/libretranslate_standin.py); the ctranslate2 backend runs a tiny model the
tests build.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from terra.app import create_app
from terra.config import load_config
from tests.fakes import FakeEngine

from .conftest import TOKEN, ServerFactory
from .libretranslate_standin import LibreTranslateStandIn
from .test_translate_http import free_port
from .tiny_translation import build_marian

DISABLED = "TRANSLATOR DISABLED OR URL IS NOT CONFIGURED"

# The spec's request example, and the answer it documents (with a phrase book that knows
# both sentences).
SPEC_PAYLOAD = [
    {"from_lang": "auto", "to_lang": "en", "content": "первое предложение"},
    {"from_lang": "auto", "to_lang": "ru", "content": "last sentence"},
    {"from_lang": "auto", "to_lang": "unknown", "content": "last sentence"},
]
SPEC_ANSWER = [
    {"from_lang": "ru", "to_lang": "en", "content": "first sentence", "status": "processed"},
    {"from_lang": "en", "to_lang": "ru", "content": "последнее предложение", "status": "processed"},
    {
        "from_lang": "en",
        "to_lang": "unknown",
        "content": "last sentence",
        "status": "not_processed",
    },
]


@pytest.fixture
async def standin() -> AsyncIterator[LibreTranslateStandIn]:
    server = await LibreTranslateStandIn().start()
    yield server
    await server.close()


def http_settings(url: str, **values: Any) -> dict[str, Any]:
    return {"enabled": True, "backend": "http", "url": url, "retry_backoff_s": 0.01} | values


async def post(client: TestClient[Any, Any], body: Any, **kwargs: Any) -> tuple[int, Any]:
    response = await client.post("/translate_to_any", json=body, **kwargs)
    return response.status, await response.json()


async def test_the_specs_example(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    client = await make_fast_server(translate=http_settings(standin.url))
    status, body = await post(client, {"token": TOKEN, "payload": SPEC_PAYLOAD})
    assert status == 200
    assert body == {"payload": SPEC_ANSWER}
    # one request per direction; the third parcel never reached the translator
    assert sorted((r["source"], r["target"], r["q"]) for r in standin.requests) == [
        ("en", "ru", ["last sentence"]),
        ("ru", "en", ["первое предложение"]),
    ]


async def test_the_answer_is_utf8_json_with_the_items_other_keys(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    client = await make_fast_server(translate=http_settings(standin.url))
    payload = [{"uuid": "u-1", "from_lang": "RU", "to_lang": "en", "content": "второе предложение"}]
    response = await client.post("/translate_to_any", json={"token": TOKEN, "payload": payload})
    assert response.status == 200 and response.content_type == "application/json"
    raw = await response.read()
    assert json.loads(raw) == {
        "payload": [
            {
                "uuid": "u-1",
                "from_lang": "ru",
                "to_lang": "en",
                "content": "second sentence",
                "status": "processed",
            }
        ]
    }


async def test_a_large_payload_is_batched(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    client = await make_fast_server(translate=http_settings(standin.url, batch_size=16))
    payload = [
        {"from_lang": "ru", "to_lang": "en", "content": f"фраза номер {i}"} for i in range(40)
    ]
    status, body = await post(client, {"token": TOKEN, "payload": payload})
    assert status == 200
    assert [item["content"] for item in body["payload"]] == [
        f"<en> фраза номер {i}" for i in range(40)
    ]
    assert {item["status"] for item in body["payload"]} == {"processed"}
    assert sorted(len(r["q"]) for r in standin.requests) == [8, 16, 16]


async def test_the_token_may_come_in_the_body_the_query_or_a_form_field(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    client = await make_fast_server(translate=http_settings(standin.url))
    status, body = await post(client, {"payload": SPEC_PAYLOAD}, params={"token": TOKEN})
    assert (status, body) == (200, {"payload": SPEC_ANSWER})

    form = aiohttp.FormData()
    form.add_field("token", TOKEN)
    form.add_field("payload", json.dumps(SPEC_PAYLOAD))
    response = await client.post("/translate_to_any", data=form)
    assert response.status == 200 and await response.json() == {"payload": SPEC_ANSWER}

    multipart = aiohttp.FormData(quote_fields=False)
    multipart.add_field("token", TOKEN)
    multipart.add_field("payload", json.dumps(SPEC_PAYLOAD), content_type="application/json")
    response = await client.post("/translate_to_any", data=multipart)
    assert response.status == 200 and await response.json() == {"payload": SPEC_ANSWER}


async def test_token_is_checked_first(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    client = await make_fast_server(translate=http_settings(standin.url))
    for body, params in [
        ({"payload": SPEC_PAYLOAD}, {}),
        ({"token": "wrong", "payload": SPEC_PAYLOAD}, {}),
        ({"token": 5, "payload": SPEC_PAYLOAD}, {}),
        ({"payload": SPEC_PAYLOAD}, {"token": "wrong"}),
        ("not an object", {}),
    ]:
        status, answer = await post(client, body, params=params)
        assert status == 401, (body, answer)
        assert "token" in answer["detail"]
    assert standin.requests == []


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the default: off
        {"enabled": False, "url": "http://127.0.0.1:1"},  # USE_TRANSLATOR: false
        {"enabled": True, "url": ""},  # TRANSLATOR_URL empty
        {"enabled": True, "url": "   "},
        {"enabled": True, "backend": "ctranslate2"},  # no model configured
    ],
)
async def test_disabled_or_unconfigured_is_the_specs_404(
    make_fast_server: ServerFactory, settings: dict[str, Any]
) -> None:
    client = await make_fast_server(translate=settings)
    status, body = await post(client, {"token": TOKEN, "payload": SPEC_PAYLOAD})
    assert (status, body) == (404, DISABLED)
    # ... but only for a client with a valid token
    status, body = await post(client, {"token": "wrong", "payload": SPEC_PAYLOAD})
    assert status == 401


async def test_malformed_payloads_are_400_with_the_reason(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    client = await make_fast_server(translate=http_settings(standin.url, max_items=5))
    item = {"from_lang": "auto", "to_lang": "en", "content": "x"}
    cases: list[tuple[Any, str]] = [
        ({"token": TOKEN}, "payload is required"),
        ({"token": TOKEN, "payload": "first sentence"}, "payload must be a list"),
        ({"token": TOKEN, "payload": {"from_lang": "auto"}}, "payload must be a list"),
        ({"token": TOKEN, "payload": [item, "x"]}, "payload[1] must be an object"),
        (
            {"token": TOKEN, "payload": [{"to_lang": "en", "content": "x"}]},
            "payload[0].from_lang is required",
        ),
        (
            {"token": TOKEN, "payload": [item | {"content": None}]},
            "payload[0].content must be a string",
        ),
        (
            {"token": TOKEN, "payload": [item | {"to_lang": 1}]},
            "payload[0].to_lang must be a string",
        ),
        ({"token": TOKEN, "payload": [item] * 6}, "payload has 6 items; at most 5"),
    ]
    for body, reason in cases:
        status, answer = await post(client, body)
        assert status == 400, (body, answer)
        assert reason in answer["detail"]

    response = await client.post(
        "/translate_to_any",
        params={"token": TOKEN},
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 400 and "JSON object" in (await response.json())["detail"]
    form = aiohttp.FormData({"token": TOKEN, "payload": "[{not json"})
    response = await client.post("/translate_to_any", data=form)
    assert response.status == 400 and "not valid JSON" in (await response.json())["detail"]
    assert standin.requests == []


async def test_a_malformed_body_that_opens_with_a_valid_token_is_400_with_the_reason(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    """A body cut short, or holding a lone surrogate, after a valid leading ``"token"`` was
    answered 401 "token is required": the client who sent a good token was told it sent
    none. The token is judged as the client wrote it, then the body: 400 with the reason; a
    wrong leading token is still a 401."""
    client = await make_fast_server(translate=http_settings(standin.url))
    payload = json.dumps({"token": TOKEN, "payload": SPEC_PAYLOAD}, ensure_ascii=False)
    for body, reason in (
        (payload[:-5], "not valid JSON"),
        (payload.replace("первое", "\\ud800"), "surrogate"),
    ):
        response = await client.post(
            "/translate_to_any",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = await response.json()
        assert response.status == 400 and reason in answer["detail"], (body, answer)
        wrong = body.replace(TOKEN, "wrong")
        response = await client.post(
            "/translate_to_any",
            data=wrong.encode(),
            headers={"Content-Type": "application/json"},
        )
        assert response.status == 401, wrong
    assert standin.requests == []


async def test_a_body_over_the_limit_is_413(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    client = await make_fast_server(
        server={"tokens": [TOKEN], "max_upload_bytes": 2000}, translate=http_settings(standin.url)
    )
    payload = [{"from_lang": "ru", "to_lang": "en", "content": "я" * 3000}]
    status, body = await post(client, {"token": TOKEN, "payload": payload})
    assert status == 413 and "larger than" in body["detail"]


async def test_a_lone_surrogate_is_400_and_an_escaped_pair_is_text(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    """JSON may escape half a UTF-16 pair (``"\\ud800"``): Python parses it into a string
    that is not text, which the language detector and the UTF-8 answer failed on (500). It
    is the client's error, in the content or in a key echoed back; a whole pair is an emoji."""
    client = await make_fast_server(translate=http_settings(standin.url))
    for body in (
        '[{"from_lang": "auto", "to_lang": "en", "content": "\\ud800 привет"}]',
        '[{"from_lang": "ru", "to_lang": "en", "content": "привет \\udfff"}]',
        '[{"from_lang": "ru", "to_lang": "en", "content": "привет", "uuid": "\\ud83d"}]',
    ):
        response = await client.post(
            "/translate_to_any",
            params={"token": TOKEN},
            data=f'{{"payload": {body}}}'.encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = await response.json()
        assert response.status == 400 and "surrogate" in answer["detail"], (body, answer)
        form = aiohttp.FormData({"token": TOKEN, "payload": body})
        response = await client.post("/translate_to_any", data=form)
        assert response.status == 400, body
    assert standin.requests == []
    emoji = "\\ud83d\\ude00"  # one whole pair, escaped
    pair = f'[{{"from_lang": "ru", "to_lang": "en", "content": "{emoji}", "uuid": "{emoji}"}}]'
    response = await client.post(
        "/translate_to_any",
        params={"token": TOKEN},
        data=f'{{"payload": {pair}}}'.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 200
    assert (await response.json())["payload"][0]["uuid"] == "\U0001f600"


async def test_a_translator_that_is_down_leaves_the_parcels_not_processed(
    make_fast_server: ServerFactory,
) -> None:
    client = await make_fast_server(
        translate=http_settings(f"http://127.0.0.1:{free_port()}", retries=1)
    )
    status, body = await post(client, {"token": TOKEN, "payload": SPEC_PAYLOAD})
    assert status == 200
    assert body == {
        "payload": [
            {
                "from_lang": "ru",
                "to_lang": "en",
                "content": "первое предложение",
                "status": "not_processed",
            },
            {
                "from_lang": "en",
                "to_lang": "ru",
                "content": "last sentence",
                "status": "not_processed",
            },
            SPEC_ANSWER[2],
        ]
    }
    health = await client.get("/healthz")
    assert health.status == 200  # nothing else broke


async def test_a_translator_answer_that_is_not_text_leaves_its_parcels_not_processed(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    """A broken service's 200 that nests too deep for the JSON parser, or whose text holds a
    lone surrogate (not text, which the UTF-8 answer cannot carry), failed the whole request
    with a 500; it is that batch's failure: its parcels come back not_processed, the other
    direction's are translated, and it is not retried (the service answered)."""
    client = await make_fast_server(translate=http_settings(standin.url, retries=2))
    for broken in (
        b'{"translatedText": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"translatedText": ["\\ud800"]}',
    ):
        standin.requests.clear()
        standin.answer_with = [broken]
        status, body = await post(
            client, {"token": TOKEN, "payload": SPEC_PAYLOAD[:1] + SPEC_PAYLOAD[1:2] * 2}
        )
        assert status == 200, body
        # parcels 1 and 2 share a direction (and one text); whichever direction's request
        # came first got the broken answer
        first, second, third = (item["status"] for item in body["payload"])
        assert {first, second} == {"not_processed", "processed"} and second == third, body
        assert len(standin.requests) == 2  # one per direction, no retry


async def test_a_hung_translator_is_given_up_on_once_per_request_not_per_batch(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    """A translator that takes connections but never answers: every batch of a request
    waited out its timeout and all its retries in turn, behind the shared concurrency
    limit (1,000 parcels: 63 batches x 3 tries x 10 s / 2 = 16 minutes for one request,
    and every other client queued behind it). Once a batch has given up on the service,
    the request's other batches are not sent: their parcels come back not_processed."""
    standin.delay_s = 2.0  # past timeout_s: every request times out
    client = await make_fast_server(
        translate=http_settings(standin.url, timeout_s=0.1, retries=1, batch_size=1, concurrency=1)
    )
    payload = [
        {"from_lang": "ru", "to_lang": "en", "content": f"предложение номер {i}"} for i in range(10)
    ]
    status, body = await post(client, {"token": TOKEN, "payload": payload})
    assert status == 200
    assert [item["status"] for item in body["payload"]] == ["not_processed"] * 10
    assert [item["content"] for item in body["payload"]] == [p["content"] for p in payload]
    assert len(standin.requests) == 2  # one batch: its try and its retry; no other batch


async def test_a_parcel_with_nothing_to_translate_comes_back_as_it_was(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    """Blank parcels were skipped only when ``str.strip`` emptied them: a zero-width space,
    a byte-order mark, a word joiner, emoji or punctuation alone went to the translator, and
    a model that turns them into nothing answered "" as ``processed``: the client's text
    lost. A parcel with no letter or digit comes back as it was, ``not_processed``, and is
    never sent."""
    client = await make_fast_server(translate=http_settings(standin.url))
    nothing = ["\u200b", "\ufeff ", "\u2060", "😀😀", "...", " \n ", "", "\u00a0"]
    payload = [{"from_lang": "ru", "to_lang": "en", "content": t} for t in nothing]
    payload.append({"from_lang": "ru", "to_lang": "en", "content": "первое предложение 😀"})
    status, body = await post(client, {"token": TOKEN, "payload": payload})
    assert status == 200
    *left, translated = body["payload"]
    assert [(p["content"], p["status"]) for p in left] == [(t, "not_processed") for t in nothing]
    assert translated["status"] == "processed"
    assert [r["q"] for r in standin.requests] == [["первое предложение 😀"]]


async def test_an_empty_translation_leaves_the_parcel_not_processed(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    """A translator that answers "" (or blanks) for a text with words in it has failed on
    that text: the parcel comes back as it was, ``not_processed``, not emptied as
    ``processed``; the other parcels of the batch keep their translations."""
    client = await make_fast_server(translate=http_settings(standin.url))
    standin.answer_with = [b'{"translatedText": ["", " \\n", "first sentence"]}']
    texts = ["первое слово", "второе слово", "первое предложение"]
    payload = [{"from_lang": "ru", "to_lang": "en", "content": t} for t in texts]
    status, body = await post(client, {"token": TOKEN, "payload": payload})
    assert status == 200
    assert [(p["content"], p["status"]) for p in body["payload"]] == [
        ("первое слово", "not_processed"),
        ("второе слово", "not_processed"),
        ("first sentence", "processed"),
    ]


async def test_a_batch_the_service_fails_on_does_not_stop_the_others(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    """A 500 after the retries may be that batch's text crashing the service: the request's
    other batches are still sent (only a service that is unreachable, hung or says it is
    unavailable, 502/503/504/429, is given up on for the rest of the request)."""
    standin.fail_with = [500, 500]  # the first batch, and its retry
    client = await make_fast_server(
        translate=http_settings(standin.url, retries=1, batch_size=1, concurrency=1)
    )
    texts = ["первое слово", "второе слово", "третье слово"]
    payload = [{"from_lang": "ru", "to_lang": "en", "content": t} for t in texts]
    status, body = await post(client, {"token": TOKEN, "payload": payload})
    assert status == 200
    statuses = [p["status"] for p in body["payload"]]
    assert statuses.count("not_processed") == 1 and statuses.count("processed") == 2, body
    assert len(standin.requests) == 4  # the failing batch twice, then the two others


async def test_skip_check_en_from_the_environment(
    fake_engine: FakeEngine, tmp_path: Path, standin: LibreTranslateStandIn
) -> None:
    """USE_TRANSLATOR, TRANSLATOR_URL and SKIP_CHECK_EN as the spec names them."""
    payload = [
        {"from_lang": "en", "to_lang": "en", "content": "last sentence"},
        {"from_lang": "auto", "to_lang": "en", "content": "qwzx vbnm plkj"},
        {"from_lang": "en", "to_lang": "ru", "content": "last sentence"},
    ]
    for skip, first in [("false", "not_processed"), ("true", "processed")]:
        config = load_config(
            None,
            environ={
                "USE_TRANSLATOR": "true",
                "TRANSLATOR_URL": standin.url,
                "SKIP_CHECK_EN": skip,
                "TERRA_TOKENS": TOKEN,
                "TERRA_SPOOL_DIR": str(tmp_path / "spool"),
            },
        )
        async with TestClient(
            TestServer(create_app(config, engine=fake_engine), host="127.0.0.1")
        ) as client:
            status, body = await post(client, {"token": TOKEN, "payload": payload})
        assert status == 200
        statuses = [item["status"] for item in body["payload"]]
        # unknown is never translated, SKIP_CHECK_EN or not
        assert statuses == [first, "not_processed", "processed"]
        assert body["payload"][1]["from_lang"] == "unknown"


async def test_the_ctranslate2_backend_through_the_server(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    build_marian(models / "opus-mt-ru-en")
    client = await make_fast_server(
        model={"models_dir": str(models)},
        translate={
            "enabled": True,
            "backend": "ctranslate2",
            "model_ru_en": "opus-mt-ru-en",
            "max_output_tokens": 16,
        },
    )
    status, body = await post(client, {"token": TOKEN, "payload": SPEC_PAYLOAD})
    assert status == 200
    first, second, third = body["payload"]
    # ru->en comes from the (random) model; there is no en->ru model: returned as it was
    assert first["status"] == "processed" and first["content"] != "первое предложение"
    assert (first["from_lang"], first["to_lang"]) == ("ru", "en")
    assert second == {
        "from_lang": "en",
        "to_lang": "ru",
        "content": "last sentence",
        "status": "not_processed",
    }
    assert third == SPEC_ANSWER[2]


async def test_a_translator_answer_past_its_bound_fails_its_batch_unread(
    make_fast_server: ServerFactory, standin: LibreTranslateStandIn
) -> None:
    """A broken or hostile translator that answers far more than a batch's translation can
    hold (here 1 MB for 10 characters of text): the answer is read only up to its bound, and
    that batch's parcels come back as they were, not_processed, with no retry; the next
    batch is translated."""
    client = await make_fast_server(
        translate=http_settings(standin.url, max_content_chars=10, batch_size=1, concurrency=1)
    )
    standin.answer_with = [b'{"translatedText": ["' + b"x" * 1_000_000 + b'"]}']
    payload = [
        {"from_lang": "ru", "to_lang": "en", "content": "первое"},
        {"from_lang": "ru", "to_lang": "en", "content": "второе"},
    ]
    status, body = await post(client, {"token": TOKEN, "payload": payload})
    assert status == 200, body
    assert [(p["content"], p["status"]) for p in body["payload"]] == [
        ("первое", "not_processed"),
        ("<en> второе", "processed"),
    ]
    assert len(standin.requests) == 2  # no retry of the oversized answer
