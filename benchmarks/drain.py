"""How long the finals a load leaves owed take to drain, with and without the overload degrade.

    python -m benchmarks.drain [--talkers 20] [--seconds 30] [--overload-finals-s 30] [--name drain]

The live service itself (``LiveService`` with the real scheduler and the real model, on an
injected clock): ``--talkers`` continuous talkers (``benchmarks.live``'s load: the two 60 s
recordings, looped, each from its own offset) are fed ``--seconds`` of 2 s fragments while
the scheduler is stopped, then every combination is closed, so every final is owed at once
(as when an overload stops). Then the scheduler starts and the time until the last final is
settled is the drain. Run twice on the same audio: with every final a beam final
(``recognizer.overload_finals_s`` 1e9, as before the degrade) and with the degrade at
``--overload-finals-s`` (finals asked for past that much owed audio decoded greedy; 30 s by
default, where it acts on this owed work: the server's default, 600 s, is more than the
~560 s that 20 talkers x 30 s leave owed). The
finals' texts of the two runs are compared (CER of the degraded text against the beam text,
per talker, concatenated): what the degrade changes in the words.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import error_rates, machine, write_results
from benchmarks.live import Talker, make_talkers
from terra.app import build_engine
from terra.audio import SAMPLE_RATE
from terra.config import Config, load_config
from terra.live import LiveService
from terra.metrics import create_metrics
from terra.params import FragmentParams
from terra.recognizer.options import decode_passes
from terra.recognizer.scheduler import RecognizerScheduler
from terra.recognizer.types import RecognitionEngine
from terra.spool import Spool

BEAM_ONLY_S = 1e9  # overload_finals_s that no backlog reaches: every final a beam final


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def config_with(overload_finals_s: float) -> Config:
    return load_config(
        None,
        environ={},
        overrides={
            "recognizer": {"overload_finals_s": overload_finals_s},
            "stream": {"answer_wait_ms": 0},
        },
    )


async def drain(
    engine: RecognitionEngine, config: Config, talkers: list[Talker], seconds: float
) -> dict[str, Any]:
    """Feed the talkers with the recognizer stopped, close everything, then time the drain."""
    clock = Clock()
    metrics = create_metrics()
    scheduler = RecognizerScheduler(engine, config.recognizer, metrics)
    with tempfile.TemporaryDirectory() as folder:
        live = LiveService(
            config.stream,
            config.recognizer,
            decode_passes(config),
            scheduler,
            Spool(Path(folder)),
            metrics,
            engine,
            clock=clock,
        )
        chunk = 2 * SAMPLE_RATE
        t0 = 1_796_000_000.0
        try:
            for offset in range(0, int(seconds * SAMPLE_RATE) - chunk + 1, chunk):
                for talker in talkers:
                    await live.process(
                        FragmentParams(
                            talker.conference,
                            talker.participant,
                            talker.participant,
                            t0 + offset / SAMPLE_RATE,
                            f"{talker.participant}-{offset}",
                            talker.lang,
                            None,
                            True,
                            False,
                        ),  # fmt: skip
                        talker.audio[offset : offset + chunk],
                    )
                clock.now += 2.0
                live.tick()
            clock.now += config.stream.idle_close_ms / 1000 + 0.1
            live.tick()  # every talker quiet: every combination closes, its final owed
            owed_s = scheduler.owed_final_s
            owed = scheduler.queued_finals
            sessions = list(live._sessions.values())
            started = time.perf_counter()
            await scheduler.start()
            await asyncio.gather(*(t for s in sessions for t in s.in_flight))
            drained = time.perf_counter() - started
            texts = {}
            for session in sessions:
                finals = [e for e in session.stream.take_answer() if e.status == "final"]
                finals.sort(key=lambda e: e.timestamp_float)
                texts[session.stream.participant_id] = " ".join(e.text for e in finals)
        finally:
            await live.stop()
            await scheduler.stop()
    greedy = metrics.registry.get_sample_value("terra_overload_finals_total") or 0.0
    return {
        "overload_finals_s": config.recognizer.overload_finals_s,
        "finals_owed": owed,
        "owed_audio_s": round(owed_s, 1),
        "finals_greedy": int(greedy),
        "drain_s": round(drained, 1),
        "audio_s_per_s": round(owed_s / drained, 2),
        "texts": texts,
    }


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Drain of owed finals",
        "",
        f"`python -m benchmarks.drain --talkers {data['talkers']} --seconds "
        f"{data['seconds']:.0f} --overload-finals-s {data['overload_finals_s']:g}` "
        f"({data['machine']}); measured {data['at']}.",
        "",
        "The live service with the real scheduler and model: the talkers' audio fed with the "
        "recognizer stopped, every combination closed, then the time until every final is "
        "settled. Same audio in each run; `CER vs beam` compares each talker's finals with "
        "the beam-only run's (what the degrade changes in the words, not accuracy against a "
        "reference).",
        "",
        "| run | overload_finals_s | finals owed | audio owed | finals greedy | drain "
        "| audio-s drained per s | CER vs beam (min / mean / max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in data["runs"]:
        lines.append(
            f"| {run['name']} | {run['overload_finals_s']:g} | {run['finals_owed']} "
            f"| {run['owed_audio_s']:.0f} s | {run['finals_greedy']} | {run['drain_s']:.1f} s "
            f"| {run['audio_s_per_s']:.1f} | {run.get('cer_vs_beam', '-')} |"
        )
    return "\n".join(lines) + "\n"


async def main(talker_count: int, seconds: float, overload_finals_s: float, name: str) -> None:
    configs = {
        "beam only": config_with(BEAM_ONLY_S),
        "overload degrade": config_with(overload_finals_s),
    }
    engine = await asyncio.to_thread(build_engine, configs["beam only"])
    talkers = make_talkers("continuous", talker_count, seconds, spread=False)
    runs = []
    for run_name, config in configs.items():
        run = await drain(engine, config, talkers, seconds)
        run["name"] = run_name
        print(f"{run_name}: { {k: v for k, v in run.items() if k != 'texts'} }", flush=True)
        runs.append(run)
    beam = runs[0]["texts"]
    for run in runs[1:]:
        cers = [
            error_rates([beam[p]], [text])["cer"] for p, text in run["texts"].items() if beam[p]
        ]
        run["cer_vs_beam"] = (
            f"{min(cers):.3f} / {float(np.mean(cers)):.3f} / {max(cers):.3f}" if cers else "-"
        )
    data = {
        "machine": machine(),
        "talkers": talker_count,
        "seconds": seconds,
        "overload_finals_s": overload_finals_s,
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": runs,
    }
    write_results(name, data, markdown(data))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--talkers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--overload-finals-s",
        type=float,
        default=30.0,
        help="recognizer.overload_finals_s of the degraded run (the results of record: 30)",
    )
    parser.add_argument("--name", default="drain", help="results file name")
    args = parser.parse_args()
    asyncio.run(main(args.talkers, args.seconds, args.overload_finals_s, args.name))
