"""Minutes: compile speed, and accuracy against the live finals of the same meeting.

Each meeting of ../shared/data/speech/meetings/ (one FLAC per participant, exact turns) is
streamed through the real server as a conference server would (every participant in 2 s
fragments, ``online=true&offline=true``, as fast as answers come back): that gives the live
finals and fills the spool. Then ``GET /minutes/{id}`` is walked until the XML is there.
Both are compared with the reference turns (CER/WER per participant, pooled over the
meeting) and with each other.

Speed is the real-time factor of the compile: seconds of audio per second of compile, for
the spooled audio of all participants together and for the meeting's own duration; the
server's figure comes from the job's status file (compile start to end). The same spool is
also compiled without a server (the ``terra minutes`` path) at several
``minutes.max_in_flight``. Finally one meeting is streamed live at real-time pace while the
other is compiled, to show what a compile costs the live finals (their latency from the
end of speech, from the server's ``terra_text_latency_seconds{kind="final"}``).

    python -m benchmarks.minutes [--model base] [--skip-priority]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from lxml import etree

from benchmarks.common import ROOT, SPEECH, error_rates, machine, running_server, write_results
from terra.config import Config, load_config
from terra.jobs import JobStore
from terra.minutes.compiler import MinutesCompiler, in_thread
from terra.minutes.formats import validate_xml
from terra.models import resolve_model
from terra.recognizer.engine import WhisperEngine, load_whisper
from terra.recognizer.options import decode_passes, engine_settings
from terra.spool import Spool, read_conference
from terra.streamclient import ParticipantSource, StreamSettings, stream_participants

TOKEN = "bench-token"
MEETINGS = (("planerka_ru", "ru"), ("standup_en", "en"))
IN_FLIGHT = (1, 3, 6)


def reference_turns(meeting: str) -> list[dict[str, Any]]:
    with open(SPEECH / "meetings" / meeting / "turns.tsv", encoding="utf-8") as f:
        return [
            {**row, "start_s": float(row["start_s"]), "end_s": float(row["end_s"])}
            for row in csv.DictReader(f, delimiter="\t")
        ]


def participants_of(meeting: str) -> list[ParticipantSource]:
    folder = SPEECH / "meetings" / meeting
    return [
        ParticipantSource(p.stem, p.stem.title(), p)
        for p in sorted(folder.glob("*.flac"))
        if p.stem != "mix"
    ]


def texts_by_speaker(turns: list[dict[str, Any]]) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    for turn in turns:
        out.setdefault(turn["speaker"], []).append(turn["text"])
    return {speaker: " ".join(texts) for speaker, texts in out.items()}


def compare(reference: dict[str, str], hypothesis: dict[str, str]) -> dict[str, Any]:
    speakers = sorted(reference)
    return {
        "meeting": error_rates(
            [reference[s] for s in speakers], [hypothesis.get(s, "") for s in speakers]
        ),
        "participants": {
            s: error_rates([reference[s]], [hypothesis.get(s, "")])["cer"] for s in speakers
        },
    }


def start_errors(turns: list[dict[str, Any]], phrases: list[dict[str, Any]]) -> dict[str, float]:
    """How far each reference turn's first phrase starts from the turn (seconds)."""
    errors = []
    for turn in turns:
        mine = [
            p["start_s"]
            for p in phrases
            if p["participant_id"] == turn["speaker"]
            and p["start_s"] < turn["end_s"]
            and p["end_s"] > turn["start_s"]
        ]
        if mine:
            errors.append(abs(min(mine) - turn["start_s"]))
    errors.sort()
    return {
        "turns_found": len(errors),
        "turns": len(turns),
        "mean_s": round(sum(errors) / max(len(errors), 1), 3),
        "max_s": round(max(errors, default=0.0), 3),
    }


# -- metrics -------------------------------------------------------------------------------
_SAMPLE = re.compile(r'^terra_text_latency_seconds_bucket\{kind="final",le="([^"]+)"\} (\S+)$')


async def final_latency_buckets(
    session: aiohttp.ClientSession, url: str
) -> list[tuple[float, float]]:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    buckets = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            le = float("inf") if match[1] == "+Inf" else float(match[1])
            buckets.append((le, float(match[2])))
    return sorted(buckets)


def quantile(
    before: list[tuple[float, float]], after: list[tuple[float, float]], q: float
) -> float:
    """A quantile of the observations between two readings of a cumulative histogram."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before)]
    if not counts or counts[-1][1] <= 0:
        return float("nan")
    rank = q * counts[-1][1]
    previous_le, previous = 0.0, 0.0
    for le, count in counts:
        if count >= rank:
            if le == float("inf"):
                return previous_le
            return previous_le + (le - previous_le) * (rank - previous) / max(
                count - previous, 1e-9
            )
        previous_le, previous = le, count
    return previous_le


# -- passes ----------------------------------------------------------------------------------
async def live_pass(
    url: str, conference: str, meeting: str, lang: str, speed: float = 0.0
) -> dict[str, list[dict[str, Any]]]:
    settings = StreamSettings(
        url=url,
        conference_id=conference,
        chunk_ms=2000,
        speed=speed,
        token=TOKEN,
        lang=lang,
        offline=True,
        tail_silence_ms=2000,
    )
    finals = await stream_participants(settings, participants_of(meeting), on_elems=lambda *_: None)
    return {pid: [dict(e) for e in elems] for pid, elems in finals.items()}


async def minutes_pass(url: str, conference: str) -> tuple[bytes, float]:
    """Walk GET /minutes to the XML; the wall time from queueplacing to the protocol."""
    params = {"token": TOKEN}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/minutes/{conference}", params=params) as response:
            body = await response.json()
            assert body["status"] == "queueplacing", body
        started = time.perf_counter()
        while True:
            async with session.get(f"{url}/minutes/{conference}", params=params) as response:
                if response.content_type == "application/json":
                    assert (await response.json())["status"] == "running"
                else:
                    return await response.read(), time.perf_counter() - started
            await asyncio.sleep(0.2)


def xml_phrases(xml: bytes) -> list[dict[str, Any]]:
    errors = validate_xml(xml)
    assert not errors, errors
    root = etree.fromstring(xml)
    return [
        {
            "participant_id": p.get("participant_id"),
            "start_s": float(p.get("start_s")),
            "end_s": float(p.get("end_s")),
            "text": p.text or "",
        }
        for p in root.iterfind("phrases/phrase")
    ]


def spool_copy(spool_root: Path, source: str, target: str) -> None:
    """The spooled audio of one conference under another id (a fresh compile to run)."""
    spool = Spool(spool_root, fsync=False)
    for participant in read_conference(spool_root, source):
        for fragment in participant.fragments:
            spool.write(
                target,
                participant.participant_id,
                participant.name,
                fragment.start_us / 1_000_000,
                0,
                fragment.path.stem.split("_", 1)[1],
                participant.language,
                fragment.path.read_bytes(),
            )


async def priority_pass(url: str, config: Config) -> dict[str, Any]:
    """Live finals of the stand-up at real-time pace: alone, then during a compile."""
    spool_root = Path(config.spool.dir)
    store = JobStore(Path(config.minutes.jobs_dir))
    result: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        for label, compile_during in (("alone", False), ("during_compile", True)):
            conference = f"priority-{label}"
            compiling = None
            if compile_during:
                await asyncio.to_thread(spool_copy, spool_root, "bench-planerka_ru", "busy")
                compiling = asyncio.create_task(minutes_pass(url, "busy"))
            before = await final_latency_buckets(session, url)
            finals = await live_pass(url, conference, "standup_en", "en", speed=1.0)
            after = await final_latency_buckets(session, url)
            hypothesis = {
                pid: " ".join(e["text"].strip() for e in elems) for pid, elems in finals.items()
            }
            entry: dict[str, Any] = {
                "final_latency_p50_s": round(quantile(before, after, 0.5), 2),
                "final_latency_p95_s": round(quantile(before, after, 0.95), 2),
                "finals_cer": compare(texts_by_speaker(reference_turns("standup_en")), hypothesis)[
                    "meeting"
                ]["cer"],
            }
            if compiling is not None:
                _, wall = await compiling
                job = store.get("minutes", "busy")
                assert job is not None
                entry["compile_s_under_live_load"] = job.params["compile_s"]
                entry["compile_wall_s"] = round(wall, 1)
            result[label] = entry
            print(f"priority {label}: {entry}", flush=True)
    return result


async def measure(model_name: str, priority: bool, in_flight: int | None) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="terra-minutes-bench-"))
    config = load_config(
        ROOT / "config.yaml",
        environ={},
        overrides={
            "model": {"name": model_name},
            "server": {"tokens": [TOKEN]},
            "spool": {"dir": str(folder / "spool"), "fsync": False},
            "minutes": {
                "dir": str(folder / "minutes"),
                "jobs_dir": str(folder / "jobs"),
                **({"max_in_flight": in_flight} if in_flight else {}),
            },
        },
    )
    path = resolve_model(model_name, ROOT / config.model.models_dir, allow_download=False)
    settings = engine_settings(config, path, workers=1)
    engine = WhisperEngine(load_whisper(settings), settings)
    store = JobStore(Path(config.minutes.jobs_dir))
    meetings: dict[str, Any] = {}
    started = time.perf_counter()
    async with running_server(config, engine) as url:
        for meeting, lang in MEETINGS:
            conference = f"bench-{meeting}"
            live = await live_pass(url, conference, meeting, lang)
            xml, wall = await minutes_pass(url, conference)
            job = store.get("minutes", conference)
            assert job is not None
            phrases = xml_phrases(xml)
            turns = reference_turns(meeting)
            reference = texts_by_speaker(turns)
            live_text = {
                pid: " ".join(
                    e["text"].strip() for e in sorted(elems, key=lambda e: e["timestamp_float"])
                )
                for pid, elems in live.items()
            }
            minutes_text: dict[str, str] = {}
            for phrase in phrases:
                minutes_text.setdefault(phrase["participant_id"], "")
                minutes_text[phrase["participant_id"]] += " " + phrase["text"]
            compile_s = float(job.params["compile_s"])
            duration_s = max(t["end_s"] for t in turns)
            audio_s = float(job.params["audio_s"])
            meetings[meeting] = {
                "lang": lang,
                "participants": len(reference),
                "meeting_s": round(duration_s, 1),
                "spooled_audio_s": audio_s,
                "speech_s": job.params["speech_s"],
                "phrases": len(phrases),
                "server_compile_s": compile_s,
                "server_wall_s": round(wall, 1),
                "rtf_audio": round(audio_s / compile_s, 1),
                "rtf_meeting": round(duration_s / compile_s, 1),
                "live_finals_vs_reference": compare(reference, live_text),
                "minutes_vs_reference": compare(reference, minutes_text),
                "minutes_vs_live": compare(live_text, minutes_text)["meeting"],
                "phrase_start_error": start_errors(turns, phrases),
                "minutes": phrases,
                "live_finals": live_text,
            }
            row = meetings[meeting]
            live_cer = row["live_finals_vs_reference"]["meeting"]["cer"]
            minutes_cer = row["minutes_vs_reference"]["meeting"]["cer"]
            print(
                f"{meeting}: live CER {live_cer}, minutes CER {minutes_cer}, "
                f"compile {compile_s:.1f} s (x{audio_s / compile_s:.1f} audio)",
                flush=True,
            )
        priority_result = await priority_pass(url, config) if priority else None

    pooled: dict[str, list[str]] = {"reference": [], "live": [], "minutes": []}
    for meeting, row in meetings.items():
        reference = texts_by_speaker(reference_turns(meeting))
        for speaker in sorted(reference):
            pooled["reference"].append(reference[speaker])
            pooled["live"].append(row["live_finals"].get(speaker, ""))
            pooled["minutes"].append(
                " ".join(p["text"] for p in row["minutes"] if p["participant_id"] == speaker)
            )
    both = {
        "live_finals_vs_reference": error_rates(pooled["reference"], pooled["live"]),
        "minutes_vs_reference": error_rates(pooled["reference"], pooled["minutes"]),
    }

    direct: dict[str, Any] = {}
    for meeting, _ in MEETINGS:
        direct[meeting] = {}
        for in_flight in IN_FLIGHT:
            options = dataclasses.replace(config.minutes, max_in_flight=in_flight)
            compiler = MinutesCompiler(
                options,
                in_thread(engine.recognize),
                decode=decode_passes(config),
            )
            result = await compiler.compile(Path(config.spool.dir), f"bench-{meeting}")
            direct[meeting][str(in_flight)] = {
                "compile_s": round(result.seconds, 2),
                "rtf_audio": round(result.minutes.audio_s / result.seconds, 1),
                "rtf_meeting": round(meetings[meeting]["meeting_s"] / result.seconds, 1),
            }
            print(f"direct {meeting} max_in_flight={in_flight}: {direct[meeting][str(in_flight)]}")
    return {
        "model": model_name,
        "machine": machine(),
        "config": {
            "minutes": dataclasses.asdict(config.minutes),
            "cpu_threads": config.model.cpu_threads,
            "compute_type": config.model.compute_type,
        },
        "seconds": round(time.perf_counter() - started, 1),
        "meetings": meetings,
        "both_meetings": both,
        "direct_compile": direct,
        "priority": priority_result,
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# Minutes: compile speed and accuracy ({result['model']}, {m['date']})",
        "",
        f"{m['cores']} cores, {m['cpu']}, CTranslate2 {m['ctranslate2']}, "
        f"{result['config']['compute_type']}; minutes defaults (beam "
        f"{result['config']['minutes']['beam_size']}, word timestamps, context; server "
        f"max_in_flight {result['config']['minutes']['max_in_flight']}).",
        "",
        "CER pooled over the participants of a meeting (lowercase, punctuation stripped, ё→е); "
        "live = the finals of the same meeting streamed through POST /process.",
        "",
        "| meeting | participants | meeting s | spooled audio s | compile s (server) "
        "| RTF audio | RTF meeting | live finals CER | minutes CER | minutes vs live CER "
        "| turn start error mean/max s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["meetings"].items():
        lines.append(
            f"| {name} | {row['participants']} | {row['meeting_s']} | {row['spooled_audio_s']} "
            f"| {row['server_compile_s']} | {row['rtf_audio']} | {row['rtf_meeting']} "
            f"| {row['live_finals_vs_reference']['meeting']['cer']:.3f} "
            f"| {row['minutes_vs_reference']['meeting']['cer']:.3f} "
            f"| {row['minutes_vs_live']['cer']:.3f} "
            f"| {row['phrase_start_error']['mean_s']} / {row['phrase_start_error']['max_s']} |"
        )
    live, mine = (
        result["both_meetings"][k] for k in ("live_finals_vs_reference", "minutes_vs_reference")
    )
    lines += [
        "",
        f"Both meetings pooled: live finals CER {live['cer']:.3f} (WER {live['wer']:.3f}), "
        f"minutes CER {mine['cer']:.3f} (WER {mine['wer']:.3f}).",
        "RTF audio = spooled audio of all participants / compile seconds; RTF meeting = the "
        "meeting's duration / compile seconds.",
    ]
    lines += ["", "Per participant CER (live → minutes):", ""]
    for name, row in result["meetings"].items():
        live = row["live_finals_vs_reference"]["participants"]
        mine = row["minutes_vs_reference"]["participants"]
        pairs = ", ".join(f"{p} {live[p]:.3f} → {mine[p]:.3f}" for p in sorted(live))
        lines.append(f"- {name}: {pairs}")
    lines += [
        "",
        "Compile without a server (`terra minutes` path), by `minutes.max_in_flight` "
        "(seconds; RTF audio):",
        "",
        "| meeting | " + " | ".join(str(n) for n in IN_FLIGHT) + " |",
        "|---|" + "---|" * len(IN_FLIGHT),
    ]
    for name, by in result["direct_compile"].items():
        cells = " | ".join(
            f"{by[str(n)]['compile_s']} s; x{by[str(n)]['rtf_audio']}" for n in IN_FLIGHT
        )
        lines.append(f"| {name} | {cells} |")
    priority = result.get("priority")
    if priority:
        alone, busy = priority["alone"], priority["during_compile"]
        lines += [
            "",
            "Live finals of standup_en streamed at real-time pace (latency from the end of "
            "speech to the final):",
            "",
            "| | final p50 s | final p95 s | finals CER |",
            "|---|---|---|---|",
            f"| alone | {alone['final_latency_p50_s']} | {alone['final_latency_p95_s']} "
            f"| {alone['finals_cer']:.3f} |",
            f"| while planerka_ru compiles | {busy['final_latency_p50_s']} "
            f"| {busy['final_latency_p95_s']} | {busy['finals_cer']:.3f} |",
            "",
            f"The compile took {busy['compile_s_under_live_load']} s under that live load.",
        ]
    lines += ["", "Command: `python -m benchmarks.minutes`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--skip-priority", action="store_true", help="skip the live-load pass")
    parser.add_argument(
        "--max-in-flight", type=int, default=None, help="minutes.max_in_flight of the server"
    )
    parser.add_argument("--name", default=None, help="results name (default minutes_MODEL)")
    args = parser.parse_args()
    result = asyncio.run(measure(args.model, not args.skip_priority, args.max_in_flight))
    path = write_results(args.name or f"minutes_{args.model}", result, markdown(result))
    print(markdown(result))
    print(f"written: {path}")
    print(
        json.dumps({k: v["minutes_vs_reference"]["meeting"] for k, v in result["meetings"].items()})
    )


if __name__ == "__main__":
    main()
