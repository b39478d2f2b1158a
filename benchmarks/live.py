"""Live capacity and latency as the client sees it: terra against the naive baseline, one run.

For each recognizer mode (``terra``; ``naive`` = one ``transcribe()`` of the whole pending
buffer per update, 30 s padded window, no batching), each load shape and each level N, a real
``terra serve`` process is started on loopback and N talkers (or N meetings) play real speech
from ../shared/data/speech/ (looped) in 2 s fragments at real-time pace, for a fixed wall
time. Fragments are sent on schedule whether or not the previous answer came back, as a
conference server does.

Loads (``--load``):
- ``continuous``: N talkers speaking without pause: odd talkers ``long/ru_60s.wav``, even
  ``long/en_60s.wav``, looped, each starting elsewhere in its file;
- ``meetings``: N concurrent three-person meetings (the tracks of ``meetings/planerka_ru``
  and ``meetings/standup_en``, alternately), looped, each meeting copy at its own offset:
  3N participants, about one of each three talking at a time;
- ``mixed``: half the talkers continuous, half single meeting tracks (the old load).
Clocks (``--phases``): ``spread``: each talker's 2 s clock has its own phase, as separate
clients have; ``lockstep``: every fragment of every talker is sent at the same instant (a
conference server cutting all participants on one timer).

The headline, measured at the client: for each fragment, from sending its POST to the first
answer (to that POST or a later one of the same talker) whose TextElem lists its post_id, i.e.
text made from audio that includes it. Fragments no text ever lists (silence, noise, the last
ones of a run) are counted, not timed. Second view, from the server's histograms: progress
latency (arrival to text covering it), final latency (VAD close to final text), POST round
trip, queue depth, batch sizes, CPU and peak RSS (psutil).

Capacity is the largest N whose client-visible p95 is <= 1.5 s with no growing backlog
(queue depth and pending finals at the end no larger than early in the run) and no errors.

``--accuracy N`` (issue 10, target 3): on one more server, the two shared meetings
(``meetings/planerka_ru``, ``meetings/standup_en``, once, real-time, as ``benchmarks.minutes``
streams them) are streamed alone, then inside N continuous talkers; the CER of their finals
against the reference turns is compared (target: at most +1.0 point under load).

    python -m benchmarks.live [--quick] [--load continuous,meetings] [--phases spread,lockstep]
    python -m benchmarks.live --load '' --terra-only --accuracy 16 --name live_accuracy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import yaml

from benchmarks.common import ROOT, SPEECH, free_port, machine, machine_line, write_results
from benchmarks.metrics import histogram_quantile, metric, parse_metrics
from benchmarks.minutes import MEETINGS as SHARED_MEETINGS
from benchmarks.minutes import compare, participants_of, reference_turns, texts_by_speaker
from terra.audio import SAMPLE_RATE, Samples, encode_wav
from terra.streamclient import StreamError, StreamSettings, load_audio, stream_participants

TOKEN = "bench-token"
CONFIG_PATH = ROOT / "config.yaml"  # replaced by a tuned copy with --set
CHUNK_S = 2.0
CAPACITY_P95_S = 1.5
LOADS = ("continuous", "meetings", "mixed")

CONTINUOUS = [("long/ru_60s.wav", "ru"), ("long/en_60s.wav", "en")]
MEETINGS = [
    ("meetings/planerka_ru", ("anna", "boris", "viktor"), "ru"),
    ("meetings/standup_en", ("john", "maria", "peter"), "en"),
]
MIXED = [
    ("long/ru_60s.wav", "ru"),
    ("long/en_60s.wav", "en"),
    ("meetings/planerka_ru/anna.flac", "ru"),
    ("meetings/standup_en/john.flac", "en"),
]


@dataclass
class LevelResult:
    mode: str
    load: str
    phases: str
    talkers: int  # the level: talkers, or meetings for the meetings load
    participants: int
    seconds: float
    fragments_sent: int
    fragments_covered: int  # listed by some answer's TextElem
    client_p50_s: float  # the headline: POST sent -> first answer listing its post_id
    client_p95_s: float
    client_max_s: float
    post_p50_s: float
    post_p95_s: float
    progress_p50_s: float
    progress_p95_s: float
    final_p50_s: float
    final_p95_s: float
    finals: int
    queue_depth_max: float
    queue_depth_end: float
    backlog_growing: bool
    mean_batch_size: float
    mean_batch_s: float  # wall time of one model call
    progress_request_p50_s: float  # a progress request's queue wait plus its model call
    mean_request_audio_s: float  # audio per recognition request
    recognizer_busy: float  # model-call seconds per second (at most recognizer.workers)
    final_share: float  # the finals' share of the model-call seconds (the rest: progress)
    server_cpu_percent: float
    server_peak_rss_mb: float
    errors: int
    ok: bool = False
    queue_samples: list[float] = field(default_factory=list)


# -- the server process --------------------------------------------------------------
class ServerProcess:
    def __init__(self, mode: str, spool: Path) -> None:
        self.port = free_port()
        env = dict(os.environ)  # TERRA_* variables set by the caller pass through (tuning)
        env.update(
            {
                "TERRA_RECOGNIZER_MODE": mode,
                "TERRA_TOKENS": TOKEN,
                "TERRA_SPOOL_DIR": str(spool),
                "TERRA_PORT": str(self.port),
                "TERRA_HOST": "127.0.0.1",
                "TERRA_LOG_LEVEL": os.environ.get("TERRA_LOG_LEVEL", "WARNING"),
            }
        )
        # The server's log, kept for a look at what it did (TERRA_LOG_LEVEL=DEBUG shows every
        # model call); a file, not a pipe nobody reads, which would stall a chatty server.
        self.log_path = Path(os.environ.get("TERRA_BENCH_SERVER_LOG", spool / "server.log"))
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "terra.cli", "serve", "--config", str(CONFIG_PATH)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.ps = psutil.Process(self.process.pid)
        self.peak_rss = 0

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log_path.read_text(encoding="utf-8", errors="replace")
                raise RuntimeError(f"server exited: {log[-2000:]}")
            try:
                async with session.get(f"{self.url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("server did not become ready in 60 s")

    def sample_rss(self) -> None:
        try:
            self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)
        except psutil.Error:
            pass

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


# -- talkers -------------------------------------------------------------------------
@dataclass(frozen=True)
class Talker:
    conference: str
    participant: str
    audio: Samples
    lang: str
    phase_s: float  # its clock's offset inside the 2 s


def _looped(audio: Samples, shift_s: float, seconds: float) -> Samples:
    shift = int(shift_s * SAMPLE_RATE) % audio.size
    audio = np.roll(audio, -shift)
    repeats = int(np.ceil(seconds * SAMPLE_RATE / audio.size)) + 1
    return np.tile(audio, repeats)[: int(seconds * SAMPLE_RATE)]


def make_talkers(load: str, level: int, seconds: float, spread: bool) -> list[Talker]:
    """The participants of one level: ``level`` talkers, or ``level`` meetings of three."""
    talkers: list[Talker] = []
    if load == "meetings":
        for m in range(level):
            folder, names, lang = MEETINGS[m % len(MEETINGS)]
            tracks = [load_audio(SPEECH / folder / f"{n}.flac") for n in names]
            # Each meeting copy starts elsewhere in the meeting (the same shift for its three
            # tracks, which stay in sync): at any moment someone talks in most of them.
            shift_s = (m // len(MEETINGS)) * tracks[0].size / SAMPLE_RATE / max(1, level // 2)
            for name, track in zip(names, tracks):
                talkers.append(
                    Talker(f"meeting-{m}", name, _looped(track, shift_s, seconds), lang, 0.0)
                )
    else:
        files = CONTINUOUS if load == "continuous" else MIXED
        for i in range(level):
            relative, lang = files[i % len(files)]
            audio = _looped(load_audio(SPEECH / relative), i * 7.3 % 20.0, seconds)
            talkers.append(Talker("bench", f"talker-{i}", audio, lang, 0.0))
    count = len(talkers)
    return [
        Talker(t.conference, t.participant, t.audio, t.lang, i * CHUNK_S / count if spread else 0)
        for i, t in enumerate(talkers)
    ]


@dataclass
class ClientLog:
    """What the client saw: POST round trips, and each fragment's wait for covering text."""

    post_times: list[float] = field(default_factory=list)
    covered: list[float] = field(default_factory=list)
    sent: int = 0
    errors: list[str] = field(default_factory=list)


async def run_talker(
    session: aiohttp.ClientSession,
    url: str,
    talker: Talker,
    started: float,
    log: ClientLog,
) -> None:
    audio = talker.audio
    chunk = int(CHUNK_S * SAMPLE_RATE)
    loop = asyncio.get_running_loop()
    wall_start = time.time()
    pending: list[asyncio.Task[None]] = []
    waiting: dict[str, float] = {}  # post_id -> when its POST was sent

    async def post(offset: int) -> None:
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("token", TOKEN)
        form.add_field(
            "audiofile",
            encode_wav(audio[offset : offset + chunk]),
            filename="fragment.wav",
            content_type="audio/wav",
        )
        post_id = str(uuid.uuid4())
        params = {
            "conference_id": talker.conference,
            "participant_id": talker.participant,
            "participant_name": talker.participant,
            "lang1": talker.lang,
            "online": "true",
            "offline": "true",
            "post_id": post_id,
            "timestamp_float": repr(wall_start + offset / SAMPLE_RATE),
        }
        sent = time.monotonic()
        waiting[post_id] = sent
        log.sent += 1
        try:
            async with session.post(f"{url}/process", params=params, data=form) as response:
                body = await response.read()
                if response.status != 200:
                    log.errors.append(f"HTTP {response.status}")
                    return
        except (aiohttp.ClientError, TimeoutError) as e:
            log.errors.append(type(e).__name__)
            return
        now = time.monotonic()
        log.post_times.append(now - sent)
        for elem in json.loads(body):
            for listed in elem["post_ids"]:
                at = waiting.pop(listed, None)
                if at is not None:
                    log.covered.append(now - at)

    for offset in range(0, audio.size - chunk + 1, chunk):
        due = started + talker.phase_s + offset / SAMPLE_RATE
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(post(offset)))
    await asyncio.gather(*pending)


async def run_level(mode: str, load: str, level: int, seconds: float, spread: bool) -> LevelResult:
    talkers = make_talkers(load, level, seconds, spread)
    with tempfile.TemporaryDirectory(prefix="terra-bench-") as spool:
        server = ServerProcess(mode, Path(spool))
        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=0)
        try:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                await server.wait_ready(session)
                cpu_before = server.cpu_seconds()
                loop = asyncio.get_running_loop()
                started = loop.time() + 0.5
                client = ClientLog()
                queue: list[float] = []
                pending_finals: list[float] = []

                async def watch() -> None:
                    while True:
                        await asyncio.sleep(1.0)
                        server.sample_rss()
                        async with session.get(f"{server.url}/healthz") as response:
                            health = await response.json()
                        queue.append(float(health["recognizer_queue_depth"]))
                        pending_finals.append(float(health["pending_finals"]))

                watcher = asyncio.create_task(watch())
                await asyncio.gather(
                    *(run_talker(session, server.url, t, started, client) for t in talkers)
                )
                elapsed = loop.time() - started
                watcher.cancel()
                cpu = server.cpu_seconds() - cpu_before
                async with session.get(f"{server.url}/metrics") as response:
                    samples = parse_metrics(await response.text())
        finally:
            server.stop()
    third = max(1, len(queue) // 3)
    growing = bool(queue) and bool(
        np.mean(queue[-third:]) > np.mean(queue[:third]) + 2
        or np.mean(pending_finals[-third:]) > np.mean(pending_finals[:third]) + 1
    )
    batches = metric(samples, "terra_recognizer_batch_size_count")

    def server_q(name: str, kind: str, q: float, label: str = "kind") -> float:
        return round(histogram_quantile(samples, name, kind, q, label=label), 3)

    result = LevelResult(
        mode=mode,
        load=load,
        phases="spread" if spread else "lockstep",
        talkers=level,
        participants=len(talkers),
        seconds=round(elapsed, 1),
        fragments_sent=client.sent,
        fragments_covered=len(client.covered),
        client_p50_s=_q(client.covered, 0.5),
        client_p95_s=_q(client.covered, 0.95),
        client_max_s=round(max(client.covered, default=float("nan")), 3),
        post_p50_s=_q(client.post_times, 0.5),
        post_p95_s=_q(client.post_times, 0.95),
        progress_p50_s=server_q("terra_text_latency_seconds", "progress", 0.5),
        progress_p95_s=server_q("terra_text_latency_seconds", "progress", 0.95),
        final_p50_s=server_q("terra_text_latency_seconds", "final", 0.5),
        final_p95_s=server_q("terra_text_latency_seconds", "final", 0.95),
        finals=int(metric(samples, "terra_finals_total")),
        queue_depth_max=float(max(queue, default=0.0)),
        queue_depth_end=float(queue[-1]) if queue else 0.0,
        backlog_growing=growing,
        mean_batch_size=round(metric(samples, "terra_recognizer_batch_size_sum") / batches, 2)
        if batches
        else 0.0,
        mean_batch_s=round(metric(samples, "terra_recognizer_batch_seconds_sum") / batches, 3)
        if batches
        else 0.0,
        progress_request_p50_s=server_q(
            "terra_recognizer_latency_seconds", "progress", 0.5, label="priority"
        ),
        mean_request_audio_s=round(
            metric(samples, "terra_recognizer_audio_seconds_total")
            / max(metric(samples, "terra_recognizer_batch_size_sum"), 1),
            2,
        ),
        recognizer_busy=round(
            metric(samples, "terra_recognizer_batch_seconds_sum") / max(elapsed, 1e-9), 2
        ),
        final_share=round(
            metric(samples, "terra_recognizer_model_seconds_total", priority="final")
            / max(metric(samples, "terra_recognizer_batch_seconds_sum"), 1e-9),
            2,
        ),
        server_cpu_percent=round(100 * cpu / max(elapsed, 1e-9), 1),
        server_peak_rss_mb=round(server.peak_rss / 1e6, 1),
        errors=len(client.errors),
        queue_samples=queue,
    )
    result.ok = (
        not growing
        and not client.errors
        and bool(client.covered)
        and result.client_p95_s <= CAPACITY_P95_S
    )
    return result


def _q(values: list[float], q: float) -> float:
    return round(float(np.quantile(values, q)), 3) if values else float("nan")


# -- silence and noise -----------------------------------------------------------------
async def words_from(samples: Samples, label: str) -> int:
    """Words in the finals of 60 s of silence or noise streamed through a terra server."""
    with tempfile.TemporaryDirectory(prefix="terra-bench-") as spool:
        server = ServerProcess("terra", Path(spool))
        try:
            async with aiohttp.ClientSession() as session:
                await server.wait_ready(session)
                words = 0
                base = time.time()  # stamps near the server's clock (farther ones are a 400)
                chunk = int(CHUNK_S * SAMPLE_RATE)
                padded = np.concatenate([samples, np.zeros(4 * chunk, np.float32)])
                for offset in range(0, padded.size, chunk):
                    form = aiohttp.FormData(quote_fields=False)
                    form.add_field("token", TOKEN)
                    form.add_field(
                        "audiofile", encode_wav(padded[offset : offset + chunk]), filename="f.wav"
                    )
                    params = {
                        "conference_id": label,
                        "participant_id": "p",
                        "lang1": "ru",
                        "online": "true",
                        "offline": "false",
                        "timestamp_float": repr(base + offset / SAMPLE_RATE),
                    }
                    async with session.post(
                        f"{server.url}/process", params=params, data=form
                    ) as response:
                        if response.status != 200:
                            raise RuntimeError(f"{label}: HTTP {response.status}")
                        for elem in await response.json():
                            if elem["status"] == "final":
                                words += len(elem["text"].split())
                return words
        finally:
            server.stop()


# -- accuracy under load (issue 10, target 3) -------------------------------------------
async def meeting_cer(url: str, tag: str) -> list[dict[str, Any]]:
    """Stream both shared meetings at real-time pace; CER of their finals against the turns."""

    async def one(meeting: str, lang: str) -> dict[str, Any]:
        try:
            settings = StreamSettings(
                url=url,
                conference_id=f"{tag}-{meeting}",
                chunk_ms=int(CHUNK_S * 1000),
                speed=1.0,
                token=TOKEN,
                lang=lang,
                offline=False,
                tail_silence_ms=4000,
                settle_fragments=30,  # under load a final may come long after the speech
            )
            finals = await stream_participants(
                settings, participants_of(meeting), on_elems=lambda *_: None
            )
            errors = 0
        except StreamError as e:
            finals, errors = e.finals, len(e.failures)
        said = {p: " ".join(str(e["text"]).strip() for e in f) for p, f in finals.items()}
        scores = compare(texts_by_speaker(reference_turns(meeting)), said)
        return {"meeting": meeting, "cer": scores["meeting"]["cer"], "errors": errors}

    return list(await asyncio.gather(*(one(m, lang) for m, lang in SHARED_MEETINGS)))


async def accuracy(level: int) -> dict[str, Any]:
    """The shared meetings alone, then inside ``level`` continuous talkers, on one server."""
    longest = max(load_audio(p.path).size for m, _ in SHARED_MEETINGS for p in participants_of(m))
    talkers = make_talkers("continuous", level, longest / SAMPLE_RATE + 20, spread=True)
    with tempfile.TemporaryDirectory(prefix="terra-bench-") as spool:
        server = ServerProcess("terra", Path(spool))
        timeout = aiohttp.ClientTimeout(total=120)
        try:
            async with aiohttp.ClientSession(
                timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
            ) as session:
                await server.wait_ready(session)
                alone = await meeting_cer(server.url, "alone")
                started = asyncio.get_running_loop().time() + 0.5
                log = ClientLog()
                load = [
                    asyncio.create_task(run_talker(session, server.url, t, started, log))
                    for t in talkers
                ]
                try:
                    await asyncio.sleep(4.5)  # the meetings join a load already running
                    loaded = await meeting_cer(server.url, "loaded")
                    await asyncio.gather(*load)
                finally:  # when anything failed, the talkers stop before the server does
                    for task in load:
                        task.cancel()
                    await asyncio.gather(*load, return_exceptions=True)
        finally:
            server.stop()
    rows = []
    for a, b in zip(alone, loaded, strict=True):
        delta = round(100 * (b["cer"] - a["cer"]), 2)
        rows.append(
            {
                "meeting": a["meeting"],
                "cer_alone": a["cer"],
                "cer_loaded": b["cer"],
                "delta_points": delta,
                "errors": a["errors"] + b["errors"],
                "ok": delta <= 1.0 and not a["errors"] + b["errors"],
            }
        )
    return {
        "talkers": level,
        "load_client_p95_s": _q(log.covered, 0.95),
        "load_errors": len(log.errors),
        "meetings": rows,
    }


# -- the run ---------------------------------------------------------------------------
async def sweep(
    mode: str, load: str, levels: list[int], seconds: float, spread: bool, stop_after: int = 2
) -> list[LevelResult]:
    results: list[LevelResult] = []
    failures = 0
    for level in levels:
        result = await run_level(mode, load, level, seconds, spread)
        results.append(result)
        print(
            f"{mode:6} {load}/{result.phases} N={level:<3} client p50/p95 "
            f"{result.client_p50_s:.2f}/{result.client_p95_s:.2f} s "
            f"({result.fragments_covered}/{result.fragments_sent} listed)  server progress "
            f"p95 {result.progress_p95_s:.2f} s  final p95 {result.final_p95_s:.2f} s  "
            f"queue max {result.queue_depth_max:.0f}  batch {result.mean_batch_size:.1f} "
            f"({result.mean_batch_s:.2f} s, busy {result.recognizer_busy:.2f}, "
            f"{result.mean_request_audio_s:.1f} s audio, finals {result.final_share:.0%})  "
            f"cpu {result.server_cpu_percent:.0f}%  {'ok' if result.ok else 'OVER'}",
            flush=True,
        )
        failures += 0 if result.ok else 1
        if failures >= stop_after:  # past capacity that often: higher levels take longer
            break
    return results


def capacity(results: list[LevelResult]) -> int:
    ok = [r.talkers for r in results if r.ok]
    return max(ok, default=0)


def shapes(results: list[LevelResult]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for r in results:
        if (r.load, r.phases) not in seen:
            seen.append((r.load, r.phases))
    return seen


def plot(results: list[LevelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    colours = iter(["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown"])
    for load, phases in shapes(results):
        for mode in ("terra", "naive"):
            rows = [r for r in results if (r.mode, r.load, r.phases) == (mode, load, phases)]
            if not rows:
                continue
            colour = "tab:red" if mode == "naive" else next(colours)
            n = [r.talkers for r in rows]
            label = f"{mode} {load}/{phases}"
            axis.plot(n, [r.client_p95_s for r in rows], "o-", color=colour, label=f"{label} p95")
            axis.plot(n, [r.client_p50_s for r in rows], "o--", color=colour, alpha=0.5)
    axis.axhline(CAPACITY_P95_S, color="grey", linestyle=":", label="1.5 s target")
    axis.set_xlabel("level (talkers; meetings of three for the meetings load)")
    axis.set_ylabel("client-visible latency, s (p95 solid, p50 dashed)")
    axis.set_yscale("log")
    axis.set_title("POST sent -> first answer listing its post_id (2 s fragments)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Live capacity ({report['name']}, {m['date']})",
        "",
        f"Machine: {machine_line(m)}; model "
        f"{report['model']} int8; {report['seconds_per_level']} s per level; 2 s fragments "
        "at real-time pace.",
        "",
        "Latency is measured **at the client**: from sending a fragment's POST to the first "
        "answer whose TextElem lists its post_id (`client`). `progress`/`final` are the "
        "server's histograms (arrival to covering text; VAD close to final text). Capacity: "
        f"the largest level with client p95 ≤ {CAPACITY_P95_S} s, no growing backlog, no "
        "errors. Levels are talkers, or three-person meetings for the meetings load.",
        "",
        "| load | clocks | terra capacity | naive capacity |",
        "|---|---|---|---|",
    ]
    for row in report["capacity"]:
        naive = "—" if row["naive"] is None else row["naive"]
        lines.append(f"| {row['load']} | {row['phases']} | {row['terra']} | {naive} |")
    lines += [
        "",
        "| mode | load | clocks | N | people | client p50 | client p95 | client max | listed "
        "| progress p95 | final p95 | POST p95 | queue max | batch | audio/req "
        "| finals' share | CPU % | RSS MB | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["levels"]:
        lines.append(
            f"| {r['mode']} | {r['load']} | {r['phases']} | {r['talkers']} "
            f"| {r['participants']} | {r['client_p50_s']:.2f} | {r['client_p95_s']:.2f} "
            f"| {r['client_max_s']:.2f} | {r['fragments_covered']}/{r['fragments_sent']} "
            f"| {r['progress_p95_s']:.2f} | {r['final_p95_s']:.2f} | {r['post_p95_s']:.2f} "
            f"| {r['queue_depth_max']:.0f} | {r['mean_batch_size']:.1f} "
            f"| {r['mean_request_audio_s']:.1f} | {r['final_share']:.0%} "
            f"| {r['server_cpu_percent']:.0f} "
            f"| {r['server_peak_rss_mb']:.0f} | {'yes' if r['ok'] else 'no'} |"
        )
    if report.get("ratios"):
        lines += ["", "Ratios at equal N (naive / terra client p95; >1: terra is faster):", ""]
        for row in report["ratios"]:
            shape = f"{row['load']}/{row['phases']} N={row['talkers']}"
            lines.append(f"- {shape}: ×{row['client_p95']}")
    if report["silence_words"] < 0:  # a tuning run (--terra-only) leaves them out
        words = "Words from silence and noise: not measured in this run."
    else:
        words = (
            f"Words from 60 s of silence: {report['silence_words']}; "
            f"from 60 s of white noise: {report['noise_words']}."
        )
    if report.get("accuracy"):
        acc = report["accuracy"]
        lines += [
            "",
            f"Accuracy under load: the shared meetings streamed alone, then inside "
            f"{acc['talkers']} continuous talkers (their client p95 {acc['load_client_p95_s']} s,"
            f" {acc['load_errors']} errors); CER of the finals against the turns (target: "
            "+1.0 point at most):",
            "",
            "| meeting | CER alone | CER under load | change (points) | ok |",
            "|---|---|---|---|---|",
        ]
        for m in acc["meetings"]:
            lines.append(
                f"| {m['meeting']} | {m['cer_alone']:.3f} | {m['cer_loaded']:.3f} "
                f"| {m['delta_points']:+.1f} | {'yes' if m['ok'] else 'no'} |"
            )
    lines += ["", words, "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def _levels(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    seconds = 20.0 if args.quick else args.seconds
    terra_levels = _levels(args.levels) or ([1, 4] if args.quick else [8, 12, 16, 20])
    meeting_levels = _levels(args.meeting_levels) or ([1, 2] if args.quick else [8, 12, 16])
    naive_levels = _levels(args.naive_levels) or [1, 2]
    loads = [x for x in args.load.split(",") if x]
    phases = [x for x in args.phases.split(",") if x]
    results: list[LevelResult] = []
    for load in loads:
        for phase in phases:
            levels = meeting_levels if load == "meetings" else terra_levels
            results += await sweep(
                "terra", load, levels, seconds, phase == "spread", args.stop_after
            )
    if not args.terra_only and loads:  # the baseline in the same run, on the first shape
        results += await sweep("naive", loads[0], naive_levels, seconds, phases[0] == "spread")
    rng = np.random.default_rng(1)
    silence_words = noise_words = -1  # not measured in a tuning run
    if not args.terra_only:
        silence_words = await words_from(np.zeros(60 * SAMPLE_RATE, np.float32), "silence")
        noise_words = await words_from(
            (rng.standard_normal(60 * SAMPLE_RATE) * 0.05).astype(np.float32), "noise"
        )
    table = []
    ratios = []
    for load, phase in shapes(results):
        rows = [r for r in results if (r.load, r.phases) == (load, phase)]
        naive_rows = [r for r in rows if r.mode == "naive"]
        table.append(
            {
                "load": load,
                "phases": phase,
                "terra": capacity([r for r in rows if r.mode == "terra"]),
                "naive": capacity(naive_rows) if naive_rows else None,
            }
        )
        for r in rows:
            naive = next((n for n in naive_rows if n.talkers == r.talkers), None)
            if r.mode == "terra" and naive is not None:
                ratios.append(
                    {
                        "load": load,
                        "phases": phase,
                        "talkers": r.talkers,
                        "client_p95": round(naive.client_p95_s / max(r.client_p95_s, 1e-3), 2),
                    }
                )
    return {
        "name": args.name,
        "model": "base",
        "machine": machine(),
        "seconds_per_level": seconds,
        "command": " ".join(["python -m benchmarks.live", *sys.argv[1:]]),
        "capacity": table,
        "ratios": ratios,
        "silence_words": silence_words,
        "noise_words": noise_words,
        "levels": [asdict(r) for r in results],
        "accuracy": await accuracy(args.accuracy) if args.accuracy else None,
    }


def tuned_config(settings: list[str]) -> Path:
    """config.yaml with ``section.key=value`` settings changed, in a temporary file."""
    raw = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    for setting in settings:
        key, _, value = setting.partition("=")
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8")
    with handle:
        yaml.safe_dump(raw, handle, allow_unicode=True)
    return Path(handle.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in a few minutes")
    parser.add_argument("--seconds", type=float, default=40.0, help="wall time per level")
    parser.add_argument("--name", default=None)
    parser.add_argument(
        "--load",
        default="continuous",
        help=f"load shapes, comma-separated: {', '.join(LOADS)}",
    )
    parser.add_argument(
        "--phases",
        default="spread",
        help="talkers' clocks, comma-separated: spread (each its own phase) or lockstep",
    )
    parser.add_argument("--levels", default="", help="terra's talker counts, e.g. 8,12,16")
    parser.add_argument("--meeting-levels", default="", help="meetings load: meeting counts")
    parser.add_argument("--naive-levels", default="", help="the baseline's talker counts")
    parser.add_argument("--terra-only", action="store_true", help="skip the baseline (tuning)")
    parser.add_argument(
        "--stop-after", type=int, default=2, help="stop a sweep after this many failed levels"
    )
    parser.add_argument(
        "--accuracy",
        type=int,
        default=0,
        metavar="N",
        help="also stream the shared meetings alone and inside N continuous talkers: CER of "
        "their finals (--load '' runs only this)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="run the servers with this config.yaml setting changed (repeatable)",
    )
    args = parser.parse_args()
    for load in filter(None, args.load.split(",")):
        if load not in LOADS:
            parser.error(f"unknown load {load!r}")
    for phase in args.phases.split(","):
        if phase not in ("spread", "lockstep"):
            parser.error(f"unknown phases {phase!r}")
    args.name = args.name or ("live_quick" if args.quick else "live")
    if args.set:
        global CONFIG_PATH
        CONFIG_PATH = tuned_config(args.set)
    report = asyncio.run(main_async(args))
    path = write_results(args.name, report, markdown(report))
    plot([LevelResult(**r) for r in report["levels"]], path.with_suffix(".png"))
    print(markdown(report))
    print(f"written: {path} (+ .md, .png)")


if __name__ == "__main__":
    main()
