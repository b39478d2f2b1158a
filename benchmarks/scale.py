"""Scale-out on Ray: live talkers served by 1 and by 2 recognizer replicas, in one run, and
what ``recognizer.backend: ray`` costs against ``local`` at equal cores.

A real Ray cluster runs on this machine (one node with 2 CPUs, benchmarks/raycluster.py);
``terra recognizer`` deploys the recognizer on it with 1, then 2 replicas of one CPU and one
model thread each; a real ``terra serve`` front end with backend ray takes the talkers. The
load and the measurement are benchmarks/live.py's: continuous talkers (``long/ru_60s.wav``
and ``long/en_60s.wav``, looped, each starting elsewhere), 2 s fragments at real-time pace,
clocks spread; the headline is client-visible: from a fragment's POST to the first answer
listing its post_id. A level passes at p95 <= 1.5 s with no growing backlog and no errors;
each sweep stops at its first failing level. The result is the ratio of the two capacities.

Overhead: the same talkers (``--compare`` of them) on ``backend: local`` with the same
cores (recognizer.workers 2, one model thread each) against backend ray with 2 replicas.
Also measured: the cost of shipping a request's audio to a replica (Ray's serializer).

Two more measurements, each on its own (``--batching`` / ``--autoscale``, the sweeps then
left out unless asked for):

- ``--batching N``: N talkers on 2 replicas batching with terra's own scheduler, then with
  Ray Serve's ``@serve.batch`` (``cluster.batching``), equal load, same run.
- ``--autoscale N``: the app deployed with ``min_replicas`` 1, ``max_replicas`` 2 and short
  autoscaling delays; the replica processes are counted every half second through an idle
  start, N talkers for ``--seconds``, and the idle time after, until Serve is back at 1.

Everything (the client, the front end, Ray and its replicas) shares this machine's 2 cores:
the front end's and the client's CPU is taken from what the replicas could use, so the
ratio here is a floor for machines where recognizers have cores of their own.

    python -m benchmarks.scale [--seconds 30] [--one 1,2,3] [--two 2,3,4,5] [--compare 4]
    python -m benchmarks.scale --batching 3 --autoscale 3 --name scale_batching_autoscale
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks import live
from benchmarks.common import ROOT, SPEECH, machine, write_results
from benchmarks.raycluster import BIN, LocalRayCluster
from terra.audio import SAMPLE_RATE
from terra.recognizer.options import DecodeOptions
from terra.recognizer.types import Priority, RecognitionRequest
from terra.streamclient import load_audio

LOAD = "continuous"
# --autoscale: Serve's clock made short, so that a 30 s load shows both decisions.
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_queue": 2,
    "upscale_delay_s": 3,
    "downscale_delay_s": 10,
    "metrics_interval_s": 1,
    "look_back_period_s": 3,
}


def _deploy(
    cluster: LocalRayCluster, replicas: int, workdir: Path, *extra: str, **settings: Any
) -> float:
    """Deploy (or resize) the recognizer app with ``replicas`` replicas (``settings``: more of
    the cluster section; ``extra``: more arguments, ``--delete`` removes the app); seconds
    until its replicas run."""
    raw = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    raw["cluster"].update(
        {
            "address": cluster.address,
            "min_replicas": replicas,
            "max_replicas": replicas,
            **settings,
        }
    )
    raw["model"]["models_dir"] = str(ROOT / "models")
    path = workdir / f"recognizer-{replicas}-{len(list(workdir.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    started = time.monotonic()
    subprocess.run(
        [str(BIN / "terra"), "recognizer", "--config", str(path), *extra],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return round(time.monotonic() - started, 1)


def _backend_env(backend: str, address: str = "") -> None:
    """The front end (live.ServerProcess) takes TERRA_* from this process's environment."""
    os.environ["TERRA_RECOGNIZER_BACKEND"] = backend
    os.environ["TERRA_RAY_ADDRESS"] = address
    # local at equal cores: recognizer.workers 2 (config.yaml), one model thread each
    os.environ["TERRA_CPU_THREADS"] = "1"


async def _sweep(
    label: str,
    levels: list[int],
    seconds: float,
    cluster: LocalRayCluster | None,
    stop: bool = True,
) -> list[dict[str, Any]]:
    """One row per level; with ``stop``, the sweep ends at its first failing level."""
    rows = []
    for level in levels:
        cpu_before = cluster.cpu_seconds() if cluster else 0.0
        result = await live.run_level("terra", LOAD, level, seconds, spread=True)
        row = {"setup": label, **asdict(result)}
        row.pop("queue_samples", None)
        if cluster is not None:  # the replicas' CPU is outside the front end's process
            row["cluster_cpu_percent"] = round(
                100 * (cluster.cpu_seconds() - cpu_before) / max(result.seconds, 1e-9), 1
            )
        rows.append(row)
        print(
            f"{label:>16} {level:3d} talkers: client p50 {result.client_p50_s:.2f} "
            f"p95 {result.client_p95_s:.2f} s, {result.errors} errors, "
            f"{'ok' if result.ok else 'over'}",
            flush=True,
        )
        if stop and not result.ok:
            break
    return rows


async def autoscale(
    cluster: LocalRayCluster, workdir: Path, talkers: int, seconds: float, idle_s: float
) -> dict[str, Any]:
    """Replica processes over time: ``idle_s`` idle, the load, then idle until Serve is back
    at ``min_replicas`` (at most 120 s)."""
    _deploy(cluster, 1, workdir, "--delete")  # start from min_replicas, not from what ran
    deploy_s = _deploy(cluster, 1, workdir, **AUTOSCALING)
    app = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))["cluster"]["app_name"]
    timeline: list[tuple[float, int]] = []
    t0 = time.monotonic()
    load_over = asyncio.Event()

    async def count() -> None:
        """Every half second until, after the load, four counts in a row are 1 (or 120 s)."""
        deadline = float("inf")
        while time.monotonic() < deadline:
            replicas = len(await asyncio.to_thread(cluster.replica_pids, app))
            timeline.append((round(time.monotonic() - t0, 1), replicas))
            if load_over.is_set():
                deadline = min(deadline, time.monotonic() + 120)
                if len(timeline) > 4 and all(n == 1 for _, n in timeline[-4:]):
                    return
            await asyncio.sleep(0.5)

    counter = asyncio.create_task(count())
    await asyncio.sleep(idle_s)
    rows = await _sweep("ray, autoscaling 1..2", [talkers], seconds, cluster)
    load_to = time.monotonic() - t0
    load_from = load_to - rows[0]["seconds"]  # after the level's front end started
    load_over.set()
    await counter
    peak = max((n for _, n in timeline), default=0)
    up = next((t for t, n in timeline if n == peak and t >= load_from), None)
    down = next((t for t, n in timeline if n == 1 and t >= load_to), None)
    return {
        "settings": AUTOSCALING,
        "talkers": talkers,
        "deploy_s": deploy_s,
        "load_from_s": round(load_from, 1),
        "load_to_s": round(load_to, 1),
        "replicas_before_load": timeline[0][1] if timeline else 0,
        "replicas_peak": peak,
        "peak_reached_s": up,
        "back_to_min_s": down,
        "level": rows[0],
        "timeline": timeline,
    }


def _capacity(rows: list[dict[str, Any]]) -> int:
    return max((int(r["talkers"]) for r in rows if r["ok"]), default=0)


def serialization_cost() -> list[dict[str, float]]:
    """What Ray's serializer does with a request sent to a replica: cloudpickle, protocol 5,
    numpy buffers out of band (not copied into the pickle), by audio length."""
    import pickle

    from ray import cloudpickle

    audio = load_audio(SPEECH / "long" / "en_60s.wav")
    out = []
    for seconds in (2, 10, 30):
        request = RecognitionRequest(
            audio=np.ascontiguousarray(audio[: seconds * SAMPLE_RATE]),
            language="en",
            priority=Priority.PROGRESS,
            options=DecodeOptions(),
        )
        reps = 500
        started = time.perf_counter()
        for _ in range(reps):
            buffers: list[pickle.PickleBuffer] = []
            data = cloudpickle.dumps(  # type: ignore[no-untyped-call,unused-ignore]
                request, protocol=5, buffer_callback=buffers.append
            )
        mid = time.perf_counter()
        for _ in range(reps):
            pickle.loads(data, buffers=buffers)
        ended = time.perf_counter()
        out.append(
            {
                "audio_s": seconds,
                "pickle_bytes": len(data),
                "buffer_bytes": sum(b.raw().nbytes for b in buffers),
                "serialize_ms": round((mid - started) / reps * 1000, 4),
                "deserialize_ms": round((ended - mid) / reps * 1000, 4),
            }
        )
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    one = live._levels(args.one)
    two = live._levels(args.two)
    rows: list[dict[str, Any]] = []
    deploy_s: dict[str, float] = {}
    autoscaled: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="terra-scale-") as tmp:
        if args.compare:  # 0: no comparison with local
            _backend_env("local")
            rows += await _sweep("local (2x1 thread)", [args.compare], args.seconds, None)
        cluster = LocalRayCluster(Path(tmp), node_cpus=(2,))
        try:
            cluster.start()
            _backend_env("ray", cluster.address)
            if one:
                deploy_s["1"] = _deploy(cluster, 1, Path(tmp))
                rows += await _sweep("ray, 1 replica", one, args.seconds, cluster)
            if two:
                deploy_s["2"] = _deploy(cluster, 2, Path(tmp))
                rows += await _sweep("ray, 2 replicas", two, args.seconds, cluster)
            if args.compare and not any(
                r["setup"] == "ray, 2 replicas" and r["talkers"] == args.compare for r in rows
            ):
                deploy_s["2"] = _deploy(cluster, 2, Path(tmp))
                rows += await _sweep("ray, 2 replicas", [args.compare], args.seconds, cluster)
            # Alternating rounds, so that neither gets the warmer machine each time.
            batchings = [
                b
                for r in range(args.rounds if args.batching else 0)
                for b in (("terra", "serve") if r % 2 == 0 else ("serve", "terra"))
            ]
            for batching in batchings:
                deploy_s[f"2, {batching} batching"] = _deploy(
                    cluster, 2, Path(tmp), batching=batching
                )
                setup = f"ray, 2 replicas, {batching} batching"
                rows += await _sweep(setup, [args.batching], args.seconds, cluster, stop=False)
            if args.autoscale:
                autoscaled = await autoscale(
                    cluster, Path(tmp), args.autoscale, args.seconds, args.idle
                )
        finally:
            cluster.stop()
    cap1 = _capacity([r for r in rows if r["setup"] == "ray, 1 replica"])
    cap2 = _capacity([r for r in rows if r["setup"] == "ray, 2 replicas"])

    def at(setup: str, talkers: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["setup"] == setup and r["talkers"] == talkers), None)

    local_row = at("local (2x1 thread)", args.compare)
    ray_row = at("ray, 2 replicas", args.compare)
    overhead = None
    if local_row and ray_row:
        overhead = {
            "talkers": args.compare,
            "local_p50_s": local_row["client_p50_s"],
            "local_p95_s": local_row["client_p95_s"],
            "ray_p50_s": ray_row["client_p50_s"],
            "ray_p95_s": ray_row["client_p95_s"],
            "p50_delta_s": round(ray_row["client_p50_s"] - local_row["client_p50_s"], 3),
            "p95_delta_s": round(ray_row["client_p95_s"] - local_row["client_p95_s"], 3),
        }
    return {
        "model": "base",
        "machine": machine(),
        "seconds_per_level": args.seconds,
        "command": " ".join(["python -m benchmarks.scale", *sys.argv[1:]]),
        "capacity": {"one_replica": cap1, "two_replicas": cap2},
        "ratio": round(cap2 / cap1, 2) if cap1 else None,
        "overhead": overhead,
        "deploy_s": deploy_s,
        "serialization": serialization_cost(),
        "levels": rows,
        "batching": _batching(rows, args.batching),
        "autoscale": autoscaled,
    }


def _batching(rows: list[dict[str, Any]], talkers: int) -> dict[str, Any] | None:
    """terra's own batching against @serve.batch at equal load: each figure the mean over
    the rounds (every round's row is in ``levels``)."""
    keys = ("client_p50_s", "client_p95_s", "final_p50_s", "final_p95_s")
    out: dict[str, Any] = {"talkers": talkers}
    for batching in ("terra", "serve"):
        mine = [r for r in rows if r["setup"] == f"ray, 2 replicas, {batching} batching"]
        if not talkers or not mine:
            return None
        out[batching] = {k: round(float(np.mean([r[k] for r in mine])), 3) for k in keys}
        out[batching]["rounds"] = len(mine)
    return out


def markdown(report: dict[str, Any]) -> str:
    cap = report["capacity"]
    lines = [
        "# Scale-out on Ray (base, int8, recognizer replicas of 1 thread each)",
        "",
        f"`{report['command']}` on {report['machine']['cores']} cores "
        f"({report['machine']['date']}), {report['seconds_per_level']:.0f} s per level. "
        "Continuous talkers (ru_60s/en_60s looped), 2 s fragments at real-time pace, clocks "
        "spread; latency at the client: a fragment's POST to the first answer listing its "
        "post_id. Capacity (sweeps): the most talkers at p95 <= 1.5 s, no growing backlog, no "
        "errors. "
        "The client, the front end, Ray and the replicas share the machine's cores.",
        "",
    ]
    if any(r["setup"] in ("ray, 1 replica", "ray, 2 replicas") for r in report["levels"]):
        lines.append(
            f"- 1 replica: **{cap['one_replica']}** talkers; 2 replicas: "
            f"**{cap['two_replicas']}** talkers; ratio **{report['ratio']}**"
        )
    overhead = report["overhead"]
    if overhead:
        lines.append(
            f"- backend ray (2 replicas x 1 thread) against local (2 workers x 1 thread) at "
            f"{overhead['talkers']} talkers: p50 {overhead['ray_p50_s']:.2f} vs "
            f"{overhead['local_p50_s']:.2f} s, p95 {overhead['ray_p95_s']:.2f} vs "
            f"{overhead['local_p95_s']:.2f} s (ray - local: p50 {overhead['p50_delta_s']:+.3f}, "
            f"p95 {overhead['p95_delta_s']:+.3f} s)"
        )
    batching = report.get("batching")
    if batching:
        terra, serve = batching["terra"], batching["serve"]
        lines.append(
            f"- batching at {batching['talkers']} talkers on 2 replicas, mean of "
            f"{terra['rounds']} round(s) each: terra's own scheduler "
            f"client p50 {terra['client_p50_s']:.2f} / p95 {terra['client_p95_s']:.2f} s, "
            f"finals p50 {terra['final_p50_s']:.2f} / p95 {terra['final_p95_s']:.2f} s; "
            f"@serve.batch client p50 {serve['client_p50_s']:.2f} / p95 "
            f"{serve['client_p95_s']:.2f} s, finals p50 {serve['final_p50_s']:.2f} / p95 "
            f"{serve['final_p95_s']:.2f} s (finals: the front end's text latency)"
        )
    auto = report.get("autoscale")
    if auto:
        lines.append(
            f"- autoscaling ({auto['settings']}): {auto['replicas_before_load']} replica(s) "
            f"idle; {auto['talkers']} talkers from {auto['load_from_s']} s to "
            f"{auto['load_to_s']} s; {auto['replicas_peak']} replica processes at "
            f"{auto['peak_reached_s']} s; back to 1 at {auto['back_to_min_s']} s "
            f"(the load's p95 {auto['level']['client_p95_s']:.2f} s)"
        )
        changes = [
            f"{t} s: {n}"
            for i, (t, n) in enumerate(auto["timeline"])
            if i == 0 or n != auto["timeline"][i - 1][1]
        ]
        lines.append("- replica processes over time (changes only): " + ", ".join(changes))
    lines += [
        "- deploying took "
        + ", ".join(f"{v} s ({k} replica(s))" for k, v in report["deploy_s"].items()),
        "",
        "| setup | talkers | client p50 s | client p95 s | covered/sent | errors | front-end CPU % "
        "| cluster CPU % | ok |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["levels"]:
        lines.append(
            f"| {r['setup']} | {r['talkers']} | {r['client_p50_s']:.2f} | {r['client_p95_s']:.2f} "
            f"| {r['fragments_covered']}/{r['fragments_sent']} | {r['errors']} "
            f"| {r['server_cpu_percent']} | {r.get('cluster_cpu_percent', '-')} "
            f"| {'yes' if r['ok'] else 'no'} |"
        )
    lines += [
        "",
        "Serializing a request for a replica (Ray's serializer, numpy audio out of band):",
        "",
        "| audio s | pickle bytes | out-of-band bytes | serialize ms | deserialize ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in report["serialization"]:
        lines.append(
            f"| {s['audio_s']} | {s['pickle_bytes']} | {s['buffer_bytes']} "
            f"| {s['serialize_ms']} | {s['deserialize_ms']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="wall time per level")
    parser.add_argument("--one", default="1,2,3", help="talker levels with 1 replica")
    parser.add_argument("--two", default="2,3,4,5", help="talker levels with 2 replicas")
    parser.add_argument("--compare", type=int, default=4, help="talkers for ray vs local")
    parser.add_argument(
        "--batching", type=int, default=0, help="talkers for terra batching vs @serve.batch"
    )
    parser.add_argument("--rounds", type=int, default=1, help="--batching rounds (alternating)")
    parser.add_argument("--autoscale", type=int, default=0, help="talkers for the autoscaling run")
    parser.add_argument("--idle", type=float, default=5.0, help="idle seconds before it")
    parser.add_argument("--name", default="scale")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    path = write_results(args.name, report, markdown(report))
    print(markdown(report))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
