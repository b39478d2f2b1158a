"""Signed viewer links: a per-conference token that expires. Pure.

The token is ``{expires}.{mac}``: ``expires`` in unix seconds and ``mac`` the hex
HMAC-SHA256 of ``{conference_id}:{expires}`` under ``server.link_secret``. It opens that
conference's feed, transcript and pages only, until it expires.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import sys
import time
from urllib.parse import quote


def _mac(secret: str, conference_id: str, expires: int) -> str:
    message = f"{conference_id}:{expires}".encode()
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sign_link(secret: str, conference_id: str, expires: int) -> str:
    """The viewer token for ``conference_id`` valid until ``expires`` (unix seconds)."""
    if not secret:
        raise ValueError("server.link_secret is empty: signed links are off")
    return f"{expires}.{_mac(secret, conference_id, expires)}"


def verify_link(secret: str, conference_id: str, token: str, now: float) -> bool:
    """True when ``token`` was signed for this conference with ``secret`` and is not expired."""
    if not secret:
        return False
    expires_text, dot, mac = token.partition(".")
    if not dot or not expires_text.isascii() or not expires_text.isdigit() or len(mac) != 64:
        return False
    expires = int(expires_text)
    expected = _mac(secret, conference_id, expires)
    return hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode()) and now <= expires


def add_link_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("conference_id")
    parser.add_argument("--hours", type=float, default=4.0, help="valid this long (default 4)")
    parser.add_argument("--config", default=None, help="config.yaml (for server.link_secret)")
    parser.add_argument("--url", default="http://127.0.0.1:9001", help="the server's address")


def run_link_command(args: argparse.Namespace) -> int:
    """``terra link``: print the captions page and minutes viewer links for a conference."""
    from terra.config import ConfigError, load_config
    from terra.params import ParamError, validate_id

    try:
        config = load_config(args.config)
        conference_id = validate_id("conference_id", args.conference_id)
        token = sign_link(
            config.server.link_secret, conference_id, int(time.time() + args.hours * 3600)
        )
    except (ConfigError, ParamError, ValueError) as e:
        print(f"terra link: {e}", file=sys.stderr)
        return 2
    base = args.url.rstrip("/")
    print(f"{base}/live/{conference_id}?token={quote(token)}")
    print(f"{base}/minutes/{conference_id}/view?token={quote(token)}")
    return 0
