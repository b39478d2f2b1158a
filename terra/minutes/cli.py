"""``terra minutes CONFERENCE_ID``: compile minutes from the spool on disk, without a server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_minutes_arguments(parser: argparse.ArgumentParser) -> None:
    from terra.minutes.formats import FORMATS

    parser.add_argument("conference_id", help="the conference whose spooled audio to compile")
    parser.add_argument(
        "--spool", default=None, help="the spool folder (default: spool.dir of the config)"
    )
    parser.add_argument("--format", choices=FORMATS, default="xml", help="default: xml")
    parser.add_argument("--output", "-o", default=None, help="write here (default: stdout)")
    parser.add_argument("--config", default=None, help="config.yaml (defaults apply without one)")
    parser.add_argument("--model", default=None, help="a model name or folder (model.name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run_minutes_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from terra.config import ConfigError, load_config, zone_of
    from terra.minutes.compiler import MinutesCompiler, NothingSpooled, in_thread
    from terra.minutes.formats import render
    from terra.models import resolve_model
    from terra.params import ParamError, validate_id
    from terra.recognizer.engine import WhisperEngine, load_whisper
    from terra.recognizer.options import decode_passes, engine_settings
    from terra.spool import read_conference

    overrides: dict[str, dict[str, object]] = {}
    if args.model:
        overrides["model"] = {"name": args.model}
    try:
        config = load_config(args.config, overrides=overrides)
        conference_id = validate_id("conference_id", args.conference_id)
    except (ConfigError, ParamError) as e:
        print(f"terra minutes: {e}", file=sys.stderr)
        return 2
    spool = Path(args.spool or config.spool.dir)
    if not read_conference(spool, conference_id):
        print(f"terra minutes: nothing spooled for {conference_id} in {spool}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = resolve_model(
            config.model.name,
            Path(config.model.models_dir),
            allow_download=config.model.allow_download,
        )
        settings = engine_settings(config, path, workers=1)
        engine = WhisperEngine(load_whisper(settings), settings)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"terra minutes: {e}", file=sys.stderr)
        return 1

    bar = tqdm(
        total=100,
        desc=f"minutes {conference_id}",
        unit="%",
        file=sys.stderr,
        disable=args.no_progress,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
    )
    with bar:

        def progress(fraction: float) -> None:
            bar.n = round(100 * fraction, 1)
            bar.refresh()

        try:
            compiler = MinutesCompiler(
                config.minutes,
                in_thread(engine.recognize),
                decode=decode_passes(config),
                model=config.model.name,
            )
            result = asyncio.run(compiler.compile(spool, conference_id, progress))
        except NothingSpooled:
            bar.close()
            print(f"terra minutes: nothing spooled for {conference_id} in {spool}", file=sys.stderr)
            return 1
    data = render(result.minutes, args.format, zone_of(config.stream.timezone))
    if args.output:
        Path(args.output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    minutes = result.minutes
    print(
        f"terra minutes: {len(minutes.phrases)} phrases of {len(minutes.participants)} "
        f"participant(s); {minutes.audio_s:.1f} s of audio ({minutes.duration_s:.1f} s meeting) "
        f"in {result.seconds:.1f} s",
        file=sys.stderr,
    )
    return 0
