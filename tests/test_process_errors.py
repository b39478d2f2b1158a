"""Every error of POST /process: a JSON {"detail": ...}, the right status, and no side effect.

On FakeEngine (tests/fakes.py): validation happens before any recognition, so the model is
not needed to check it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from terra.audio import SAMPLE_RATE
from tests.fakes import FakeEngine

from .conftest import SPEECH, ServerFactory, load_clip, post_fragment, stream_samples

SPEECHLESS = np.zeros(SAMPLE_RATE, np.float32)


def nothing_spooled(tmp_path: Path) -> bool:
    spool = tmp_path / "spool"
    return not spool.exists() or not any(spool.rglob("*.wav"))


@pytest.mark.parametrize(
    ("kwargs", "status", "fragment"),
    [
        ({"token": None}, 401, "token is required"),
        ({"token": "wrong"}, 401, "invalid token"),
        ({"conference_id": "../etc"}, 400, "conference_id must match"),
        ({"conference_id": "a" * 129}, 400, "conference_id must match"),
        ({"participant_id": "p 1"}, 400, "participant_id must match"),
        ({"participant_id": None}, 400, "participant_id is required"),
        ({"start_time": None}, 400, "timestamp_float is absent"),
        ({"start_time": 0.0}, 400, "does not carry a time"),
        ({"extra": {"timestamp_float": "yesterday"}}, 400, "timestamp_float must be a number"),
        ({"extra": {"online": "maybe"}}, 400, "online must be true or false"),
        ({"extra": {"offline": "2"}}, 400, "offline must be true or false"),
        ({"audio_bytes": b"RIFF\x00\x00not really a wav"}, 400, "cannot decode audio"),
        ({"audio_bytes": b""}, 400, "empty"),
        ({"lang": "r1"}, 400, "lang1 must be"),
        ({"post_id": "x" * 257}, 400, "post_id is longer"),
    ],
)
async def test_bad_requests(
    make_fast_server: ServerFactory,
    tmp_path: Path,
    kwargs: dict[str, Any],
    status: int,
    fragment: str,
) -> None:
    client = await make_fast_server()
    got, body = await post_fragment(client, SPEECHLESS, **kwargs)
    assert got == status
    assert fragment in body["detail"]
    assert nothing_spooled(tmp_path)
    health = await (await client.get("/healthz")).json()
    assert health["participants"] == 0


async def test_missing_audiofile(make_fast_server: ServerFactory) -> None:
    client = await make_fast_server()
    response = await client.post(
        "/process",
        params={"conference_id": "c", "participant_id": "p", "token": "test-token"},
        data={"token": "test-token"},
    )
    assert response.status == 400
    assert "audiofile is required" in (await response.json())["detail"]


async def test_body_over_the_limit_is_413(make_fast_server: ServerFactory, tmp_path: Path) -> None:
    client = await make_fast_server(server={"max_upload_bytes": 100_000})
    got, body = await post_fragment(client, np.zeros(5 * SAMPLE_RATE, np.float32))
    assert got == 413
    assert "limit" in body["detail"]
    assert nothing_spooled(tmp_path)


async def test_unknown_route_is_json_404(make_fast_server: ServerFactory) -> None:
    client = await make_fast_server()
    response = await client.get("/nope")
    assert response.status == 404
    assert "detail" in await response.json()


async def test_healthz_and_metrics(make_fast_server: ServerFactory) -> None:
    client = await make_fast_server()
    health = await (await client.get("/healthz")).json()
    assert health["status"] == "ok" and health["recognizer_queue_depth"] == 0
    await post_fragment(client, SPEECHLESS, online=False)
    text = await (await client.get("/metrics")).text()
    for name in (
        "terra_http_requests_total",
        "terra_recognizer_queue_depth",
        "terra_recognizer_batch_size_bucket",
        "terra_http_request_seconds_bucket",
        "terra_fragments_total 1.0",
    ):
        assert name in text


async def test_captions_only_to_english(make_fast_server: ServerFactory) -> None:
    client = await make_fast_server()
    status, body = await post_fragment(client, extra={"lang2": "de"})
    assert status == 400 and "only en" in body["detail"]


async def test_online_false_costs_no_recognizer_time(
    make_fast_server: ServerFactory, fake_engine: FakeEngine
) -> None:
    client = await make_fast_server()
    speech = load_clip(SPEECH / "clips" / "faster_whisper" / "jfk.flac")
    answers = await stream_samples(client, speech, online=False)
    assert all(answer == [] for answer in answers)
    # Spooled before each 200; never fed to the live stream, so nothing was queued either.
    health = await (await client.get("/healthz")).json()
    assert health["recognizer_queue_depth"] == 0 and fake_engine.requests == 0
    metrics = await (await client.get("/metrics")).text()
    assert "terra_recognizer_batch_size_count 0.0" in metrics
    assert f"terra_spooled_fragments_total {len(answers)}.0" in metrics


async def test_an_undecodable_fragment_is_named_without_the_servers_internals(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    """libsndfile's message names the object it read from: the 400 said "Error opening
    <_io.BytesIO object at 0x7f21e73adda0>: Format not recognised." (a memory address of
    the server process, and SaluteSpeech tasks' ERROR said the same). The reason alone."""
    client = await make_fast_server()
    got, body = await post_fragment(client, audio_bytes=b"garbage" * 100)
    assert got == 400
    assert body["detail"] == "cannot decode audio: Format not recognised."
    assert nothing_spooled(tmp_path)
