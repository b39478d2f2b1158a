"""Signed viewer links: a per-conference token that expires. Pure.

The token is ``{expires}.{mac}``: ``expires`` in unix seconds and ``mac`` the hex
HMAC-SHA256 of ``{conference_id}:{expires}`` under ``server.link_secret``. It opens that
conference's feed, transcript and pages only, until it expires.
"""

from __future__ import annotations

import hashlib
import hmac


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
