"""What the viewers cost the server: 16 talkers in one conference, without and with 100
viewers following its event feed (as the captions page does).

Each phase starts a real ``terra serve`` (the real model) on loopback; 16 talkers play real
speech in 2 s fragments at real-time pace into one conference (``benchmarks.live``'s
talkers). In the second phase 100 viewers each load the captions page and its two assets,
then follow ``/conferences/{id}/events`` for the rest of the run. Measured per phase: the
server process's CPU (user+system over wall time; 200 % is both cores) and RSS (peak and at
the end, psutil), the POST round trip at the talkers (p50/p95: is ingest slowed?), and what
the viewers received (events, bytes, reconnects).

The viewers run in this process, so their own parsing competes with the server for the
same 2 cores: the server's figures are what it spends, with a busier machine around it.

    python -m benchmarks.viewers [--seconds 40] [--talkers 16] [--viewers 100]

``--feed-only`` measures the feed alone, without the model's noise: a server process whose
recognizer is tests/fakes.py's FakeEngine (never called here) publishes the events of
``--talkers`` synthetic talkers into its hub (each a growing progress line every second and
a final every 5 s, about 100 characters) while 0 or ``--viewers`` viewers follow it; the
server's CPU and RSS are measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks.common import ROOT, free_port, machine, write_results
from benchmarks.live import TOKEN, ClientLog, ServerProcess, make_talkers, run_talker
from terra.stream import TextElem

CONFERENCE = "bench-viewers"


@dataclass
class ViewerStats:
    events: int = 0
    bytes: int = 0
    reconnects: int = 0
    errors: int = 0


@dataclass
class PhaseResult:
    talkers: int
    viewers: int
    seconds: float
    cpu_percent: float
    rss_peak_mb: float
    rss_end_mb: float
    post_p50_s: float
    post_p95_s: float
    post_errors: int
    viewer_events: int  # all viewers together
    viewer_mb: float
    viewer_reconnects: int
    viewer_errors: int


def _q(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def follow(
    session: aiohttp.ClientSession, url: str, stop: asyncio.Event, stats: ViewerStats
) -> None:
    """One viewer: the page and its assets once, then the feed until ``stop``, reconnecting
    with Last-Event-ID as EventSource does."""
    query = {"token": TOKEN}
    for path in (f"/live/{CONFERENCE}", "/assets/live.js", "/assets/live.css"):
        async with session.get(url + path, params=query) as response:
            await response.read()
            if response.status != 200:
                stats.errors += 1
    last_id = ""
    while not stop.is_set():
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            async with session.get(
                f"{url}/conferences/{CONFERENCE}/events", params=query, headers=headers
            ) as response:
                if response.status != 200:
                    stats.errors += 1
                    return
                async for chunk in response.content.iter_any():
                    stats.bytes += len(chunk)
                    stats.events += chunk.count(b"\nevent: ") + chunk.startswith(b"event: ")
                    at = chunk.rfind(b"id: ")
                    if at >= 0:
                        last_id = chunk[at + 4 : chunk.find(b"\n", at)].decode()
                    if stop.is_set():
                        return
        except (aiohttp.ClientError, TimeoutError):
            stats.errors += 1
        if not stop.is_set():
            stats.reconnects += 1


async def conference_live(session: aiohttp.ClientSession, url: str) -> None:
    """Until the operator's list shows the conference (its first fragment was handled)."""
    while True:
        async with session.get(f"{url}/conferences", params={"token": TOKEN}) as response:
            listed = await response.json()
        if any(c["conference_id"] == CONFERENCE for c in listed["conferences"]):
            return
        await asyncio.sleep(0.2)


async def run_phase(talkers: int, viewers: int, seconds: float) -> PhaseResult:
    with tempfile.TemporaryDirectory(prefix="terra-bench-viewers-") as spool:
        server = ServerProcess("terra", Path(spool))
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                await server.wait_ready(session)
                loop = asyncio.get_running_loop()
                started = loop.time() + 0.5
                client = ClientLog()
                post_times, errors = client.post_times, client.errors
                cpu_start = server.cpu_seconds()
                wall_start = time.monotonic()
                talking = [
                    asyncio.ensure_future(
                        run_talker(
                            session,
                            server.url,
                            dataclasses.replace(talker, conference=CONFERENCE),
                            started,
                            client,
                        )
                    )
                    for talker in make_talkers("mixed", talkers, seconds, spread=True)
                ]
                stop = asyncio.Event()
                stats = [ViewerStats() for _ in range(viewers)]
                watching: list[asyncio.Future[None]] = []
                if viewers:
                    await conference_live(session, server.url)
                    watching = [
                        asyncio.ensure_future(follow(session, server.url, stop, s)) for s in stats
                    ]
                rss: list[int] = []
                while not all(t.done() for t in talking):
                    server.sample_rss()
                    rss.append(server.ps.memory_info().rss)
                    await asyncio.wait(talking, timeout=0.5)
                cpu = server.cpu_seconds() - cpu_start
                wall = time.monotonic() - wall_start
                rss_end = server.ps.memory_info().rss
                stop.set()
                for task in watching:
                    task.cancel()
                await asyncio.gather(*watching, return_exceptions=True)
        finally:
            server.stop()
    return PhaseResult(
        talkers=talkers,
        viewers=viewers,
        seconds=round(wall, 1),
        cpu_percent=round(100 * cpu / wall, 1),
        rss_peak_mb=round(server.peak_rss / 2**20, 1),
        rss_end_mb=round(rss_end / 2**20, 1),
        post_p50_s=round(_q(post_times, 0.5), 3),
        post_p95_s=round(_q(post_times, 0.95), 3),
        post_errors=len(errors),
        viewer_events=sum(s.events for s in stats),
        viewer_mb=round(sum(s.bytes for s in stats) / 2**20, 2),
        viewer_reconnects=sum(s.reconnects for s in stats),
        viewer_errors=sum(s.errors for s in stats),
    )


# -- the feed alone ---------------------------------------------------------------------
async def publish_synthetic(hub: Any, talkers: int) -> None:
    """What ``talkers`` people talking without a pause publish: per talker a progress line
    growing by a word every second and a final every 5 s, in one conference."""
    words = "the quick brown fox jumps over the lazy dog again and again".split()
    tick = 0
    started = time.time()
    while True:
        await asyncio.sleep(1.0 / talkers)
        talker = tick % talkers
        second = tick // talkers
        combination = f"t{talker}-{second // 5}"
        text = " ".join(words[: (second % 5 + 1) * 2]) * 2
        status = "final" if second % 5 == 4 else "progress"
        hub.text(
            TextElem(
                timestamp="2026-11-30T09:00:00.000000",
                timestamp_float=started + second,
                duration=1000 * (second % 5 + 1),
                conference_id=CONFERENCE,
                participant_id=f"talker-{talker}",
                text=text,
                id=combination,
                post_ids=(f"post-{tick}",),
                status=status,
            ),
            f"Talker {talker}",
        )
        tick += 1


def serve_synthetic(port: int, talkers: int) -> None:
    """The server of ``--feed-only``: the real app, FakeEngine, synthetic talkers."""
    from aiohttp import web

    from terra import keys
    from terra.app import create_app
    from terra.config import load_config
    from tests.fakes import FakeEngine

    spool = tempfile.mkdtemp(prefix="terra-bench-feed-")
    config = load_config(
        None,
        environ={},
        overrides={"server": {"tokens": [TOKEN], "log_level": "WARNING"}, "spool": {"dir": spool}},
    )
    app = create_app(config, engine=FakeEngine())

    async def talk(app: web.Application) -> Any:
        task = asyncio.ensure_future(publish_synthetic(app[keys.FEED], talkers))
        yield
        task.cancel()

    app.cleanup_ctx.append(talk)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _start_synthetic(port: int, talkers: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.viewers", "--serve-synthetic", str(port)]
        + ["--talkers", str(talkers)],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=10)


async def run_feed_phase(talkers: int, viewers: int, seconds: float) -> PhaseResult:
    port = free_port()
    process = _start_synthetic(port, talkers)
    ps = psutil.Process(process.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            deadline = time.monotonic() + 60
            while True:
                try:
                    await conference_live(session, url)
                    break
                except aiohttp.ClientError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            stop = asyncio.Event()
            stats = [ViewerStats() for _ in range(viewers)]
            watching = [asyncio.ensure_future(follow(session, url, stop, st)) for st in stats]
            times = ps.cpu_times()
            cpu_start = times.user + times.system
            wall_start = time.monotonic()
            rss: list[int] = []
            while time.monotonic() - wall_start < seconds:
                rss.append(ps.memory_info().rss)
                await asyncio.sleep(0.5)
            times = ps.cpu_times()
            cpu = times.user + times.system - cpu_start
            wall = time.monotonic() - wall_start
            stop.set()
            for task in watching:
                task.cancel()
            await asyncio.gather(*watching, return_exceptions=True)
    finally:
        _stop(process)
    return PhaseResult(
        talkers=talkers,
        viewers=viewers,
        seconds=round(wall, 1),
        cpu_percent=round(100 * cpu / wall, 1),
        rss_peak_mb=round(max(rss) / 2**20, 1),
        rss_end_mb=round(rss[-1] / 2**20, 1),
        post_p50_s=float("nan"),
        post_p95_s=float("nan"),
        post_errors=0,
        viewer_events=sum(st.events for st in stats),
        viewer_mb=round(sum(st.bytes for st in stats) / 2**20, 2),
        viewer_reconnects=sum(st.reconnects for st in stats),
        viewer_errors=sum(st.errors for st in stats),
    )


def markdown(report: dict[str, Any]) -> str:
    rows = [
        "| talkers | viewers | server CPU (of 200 %) | RSS peak / end | POST p50 / p95 | "
        "events to viewers | MB sent | reconnects |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["phases"]:
        rows.append(
            f"| {r['talkers']} | {r['viewers']} | {r['cpu_percent']} % | "
            f"{r['rss_peak_mb']} / {r['rss_end_mb']} MB | "
            f"{r['post_p50_s']} / {r['post_p95_s']} s | "
            f"{r['viewer_events']} | {r['viewer_mb']} | {r['viewer_reconnects']} |"
        )
    m = report["machine"]
    where = f"{m['cpu']}, {m['cores']} cores, CTranslate2 {m['ctranslate2']}, {m['date']}"
    return "\n".join(
        [
            "# Viewers' cost: talkers in one conference, without and with feed viewers",
            "",
            f"`python -m benchmarks.viewers --seconds {report['seconds']}"
            f"{' --feed-only' if report['load'] != 'real model' else ''}` on {where};"
            f" load: {report['load']}.",
            "",
            *rows,
            "",
            "Server CPU is the `terra serve` process's user+system time over the phase's wall",
            "time; the viewers (aiohttp clients in the benchmark process) share the same cores.",
            "",
        ]
    )


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    phases = []
    run = run_feed_phase if args.feed_only else run_phase
    for viewers in (0, args.viewers):
        result = await run(args.talkers, viewers, args.seconds)
        print(result, flush=True)
        phases.append(asdict(result))
    return {
        "machine": machine(),
        "seconds": args.seconds,
        "load": "synthetic feed (FakeEngine)" if args.feed_only else "real model",
        "phases": phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--talkers", type=int, default=16)
    parser.add_argument("--viewers", type=int, default=100)
    parser.add_argument("--name", default=None, help="results name (viewers, viewers_feed)")
    parser.add_argument("--feed-only", action="store_true", help="the feed alone, no model")
    parser.add_argument("--serve-synthetic", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_synthetic:
        serve_synthetic(args.serve_synthetic, args.talkers)
        return
    args.name = args.name or ("viewers_feed" if args.feed_only else "viewers")
    report = asyncio.run(main_async(args))
    write_results(args.name, report, markdown(report))


if __name__ == "__main__":
    main()
