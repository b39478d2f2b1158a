"""Hostile-input probe (issue 11): each row's input against a real `terra serve` on loopback.

For each row: the HTTP status (or outcome), the time to the answer, and the server's RSS
(before, peak while the row ran, after), sampled every 20 ms with psutil. Writes
benchmarks/results/hostile.{json,md}. Run it alone on the machine (it loads the model):

    python -m benchmarks.hostile

The probe's server runs with ``server.body_timeout_s: 10`` (default 60) so the trickle row
ends in seconds; every other setting is the default.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import soundfile as sf
import yaml
from yarl import URL

from benchmarks.common import ROOT, SPEECH, free_port, machine, write_results
from terra.audio import SAMPLE_RATE, encode_wav
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


class Server:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
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
        }
        self.config = folder / "config.yaml"
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = folder / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
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


def markdown(rows: list[Row], info: dict[str, Any]) -> str:
    lines = [
        "# Hostile-input probe",
        "",
        f"`python -m benchmarks.hostile` against a real `terra serve` on loopback ({info}).",
        "One request (or one burst) per row, in order, on one server; RSS sampled every 20 ms.",
        "The machine was shared with other work while this ran: times are indicative only.",
        "",
        "| row | input | outcome | time | RSS before / peak / after |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        outcome = r.outcome.replace("|", "\\|").replace("\n", " ")
        what = r.input.replace("|", "\\|")
        lines.append(
            f"| {r.row} | {what} | {outcome} | {r.seconds:.2f} s | "
            f"{r.rss_before_mb:.0f} / {r.rss_peak_mb:.0f} / {r.rss_after_mb:.0f} MB |"
        )
    return "\n".join(lines) + "\n"


async def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        server = Server(Path(folder))
        try:
            await server.wait_ready()
            rows = await run_rows(server)
        finally:
            server.stop()
    rows.append(default_token_row())
    info = machine()
    write_results(
        "hostile", {"machine": info, "rows": [asdict(r) for r in rows]}, markdown(rows, info)
    )


if __name__ == "__main__":
    asyncio.run(main())
