"""Live capacity and latency: terra against the naive baseline, side by side in one run.

For each recognizer mode (``terra``; ``naive`` = one ``transcribe()`` of the whole pending
buffer per update, 30 s padded window, no batching) and each number of talkers N, a real
``terra serve`` process is started on loopback and N talkers play real speech from
../shared/data/speech/ (looped) in 2 s fragments at real-time pace, each its own
participant, for a fixed wall time. Fragments are sent on schedule whether or not the
previous answer came back, as a conference server does.

Measured per level:
- progress latency: from a fragment's arrival to the first text made from audio that
  includes it (the server's ``terra_text_latency_seconds{kind="progress"}``);
- final latency: from the VAD closing a combination to its final text (``kind="final"``);
- POST round-trip time at the client; recognizer queue depth over time and batch sizes
  (``/metrics``); CPU seconds and peak RSS of the server process (psutil).
Percentiles of server histograms are interpolated within their 0.1 s buckets.

Capacity is the largest N whose p95 progress latency is <= 1.5 s with no growing backlog
(queue depth and pending finals at the end no larger than early in the run).

    python -m benchmarks.live [--quick] [--name NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
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

from benchmarks.common import ROOT, SPEECH, free_port, machine, write_results
from terra.audio import SAMPLE_RATE, Samples, encode_wav
from terra.streamclient import load_audio

TOKEN = "bench-token"
CONFIG_PATH = ROOT / "config.yaml"  # replaced by a tuned copy with --set
CHUNK_S = 2.0
CAPACITY_P95_S = 1.5

TALKER_FILES = [
    ("long/ru_60s.wav", "ru"),
    ("long/en_60s.wav", "en"),
    ("meetings/planerka_ru/anna.flac", "ru"),
    ("meetings/standup_en/john.flac", "en"),
]


@dataclass
class LevelResult:
    mode: str
    talkers: int
    seconds: float
    fragments_sent: int
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
    server_cpu_percent: float
    server_peak_rss_mb: float
    errors: int
    ok: bool = False
    queue_samples: list[float] = field(default_factory=list)


# -- metrics parsing -----------------------------------------------------------------
_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>[-+0-9.eE]+|NaN)$")


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        samples.append((match["name"], labels, float(match["value"])))
    return samples


def histogram_quantile(
    samples: list[tuple[str, dict[str, str], float]],
    name: str,
    kind: str,
    q: float,
    label: str = "kind",
) -> float:
    buckets = sorted(
        (float("inf") if lb["le"] == "+Inf" else float(lb["le"]), v)
        for n, lb, v in samples
        if n == f"{name}_bucket" and lb.get(label) == kind
    )
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    total = buckets[-1][1]
    rank = q * total
    previous_le, previous_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return previous_le
            share = (rank - previous_count) / max(count - previous_count, 1e-9)
            return previous_le + (le - previous_le) * share
        previous_le, previous_count = le, count
    return previous_le


def metric(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(
        v for n, lb, v in samples if n == name and all(lb.get(k) == x for k, x in labels.items())
    )


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
def talker_audio(index: int, seconds: float) -> tuple[Samples, str]:
    relative, lang = TALKER_FILES[index % len(TALKER_FILES)]
    audio = load_audio(SPEECH / relative)
    # Start each talker elsewhere in its file, so N talkers are not N copies in lockstep.
    shift = int((index * 7.3 % 20.0) * SAMPLE_RATE) % audio.size
    audio = np.roll(audio, -shift)
    repeats = int(np.ceil(seconds * SAMPLE_RATE / audio.size)) + 1
    return np.tile(audio, repeats)[: int(seconds * SAMPLE_RATE)], lang


async def run_talker(
    session: aiohttp.ClientSession,
    url: str,
    conference: str,
    index: int,
    seconds: float,
    started: float,
    post_times: list[float],
    errors: list[str],
) -> None:
    audio, lang = talker_audio(index, seconds)
    chunk = int(CHUNK_S * SAMPLE_RATE)
    loop = asyncio.get_running_loop()
    wall_start = time.time()
    pending: list[asyncio.Task[None]] = []

    async def post(offset: int) -> None:
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("token", TOKEN)
        form.add_field(
            "audiofile",
            encode_wav(audio[offset : offset + chunk]),
            filename="fragment.wav",
            content_type="audio/wav",
        )
        params = {
            "conference_id": conference,
            "participant_id": f"talker-{index}",
            "participant_name": f"Talker {index}",
            "lang1": lang,
            "online": "true",
            "offline": "true",
            "post_id": str(uuid.uuid4()),
            "timestamp_float": repr(wall_start + offset / SAMPLE_RATE),
        }
        sent = time.monotonic()
        try:
            async with session.post(f"{url}/process", params=params, data=form) as response:
                await response.read()
                if response.status != 200:
                    errors.append(f"HTTP {response.status}")
                    return
        except (aiohttp.ClientError, TimeoutError) as e:
            errors.append(type(e).__name__)
            return
        post_times.append(time.monotonic() - sent)

    for offset in range(0, audio.size - chunk + 1, chunk):
        due = started + offset / SAMPLE_RATE
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(post(offset)))
    await asyncio.gather(*pending)


async def run_level(mode: str, talkers: int, seconds: float, spread: bool) -> LevelResult:
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
                post_times: list[float] = []
                errors: list[str] = []
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
                    *(
                        run_talker(
                            session,
                            server.url,
                            "bench",
                            i,
                            seconds,
                            # spread: each talker's 2 s clock has its own phase, as separate
                            # clients have; lockstep: all fragments arrive at the same moment.
                            started + (i * CHUNK_S / talkers if spread else 0.0),
                            post_times,
                            errors,
                        )
                        for i in range(talkers)
                    )
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
    result = LevelResult(
        mode=mode,
        talkers=talkers,
        seconds=round(elapsed, 1),
        fragments_sent=len(post_times) + len(errors),
        post_p50_s=_q(post_times, 0.5),
        post_p95_s=_q(post_times, 0.95),
        progress_p50_s=round(
            histogram_quantile(samples, "terra_text_latency_seconds", "progress", 0.5), 3
        ),
        progress_p95_s=round(
            histogram_quantile(samples, "terra_text_latency_seconds", "progress", 0.95), 3
        ),
        final_p50_s=round(
            histogram_quantile(samples, "terra_text_latency_seconds", "final", 0.5), 3
        ),
        final_p95_s=round(
            histogram_quantile(samples, "terra_text_latency_seconds", "final", 0.95), 3
        ),
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
        progress_request_p50_s=round(
            histogram_quantile(
                samples, "terra_recognizer_latency_seconds", "progress", 0.5, label="priority"
            ),
            3,
        ),
        mean_request_audio_s=round(
            metric(samples, "terra_recognizer_audio_seconds_total")
            / max(metric(samples, "terra_recognizer_batch_size_sum"), 1),
            2,
        ),
        recognizer_busy=round(
            metric(samples, "terra_recognizer_batch_seconds_sum") / max(elapsed, 1e-9), 2
        ),
        server_cpu_percent=round(100 * cpu / max(elapsed, 1e-9), 1),
        server_peak_rss_mb=round(server.peak_rss / 1e6, 1),
        errors=len(errors),
        queue_samples=queue,
    )
    result.ok = not growing and not errors and result.progress_p95_s <= CAPACITY_P95_S
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
                        "timestamp_float": repr(1e9 + offset / SAMPLE_RATE),
                    }
                    async with session.post(
                        f"{server.url}/process", params=params, data=form
                    ) as response:
                        for elem in await response.json():
                            if elem["status"] == "final":
                                words += len(elem["text"].split())
                return words
        finally:
            server.stop()


# -- the run ---------------------------------------------------------------------------
async def sweep(
    mode: str, levels: list[int], seconds: float, spread: bool = True
) -> list[LevelResult]:
    results: list[LevelResult] = []
    failures = 0
    for talkers in levels:
        result = await run_level(mode, talkers, seconds, spread)
        results.append(result)
        print(
            f"{mode:6} N={talkers:<3} progress p50/p95 {result.progress_p50_s:.2f}/"
            f"{result.progress_p95_s:.2f} s  final p95 {result.final_p95_s:.2f} s  "
            f"queue max {result.queue_depth_max:.0f}  batch {result.mean_batch_size:.1f} "
            f"({result.mean_batch_s:.2f} s, busy {result.recognizer_busy:.2f}, request p50 "
            f"{result.progress_request_p50_s:.2f} s, {result.mean_request_audio_s:.1f} s audio)  "
            f"cpu {result.server_cpu_percent:.0f}%  {'ok' if result.ok else 'OVER'}",
            flush=True,
        )
        failures += 0 if result.ok else 1
        if failures >= 2:  # past capacity twice: higher levels only take longer
            break
    return results


def capacity(results: list[LevelResult]) -> int:
    ok = [r.talkers for r in results if r.ok]
    return max(ok, default=0)


def plot(results: list[LevelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for mode, colour in (("terra", "tab:blue"), ("naive", "tab:red")):
        rows = [r for r in results if r.mode == mode]
        if not rows:
            continue
        n = [r.talkers for r in rows]
        axis.plot(n, [r.progress_p50_s for r in rows], "o--", color=colour, label=f"{mode} p50")
        axis.plot(n, [r.progress_p95_s for r in rows], "o-", color=colour, label=f"{mode} p95")
    axis.axhline(CAPACITY_P95_S, color="grey", linestyle=":", label="1.5 s target")
    axis.set_xlabel("live talkers (participants)")
    axis.set_ylabel("progress latency, s")
    axis.set_yscale("log")
    axis.set_title("terra vs naive faster-whisper streaming (2 s fragments, real time)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Live capacity ({report['name']}, {report['machine']['date']})",
        "",
        f"Machine: {report['machine']['cores']} cores, {report['machine']['cpu']}; model "
        f"{report['model']} int8; {report['seconds_per_level']} s per level; talkers' fragment "
        f"clocks {report.get('phases', 'lockstep')} (spread: each its own phase; lockstep: all "
        "at once).",
        "",
        f"**Capacity** (p95 progress ≤ {CAPACITY_P95_S} s, no growing backlog): "
        f"terra {report['capacity']['terra']}, naive {report['capacity']['naive']} "
        f"→ ratio {report['capacity']['ratio']}",
        "",
        "| mode | N | progress p50 | progress p95 | final p50 | final p95 | POST p95 "
        "| queue max | batch | CPU % | RSS MB | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["levels"]:
        lines.append(
            f"| {r['mode']} | {r['talkers']} "
            f"| {r['progress_p50_s']:.2f} | {r['progress_p95_s']:.2f} "
            f"| {r['final_p50_s']:.2f} | {r['final_p95_s']:.2f} | {r['post_p95_s']:.2f} "
            f"| {r['queue_depth_max']:.0f} | {r['mean_batch_size']:.1f} "
            f"| {r['server_cpu_percent']:.0f} | {r['server_peak_rss_mb']:.0f} "
            f"| {'yes' if r['ok'] else 'no'} |"
        )
    if report.get("ratios"):
        lines += ["", "Ratios at equal N (naive / terra; >1 means terra is faster):", ""]
        for row in report["ratios"]:
            lines.append(
                f"- N={row['talkers']}: progress p95 ×{row['progress_p95']}, "
                f"final p95 ×{row['final_p95']}"
            )
    if report["silence_words"] < 0:  # a tuning run (--terra-only) leaves them out
        words = "Words from silence and noise: not measured in this run."
    else:
        words = (
            f"Words from 60 s of silence: {report['silence_words']}; "
            f"from 60 s of white noise: {report['noise_words']}."
        )
    lines += [
        "",
        words,
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        seconds = 20.0
        terra_levels, naive_levels = [1, 4], [1, 2]
    else:
        seconds = args.seconds
        terra_levels = [1, 2, 4, 8, 12, 14, 16, 18, 20, 24]
        naive_levels = [1, 2, 3, 4]
    if args.levels:
        terra_levels = [int(n) for n in args.levels.split(",")]
    spread = args.phases == "spread"
    results = await sweep("terra", terra_levels, seconds, spread)
    if not args.terra_only:
        results += await sweep("naive", naive_levels, seconds, spread)
    rng = np.random.default_rng(1)
    silence_words = noise_words = -1  # not measured in a tuning run
    if not args.terra_only:
        silence_words = await words_from(np.zeros(60 * SAMPLE_RATE, np.float32), "silence")
        noise_words = await words_from(
            (rng.standard_normal(60 * SAMPLE_RATE) * 0.05).astype(np.float32), "noise"
        )
    cap_terra = capacity([r for r in results if r.mode == "terra"])
    cap_naive = capacity([r for r in results if r.mode == "naive"])
    ratios = []
    for r in results:
        if r.mode != "terra":
            continue
        naive = next((n for n in results if n.mode == "naive" and n.talkers == r.talkers), None)
        if naive is not None:
            ratios.append(
                {
                    "talkers": r.talkers,
                    "progress_p95": round(naive.progress_p95_s / max(r.progress_p95_s, 1e-3), 2),
                    "final_p95": round(naive.final_p95_s / max(r.final_p95_s, 1e-3), 2),
                }
            )
    return {
        "name": args.name,
        "model": "base",
        "machine": machine(),
        "seconds_per_level": seconds,
        "phases": args.phases,
        "command": " ".join(["python -m benchmarks.live", *sys.argv[1:]]),
        "capacity": {
            "terra": cap_terra,
            "naive": cap_naive,
            "ratio": round(cap_terra / cap_naive, 1) if cap_naive else None,
        },
        "ratios": ratios,
        "silence_words": silence_words,
        "noise_words": noise_words,
        "levels": [asdict(r) for r in results],
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
    parser.add_argument("--quick", action="store_true", help="a smoke run in under 3 minutes")
    parser.add_argument("--seconds", type=float, default=45.0, help="wall time per level")
    parser.add_argument("--name", default=None)
    parser.add_argument("--levels", default="", help="terra's talker counts, e.g. 2,4,8")
    parser.add_argument("--terra-only", action="store_true", help="skip the baseline (tuning)")
    parser.add_argument(
        "--phases",
        choices=("spread", "lockstep"),
        default="spread",
        help="talkers' fragment clocks: spread over the 2 s (separate clients) or all at once",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="run the servers with this config.yaml setting changed (repeatable)",
    )
    args = parser.parse_args()
    args.name = args.name or ("live_quick" if args.quick else "live")
    if args.set:
        global CONFIG_PATH
        CONFIG_PATH = tuned_config(args.set)
    report = asyncio.run(main_async(args))
    path = write_results(args.name, report, markdown(report))
    plot(
        [LevelResult(**{k: v for k, v in r.items()}) for r in report["levels"]],
        path.with_suffix(".png"),
    )
    print(markdown(report))
    print(f"written: {path} (+ .md, .png)")


if __name__ == "__main__":
    main()
