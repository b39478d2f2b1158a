"""Command line: ``terra serve | recognizer | models | stream | minutes | link``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from terra.config import Config

log = logging.getLogger(__name__)


def _configure(path: str | None, overrides: dict[str, dict[str, object]]) -> Config | None:
    """Load the configuration and set up logging; None (reported) if it is invalid."""
    from terra.config import ConfigError, load_config
    from terra.logs import setup_logging

    try:
        config = load_config(path, overrides=overrides)
    except ConfigError as e:
        print(f"terra: {e}", file=sys.stderr)
        return None
    setup_logging(config.server.log_level, config.server.log_json)
    return config


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from terra.app import create_app

    overrides: dict[str, dict[str, object]] = {"server": {}}
    if args.host:
        overrides["server"]["host"] = args.host
    if args.port:
        overrides["server"]["port"] = args.port
    config = _configure(args.config, overrides)
    if config is None:
        return 2
    if "ivcs" in config.server.tokens:
        if not is_loopback_host(config.server.host) and not args.insecure_default_token:
            print(
                f"terra: refusing to serve on {config.server.host} with the example token "
                "'ivcs': set server.tokens or TERRA_TOKENS (or pass --insecure-default-token)",
                file=sys.stderr,
            )
            return 2
        log.warning("the default token 'ivcs' is enabled: set server.tokens or TERRA_TOKENS")
    web.run_app(
        create_app(config),
        host=config.server.host,
        port=config.server.port,
        backlog=config.server.backlog,
        access_log=None,
        print=lambda message: log.info("%s", message),
    )
    return 0


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost``, 127.0.0.0/8, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _recognizer(args: argparse.Namespace) -> int:
    """Deploy (or, with --delete, remove) the recognizer's Ray Serve app; Ray keeps it."""
    from terra.recognizer.ray_app import deploy, undeploy

    overrides: dict[str, dict[str, object]] = {"cluster": {}}
    if args.address:
        overrides["cluster"]["address"] = args.address
    config = _configure(args.config, overrides)
    if config is None:
        return 2
    if args.delete:
        undeploy(config)
    else:
        deploy(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from terra.links import add_link_arguments
    from terra.minutes.cli import add_minutes_arguments
    from terra.models import add_models_arguments
    from terra.streamclient import add_stream_arguments

    parser = argparse.ArgumentParser(prog="terra", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", default=None, help="config.yaml (defaults apply without one)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument(
        "--insecure-default-token",
        action="store_true",
        help="serve on a non-loopback address even with the example token 'ivcs'",
    )
    serve.set_defaults(func=_serve)

    recognizer = commands.add_parser(
        "recognizer", help="deploy the recognizer on a Ray cluster (recognizer.backend: ray)"
    )
    recognizer.add_argument("--config", default=None, help="config.yaml (its cluster section)")
    recognizer.add_argument("--address", default=None, help="Ray address (TERRA_RAY_ADDRESS)")
    recognizer.add_argument("--delete", action="store_true", help="remove the app instead")
    recognizer.set_defaults(func=_recognizer)

    models = commands.add_parser("models", help="install and list Whisper models")
    add_models_arguments(models)

    stream = commands.add_parser("stream", help="play audio files to a server as participants")
    add_stream_arguments(stream)

    minutes = commands.add_parser("minutes", help="compile a conference's minutes from the spool")
    add_minutes_arguments(minutes)

    link = commands.add_parser("link", help="signed viewer links to a conference's pages")
    add_link_arguments(link)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "models":
        from terra.models import run_models_command

        return run_models_command(args)
    if args.command == "minutes":
        from terra.minutes.cli import run_minutes_command

        return run_minutes_command(args)
    if args.command == "link":
        from terra.links import run_link_command

        return run_link_command(args)
    if args.command == "stream":
        from terra.streamclient import run_stream_command

        return run_stream_command(args)
    if args.command == "recognizer":
        return _recognizer(args)
    serve: int = _serve(args)
    return serve


if __name__ == "__main__":
    raise SystemExit(main())
