"""The SaluteSpeech async dialect end to end: real server, real model, real speech.

Error codes, queue limits and retention run on FakeEngine (tests/fakes.py): they do not
depend on what was recognized."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from terra.api.errors import BadRequest
from terra.api.salute import SALUTE, parse_options
from terra.audio import SAMPLE_RATE, AudioLimits, to_pcm16
from terra.files.codecs import AudioFormat, decode_channels
from terra.files.salute import mask_profanity, plain_text
from terra.files.transcribe import hint_tokens
from terra.jobs.store import JobStore
from terra.recognizer.engine import WhisperEngine

from .conftest import SPEECH, TOKEN, ServerFactory, cer, clip, load_clip

AUTH = {"Authorization": f"Bearer {TOKEN}"}
STEREO = SPEECH / "clips/faster_whisper/stereo_diarization.wav"
LIMITS = AudioLimits(max_seconds=3600)


def files_section(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"dir": str(tmp_path / "files"), "jobs_dir": str(tmp_path / "file-jobs"), **extra}


async def upload(client: Any, data: bytes) -> str:
    response = await client.post("/rest/v1/data:upload", data=data, headers=AUTH)
    body = await response.json()
    assert response.status == 200, body
    assert body["status"] == 200
    return str(body["result"]["request_file_id"])


async def create_task(client: Any, file_id: str, **options: Any) -> dict[str, Any]:
    response = await client.post(
        "/rest/v1/speech:async_recognize",
        json={"options": options, "request_file_id": file_id},
        headers=AUTH,
    )
    body = await response.json()
    assert response.status == 200, body
    assert set(body["result"]) == {"id", "created_at", "updated_at", "status"}
    assert body["result"]["status"] == "NEW"
    return dict(body["result"])


async def wait_task(client: Any, task_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.get("/rest/v1/task:get", params={"id": task_id}, headers=AUTH)
        body = await response.json()
        assert response.status == 200, body
        if body["result"]["status"] in ("DONE", "ERROR", "CANCELED"):
            return dict(body["result"])
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


async def download(client: Any, file_id: str) -> list[dict[str, Any]]:
    response = await client.get(
        "/rest/v1/data:download", params={"response_file_id": file_id}, headers=AUTH
    )
    assert response.status == 200
    result: list[dict[str, Any]] = await response.json()
    return result


def text_of(utterances: list[dict[str, Any]], channel: int | None = None) -> str:
    return " ".join(
        u["results"][0]["normalized_text"]
        for u in utterances
        if channel is None or u["channel"] == channel
    )


def encoded(samples: np.ndarray, rate: int, format: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=format, subtype=subtype)
    return buffer.getvalue()


# -- pure parts ---------------------------------------------------------------------------
def test_options_defaults_and_durations() -> None:
    options = parse_options(
        {
            "language": "en-US",
            "audio_encoding": "mulaw",
            "max_speech_timeout": "5s",
            "no_speech_timeout": "700ms",
            "hints": {"words": ["карту"], "eou_timeout": 1.5},
            "speaker_separation_options": {"enable": True},
        }
    )
    assert options.language == "en"
    assert options.audio_encoding == "MULAW"
    assert options.sample_rate == 8000
    assert (options.max_speech_timeout_ms, options.no_speech_timeout_ms) == (5000, 700)
    assert options.eou_timeout_ms == 1500
    assert options.words == ("карту",) and options.separate_speakers
    for bad in (
        {"language": "russian!"},
        {"audio_encoding": "AAC"},
        {"channels_count": 0},
        {"sample_rate": "fast"},
        {"max_speech_timeout": "soon"},
        {"enable_profanity_filter": "yes"},
        {"hints": {"words": "one"}},
    ):
        with pytest.raises(BadRequest):
            parse_options(bad)


def test_profanity_mask_and_plain_text() -> None:
    assert mask_profanity("Ну, блять, опять!", ("блят",)) == "Ну, *****, опять!"
    assert mask_profanity("What the Fuck.", ("fuck",)) == "What the ****."
    assert plain_text("Какая погода в Нью-Йорке?") == "какая погода в нью-йорке"


@pytest.mark.parametrize(
    ("encoding", "format", "subtype"),
    [
        ("FLAC", "FLAC", "PCM_16"),
        ("OPUS", "OGG", "OPUS"),
        ("MP3", "MP3", "MPEG_LAYER_III"),
        ("ALAW", "RAW", "ALAW"),
        ("MULAW", "RAW", "ULAW"),
    ],
)
def test_decode_each_encoding(encoding: str, format: str, subtype: str) -> None:
    stereo, rate = sf.read(STEREO, dtype="float32", always_2d=True)
    data = encoded(stereo, rate, format, subtype)
    tracks = decode_channels(data, AudioFormat(encoding, 16000, 2, split=True), LIMITS)
    assert len(tracks) == 2
    for channel, track in enumerate(tracks):
        reference = stereo[:, channel]
        n = min(track.size, reference.size)
        assert abs(track.size - reference.size) < 0.1 * SAMPLE_RATE
        if encoding in ("ALAW", "MULAW", "FLAC"):  # sample-exact codecs: compare directly
            assert np.corrcoef(track[:n], reference[:n])[0, 1] > 0.99
    mono = decode_channels(data, AudioFormat(encoding, 16000, 2, split=False), LIMITS)
    assert len(mono) == 1


@pytest.mark.model
def test_hint_tokens_round_trip(engine: WhisperEngine) -> None:
    tokens = hint_tokens(engine, ["карту", "гуакамоле"])
    assert tokens and engine.decode_text(tokens).strip() == "карту, гуакамоле"


# -- end to end ---------------------------------------------------------------------------


@pytest.mark.model
async def test_raw_pcm_upload_recognized(make_server: ServerFactory, tmp_path: Path) -> None:
    reference = clip("clips/speech_to_phrase_ru/ru_01.wav")
    client = await make_server(files=files_section(tmp_path))
    file_id = await upload(client, to_pcm16(load_clip(reference.path)))
    task = await create_task(
        client,
        file_id,
        language="ru-RU",
        audio_encoding="PCM_S16LE",
        sample_rate=16000,
        channels_count=1,
        hints={"words": ["Нью-Йорк"]},
    )
    done = await wait_task(client, task["id"])
    assert done["status"] == "DONE", done
    assert done["id"] == task["id"] and done["created_at"] == task["created_at"]
    utterances = await download(client, done["response_file_id"])
    assert utterances
    first = utterances[0]
    assert {"results", "eou", "channel", "processed_audio_start", "speaker_info"} <= set(first)
    hypothesis = first["results"][0]
    assert {"text", "normalized_text", "start", "end"} <= set(hypothesis)
    assert hypothesis["start"].endswith("s") and float(hypothesis["end"][:-1]) <= 3.2
    assert first["channel"] == 0 and first["eou"] is True
    assert cer(reference.transcript, text_of(utterances)) < 0.2
    assert hypothesis["text"] == plain_text(hypothesis["normalized_text"])


@pytest.mark.model
async def test_hypotheses_count_gives_an_n_best_list(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    reference = clip("clips/speech_to_phrase_ru/ru_05.wav")
    client = await make_server(files=files_section(tmp_path))
    file_id = await upload(client, to_pcm16(load_clip(reference.path)))
    task = await create_task(
        client,
        file_id,
        language="ru-RU",
        audio_encoding="PCM_S16LE",
        sample_rate=16000,
        hypotheses_count=3,
    )
    done = await wait_task(client, task["id"])
    assert done["status"] == "DONE", done
    utterances = await download(client, done["response_file_id"])
    assert len(utterances) == 1
    results = utterances[0]["results"]
    assert 2 <= len(results) <= 3
    texts = [r["normalized_text"] for r in results]
    assert len(set(texts)) == len(texts), texts  # distinct beam hypotheses, best first
    assert cer(reference.transcript, texts[0]) < 0.2, texts


@pytest.mark.model
async def test_two_channels_one_speaker_each(make_server: ServerFactory, tmp_path: Path) -> None:
    client = await make_server(files=files_section(tmp_path))
    stereo, rate = sf.read(STEREO, dtype="int16", always_2d=True)
    assert rate == 16000 and stereo.shape[1] == 2
    file_id = await upload(client, stereo.astype("<i2").tobytes())
    task = await create_task(
        client,
        file_id,
        language="en-US",
        audio_encoding="PCM_S16LE",
        sample_rate=16000,
        channels_count=2,
        speaker_separation_options={"enable": True, "count": 2},
    )
    done = await wait_task(client, task["id"])
    assert done["status"] == "DONE", done
    utterances = await download(client, done["response_file_id"])
    assert {u["channel"] for u in utterances} == {0, 1}
    assert all(u["speaker_info"]["speaker_id"] == u["channel"] for u in utterances)
    for channel, side in ((0, "left"), (1, "right")):
        reference = STEREO.with_name(f"stereo_diarization.{side}.txt").read_text().strip()
        assert cer(reference, text_of(utterances, channel)) < 0.15, text_of(utterances, channel)


@pytest.mark.model
async def test_opus_with_profanity_filter(make_server: ServerFactory, tmp_path: Path) -> None:
    reference = clip("clips/speech_to_phrase_ru/ru_03.wav")
    client = await make_server(files=files_section(tmp_path, profanity_words=["погод"]))
    data = encoded(load_clip(reference.path), SAMPLE_RATE, "OGG", "OPUS")
    file_id = await upload(client, data)
    task = await create_task(
        client, file_id, language="ru-RU", audio_encoding="OPUS", enable_profanity_filter=True
    )
    done = await wait_task(client, task["id"])
    assert done["status"] == "DONE", done
    text = text_of(await download(client, done["response_file_id"]))
    assert "погод" not in text.lower() and "*****" in text, text
    plain = " ".join(
        u["results"][0]["text"] for u in await download(client, done["response_file_id"])
    )
    assert "погод" not in plain and "*****" in plain, plain


@pytest.mark.model
async def test_cancel_only_while_new(make_server: ServerFactory, tmp_path: Path) -> None:
    client = await make_server(files=files_section(tmp_path))
    stereo, _ = sf.read(STEREO, dtype="int16", always_2d=True)
    file_id = await upload(client, stereo.astype("<i2").tobytes())
    options = {"language": "en-US", "channels_count": 2}
    first = await create_task(client, file_id, **options)
    second = await create_task(client, file_id, **options)  # waits: one worker, busy
    response = await client.post("/rest/v1/task:cancel", params={"id": second["id"]}, headers=AUTH)
    body = await response.json()
    assert response.status == 200, body
    assert body == {"status": 200, "result": {**body["result"], "status": "CANCELED"}}
    assert (await wait_task(client, second["id"]))["status"] == "CANCELED"
    done = await wait_task(client, first["id"])
    assert done["status"] == "DONE"
    response = await client.post("/rest/v1/task:cancel", params={"id": first["id"]}, headers=AUTH)
    body = await response.json()
    assert response.status == 400 and body["status"] == 400 and "NEW" in body["message"]
    # The one worker takes tasks in order: once a task made after it is done, the canceled
    # one's turn has passed, and it never ran.
    silence = await upload(client, to_pcm16(np.zeros(SAMPLE_RATE, np.float32)))
    third = await create_task(client, silence)
    assert (await wait_task(client, third["id"]))["status"] == "DONE"
    assert (await wait_task(client, second["id"]))["status"] == "CANCELED"


async def test_undecodable_file_is_an_error_task(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    client = await make_fast_server(files=files_section(tmp_path))
    file_id = await upload(client, b"OggS definitely not opus" * 10)
    task = await create_task(client, file_id, audio_encoding="OPUS")
    done = await wait_task(client, task["id"])
    assert done["status"] == "ERROR" and "cannot decode" in done["error"]
    assert "response_file_id" not in done


async def test_error_codes(make_fast_server: ServerFactory, tmp_path: Path) -> None:
    client = await make_fast_server(files=files_section(tmp_path, max_upload_bytes=64_000))

    async def expect(status: int, method: str, path: str, **kwargs: Any) -> str:
        kwargs.setdefault("headers", AUTH)
        response = await client.request(method, path, **kwargs)
        body = await response.json()
        assert response.status == status, body
        assert set(body) == {"status", "message"} and body["status"] == status, body
        return str(body["message"])

    assert (
        await expect(401, "POST", "/rest/v1/data:upload", data=b"x", headers={}) == "Unauthorized"
    )
    bad = {"Authorization": "Bearer wrong"}
    assert await expect(401, "GET", "/rest/v1/task:get", params={"id": "x"}, headers=bad)
    assert await expect(401, "GET", "/rest/v1/task:get", headers={"Authorization": TOKEN})
    assert await expect(400, "GET", "/rest/v1/task:get") == "Id must not be empty"
    assert await expect(400, "POST", "/rest/v1/task:cancel")
    assert await expect(400, "POST", "/rest/v1/data:upload", data=b"")
    assert await expect(400, "POST", "/rest/v1/speech:async_recognize", data=b"{not json")
    assert await expect(400, "POST", "/rest/v1/speech:async_recognize", json={"options": {}})
    assert await expect(
        400,
        "POST",
        "/rest/v1/speech:async_recognize",
        json={"options": {"audio_encoding": "AAC"}, "request_file_id": "x"},
    )
    assert await expect(400, "GET", "/rest/v1/data:download")
    assert await expect(404, "GET", "/rest/v1/task:get", params={"id": "no-such-task"})
    assert await expect(404, "POST", "/rest/v1/task:cancel", params={"id": "../../etc"})
    assert await expect(
        404, "GET", "/rest/v1/data:download", params={"response_file_id": "nothing"}
    )
    assert await expect(
        404,
        "POST",
        "/rest/v1/speech:async_recognize",
        json={"request_file_id": "2345200-abe8-4f60-90c8-0d43c5f6c0f6"},
    )
    assert await expect(404, "GET", "/rest/v1/no:such")
    message = await expect(413, "POST", "/rest/v1/data:upload", data=b"\0" * 64_001)
    assert message == "Payload too large"


async def test_a_duration_out_of_range_is_400(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    """A duration option that overflows (JSON's 1e999 and Infinity, a digit string past a
    float's range) or is not a number (NaN) is the client's error, not a 500."""
    client = await make_fast_server(files=files_section(tmp_path))
    for value in ("1e999", "-1e999", "Infinity", "NaN", "1" + "0" * 400, '"' + "9" * 400 + 's"'):
        for option in ('"max_speech_timeout"', '"no_speech_timeout"'):
            body = '{"request_file_id": "x", "options": {' + option + ": " + value + "}}"
            response = await client.post(
                "/rest/v1/speech:async_recognize", data=body.encode(), headers=AUTH
            )
            answer = await response.json()
            assert response.status == 400, (option, value, answer)
            assert "timeout" in answer["message"], answer
        hints = '{"request_file_id": "x", "options": {"hints": {"eou_timeout": ' + value + "}}}"
        response = await client.post(
            "/rest/v1/speech:async_recognize", data=hints.encode(), headers=AUTH
        )
        assert response.status == 400, (value, await response.text())


async def test_overlong_hint_words_are_400_and_no_task(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    """Hint words were unbounded in length (only their count was cut to 100): one 1 MB
    "word" was written into the task's record and tokenized on the event loop when the task
    ran (about 1.8 s of every request's time per MB; a 20 MiB body, 36 s). Whisper reads
    only the last 223 prompt tokens anyway. A word over 200 characters is a 400 now, and no
    task is made."""
    client = await make_fast_server(files=files_section(tmp_path))
    file_id = await upload(client, to_pcm16(np.zeros(SAMPLE_RATE, np.float32)))
    for words in (["гуакамоле, " * 5_000], ["карту", "x" * 201]):
        response = await client.post(
            "/rest/v1/speech:async_recognize",
            json={"request_file_id": file_id, "options": {"hints": {"words": words}}},
            headers=AUTH,
        )
        body = await response.json()
        assert response.status == 400, body
        assert "hints.words" in body["message"] and "200 characters" in body["message"], body
    assert JobStore(tmp_path / "file-jobs").jobs("salute") == []
    task = await create_task(client, file_id, hints={"words": ["карту", "x" * 200]})
    assert task["status"] == "NEW"


async def test_queue_full_is_429(make_fast_server: ServerFactory, tmp_path: Path) -> None:
    client = await make_fast_server(files=files_section(tmp_path, max_queued=1))
    file_id = await upload(client, to_pcm16(np.zeros(SAMPLE_RATE, np.float32)))
    statuses = []
    for _ in range(3):
        response = await client.post(
            "/rest/v1/speech:async_recognize", json={"request_file_id": file_id}, headers=AUTH
        )
        body = await response.json()
        statuses.append(response.status)
        if response.status == 429:
            assert body == {"status": 429, "message": "Too Many Requests"}
    assert statuses[0] == 200 and 429 in statuses


async def test_internal_error_is_500(make_fast_server: ServerFactory, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    client = await make_fast_server(files={"dir": str(blocker), "jobs_dir": str(tmp_path / "jobs")})
    response = await client.post("/rest/v1/data:upload", data=b"audio", headers=AUTH)
    assert response.status == 500
    assert await response.json() == {"status": 500, "message": "internal server error"}


async def test_uploads_and_results_expire(make_fast_server: ServerFactory, tmp_path: Path) -> None:
    client = await make_fast_server(files=files_section(tmp_path))
    file_id = await upload(client, to_pcm16(np.zeros(SAMPLE_RATE, np.float32)))
    done = await wait_task(client, (await create_task(client, file_id))["id"])
    assert done["status"] == "DONE" and await download(client, done["response_file_id"]) == []
    service = client.app[SALUTE]
    assert service.sweep(time.time() + 71 * 3600) == 0  # kept for 72 h by default
    assert service.sweep(time.time() + 73 * 3600) == 3  # upload, result, task
    response = await client.get("/rest/v1/task:get", params={"id": done["id"]}, headers=AUTH)
    assert response.status == 404
    response = await client.post(
        "/rest/v1/speech:async_recognize", json={"request_file_id": file_id}, headers=AUTH
    )
    assert response.status == 404


async def test_a_chunked_upload_over_the_limit_is_413_and_leaves_nothing(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    """No Content-Length: the body is streamed to disk and cut off at the limit."""
    client = await make_fast_server(files=files_section(tmp_path, max_upload_bytes=64_000))

    async def body(parts: int) -> Any:
        for _ in range(parts):
            yield b"\0" * 16_000

    response = await client.post("/rest/v1/data:upload", data=body(5), headers=AUTH)
    assert response.status == 413
    assert await response.json() == {"status": 413, "message": "Payload too large"}
    uploads = tmp_path / "files" / "salute" / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())
    file_id = await upload(client, b"".join([b"\0" * 16_000] * 4))  # at the limit: kept
    assert (uploads / file_id).stat().st_size == 64_000
