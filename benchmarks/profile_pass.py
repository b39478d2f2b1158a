"""Where a live pass's time goes: the real engine on the real speech, by stage.

The live service (terra/live.py) makes two kinds of model call per talker: a progress pass
per 2 s fragment (greedy, word times for the agreement, over the uncommitted audio: 4.0-4.5 s
on average in benchmarks.live, with the last committed words as context), and a final per
closed combination (beam ``final_beam_size``, no word times). This runs those shapes through
``WhisperEngine.recognize_timed`` on one model worker with one thread (one of the two that
``recognizer.workers: 2`` runs on 2 cores), alone or batched as the scheduler batches them
(1 talker: batches of 1; 16 talkers: 3-4 on average, ``max_batch_size`` 8 at most), and
reports each stage's time per call and its core-seconds per second of audio decoded:
features (log-mel), encode, detect (language; none here: live locks it), generate (the
decoder), align (word timestamps, faster-whisper's ``add_word_timestamps``) and other
(Python: tokenizers, guards, segments).

Core-seconds are the process's CPU time (``time.process_time``) around each stage, with one
call at a time and one thread: they are the cost of the work itself, and hold while other
processes share the machine (wall times then do not: they are given too, as indicative).

Variants (``--variants``) run the same progress passes with one setting changed, to see what
each candidate cut saves before it goes through the accuracy benchmarks.

    python -m benchmarks.profile_pass [--batches 1,4,8] [--variants] [--name profile_pass]
    python -m benchmarks.profile_pass --layouts   # 2 workers x 1 or 2 threads
    python -m benchmarks.profile_pass --encoder   # windows encoded one at a time or stacked
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import ctranslate2
import numpy as np

from benchmarks.common import ROOT, SPEECH, machine, machine_line, write_results
from terra.audio import SAMPLE_RATE
from terra.config import Config, load_config
from terra.models import resolve_model
from terra.recognizer.engine import EngineTimings, Stage, WhisperEngine, load_whisper
from terra.recognizer.options import DecodeOptions, decode_passes, engine_settings
from terra.recognizer.types import Priority, Recognition, RecognitionRequest
from terra.streamclient import load_audio

CHUNK_S = 2.0  # a progress pass per fragment: each covers 2 s of new talker audio
PROGRESS_AUDIO_S = (2.0, 4.0, 6.0)  # uncommitted audio per pass: mean 4.0 (live: 4.0-4.5)
FINAL_AUDIO_S = 8.0  # a final over a combination up to final_whole_max_s decodes all of it
PROMPT_WORDS = 40  # recognizer.prompt_max_words
FILES = (("long/ru_60s.wav", "ru"), ("long/en_60s.wav", "en"))


@dataclass(frozen=True, slots=True)
class Shape:
    """One kind of call to profile."""

    name: str
    kind: str  # progress | final
    batch: int
    options: DecodeOptions
    margin_s: float | None = None  # recognizer.window.trailing_margin_s (None: as configured)
    threads: int = 1
    prompt_words: int = PROMPT_WORDS


def contexts(engine: WhisperEngine, config: Config) -> dict[tuple[str, int], str]:
    """The text before each request's audio (its last 8 s, decoded greedily as the progress
    passes that committed it were): the agreement's prompt is the last committed words."""
    greedy = dataclasses.replace(decode_passes(config).progress, word_timestamps=False)
    out = {}
    for path, language in FILES:
        audio = load_audio(SPEECH / path)
        for end_s in range(8, 57, 6):
            progress_s = PROGRESS_AUDIO_S[(end_s // 6) % len(PROGRESS_AUDIO_S)]
            for length in (progress_s, FINAL_AUDIO_S):
                start = int((end_s - length) * SAMPLE_RATE)
                before = audio[max(0, start - 8 * SAMPLE_RATE) : start]
                if before.size and (path, start) not in out:
                    request = RecognitionRequest(before, language, Priority.PROGRESS, greedy)
                    out[(path, start)] = engine.recognize([request])[0].text
    return out


def requests_for(
    engine: WhisperEngine, shape: Shape, previous: dict[tuple[str, int], str]
) -> list[RecognitionRequest]:
    """Live-shaped requests over both long recordings: the audio ending at 8, 14, ... 56 s
    (progress: 2, 4 or 6 s of it in turn), with the last words before it as the prompt."""
    out = []
    for path, language in FILES:
        audio = load_audio(SPEECH / path)
        for end_s in range(8, 57, 6):
            lengths = PROGRESS_AUDIO_S if shape.kind == "progress" else (FINAL_AUDIO_S,)
            length = lengths[(end_s // 6) % len(lengths)]
            start = int((end_s - length) * SAMPLE_RATE)
            words = previous.get((path, start), "").split()
            prompt = " ".join(words[-shape.prompt_words :]) if shape.prompt_words else ""
            out.append(
                RecognitionRequest(
                    audio=audio[start : int(end_s * SAMPLE_RATE)],
                    language=language,
                    priority=Priority.PROGRESS if shape.kind == "progress" else Priority.FINAL,
                    options=shape.options,
                    prompt_tokens=engine.encode_text(prompt) if prompt else (),
                )
            )
    return out


def run_shape(
    engine: WhisperEngine, requests: Sequence[RecognitionRequest], batch: int
) -> tuple[list[EngineTimings], list[Recognition]]:
    timings: list[EngineTimings] = []
    results: list[Recognition] = []
    for i in range(0, len(requests), batch):
        part = list(requests[i : i + batch])
        # One model call per batch: force one key (the live scheduler batches equal keys).
        recognized, calls = engine.recognize_timed(part)
        timings += calls
        results += recognized
    return timings, results


def summarize(
    shape: Shape, requests: Sequence[RecognitionRequest], timings: list[EngineTimings]
) -> dict[str, Any]:
    calls = len(timings)
    audio_s = sum(r.audio.size for r in requests) / SAMPLE_RATE
    wall = {s: sum(t.wall[s] for t in timings) for s in Stage}
    cpu = {s: sum(t.cpu[s] for t in timings) for s in Stage}
    total_cpu = sum(cpu.values())
    per_pass_cpu = total_cpu / len(requests)
    return {
        "shape": shape.name,
        "kind": shape.kind,
        "batch": shape.batch,
        "threads": shape.threads,
        "margin_s": shape.margin_s,
        "word_timestamps": shape.options.word_timestamps,
        "beam": shape.options.beam_size,
        "calls": calls,
        "requests": len(requests),
        "mean_audio_s": round(audio_s / len(requests), 2),
        "windows_s": sorted({t.window_s for t in timings}),
        "call_wall_s": round(sum(t.seconds for t in timings) / calls, 3),
        "stage_ms_per_request": {s.value: round(cpu[s] / len(requests) * 1000, 1) for s in Stage},
        "stage_wall_ms_per_call": {s.value: round(wall[s] / calls * 1000, 1) for s in Stage},
        "cpu_s_per_request": round(per_pass_cpu, 3),
        "cpu_s_per_audio_s": round(total_cpu / audio_s, 3),
        # A progress pass per 2 s fragment: its cost spread over the talker's own 2 s.
        "cpu_s_per_talker_s": round(per_pass_cpu / CHUNK_S, 3),
        "stage_share": {s.value: round(cpu[s] / max(total_cpu, 1e-9), 3) for s in Stage},
    }


def shapes(config: Config, batches: list[int], variants: bool) -> list[Shape]:
    passes = decode_passes(config)
    out = [Shape(f"progress b{b}", "progress", b, passes.progress) for b in batches]
    out += [Shape(f"final b{b}", "final", b, passes.final) for b in batches if b <= 4]
    if variants:
        no_words = dataclasses.replace(passes.progress, word_timestamps=False)
        for b in (1, max(batches)):
            out.append(Shape(f"progress b{b} no word times", "progress", b, no_words))
            for margin in (1.0, 0.5):
                out.append(
                    Shape(f"progress b{b} margin {margin}", "progress", b, passes.progress, margin)
                )
        for words in (20, 0):
            out.append(
                Shape(
                    f"progress b1 prompt {words} words",
                    "progress",
                    1,
                    passes.progress,
                    prompt_words=words,
                )
            )
        out.append(Shape("progress b1 2 threads", "progress", 1, passes.progress, threads=2))
    return out


def layouts(config: Config, path: str) -> list[dict[str, Any]]:
    """The thread layout: ``recognizer.workers: 2`` with 1 or 2 threads each, the progress
    passes (4 s, no prompt) made one at a time (one talker) or two at once (load)."""
    rows = []
    for threads in (1, 2):
        settings = dataclasses.replace(
            engine_settings(config, path, workers=2), cpu_threads=threads
        )
        engine = WhisperEngine(load_whisper(settings), settings)
        options = decode_passes(config).progress
        requests = []
        for file, language in FILES:
            audio = load_audio(SPEECH / file)
            for end_s in range(8, 57, 6):
                piece = audio[(end_s - 4) * SAMPLE_RATE : end_s * SAMPLE_RATE]
                requests.append(RecognitionRequest(piece, language, Priority.PROGRESS, options))
        engine.recognize(requests[:2])  # warm-up
        for concurrency in (1, 2):
            with ThreadPoolExecutor(concurrency) as pool:
                wall, cpu = time.perf_counter(), time.process_time()
                calls = list(pool.map(partial(_timed_call, engine), requests * 2))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rows.append(
                {
                    "workers": 2,
                    "threads": threads,
                    "concurrent_calls": concurrency,
                    "passes": len(calls),
                    "call_wall_s": round(sum(calls) / len(calls), 3),
                    "passes_per_s": round(len(calls) / wall, 2),
                    "cpu_s_per_pass": round(cpu / len(calls), 3),
                }
            )
            print(rows[-1], flush=True)
    return rows


def encoder_batching(config: Config, path: str) -> list[dict[str, Any]]:
    """The encoder alone, one thread: 4 windows encoded one at a time (what the engine does
    on the CPU) or stacked in one call, core-ms per window, two rounds each."""
    settings = dataclasses.replace(engine_settings(config, path, workers=1), cpu_threads=1)
    ct2 = load_whisper(settings).model
    rng = np.random.default_rng(0)
    rows = []
    for window_s in (5, 8, 10):
        features = rng.standard_normal((4, 80, window_s * 100)).astype(np.float32)
        ct2.encode(ctranslate2.StorageView.from_array(features[:1]))  # warm-up
        for _ in range(2):
            for mode in ("one at a time", "stacked"):
                cpu = time.process_time()
                if mode == "stacked":
                    ct2.encode(ctranslate2.StorageView.from_array(features))
                else:
                    for item in features:
                        ct2.encode(ctranslate2.StorageView.from_array(item[np.newaxis]))
                cpu_ms = (time.process_time() - cpu) / len(features) * 1000
                rows.append({"window_s": window_s, "mode": mode, "core_ms_per_window": cpu_ms})
                print(rows[-1], flush=True)
    return rows


def _timed_call(engine: WhisperEngine, request: RecognitionRequest) -> float:
    started = time.perf_counter()
    engine.recognize([request])
    return time.perf_counter() - started


def layouts_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Thread layout ({report['name']}, {m['date']})",
        "",
        f"Machine: {machine_line(m)}; model base "
        f"{report['compute_type']}, 2 model workers with 1 or 2 threads each; 4 s progress "
        "passes (greedy, word times) over the two long recordings, made one at a time (as "
        "for one talker) or two at once (as under load).",
        "",
        "| threads per worker | calls at once | call wall s | passes / s | core-s / pass |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['threads']} | {row['concurrent_calls']} | {row['call_wall_s']} | "
            f"{row['passes_per_s']} | {row['cpu_s_per_pass']} |"
        )

    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def encoder_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Encoder batching on the CPU ({report['name']}, {m['date']})",
        "",
        f"Machine: {machine_line(m)}; model base "
        f"{report['compute_type']}, one thread; 4 windows of random features, encoded one at "
        "a time (what the engine does on the CPU) or stacked in one call; process CPU "
        "core-ms per window, two rounds.",
        "",
        "| window | one at a time | stacked |",
        "|---|---|---|",
    ]
    for window_s in sorted({r["window_s"] for r in report["rows"]}):
        cells = [
            " / ".join(
                f"{r['core_ms_per_window']:.0f}"
                for r in report["rows"]
                if r["window_s"] == window_s and r["mode"] == mode
            )
            for mode in ("one at a time", "stacked")
        ]
        lines.append(f"| {window_s} s | {cells[0]} | {cells[1]} |")
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    stages = [s.value for s in Stage]
    lines = [
        f"# Where a pass's time goes ({report['name']}, {m['date']})",
        "",
        f"Machine: {machine_line(m)}; model base "
        f"{report['compute_type']}; one model worker, one thread unless the row says 2 (live "
        "runs 2 workers x 1 thread). Requests: the live service's pass shapes over "
        "`long/ru_60s.wav` and `long/en_60s.wav` (progress: greedy, word times, 2/4/6 s of "
        "uncommitted audio with the previous 40 words as context; final: beam 3 over 8 s). "
        "Per-stage figures are process CPU time per request (core-ms), with one call at a "
        "time: the work's own cost. Call wall times are indicative when other work shares "
        "the machine.",
        "",
        "| shape | window s | audio s | call wall s | "
        + " | ".join(f"{s} ms" for s in stages)
        + " | core-s / pass | core-s / audio-s | core-s / talker-s |",
        "|---|---|---|---|" + "---|" * len(stages) + "---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['shape']} | {'/'.join(f'{w:g}' for w in row['windows_s'])} | "
            f"{row['mean_audio_s']} | {row['call_wall_s']} | "
            + " | ".join(f"{row['stage_ms_per_request'][s]}" for s in stages)
            + f" | {row['cpu_s_per_request']} | {row['cpu_s_per_audio_s']} | "
            f"{row['cpu_s_per_talker_s']} |"
        )
    lines += ["", "Shares of a pass's core time:", ""]
    for row in report["rows"]:
        share = ", ".join(f"{k} {v:.0%}" for k, v in row["stage_share"].items() if v >= 0.005)
        lines.append(f"- {row['shape']}: {share}")
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batches", default="1,4,8", help="batch sizes, comma-separated")
    parser.add_argument("--variants", action="store_true", help="also the candidate cuts")
    parser.add_argument(
        "--layouts", action="store_true", help="only the thread layouts (profile_layouts)"
    )
    parser.add_argument(
        "--encoder", action="store_true", help="only encoder batching (profile_encoder)"
    )
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    config = load_config(ROOT / "config.yaml", environ={})
    path = resolve_model(config.model.name, ROOT / config.model.models_dir, allow_download=False)
    # The one-table modes: their default name, their rows and their markdown.
    side_runs = {
        "layouts": ("profile_layouts", layouts, layouts_markdown),
        "encoder": ("profile_encoder", encoder_batching, encoder_markdown),
    }
    for mode, (default_name, rows_of, to_markdown) in side_runs.items():
        if not getattr(args, mode):
            continue
        name = args.name or default_name
        report = {
            "name": name,
            "machine": machine(),
            "compute_type": config.model.compute_type,
            "command": f"python -m benchmarks.profile_pass --{mode}",
            "rows": rows_of(config, path),
        }
        print(to_markdown(report))
        print(f"written: {write_results(name, report, to_markdown(report))} (+ .md)")
        return
    args.name = args.name or "profile_pass"
    models: dict[int, Any] = {}
    rows = []
    previous: dict[tuple[str, int], str] = {}
    for shape in shapes(config, batches, args.variants):
        settings = engine_settings(config, path, workers=1)
        settings = dataclasses.replace(settings, cpu_threads=shape.threads)
        if shape.margin_s is not None:
            window = dataclasses.replace(settings.window, trailing_margin_s=shape.margin_s)
            settings = dataclasses.replace(settings, window=window)
        if shape.threads not in models:
            models[shape.threads] = load_whisper(settings)
        engine = WhisperEngine(models[shape.threads], settings)
        previous = previous or contexts(engine, config)
        requests = requests_for(engine, shape, previous)
        run_shape(engine, requests[: shape.batch], shape.batch)  # warm-up
        started = time.perf_counter()
        timings, _ = run_shape(engine, requests, shape.batch)
        row = summarize(shape, requests, timings)
        rows.append(row)
        print(
            f"{shape.name}: {row['cpu_s_per_request']} core-s/pass, "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
    report = {
        "name": args.name,
        "machine": machine(),
        "compute_type": config.model.compute_type,
        "command": "python -m benchmarks.profile_pass "
        + " ".join(a for a in ("--variants" if args.variants else "",) if a)
        + f" --batches {args.batches}",
        "rows": rows,
    }
    out = write_results(args.name, report, markdown(report))
    print(markdown(report))
    print(f"written: {out} (+ .md)")


if __name__ == "__main__":
    main()
