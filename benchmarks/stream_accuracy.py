"""Accuracy of streamed finals against the references and against offline transcription.

Every Russian and English clip with an exact reference in ../shared/data/speech/ is
streamed through the real server in 2 s fragments (at twice real time); its
finals are compared with the reference, and with faster-whisper's own full-file
transcription of the same clip by the same model (beam 5), so the cost of streaming is
one number per language. The two 60 s recordings without reference are compared with
their offline transcription only (agreement).

    python -m benchmarks.stream_accuracy [--model base]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from faster_whisper import WhisperModel

from benchmarks.common import (
    ROOT,
    SPEECH,
    Clip,
    corpus,
    error_rates,
    machine,
    running_server,
    write_results,
)
from terra.config import load_config
from terra.models import resolve_model
from terra.recognizer.engine import WhisperEngine, load_whisper
from terra.recognizer.options import engine_settings
from terra.streamclient import ParticipantSource, StreamSettings, stream_participants

# Twice real time: with progress passes at most once a second per participant, each 2 s
# fragment still gets its pass, as at real-time pace, in half the wall time.
SPEED = 2.0


async def stream_clip(url: str, clip: Path, lang: str, index: int) -> str:
    participant = ParticipantSource(f"p{index}", f"p{index}", clip)
    settings = StreamSettings(
        url=url,
        conference_id=f"accuracy-{index}",
        chunk_ms=2000,
        speed=SPEED,
        token="ivcs",
        lang=lang,
        offline=False,
        tail_silence_ms=2000,
    )
    finals = await stream_participants(settings, [participant], on_elems=lambda *_: None)
    return " ".join(str(e["text"]).strip() for e in finals[participant.participant_id])


def offline_text(model: WhisperModel, clip: Path, lang: str) -> str:
    segments, _ = model.transcribe(str(clip), language=lang, beam_size=5)
    return " ".join(s.text.strip() for s in segments)


async def measure(model_name: str, settings: list[str]) -> dict[str, Any]:
    overrides: dict[str, dict[str, Any]] = {
        "model": {"name": model_name},
        "spool": {"fsync": False},
    }
    for setting in settings:
        key, _, value = setting.partition("=")
        section, _, name = key.partition(".")
        overrides.setdefault(section, {})[name] = value
    config = load_config(
        ROOT / "config.yaml",
        environ={},
        overrides=overrides,
    )
    path = resolve_model(model_name, ROOT / config.model.models_dir, allow_download=False)
    engine_config = engine_settings(config, path, workers=1)
    model = load_whisper(engine_config)
    engine = WhisperEngine(model, engine_config)
    clips = corpus()
    long_clips = [
        Clip(SPEECH / "long" / f"{lang}_60s.wav", lang, 60.0, "") for lang in ("ru", "en")
    ]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    async with running_server(config, engine) as url:
        for index, clip in enumerate(clips + long_clips):
            streamed = await stream_clip(url, clip.path, clip.lang, index)
            offline = await asyncio.to_thread(offline_text, model, clip.path, clip.lang)
            rows.append(
                {
                    "clip": str(clip.path.relative_to(SPEECH)),
                    "lang": clip.lang,
                    "reference": clip.transcript,
                    "streamed": streamed,
                    "offline": offline,
                }
            )
            print(f"{clip.lang} {clip.path.name}: {streamed[:70]!r}", flush=True)
    summary: dict[str, Any] = {}
    for lang in ("ru", "en"):
        with_ref = [r for r in rows if r["lang"] == lang and r["reference"]]
        every = [r for r in rows if r["lang"] == lang]
        summary[lang] = {
            "clips": len(with_ref),
            "streamed_vs_reference": error_rates(
                [r["reference"] for r in with_ref], [r["streamed"] for r in with_ref]
            ),
            "offline_vs_reference": error_rates(
                [r["reference"] for r in with_ref], [r["offline"] for r in with_ref]
            ),
            "streamed_vs_offline_all": error_rates(
                [r["offline"] for r in every], [r["streamed"] for r in every]
            ),
        }
    return {
        "model": model_name,
        "settings": settings,
        "machine": machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "clips": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Streamed finals vs offline ({result['model']}, {result['machine']['date']})",
        "",
        "| lang | clips | streamed WER | streamed CER | offline WER | offline CER "
        "| streamed vs offline CER (incl. 60 s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for lang, s in result["summary"].items():
        streamed, offline = s["streamed_vs_reference"], s["offline_vs_reference"]
        lines.append(
            f"| {lang} | {s['clips']} | {streamed['wer']:.3f} | {streamed['cer']:.3f} "
            f"| {offline['wer']:.3f} | {offline['cer']:.3f} "
            f"| {s['streamed_vs_offline_all']['cer']:.3f} |"
        )
    lines += ["", "Command: `python -m benchmarks.stream_accuracy`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config.yaml setting (repeatable)",
    )
    parser.add_argument("--name", default=None, help="results file name")
    args = parser.parse_args()
    result = asyncio.run(measure(args.model, args.set))
    path = write_results(args.name or f"stream_accuracy_{args.model}", result, markdown(result))
    print(markdown(result))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
