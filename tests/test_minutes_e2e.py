"""GET /minutes end to end: the real server, the real `base` model, real meeting speech.

The Russian planerka (3 participants, 98 s) is spooled through POST /process and walked
404 -> queueplacing -> running -> XML; the English stand-up is compiled by a `terra serve`
process killed with SIGKILL mid-compile and started again; `terra minutes` compiles two
people talking at once from disk."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
import yaml
from lxml import etree

from terra.audio import SAMPLE_RATE, Samples, encode_wav, samples_to_ms
from terra.cli import main as terra_main
from terra.jobs import JobStatus, JobStore
from terra.minutes.formats import validate_xml
from terra.recognizer.engine import WhisperEngine
from terra.recognizer.options import DecodeOptions
from terra.recognizer.types import Priority, RecognitionRequest
from terra.spool import Spool

from .conftest import ROOT, SPEECH, TOKEN, ServerFactory, cer, load_clip, post_fragment

pytestmark = pytest.mark.model

T0 = 1_719_512_467.0
PLANERKA = SPEECH / "meetings" / "planerka_ru"
STANDUP = SPEECH / "meetings" / "standup_en"
NAMES = {"anna": "Анна", "boris": "Борис", "viktor": "Виктор"}

# Measured (base int8, 2 cores; `python -m benchmarks.minutes`): planerka CER 0.05 overall,
# per participant 0.03 / 0.04 / 0.11; stand-up 0.08 overall, 0.02 / 0.07 / 0.18. Bounds with
# margin for batch-to-batch numeric noise.
MEETING_CER_BOUND = 0.12
PARTICIPANT_CER_BOUND = 0.25
# Phrases are timed by their words: a turn's first phrase starts this close to the turn.
START_TOLERANCE_S = 1.0
PHRASE_PAUSE_S = 1.0  # minutes.phrase_pause_ms


def turns(meeting: Path) -> list[dict[str, Any]]:
    with open(meeting / "turns.tsv", encoding="utf-8") as f:
        return [
            {**row, "start_s": float(row["start_s"]), "end_s": float(row["end_s"])}
            for row in csv.DictReader(f, delimiter="\t")
        ]


def check_against_turns(phrases: list[etree._Element], meeting: Path) -> None:
    """Text close to the reference per participant and overall; every turn found in time."""
    reference = turns(meeting)
    speakers = sorted({t["speaker"] for t in reference})
    for speaker in speakers:
        ref = " ".join(t["text"] for t in reference if t["speaker"] == speaker)
        hyp = " ".join(p.text or "" for p in phrases if p.get("participant_id") == speaker)
        assert cer(ref, hyp) <= PARTICIPANT_CER_BOUND, (speaker, hyp)
    all_ref = " ".join(t["text"] for t in reference)
    assert cer(all_ref, " ".join(p.text or "" for p in phrases)) <= MEETING_CER_BOUND
    for previous, turn in zip([None, *reference], reference):
        mine = [
            float(p.get("start_s"))
            for p in phrases
            if p.get("participant_id") == turn["speaker"]
            and float(p.get("start_s")) < turn["end_s"]
            and float(p.get("end_s")) > turn["start_s"]
        ]
        assert mine, f"no phrase for {turn}"
        if (
            previous is not None
            and previous["speaker"] == turn["speaker"]
            and turn["start_s"] - previous["end_s"] < PHRASE_PAUSE_S
        ):
            continue  # a pause shorter than a phrase pause may join the two turns in a phrase
        assert abs(min(mine) - turn["start_s"]) <= START_TOLERANCE_S, (turn, mine)


def check_xml(body: bytes, meeting: Path, names: dict[str, str]) -> list[etree._Element]:
    assert validate_xml(body) == []
    root = etree.fromstring(body)
    participants = {p.get("id"): p.get("name") for p in root.iterfind("participants/participant")}
    assert participants == names
    phrases = root.findall("phrases/phrase")
    assert phrases
    starts = [float(p.get("start_s")) for p in phrases]
    assert starts == sorted(starts), "phrases in time order"
    for phrase in phrases:
        assert phrase.get("speaker") == names[phrase.get("participant_id")]
        assert float(phrase.get("start_float")) == pytest.approx(
            T0 + float(phrase.get("start_s")), abs=0.002
        )
    check_against_turns(phrases, meeting)
    return list(phrases)


def load_tracks(meeting: Path) -> dict[str, Samples]:
    return {p.stem: load_clip(p) for p in sorted(meeting.glob("*.flac")) if p.stem != "mix"}


async def spool_meeting(client: Any, meeting: Path, conference: str, lang: str) -> None:
    """POST every participant's track in 2 s fragments, in time order, offline only."""
    tracks = load_tracks(meeting)
    step = 2 * SAMPLE_RATE
    for offset in range(0, max(t.size for t in tracks.values()), step):
        for participant, samples in tracks.items():
            if offset >= samples.size:
                continue
            status, body = await post_fragment(
                client,
                samples[offset : offset + step],
                conference_id=conference,
                participant_id=participant,
                participant_name=NAMES.get(participant, participant.title()),
                start_time=T0 + offset / SAMPLE_RATE,
                online=False,
                offline=True,
                lang=lang,
            )
            assert status == 200 and body == [], body


async def get_minutes(client: Any, conference: str, **params: str) -> aiohttp.ClientResponse:
    response: aiohttp.ClientResponse = await client.get(
        f"/minutes/{conference}", params={"token": TOKEN, **params}
    )
    return response


async def test_minutes_walk_from_404_to_the_protocol(make_server: ServerFactory) -> None:
    client = await make_server(spool={"fsync": False})
    conference = "planerka-6bb3f34f"

    response = await get_minutes(client, conference)
    assert response.status == 404
    assert await response.json() == {"detail": "Conference minutes status file not found"}

    await spool_meeting(client, PLANERKA, conference, "ru")
    response = await get_minutes(client, conference)
    assert response.status == 200
    assert "Задача формирования" in await response.text()  # Cyrillic as it is
    assert await response.json() == {
        "status": "queueplacing",
        "message_en": "Compiling task of minutes has been placed to the Queue",
        "message_ru": "Задача формирования протокола поставлена в очередь",
    }
    queued_at = time.time()

    progress: list[float] = []
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, "the compile did not finish"
        response = await get_minutes(client, conference)
        assert response.status == 200
        if response.content_type != "application/json":
            break
        body = await response.json()
        assert body["status"] == "running"
        assert body["message_en"] == "Task of compiling of minutes is still under way"
        assert body["message_ru"] == "Идет процесс формирования протокола"
        assert isinstance(body["timestamp"], float)
        assert body["timestamp"] == pytest.approx(queued_at, abs=5)
        assert 0.0 <= body["progress"] <= 1.0
        progress.append(body["progress"])
        await asyncio.sleep(0.5)
    assert progress, "a running answer was seen"
    assert progress == sorted(progress)

    assert response.headers["Content-Type"] == "application/xml; charset=utf-8"
    xml = await response.read()
    phrases = check_xml(xml, PLANERKA, NAMES)
    assert "Доброе утро".encode() in xml

    # Asked again, the same protocol: no second compile.
    again = await get_minutes(client, conference)
    assert again.headers["Content-Type"] == "application/xml; charset=utf-8"
    assert await again.read() == xml

    # The same minutes in the other formats.
    formats = {}
    for fmt, content_type in (
        ("json", "application/json"),
        ("srt", "application/x-subrip"),
        ("vtt", "text/vtt"),
        ("md", "text/markdown"),
    ):
        response = await get_minutes(client, conference, format=fmt)
        assert response.status == 200
        assert response.headers["Content-Type"] == f"{content_type}; charset=utf-8"
        formats[fmt] = await response.text()
    document = json.loads(formats["json"])
    assert [p["text"] for p in document["phrases"]] == [p.text for p in phrases]
    assert formats["srt"].count(" --> ") == len(phrases)
    assert formats["vtt"].startswith("WEBVTT") and "<v Борис>" in formats["vtt"]
    assert "Анна: " in formats["srt"] and "Виктор:** " in formats["md"]

    # New audio after the compile: the next call queues a fresh one.
    status, _ = await post_fragment(
        client,
        load_clip(PLANERKA / "anna.flac")[: 2 * SAMPLE_RATE],
        conference_id=conference,
        participant_id="anna",
        participant_name="Анна",
        start_time=T0 + 200.0,
        online=False,
    )
    assert status == 200
    assert (await (await get_minutes(client, conference)).json())["status"] == "queueplacing"
    assert (await (await get_minutes(client, conference)).json())["status"] == "running"


async def test_minutes_refuses_bad_requests(make_server: ServerFactory) -> None:
    client = await make_server()
    # Encoded slashes reach the handler as part of the id; a bare ".." never does (clients
    # normalise it away).
    for conference in ("a.b", "имя", "a%2Fb", "..%2F..%2Fetc", "a%2F..%2Fb", "x" * 129):
        response = await client.get(f"/minutes/{conference}", params={"token": TOKEN})
        assert response.status == 400, conference
        assert "conference_id must match" in (await response.json())["detail"]
    response = await client.get("/minutes/conf-1")
    assert response.status == 401
    response = await client.get("/minutes/conf-1", params={"token": "wrong"})
    assert response.status == 401
    response = await client.get("/minutes/conf-1", params={"token": TOKEN, "format": "pdf"})
    assert response.status == 400 and "format" in (await response.json())["detail"]


# -- kill and restart ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spool_directly(spool: Spool, meeting: Path, conference: str, lang: str | None) -> None:
    for participant, samples in load_tracks(meeting).items():
        write_track(spool, conference, participant, participant.title(), samples, T0, lang)


def write_track(
    spool: Spool,
    conference: str,
    participant: str,
    name: str,
    samples: Samples,
    start: float,
    lang: str | None,
) -> None:
    step = 2 * SAMPLE_RATE
    for i, offset in enumerate(range(0, samples.size, step)):
        piece = samples[offset : offset + step]
        spool.write(
            conference,
            participant,
            name,
            start + offset / SAMPLE_RATE,
            samples_to_ms(piece.size),
            f"{participant}-{i}",
            lang,
            encode_wav(piece),
        )


def write_config(tmp_path: Path, port: int = 9001) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": port, "tokens": [TOKEN], "log_json": False},
        "model": {"name": "base", "models_dir": str(ROOT / "models"), "cpu_threads": 2},
        "spool": {"dir": str(tmp_path / "spool"), "fsync": False},
        "minutes": {"dir": str(tmp_path / "minutes"), "jobs_dir": str(tmp_path / "jobs")},
        # A killed server's lease is taken over after lease_s: short here, to keep it quick.
        "jobs": {"lease_s": 3, "scan_interval_s": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@contextlib.contextmanager
def server_log(folder: Path) -> Iterator[IO[bytes]]:
    """The servers' stderr, kept beside the test's files (read it when a run fails)."""
    with open(folder / "server.log", "ab") as log:
        yield log


def start_server(config: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "terra.cli", "serve", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the server has not stopped within 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert process.poll() is None, "the server exited"
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)  # a child process's start: polled
    raise AssertionError("the server did not come up")


async def test_minutes_survive_sigkill_mid_compile(tmp_path: Path) -> None:
    conference = "standup-kill"
    spool_directly(Spool(tmp_path / "spool", fsync=False), STANDUP, conference, "en")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path, port)
    store = JobStore(tmp_path / "jobs")
    with server_log(tmp_path) as log:
        await kill_and_restart(url, config, store, conference, log)


async def kill_and_restart(
    url: str, config: Path, store: JobStore, conference: str, log: IO[bytes]
) -> None:
    first = start_server(config, log)
    try:
        await wait_healthy(url, first)
        async with aiohttp.ClientSession() as session:
            params = {"token": TOKEN}
            async with session.get(f"{url}/minutes/{conference}", params=params) as response:
                assert (await response.json())["status"] == "queueplacing"
        deadline = time.monotonic() + 60
        while (job := store.get("minutes", conference)) is None or job.status != "running":
            assert time.monotonic() < deadline, "the compile did not start"
            await asyncio.sleep(0.01)
        # Kill it inside the compile: once the server reports some of it done.
        async with aiohttp.ClientSession() as session:
            while True:
                params = {"token": TOKEN}
                async with session.get(f"{url}/minutes/{conference}", params=params) as response:
                    body = await response.json()
                assert body.get("status") == "running", body
                if body["progress"] > 0:
                    break
                assert time.monotonic() < deadline, "the compile made no progress"
                await asyncio.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    killed = store.get("minutes", conference)
    assert killed is not None and killed.status is JobStatus.RUNNING, killed
    assert not (config.parent / "minutes" / f"{conference}.json").exists()

    second = start_server(config, log)
    try:
        await wait_healthy(url, second)
        # Nobody asks again: the restarted server takes the job up by itself.
        deadline = time.monotonic() + 120
        while (job := store.get("minutes", conference)) is None or not job.status.is_terminal():
            assert time.monotonic() < deadline, "the compile did not finish after the restart"
            await asyncio.sleep(0.2)
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert job.attempts == 2 and job.queued_at == killed.queued_at
        async with aiohttp.ClientSession() as session:
            params = {"token": TOKEN}
            async with session.get(f"{url}/minutes/{conference}", params=params) as response:
                assert response.headers["Content-Type"] == "application/xml; charset=utf-8"
                body = await response.read()
        check_xml(body, STANDUP, {"john": "John", "maria": "Maria", "peter": "Peter"})
    finally:
        stop_server(second)


# -- the command line ------------------------------------------------------------------------


def test_cli_compiles_two_people_talking_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    maria = load_clip(STANDUP / "maria.flac")[: 10 * SAMPLE_RATE]  # turns at 0.5 and 5.4 s
    peter = load_clip(STANDUP / "peter.flac")[int(9.5 * SAMPLE_RATE) : 20 * SAMPLE_RATE]
    write_track(spool, "overlap", "maria", "Maria", maria, T0, "en")
    write_track(spool, "overlap", "peter", "Peter", peter, T0 + 1.0, None)  # 1.3 and 6.5 s
    out = tmp_path / "minutes.json"
    code = terra_main(
        [
            "minutes",
            "overlap",
            "--spool",
            str(tmp_path / "spool"),
            "--format",
            "json",
            "--output",
            str(out),
            "--config",
            str(write_config(tmp_path)),
        ]
    )
    assert code == 0
    stderr = capsys.readouterr().err
    assert "minutes overlap: 100%" in stderr and "phrases of 2 participant(s)" in stderr
    document = json.loads(out.read_text(encoding="utf-8"))
    phrases = document["phrases"]
    by = {pid: [p for p in phrases if p["participant_id"] == pid] for pid in ("maria", "peter")}
    assert all(p["language"] == "en" for p in phrases)  # Peter's detected: no lang1 given
    assert any(
        a["start_s"] < b["end_s"] and b["start_s"] < a["end_s"]
        for a in by["maria"]
        for b in by["peter"]
    ), "two people talking at once stay two overlapping phrases"
    reference = turns(STANDUP)
    for pid, count in (("maria", 2), ("peter", 2)):
        ref = " ".join([t["text"] for t in reference if t["speaker"] == pid][:count])
        hyp = " ".join(p["text"] for p in by[pid])
        assert cer(ref, hyp) <= PARTICIPANT_CER_BOUND, (pid, hyp)

    assert terra_main(["minutes", "nothing", "--spool", str(tmp_path / "spool")]) == 1
    assert terra_main(["minutes", "../etc", "--spool", str(tmp_path / "spool")]) == 2


# -- the engine's additions the compiler relies on ---------------------------------------------


def test_engine_times_words_and_takes_context_of_any_length(engine: WhisperEngine) -> None:
    """Word timestamps inside a batch that mixes context lengths and a plain live request."""
    anna = load_clip(PLANERKA / "anna.flac")
    first = anna[int(0.3 * SAMPLE_RATE) : int(7.0 * SAMPLE_RATE)]  # "Доброе утро, коллеги..."
    second = anna[int(7.3 * SAMPLE_RATE) : int(13.0 * SAMPLE_RATE)]  # "Первый вопрос..."
    beam = DecodeOptions(beam_size=5)
    timed = DecodeOptions(beam_size=5, word_timestamps=True)
    context = engine.recognize([RecognitionRequest(first, "ru", Priority.FINAL, beam)])[0]
    assert context.tokens and context.segments
    requests = [
        RecognitionRequest(second, "ru", Priority.BACKGROUND, timed, prompt_tokens=context.tokens),
        RecognitionRequest(
            second, "ru", Priority.BACKGROUND, timed, prompt_tokens=context.tokens[:4]
        ),
        RecognitionRequest(first, "ru", Priority.BACKGROUND, timed),
        RecognitionRequest(second, "ru", Priority.FINAL, beam),
    ]
    results = engine.recognize(requests)
    assert len(results) == len(requests)
    reference = turns(PLANERKA)
    for request, result in zip(requests, results):
        expected = reference[0 if request.audio is first else 1]["text"]
        assert cer(expected, result.text) <= PARTICIPANT_CER_BOUND, result.text
        assert result.segments and " ".join(s.text for s in result.segments).split() == (
            result.text.split()
        )
        duration = request.audio.size / SAMPLE_RATE
        words = [w for s in result.segments for w in s.words]
        if not request.options.word_timestamps:
            assert not words
            continue
        assert "".join(w.text for w in words).split() == result.text.split()
        starts = [w.start_s for w in words]
        assert starts == sorted(starts)
        assert all(0 <= w.start_s <= w.end_s <= duration + 0.05 for w in words)
        # speech starts at once in these cuts and ends near their end
        assert words[0].start_s < 1.0 and words[-1].end_s > duration - 1.5
