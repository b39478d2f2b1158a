"""Hostile-input probe (issue 11): each row's input against a real `terra serve` on loopback.

For each row: the HTTP status (or outcome), the time to the answer, and the server's RSS
(before, peak while the row ran, after), sampled every 20 ms with psutil. Writes
benchmarks/results/hostile.{json,md}. Run it alone on the machine (it loads the model):

    python -m benchmarks.hostile

The probe's server runs with ``server.body_timeout_s: 10`` (default 60) so the trickle row
ends in seconds, and ``jobs.lease_s: 3`` so a job a kill -9 left is taken up in seconds;
every other setting is the default. Rows 4 (connecte data: URI bomb; a job killed -9 at
every start), 5 (1,000 participants, one small fragment each), 10 (webhook receivers that
answer 1.5 GB or never; an unrelated prediction meanwhile; kill -9 with webhooks pending)
and 13 (40 continuous talkers for 60 s with the real model, then the drain; finals
produced against finals delivered) each start a server of their own.

    python -m benchmarks.hostile [--only 4,5,10,13,rest] [--name hostile]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import soundfile as sf
import yaml
from aiohttp import web
from yarl import URL

from benchmarks.common import RESULTS, ROOT, SPEECH, free_port, machine, write_results
from benchmarks.live import Talker, make_talkers
from benchmarks.metrics import metric, parse_metrics
from terra.audio import SAMPLE_RATE, Samples, encode_wav
from terra.config import RecognizerConfig
from terra.files.fetch import FetchError, check_url
from terra.streamclient import load_audio

TOKEN = "probe-token"
CONFERENCE = "hostile"


@dataclass
class Row:
    row: str
    input: str
    outcome: str
    seconds: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    probe: str = "rest"  # the --only group that measures it
    at: str = field(default_factory=lambda: time.strftime("%H:%M UTC", time.gmtime()))


class Server:
    def __init__(self, folder: Path, extra: dict[str, dict[str, Any]] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config: dict[str, dict[str, Any]] = {
            "server": {
                "host": "127.0.0.1",
                "port": self.port,
                "tokens": [TOKEN],
                "log_json": False,
                "body_timeout_s": 10,
            },
            "model": {"models_dir": str(ROOT / "models")},
            "spool": {"dir": str(folder / "spool")},
            "minutes": {"dir": str(folder / "minutes"), "jobs_dir": str(folder / "jobs")},
            "files": {"dir": str(folder / "files"), "jobs_dir": str(folder / "file-jobs")},
            # Short leases, so a job a kill -9 left behind is taken up again in seconds.
            "jobs": {"lease_s": 3, "scan_interval_s": 1},
        }
        for section, values in (extra or {}).items():
            config.setdefault(section, {}).update(values)
        self.config = folder / "config.yaml"
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = folder / "server.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "terra.cli", "serve", "--config", str(self.config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self.ps = psutil.Process(self.process.pid)

    def rss_mb(self) -> float:
        return float(self.ps.memory_info().rss) / 2**20

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"{self.url}/healthz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("the server did not come up")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._log.close()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


async def measure(server: Server, row: str, what: str, probe: Callable[[], Awaitable[str]]) -> Row:
    peak = [server.rss_mb()]
    before = peak[0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            try:
                peak[0] = max(peak[0], server.rss_mb())
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        outcome = await probe()
    except Exception as e:  # a probe that breaks is a result too
        outcome = f"probe error: {type(e).__name__}: {e}"
    seconds = time.monotonic() - started
    stop.set()
    sampler.join()
    result = Row(
        row, what, outcome, round(seconds, 3), round(before), round(peak[0]), round(server.rss_mb())
    )
    print(f"{row:>4} {what[:60]:60} {outcome[:70]:70} {seconds:7.2f}s {peak[0]:6.0f} MB")
    return result


# -- inputs ----------------------------------------------------------------------------------
def wav_header(rate: int, channels: int, data_bytes: int) -> bytes:
    block = channels * 2
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def flac_silence(hours: float) -> bytes:
    path = Path(tempfile.gettempdir()) / f"terra-probe-silence-{hours}h.flac"
    if not path.exists():
        block = np.zeros(8000 * 60, np.int16)
        with sf.SoundFile(path, "w", 8000, 1, format="FLAC", subtype="PCM_16") as f:
            for _ in range(int(hours * 60)):
                f.write(block)
    return path.read_bytes()


def params(**extra: str) -> dict[str, str]:
    base = {
        "token": TOKEN,
        "conference_id": CONFERENCE,
        "participant_id": "p1",
        "participant_name": "Probe",
        "timestamp_float": repr(time.time()),
        "online": "true",
        "offline": "true",
    }
    base.update(extra)
    return base


async def post_process(session: aiohttp.ClientSession, url: str, audio: bytes, **extra: str) -> str:
    form = aiohttp.FormData()
    form.add_field("audiofile", audio, filename="f.wav", content_type="audio/wav")
    async with session.post(f"{url}/process", params=params(**extra), data=form) as r:
        body = await r.text()
        return f"{r.status} {body[:90]}"


async def raw(url: URL, head: bytes, body_chunks: list[bytes], pause_s: float = 0.0) -> str:
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(head)
        for chunk in body_chunks:
            writer.write(chunk)
            await writer.drain()
            if pause_s:
                await asyncio.sleep(pause_s)
        line = await asyncio.wait_for(reader.readline(), 120)
        return line.decode("latin-1").strip()
    except (ConnectionError, TimeoutError) as e:
        return f"{type(e).__name__}"
    finally:
        writer.close()


async def run_rows(server: Server) -> list[Row]:
    url = server.url
    u = URL(url)
    rows: list[Row] = []
    speech = encode_wav(load_audio(SPEECH / "long" / "en_60s.wav")[: 2 * SAMPLE_RATE])
    flac = flac_silence(12)
    async with aiohttp.ClientSession() as s:

        async def rss_row(row: str, what: str, probe: Callable[[], Awaitable[str]]) -> None:
            rows.append(await measure(server, row, what, probe))

        await rss_row("0", "a 2 s speech fragment (baseline)", lambda: post_process(s, url, speech))
        await rss_row(
            "1",
            "29 KB WAV whose header says 1 Hz, /process",
            lambda: post_process(s, url, wav_header(1, 1, 29_000) + bytes(29_000)),
        )
        await rss_row(
            "2",
            f"{len(flac) / 2**20:.2f} MB FLAC of 12 h of silence, /process",
            lambda: post_process(s, url, flac),
        )

        async def salute_mulaw() -> str:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with s.post(
                f"{url}/rest/v1/data:upload", data=bytes(20 * 2**20), headers=auth
            ) as r:
                file_id = (await r.json())["result"]["request_file_id"]
            options = {"audio_encoding": "MULAW", "sample_rate": 1000, "language": "en-US"}
            async with s.post(
                f"{url}/rest/v1/speech:async_recognize",
                json={"request_file_id": file_id, "options": options},
                headers=auth,
            ) as r:
                body = await r.json()
                if r.status != 200:
                    return f"{r.status} {body}"
                task = body["result"]["id"]
            while True:
                async with s.get(f"{url}/rest/v1/task:get", params={"id": task}, headers=auth) as r:
                    result = (await r.json())["result"]
                if result["status"] in ("DONE", "ERROR", "CANCELED"):
                    return f"task {result['status']}: {result.get('error', '')}"
                await asyncio.sleep(0.1)

        await rss_row("3", "20 MiB of mu-law declared at 1000 Hz, SaluteSpeech", salute_mulaw)
        for lang in ("zz", "auto", "jp", "конф"):
            await rss_row(
                "6",
                f"lang1={lang}",
                functools.partial(post_process, s, url, speech, lang1=lang, participant_id="p6"),
            )

        async def control_name() -> str:
            first = await post_process(
                s,
                url,
                speech,
                participant_name="Eve\x07\x1b\n",
                participant_id="p7",
                conference_id="hostile-7",
            )
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                async with s.get(f"{url}/minutes/hostile-7", params={"token": TOKEN}) as r:
                    if r.content_type == "application/xml":
                        return f"POST {first[:3]}; minutes {r.status} XML"
                    body = await r.text()
                    if r.status != 200:
                        return f"POST {first[:3]}; minutes {r.status} {body[:60]}"
                await asyncio.sleep(0.2)
            return f"POST {first[:3]}; minutes still running after 120 s"

        await rss_row("7", "participant_name with control characters, then minutes", control_name)
        for stamp in ("1e308", "100000000000", repr(time.time() + 7 * 86400)):
            await rss_row(
                "8",
                f"timestamp_float={stamp[:14]}",
                functools.partial(
                    post_process, s, url, speech, timestamp_float=stamp, participant_id="p8"
                ),
            )

        async def empty_parts() -> str:
            body = b"--b\r\n\r\n\r\n" * 300_000 + b"--b--\r\n"
            chunks = [
                b"%x\r\n%s\r\n" % (len(body[i : i + 2**16]), body[i : i + 2**16])
                for i in range(0, len(body), 2**16)
            ] + [b"0\r\n\r\n"]
            head = (
                b"POST /process HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
            )
            health = asyncio.create_task(timed_health(s, url))
            line = await raw(u, head, chunks)
            return f"{line}; /healthz meanwhile {await health:.3f} s"

        await rss_row("9", "300,000 empty multipart parts, chunked, no token", empty_parts)

        async def trickle() -> str:
            head = (
                f"POST /process?token={TOKEN} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
            ).encode()
            lines = await asyncio.gather(*(raw(u, head, [b"--b\r\n"]) for _ in range(150)))
            answered = sum(line.startswith("HTTP/1.1 408") for line in lines)
            return f"{answered} of 150 trickling bodies answered 408 ({lines[0]})"

        await rss_row("9", "150 bodies that stop after 5 bytes (body_timeout_s 10)", trickle)

        async def url_forms() -> str:
            refused = 0
            forms = [
                "http://2130706433/",
                "http://127.1/",
                "http://0177.0.0.1/",
                "http://0/",
                "http://0x7f.1/",
            ]
            for form in forms:
                try:
                    check_url(URL(form), ())
                except FetchError:
                    refused += 1
            return f"check_url refused {refused} of {len(forms)} (no server involved)"

        await rss_row("11", "check_url on 2130706433, 127.1, 0177.0.0.1, 0, 0x7f.1", url_forms)
        await rss_row(
            "12",
            "conference_id ending in \\n",
            lambda: post_process(s, url, speech, conference_id="c1\n"),
        )

        async def bad_token() -> str:
            head = b"POST /process?token=%FF%FE HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            first = await raw(u, head, [])
            async with s.post(
                f"{url}/translate_to_any",
                data=b'{"token": "\\ud800", "payload": []}',
                headers={"Content-Type": "application/json"},
            ) as r:
                return f"non-UTF-8 query token: {first}; lone surrogate JSON token: {r.status}"

        await rss_row("12", "a non-UTF-8 token; a lone-surrogate token", bad_token)

        async def deep_json() -> str:
            deep = b"[" * 200_000 + b"]" * 200_000
            statuses = []
            for path in (
                "/translate_to_any",
                "/rest/v1/speech:async_recognize",
                "/api/v1/openai/whisper",
            ):
                async with s.post(
                    f"{url}{path}?token={TOKEN}",
                    data=deep,
                    headers={
                        "Content-Type": "application/json",
                        "Authorization": f"Bearer {TOKEN}",
                    },
                ) as r:
                    statuses.append(str(r.status))
            return "/".join(statuses) + " (translate/salute/connecte)"

        await rss_row("12", "JSON nested 200,000 deep on the three JSON dialects", deep_json)

        async def disconnects() -> str:
            head = (
                f"POST /process?token={TOKEN} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
            ).encode()
            for _ in range(20):
                _, writer = await asyncio.open_connection(u.host, u.port)
                writer.write(
                    head + b'--b\r\nContent-Disposition: form-data; name="audiofile"; '
                    b'filename="a.wav"\r\n\r\n' + bytes(5000)
                )
                await writer.drain()
                writer.close()
                await writer.wait_closed()
            await asyncio.sleep(1.0)  # let the server notice
            errors = server.log_path.read_bytes().count(b"ERROR")
            return f"20 disconnects; ERROR lines in the server log: {errors}"

        await rss_row("12", "20 clients disconnecting mid-upload", disconnects)

        async def metrics() -> str:
            async with s.get(f"{url}/metrics") as r:
                loopback = r.status
            async with s.get(f"{url}/healthz") as r:
                health = r.status
            return f"/metrics from loopback {loopback}; /healthz {health}"

        await rss_row("14", "/metrics and /healthz without a token", metrics)
    return rows


async def timed_health(s: aiohttp.ClientSession, url: str) -> float:
    await asyncio.sleep(0.2)
    started = time.monotonic()
    async with s.get(f"{url}/healthz") as r:
        await r.read()
    return time.monotonic() - started


# -- rows 4, 5, 10 and 13: each on a server of its own ------------------------------------
def data_uri(audio: bytes, kind: str) -> str:
    return f"data:audio/{kind};base64," + base64.b64encode(audio).decode("ascii")


async def predict(
    s: aiohttp.ClientSession, url: str, audio: str, *, webhook: str = "", sync: bool = False
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if webhook:
        headers["Webhook-URL"] = webhook
    if sync:
        headers["Prefer"] = "SYNC"
    async with s.post(
        f"{url}/api/v1/openai/whisper", json={"audio": audio, "language": "en"}, headers=headers
    ) as r:
        return r.status, await r.json()


async def prediction(s: aiohttp.ClientSession, url: str, pid: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with s.get(f"{url}/api/v1/predictions/{pid}", headers=headers) as r:
        body: dict[str, Any] = await r.json()
        return body


async def settled(
    s: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout_s: float = 300.0
) -> dict[str, Any]:
    """Poll a prediction (as a connecte client does) until it has ended, at most timeout_s."""
    async with asyncio.timeout(timeout_s):
        while body["status"] not in ("succeeded", "failed", "canceled"):
            await asyncio.sleep(0.1)
            body = await prediction(s, url, body["id"])
    return body


async def row4(folder: Path) -> list[Row]:
    """The FLAC bomb as a connecte data: URI; then a long job killed -9 at every start."""
    rows: list[Row] = []
    server = Server(folder)
    async with aiohttp.ClientSession() as s:
        try:
            await server.wait_ready()

            async def bomb() -> str:
                status, body = await predict(s, server.url, data_uri(flac_silence(12), "flac"))
                if status != 201:
                    return f"{status} {str(body.get('detail', body))[:90]}"
                body = await settled(s, server.url, body)
                return f"201, then {body['status']}: {str(body['error'])[:80]}"

            rows.append(await measure(server, "4", "12 h FLAC of silence as a data: URI", bomb))
            speech = load_audio(SPEECH / "long" / "en_60s.wav")
            long_wav = encode_wav(np.tile(speech, 10))  # 10 minutes: still running when killed
            status, body = await predict(s, server.url, data_uri(long_wav, "wav"))
            job_id = body["id"]
        finally:
            if server.process.poll() is None:
                server.stop()
        job_file = folder / "file-jobs" / "connecte" / f"{job_id}.json"
        attempts: list[str] = []
        started = time.monotonic()
        rss = 0.0
        for _ in range(6):  # kill -9 as soon as this start has taken the job up, then again
            before = json.loads(job_file.read_text(encoding="utf-8"))["attempts"]
            server = Server(folder)
            await server.wait_ready()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                job = json.loads(job_file.read_text(encoding="utf-8"))
                if job["attempts"] > before or job["status"] in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.05)
            body = await prediction(s, server.url, job_id)
            attempts.append(f"{body['status']}/{job['attempts']}")
            if body["status"] in ("succeeded", "failed", "canceled"):
                rss = server.rss_mb()
                server.stop()
                break
            server.kill()
        outcome = (
            f"status/attempts at each start: {' -> '.join(attempts)}; "
            f"error: {str(body.get('error'))[:80]}"
        )
        print(f"   4 {outcome}")
        rows.append(
            Row(
                "4",
                "a 10 min data: URI job, kill -9 at every start (jobs.max_attempts 3)",
                outcome,
                round(time.monotonic() - started, 3),
                0,
                round(rss),
                round(rss),
            )
        )
    return rows


async def many_participants(folder: Path, count: int = 1000) -> list[Row]:
    """Rows 5 and 13: ``count`` new participants, one small fragment each, then one more."""
    server = Server(folder)
    rng = np.random.default_rng(5)
    quiet = encode_wav((rng.standard_normal(14_500) * 0.001).astype(np.float32))  # 29 KB
    rows: list[Row] = []
    try:
        await server.wait_ready()
        connector = aiohttp.TCPConnector(limit=50)
        async with aiohttp.ClientSession(connector=connector) as s:

            async def one(i: int) -> str:
                return (await post_process(s, server.url, quiet, participant_id=f"n{i}"))[:3]

            async def join() -> str:
                statuses = Counter(await asyncio.gather(*(one(i) for i in range(count))))
                return ", ".join(f"{n} x {status}" for status, n in sorted(statuses.items()))

            rows.append(
                await measure(server, "5", f"{count} participants, one 29 KB fragment each", join)
            )

            async def one_more() -> str:
                query = params(participant_id="n-extra")
                form = aiohttp.FormData()
                form.add_field("audiofile", quiet, filename="f.wav", content_type="audio/wav")
                async with s.post(f"{server.url}/process", params=query, data=form) as r:
                    retry = r.headers.get("Retry-After")
                    first = f"{r.status} Retry-After {retry}"
                async with s.get(f"{server.url}/healthz") as r:
                    health = await r.json()
                return (
                    f"{first}; /healthz {r.status} saturated={health.get('saturated')} "
                    f"participants={health.get('participants')}"
                )

            rows.append(await measure(server, "13", f"participant {count + 1}", one_more))
            before = rows[0].rss_before_mb
            per = (rows[-1].rss_after_mb - before) * 1024 / count
            print(f"   5 RSS per participant: {per:.1f} KB")
    finally:
        server.stop()
    return rows


@dataclass
class TalkLog:
    post_s: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    finals: dict[str, tuple[str, float]] = field(default_factory=dict)  # id: talker, when
    spoken: set[str] = field(default_factory=set)  # ids seen with progress text
    settled_at: list[float] = field(default_factory=list)


async def talk(
    s: aiohttp.ClientSession, url: str, talker: Talker, started: float, log: TalkLog
) -> None:
    """Real-time 2 s fragments of ``talker``, then silence until nothing is in progress."""
    loop = asyncio.get_running_loop()
    chunk = 2 * SAMPLE_RATE
    wall = time.time() - (loop.time() - started)

    async def post(samples: Samples, offset_s: float) -> bool:
        extra = {
            "conference_id": talker.conference,
            "participant_id": talker.participant,
            "lang1": talker.lang,
            "offline": "false",
            "timestamp_float": repr(wall + offset_s),
        }
        form = aiohttp.FormData()
        form.add_field("audiofile", encode_wav(samples), filename="f.wav")
        sent = time.monotonic()
        try:
            async with s.post(f"{url}/process", params=params(**extra), data=form) as r:
                log.statuses[r.status] += 1
                elems = await r.json() if r.status == 200 else []
        except (aiohttp.ClientError, TimeoutError):
            log.statuses[0] += 1  # no answer at all
            return True
        log.post_s.append(time.monotonic() - sent)
        for elem in elems:
            if elem["status"] == "final":
                log.finals.setdefault(elem["id"], (talker.participant, loop.time()))
            elif elem["text"].strip():
                log.spoken.add(elem["id"])
        return any(elem["status"] == "progress" for elem in elems)

    tasks = []
    for offset in range(0, talker.audio.size - chunk + 1, chunk):
        await asyncio.sleep(max(0.0, started + talker.phase_s + offset / SAMPLE_RATE - loop.time()))
        piece = talker.audio[offset : offset + chunk]
        tasks.append(asyncio.create_task(post(piece, offset / SAMPLE_RATE)))
    await asyncio.gather(*tasks)
    offset_s = talker.audio.size / SAMPLE_RATE
    silence = np.zeros(chunk, np.float32)
    for _ in range(150):  # a conference server keeps sending while the talker is connected
        if not await post(silence, offset_s):
            break
        offset_s += 2.0
        await asyncio.sleep(max(0.0, started + talker.phase_s + offset_s - loop.time()))
    log.settled_at.append(loop.time())


async def talkers_row(
    folder: Path, count: int = 40, seconds: float = 60.0, overload_finals_s: float | None = None
) -> dict[str, Any]:
    """Row 13: ``count`` continuous talkers for ``seconds``, then the drain. The server runs
    with ``recognizer.overload_finals_s`` when given (e.g. 1e9: every final a beam final, as
    before the overload degrade), else the default."""
    extra = (
        {}
        if overload_finals_s is None
        else {"recognizer": {"overload_finals_s": overload_finals_s}}
    )
    server = Server(folder, extra)
    talkers = make_talkers("continuous", count, seconds, spread=True)
    log = TalkLog()
    rss: list[float] = []
    try:
        await server.wait_ready()
        rss_start = server.rss_mb()
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                try:
                    rss.append(server.rss_mb())
                except psutil.Error:
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=300)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as s:
            started = loop.time() + 0.5
            # Each second: (when, queue depth, pending finals, audio seconds owed to the
            # finals waiting).
            queue: list[tuple[float, int, int, float]] = []

            async def watch() -> None:
                while True:
                    await asyncio.sleep(1.0)
                    async with s.get(f"{server.url}/healthz") as r:
                        health = await r.json()
                    queue.append(
                        (
                            loop.time(),
                            health["recognizer_queue_depth"],
                            health["pending_finals"],
                            health.get("owed_final_audio_s", 0.0),
                        )
                    )

            watcher = asyncio.create_task(watch())
            await asyncio.gather(*(talk(s, server.url, t, started, log) for t in talkers))
            watcher.cancel()
            load_end = started + seconds
            while True:  # and the server's own backlog
                async with s.get(f"{server.url}/healthz") as r:
                    health = await r.json()
                if not health["recognizer_queue_depth"] and not health["pending_finals"]:
                    break
                await asyncio.sleep(0.2)
            drained = loop.time()
            async with s.get(f"{server.url}/metrics") as r:
                samples = parse_metrics(await r.text())
            produced = int(metric(samples, "terra_finals_total"))
            overloaded = int(metric(samples, "terra_overload_finals_total"))
            unrecognized = int(metric(samples, "terra_unrecognized_finals_total"))
        stop.set()
        sampler.join()
        rss_end = server.rss_mb()
    finally:
        server.stop()
    in_load = Counter(who for who, at in log.finals.values() if at <= load_end)
    # What the load left owed: the first reading at or after its end.
    at_stop = next((q for q in queue if q[0] >= load_end), (load_end, 0, 0, 0.0))
    in_load.update({t.participant: 0 for t in talkers})
    result = {
        "talkers": count,
        "seconds": seconds,
        "posts": sum(log.statuses.values()),
        "statuses": {str(k): v for k, v in sorted(log.statuses.items())},
        "slowest_answer_s": round(max(log.post_s), 3),
        "answer_p95_s": round(float(np.quantile(log.post_s, 0.95)), 3),
        "rss_start_mb": round(rss_start),
        "rss_peak_mb": round(max(rss, default=rss_start)),
        "rss_end_mb": round(rss_end),
        "drain_s": round(drained - load_end, 1),
        "talkers_settled_s": round(max(log.settled_at) - load_end, 1),
        "finals_produced": produced,
        # finals with text: terra_finals_total counts those only, and an empty final is never
        # delivered (a final settled from empty live text leaves no final at all)
        "finals_delivered": len(log.finals),
        "finals_lost": produced - len(log.finals),
        "spoken_never_final": len(log.spoken - set(log.finals)),
        "queue_depth_max": max((q[1] for q in queue), default=0),
        "pending_finals_max": max((q[2] for q in queue), default=0),
        "pending_finals_at_stop": at_stop[2],
        "owed_final_audio_s_at_stop": at_stop[3],
        "overload_finals_s": overload_finals_s,
        "finals_overload_beam": overloaded,
        # finals past recognizer.max_owed_final_s: the live text, no model call
        "finals_unrecognized": unrecognized,
        # finals each talker received while the load ran (the fairness of overload)
        "finals_in_load_min": min(in_load.values(), default=0),
        "finals_in_load_max": max(in_load.values(), default=0),
    }
    print(f"  13 {result}")
    return result


@dataclass
class Receivers:
    """Webhook receivers in this process: one answers 1.5 GB, one never answers (until
    told to), and a small speech file for an unrelated prediction."""

    audio: bytes
    answer_hang: bool = False
    hung: set[str] = field(default_factory=set)
    delivered: set[str] = field(default_factory=set)
    huge_bytes: int = 0
    huge_done: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def until(self, done: Callable[[], bool], timeout_s: float = 120) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not done():
                    self.changed.clear()
                    await self.changed.wait()

    async def huge(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 1536 * 2**20
        await response.prepare(request)
        block = b" " * 2**20
        try:
            for _ in range(1536):
                await response.write(block)
                self.huge_bytes += len(block)
        except (ConnectionError, RuntimeError):
            pass
        self.huge_done = True
        self.changed.set()
        return response

    async def hang(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not self.answer_hang:
            self.hung.add(body["id"])
            self.changed.set()
            await asyncio.sleep(3600)
        self.delivered.add(body["id"])
        self.changed.set()
        return web.Response(text="ok")

    async def wav(self, request: web.Request) -> web.Response:
        return web.Response(body=self.audio, content_type="audio/wav")


async def row10(folder: Path, hooks: int = 100) -> list[Row]:
    receivers = Receivers(encode_wav(load_audio(SPEECH / "long" / "en_60s.wav")[: 3 * SAMPLE_RATE]))
    app = web.Application()
    app.router.add_post("/huge", receivers.huge)
    app.router.add_post("/hang", receivers.hang)
    app.router.add_get("/audio.wav", receivers.wav)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    allow: dict[str, dict[str, Any]] = {
        "files": {"url_allow": ["127.0.0.1"], "max_queued": 2 * hooks},
        # The default leases: a renewal per held lease every 10 s, not every second.
        "jobs": {"lease_s": 30, "scan_interval_s": 10},
    }
    server = Server(folder, allow)
    silence = data_uri(encode_wav(np.zeros(SAMPLE_RATE, np.float32)), "wav")
    rows: list[Row] = []
    try:
        await server.wait_ready()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:

            async def unrelated() -> str:
                status, body = await predict(s, server.url, f"{base}/audio.wav", sync=True)
                return f"{status} {body.get('status')}: {str(body.get('output') or '')[:40]}"

            for when in ("idle, the first", "idle, the second"):
                rows.append(
                    await measure(server, "10", f"an unrelated URL prediction ({when})", unrelated)
                )

            async def huge() -> str:
                _, body = await predict(s, server.url, silence, webhook=f"{base}/huge")
                body = await settled(s, server.url, body)
                await receivers.until(lambda: receivers.huge_done, 60)
                return (
                    f"prediction {body['status']}; receiver wrote {receivers.huge_bytes >> 20} MB"
                )

            rows.append(await measure(server, "10", "a webhook receiver answering 1.5 GB", huge))

            async def slow() -> str:
                created = [
                    await predict(s, server.url, silence, webhook=f"{base}/hang")
                    for _ in range(hooks)
                ]
                await receivers.until(lambda: len(receivers.hung) >= hooks)
                statuses = Counter(status for status, _ in created)
                started = time.monotonic()
                other = await unrelated()
                took = time.monotonic() - started
                return (
                    f"created {dict(statuses)}; {len(receivers.hung)} webhooks hanging; meanwhile "
                    f"an unrelated URL prediction: {other[:24]} in {took:.2f} s"
                )

            rows.append(
                await measure(server, "10", f"{hooks} webhook receivers that never answer", slow)
            )
        server.kill()  # with the webhooks still being tried

        async def resumed() -> str:
            receivers.answer_hang = True
            restarted = Server(folder, allow)
            try:
                await restarted.wait_ready()
                await receivers.until(lambda: len(receivers.delivered) >= hooks)
            finally:
                restarted.stop()
            delivered = len(receivers.delivered)
            return f"after kill -9 and restart: {delivered} of {hooks} webhooks delivered"

        started = time.monotonic()
        outcome = await resumed()
        print(f"  10 {outcome}")
        rows.append(
            Row(
                "10",
                "kill -9 while those webhooks are tried",
                outcome,
                round(time.monotonic() - started, 3),
                0,
                0,
                0,
            )
        )
    finally:
        if server.process.poll() is None:
            server.stop()
        await runner.cleanup()
    return rows


def default_token_row() -> Row:
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERRA_")}
    done = subprocess.run(
        [sys.executable, "-m", "terra.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    outcome = f"exit {done.returncode}: {done.stderr.strip()[:90]}"
    seconds = round(time.monotonic() - started, 3)
    return Row("14", "terra serve --host 0.0.0.0 with the example token", outcome, seconds, 0, 0, 0)


def markdown(rows: list[Row], info: dict[str, Any], talkers: dict[str, Any] | None) -> str:
    lines = [
        "# Hostile-input probe",
        "",
        f"`python -m benchmarks.hostile` against a real `terra serve` on loopback ({info}).",
        "One request (or one burst) per row, in order; rows 4, 5, 10 and 13 each on a server of "
        "their own (`--only 4,5,10,13,rest` re-measures some groups and keeps the others; "
        "`measured` says when). RSS of the server process sampled every 20 ms. The probe's "
        "servers run with `server.body_timeout_s: 10` and `jobs.lease_s: 3` (a job a kill -9 "
        "left is taken up again in seconds); row 10's with `files.url_allow: [127.0.0.1]` "
        "(its receivers are on loopback). The machine was shared with other work unless said "
        "otherwise: times are indicative only.",
        "",
        "| row | input | outcome | time | RSS before / peak / after | measured |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        outcome = r.outcome.replace("|", "\\|").replace("\n", " ")
        what = r.input.replace("|", "\\|")
        lines.append(
            f"| {r.row} | {what} | {outcome} | {r.seconds:.2f} s | "
            f"{r.rss_before_mb:.0f} / {r.rss_peak_mb:.0f} / {r.rss_after_mb:.0f} MB | {r.at} |"
        )
    if talkers:
        t = talkers
        default_overload = f"the default, {RecognizerConfig().overload_finals_s:g} s"
        lines += [
            "",
            f"## Row 13: {t['talkers']} continuous talkers for {t['seconds']:.0f} s "
            f"(measured {t.get('at', '?')})",
            "",
            "Real-time 2 s fragments of the two 60 s recordings (spread clocks, "
            "`benchmarks.live`'s continuous load), then each talker sends silence until its "
            "answer has nothing in progress; drain = from the end of the load until every "
            "talker settled and `/healthz` shows no queue and no pending finals. At load stop: "
            "the first `/healthz` reading after the load's last second (finals waiting or being "
            "decoded, and the audio of those waiting). Finals asked for while the finals "
            "waiting hold `recognizer.overload_finals_s` of audio are decoded greedy "
            f"(overload_finals_s here: {t.get('overload_finals_s') or default_overload}); "
            "past `recognizer.max_owed_final_s` a final is settled from the live text with no "
            "model call. Finals produced / delivered count those with text: an empty final is "
            "never delivered, so a final settled from empty live text leaves no final at all "
            "(fewer finals produced for the same speech is the words missing).",
            "",
            "| POSTs (status) | slowest answer | answer p95 | RSS start / peak / end "
            "| drain | finals produced / delivered / lost | spoken, never final "
            "| queue max / pending finals max | finals per talker during the load (min-max) "
            "| at load stop: pending finals / final audio owed | finals decoded greedy "
            "(overload) / from the live text, no model call (past max_owed_final_s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {t['posts']} ({t['statuses']}) | {t['slowest_answer_s']:.2f} s "
            f"| {t['answer_p95_s']:.2f} s | {t['rss_start_mb']} / {t['rss_peak_mb']} / "
            f"{t['rss_end_mb']} MB | {t['drain_s']:.1f} s | {t['finals_produced']} / "
            f"{t['finals_delivered']} / {t['finals_lost']} | {t['spoken_never_final']} "
            f"| {t.get('queue_depth_max', '?')} / {t.get('pending_finals_max', '?')} "
            f"| {t.get('finals_in_load_min', '?')}-{t.get('finals_in_load_max', '?')} "
            f"| {t.get('pending_finals_at_stop', '?')} / "
            f"{t.get('owed_final_audio_s_at_stop', '?')} s "
            f"| {t.get('finals_overload_beam', '?')} / {t.get('finals_unrecognized', '?')} |",
        ]
    return "\n".join(lines) + "\n"


async def main(only: set[str], name: str, overload_finals_s: float | None = None) -> None:
    rows: list[Row] = []
    talkers: dict[str, Any] | None = None
    probes: list[tuple[str, Callable[[Path], Awaitable[list[Row]]]]] = [
        ("4", row4),
        ("5", many_participants),
        ("10", row10),
    ]
    if only and (RESULTS / f"{name}.json").exists():  # keep what this run does not measure
        kept = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))
        rows = [Row(**{"at": "?", **r}) for r in kept["rows"] if r.get("probe", "rest") not in only]
        talkers = None if "13" in only else kept.get("talkers")
    for group, probe in probes:
        if not only or group in only:
            with tempfile.TemporaryDirectory() as folder:
                for r in await probe(Path(folder)):
                    r.probe = group
                    rows.append(r)
    if not only or "13" in only:
        with tempfile.TemporaryDirectory() as folder:
            talkers = await talkers_row(Path(folder), overload_finals_s=overload_finals_s)
            talkers["at"] = time.strftime("%H:%M UTC", time.gmtime())
    if not only or "rest" in only:
        with tempfile.TemporaryDirectory() as folder:
            server = Server(Path(folder))
            try:
                await server.wait_ready()
                rows += await run_rows(server)
            finally:
                server.stop()
        rows.append(default_token_row())
    rows.sort(key=lambda r: int(r.row))
    info = machine()
    data = {"machine": info, "rows": [asdict(r) for r in rows], "talkers": talkers}
    write_results(name, data, markdown(rows, info, talkers))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--only", default="", help="comma-separated: 4, 5, 10, 13, rest (rows 0-3, 6-14)"
    )
    parser.add_argument("--name", default="hostile", help="results file name")
    parser.add_argument(
        "--overload-finals-s",
        type=float,
        default=None,
        help="row 13's recognizer.overload_finals_s (1e9: no overload degrade); default: config",
    )
    args = parser.parse_args()
    asyncio.run(main(set(filter(None, args.only.split(","))), args.name, args.overload_finals_s))
