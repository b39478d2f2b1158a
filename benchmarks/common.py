"""Shared benchmark plumbing: the real server on loopback, the speech corpus, text metrics."""

from __future__ import annotations

import csv
import json
import platform
import re
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jiwer
from aiohttp import web

from terra.app import create_app
from terra.config import Config
from terra.recognizer.types import RecognitionEngine

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT.parent / "shared" / "data" / "speech"
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True, slots=True)
class Clip:
    path: Path
    lang: str
    duration_s: float
    transcript: str


def corpus(languages: tuple[str, ...] = ("ru", "en"), exact_only: bool = True) -> list[Clip]:
    clips = []
    with open(SPEECH / "manifest.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["lang"] not in languages or not row["transcript"]:
                continue
            if exact_only and row["reference"] != "exact":
                continue
            if row["channels"] != "1":
                continue
            clips.append(
                Clip(SPEECH / row["path"], row["lang"], float(row["duration_s"]), row["transcript"])
            )
    return clips


def normalise(text: str) -> str:
    text = text.lower().replace("ё", "е")
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    refs = [normalise(r) for r in references]
    hyps = [normalise(h) for h in hypotheses]
    return {
        "wer": round(float(jiwer.wer(refs, hyps)), 4),
        "cer": round(float(jiwer.cer(refs, hyps)), 4),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def running_server(config: Config, engine: RecognitionEngine) -> AsyncIterator[str]:
    """The real terra app on a loopback port; yields its base URL."""
    runner = web.AppRunner(create_app(config, engine=engine), access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def machine() -> dict[str, Any]:
    import os

    import ctranslate2

    cpu_model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu_model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
            )
    except OSError:
        pass
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "ctranslate2": ctranslate2.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def machine_line(m: dict[str, Any]) -> str:
    """A ``machine()`` record as the reports name it: cores and CPU model."""
    return f"{m['cores']} cores, {m.get('cpu_model') or m['cpu']}"


def write_results(name: str, data: dict[str, Any], markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (RESULTS / f"{name}.md").write_text(markdown, encoding="utf-8")
    return path
