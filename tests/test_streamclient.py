"""Tests of the ``terra stream`` client: pure helpers, then loopback runs against a stand-in."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from aiohttp import web
from aiohttp.test_utils import TestServer

from terra.params import parse_filename
from terra.streamclient import (
    ChangeTracker,
    ParticipantSource,
    StreamError,
    StreamSettings,
    add_stream_arguments,
    cut_fragments,
    fragment_filename,
    parse_participant,
    participant_id_for,
    plan_fragments,
    run_stream_command,
    stream_participants,
    stream_settings,
)

CLIP = Path("/work/shared/data/speech/clips/pisets/test_sound_ru.wav")
CONFERENCE = "conf-6bb3f34f"
SESSION_START = 1_719_512_467.5


# --- pure helpers -------------------------------------------------------------------------


def test_fragment_filename_is_the_spec_format() -> None:
    start = datetime(2024, 6, 28, 14, 20, 15, 123456)
    assert (
        fragment_filename("trash6bb3f34f", "58c277ff-9af4", start)
        == "trash6bb3f34f:a-58c277ff-9af4_20240628_14_20_15_123456.wav"
    )
    assert (
        fragment_filename("c", "p", datetime(2024, 1, 2, 3, 4, 5, 6))
        == "c:a-p_20240102_03_04_05_000006.wav"
    )


def test_cut_fragments_keeps_the_last_partial_chunk() -> None:
    samples = np.arange(16_000 * 5 + 123, dtype=np.float32)
    pieces = cut_fragments(samples, 2000)
    assert [p.size for p in pieces] == [32_000, 32_000, 16_123]
    assert np.array_equal(np.concatenate(pieces), samples)


def test_cut_fragments_edge_cases() -> None:
    assert cut_fragments(np.zeros(0, dtype=np.float32), 2000) == []
    assert [p.size for p in cut_fragments(np.zeros(32_000, dtype=np.float32), 2000)] == [32_000]
    with pytest.raises(ValueError):
        cut_fragments(np.zeros(10, dtype=np.float32), 0)


def test_plan_fragments_appends_silence_after_the_audio() -> None:
    samples = np.ones(16_000 + 800, dtype=np.float32)  # 1.05 s
    plan = plan_fragments(samples, 500, 1000)
    assert [f.offset_samples for f in plan] == [0, 8000, 16_000, 16_800, 24_800]
    assert [f.samples.size for f in plan] == [8000, 8000, 800, 8000, 8000]
    assert all(not f.samples.any() for f in plan[3:])


def test_participant_ids() -> None:
    assert participant_id_for("alice_1") == "alice_1"
    assert participant_id_for("Anna Smith").startswith("Anna_Smith-")
    assert participant_id_for("Анна") != participant_id_for("Пётр")
    assert participant_id_for("Анна").isalnum()


def test_parse_participant(tmp_path: Path) -> None:
    audio = tmp_path / "a=b.wav"
    audio.write_bytes(b"")
    assert parse_participant(f"Анна={audio}") == ParticipantSource(
        participant_id_for("Анна"), "Анна", audio
    )
    assert parse_participant(f"p-1:Anna Smith={audio}") == ParticipantSource(
        "p-1", "Anna Smith", audio
    )
    for bad in ("Anna", f"={audio}", f"bad id:Anna={audio}", "Anna=/no/such/file.wav"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_participant(bad)


def test_change_tracker_reports_new_finals_once_and_changed_progress() -> None:
    tracker = ChangeTracker()
    p1 = {"id": "a", "text": " Всем", "status": "progress"}
    assert tracker.update([p1]) == [p1]
    assert tracker.update([dict(p1)]) == []
    final = {"id": "a", "text": " Всем привет.", "status": "final"}
    p2 = {"id": "b", "text": "", "status": "progress"}
    assert tracker.update([final, p2]) == [final, p2]
    assert tracker.update([final, p2]) == []
    assert list(tracker.finals.values()) == [final]


def test_parser_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TERRA_TOKEN", raising=False)
    parser = argparse.ArgumentParser()
    add_stream_arguments(parser)
    args = parser.parse_args(["--conference", "c1", "--participant", f"alice={CLIP}"])
    assert args.json is False
    assert args.participants == [ParticipantSource("alice", "alice", CLIP)]
    assert stream_settings(args) == StreamSettings(
        url="http://127.0.0.1:9001",
        conference_id="c1",
        chunk_ms=2000,
        speed=1.0,
        token="ivcs",
        lang=None,
        offline=True,
        tail_silence_ms=2000,
        settle_fragments=10,
    )
    args = parser.parse_args(
        ["--conference", "c1", "--participant", f"a={CLIP}", "--speed", "max", "--no-offline"]
    )
    assert args.speed == 0.0 and args.offline is False


def test_token_option_then_environment_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_stream_arguments(parser)
    base = ["--conference", "c1", "--participant", f"alice={CLIP}"]
    monkeypatch.setenv("TERRA_TOKEN", "from-env")
    assert stream_settings(parser.parse_args(base)).token == "from-env"
    assert stream_settings(parser.parse_args([*base, "--token", "given"])).token == "given"
    assert stream_settings(parser.parse_args([*base, "--token", ""])).token == "from-env"
    monkeypatch.delenv("TERRA_TOKEN")
    assert stream_settings(parser.parse_args(base)).token == "ivcs"


# --- loopback against a stand-in server ---------------------------------------------------


@dataclass
class Recorded:
    query: dict[str, str]
    token: str
    filename: str
    samples: np.ndarray
    received_at: float


@dataclass
class StandIn:
    """A stand-in for terra's /process: records each request and answers a canned list.

    Per participant: the first fragment gets a progress TextElem; every later one gets the
    same final (id ``<pid>-1``, so the client must deduplicate it) plus a new progress.
    ``status`` other than 200 makes every answer an error with a JSON detail.
    """

    status: int = 200
    requests: list[Recorded] = field(default_factory=list)
    streaming_from: float = 0.0  # time.monotonic() just before the client started

    async def process(self, request: web.Request) -> web.Response:
        form = await request.post()
        audio = form["audiofile"]
        assert isinstance(audio, web.FileField)
        samples, rate = sf.read(io.BytesIO(audio.file.read()), dtype="float32")
        assert rate == 16_000
        query = dict(request.query)
        self.requests.append(
            Recorded(query, str(form["token"]), audio.filename, samples, time.monotonic())
        )
        if self.status != 200:
            return web.json_response({"detail": "invalid token"}, status=self.status)
        return web.json_response(self.answer(query))

    def answer(self, query: dict[str, str]) -> list[dict[str, Any]]:
        pid = query["participant_id"]
        seen = [r for r in self.requests if r.query["participant_id"] == pid]
        first = seen[0].query
        progress = self.elem(query, f"{pid}-{len(seen)}", f" часть {len(seen)}", "progress")
        if len(seen) == 1:
            return [progress]
        return [self.elem(first, f"{pid}-1", " Всем привет.", "final", 2000), progress]

    @staticmethod
    def elem(
        query: dict[str, str], elem_id: str, text: str, status: str, duration: int = 800
    ) -> dict[str, Any]:
        return {
            "timestamp": "2024-06-27T21:21:07.782414",
            "timestamp_float": float(query["timestamp_float"]),
            "duration": duration,
            "conference_id": query["conference_id"],
            "participant_id": query["participant_id"],
            "text": text,
            "id": elem_id,
            "post_ids": [query["post_id"]],
            "status": status,
        }

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/process", self.process)
        return app


PARTICIPANTS = [
    ParticipantSource("alice", "Alice", CLIP),
    ParticipantSource("bob-2", "Боб", CLIP),
]


async def _stream(stand_in: StandIn, **options: Any) -> tuple[Any, list[tuple[str, list[Any]]]]:
    changes: list[tuple[str, list[Any]]] = []
    fields: dict[str, Any] = {
        "chunk_ms": 800,
        "speed": 0.0,
        "token": "secret",
        "lang": "ru",
        "offline": False,
        "tail_silence_ms": 1600,
        "settle_fragments": 0,  # the stand-in always answers with progress
    }
    on_error = options.pop("on_error", None)
    fields.update(options)
    async with TestServer(stand_in.app(), host="127.0.0.1") as server:
        settings = StreamSettings(
            url=str(server.make_url("/")).rstrip("/"), conference_id=CONFERENCE, **fields
        )
        stand_in.streaming_from = time.monotonic()
        finals = await stream_participants(
            settings,
            PARTICIPANTS,
            on_elems=lambda pid, elems: changes.append((pid, elems)),
            on_error=on_error,
            session_start=SESSION_START,
        )
    return finals, changes


def test_stream_participants_loopback() -> None:
    stand_in = StandIn()
    finals, changes = asyncio.run(_stream(stand_in))
    clip, _ = sf.read(CLIP, dtype="float32")
    audio_fragments = -(-clip.size // 12_800)  # 3.234 s in 0.8 s chunks: 4 full + 1 partial
    tail_fragments = 2
    assert audio_fragments == 5

    for participant in PARTICIPANTS:
        pid = participant.participant_id
        sent = [r for r in stand_in.requests if r.query["participant_id"] == pid]
        assert len(sent) == audio_fragments + tail_fragments
        for recorded in sent:
            assert recorded.token == "secret"
            assert recorded.query["conference_id"] == CONFERENCE
            assert recorded.query["participant_name"] == participant.name
            assert recorded.query["lang1"] == "ru"
            assert recorded.query["online"] == "true"
            assert recorded.query["offline"] == "false"
            info = parse_filename(recorded.filename)
            assert info is not None, recorded.filename
            assert (info.conference_id, info.participant_id) == (CONFERENCE, pid)
            stamp = float(recorded.query["timestamp_float"])
            assert abs(info.local_time.timestamp() - stamp) < 1e-5
        post_ids = [r.query["post_id"] for r in sent]
        assert len(set(post_ids)) == len(post_ids)
        assert all(uuid.UUID(post_id).version == 4 for post_id in post_ids)

        # In order, timestamps step by chunk_ms, and the samples are the file's, then silence.
        stamps = [float(r.query["timestamp_float"]) for r in sent]
        assert stamps[0] == pytest.approx(SESSION_START, abs=1e-6)
        assert np.diff(stamps[:audio_fragments]) == pytest.approx(0.8, abs=1e-6)
        assert stamps[audio_fragments] == pytest.approx(SESSION_START + clip.size / 16_000)
        assert stamps[-1] - stamps[audio_fragments] == pytest.approx(0.8)
        received = np.concatenate([r.samples for r in sent[:audio_fragments]])
        assert received.size == clip.size
        assert np.abs(received - clip).max() < 1e-3
        assert [r.samples.size for r in sent[audio_fragments:]] == [12_800, 12_800]
        assert all(not r.samples.any() for r in sent[audio_fragments:])

        # The final came back with six answers; it is returned and reported once.
        assert [(e["id"], e["status"]) for e in finals[pid]] == [(f"{pid}-1", "final")]
        assert finals[pid][0]["timestamp_float"] == pytest.approx(SESSION_START)
        reported = [e for p, elems in changes if p == pid for e in elems]
        assert [e["id"] for e in reported if e["status"] == "final"] == [f"{pid}-1"]
        assert len([e for e in reported if e["status"] == "progress"]) == len(sent)
    assert set(finals) == {"alice", "bob-2"}


def test_stream_participants_paces_at_speed() -> None:
    stand_in = StandIn()
    asyncio.run(_stream(stand_in, speed=20.0, tail_silence_ms=0))
    sent = [r for r in stand_in.requests if r.query["participant_id"] == "alice"]
    assert len(sent) == 5
    # Fragment k is sent no earlier than the session start + k * 0.8 s / 20. The session
    # starts after streaming_from, so a late first fragment (a loaded machine) cannot fail
    # this; a client that ignored the speed would send all five within milliseconds.
    for k, recorded in enumerate(sent):
        assert recorded.received_at - stand_in.streaming_from >= k * 0.04


def test_stream_participants_stops_on_error_answers() -> None:
    stand_in = StandIn(status=401)
    errors: list[tuple[str, str]] = []
    with pytest.raises(StreamError) as caught:
        asyncio.run(_stream(stand_in, on_error=lambda pid, m: errors.append((pid, m))))
    assert caught.value.failures == {
        "alice": "HTTP 401: invalid token",
        "bob-2": "HTTP 401: invalid token",
    }
    assert sorted(errors) == sorted(caught.value.failures.items())
    assert caught.value.finals == {"alice": [], "bob-2": []}
    assert len(stand_in.requests) == 2  # one each, then the participant stopped


def test_run_stream_command_prints_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    stand_in = StandIn()

    async def serve_and_run() -> int:
        async with TestServer(stand_in.app(), host="127.0.0.1") as server:
            parser = argparse.ArgumentParser()
            add_stream_arguments(parser)
            args = parser.parse_args(
                [
                    "--url", str(server.make_url("/")),
                    "--conference", CONFERENCE,
                    "--participant", f"Alice={CLIP}",
                    "--speed", "max",
                    "--chunk-ms", "1600",
                    "--tail-silence-ms", "0",
                    "--settle-fragments", "0",
                    "--token", "secret",
                    "--json",
                ]
            )  # fmt: skip
            return await asyncio.to_thread(run_stream_command, args)

    assert asyncio.run(serve_and_run()) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["status"], e["text"]) for e in lines] == [
        ("progress", " часть 1"),
        ("final", " Всем привет."),
        ("progress", " часть 2"),
        ("progress", " часть 3"),
    ]
    assert {r.token for r in stand_in.requests} == {"secret"}


class SettlingStandIn(StandIn):
    """A stand-in whose last final settles only after the sound stops: while audio arrives it
    answers progress, on silence it answers the final alone."""

    def answer(self, query: dict[str, str]) -> list[dict[str, Any]]:
        pid = query["participant_id"]
        seen = [r for r in self.requests if r.query["participant_id"] == pid]
        silent_in_a_row = 0
        for recorded in reversed(seen):
            if recorded.samples.any():
                break
            silent_in_a_row += 1
        if silent_in_a_row >= 3:
            return [self.elem(seen[0].query, f"{pid}-1", " Всем привет.", "final", 2000)]
        return [self.elem(query, f"{pid}-p", " Всем", "progress")]


def test_client_keeps_sending_silence_until_the_text_settles() -> None:
    stand_in = SettlingStandIn()
    finals, _ = asyncio.run(_stream(stand_in, settle_fragments=10))
    for participant in PARTICIPANTS:
        sent = [
            r for r in stand_in.requests if r.query["participant_id"] == participant.participant_id
        ]
        assert [e["text"] for e in finals[participant.participant_id]] == [" Всем привет."]
        # One tail fragment (1600 ms at 2000 ms chunks), then two more until the final came.
        assert sum(1 for r in sent if not r.samples.any()) == 3
