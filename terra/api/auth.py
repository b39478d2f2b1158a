"""The one place where requests are authorised: where a token is read from, how it is checked.

Every dialect reads its token here (``Authorization: Bearer``, the query string, a form or
JSON field) and checks it with :func:`check_token`: a constant-time comparison against
``server.tokens``. A token that is not valid text (bytes that are not UTF-8, a lone
surrogate from a JSON ``\\ud800``) is refused like a wrong one: 401, never a 500.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Iterable

from aiohttp import web

from terra import keys
from terra.api.errors import Unauthorized
from terra.links import verify_link


def _as_bytes(token: object) -> bytes | None:
    """The token's UTF-8 bytes, or None when it is not a usable token."""
    if isinstance(token, bytes):
        try:
            token = token.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(token, str) or not token or "\ufffd" in token:
        return None
    try:
        return token.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return None


def token_matches(known_tokens: Iterable[str], token: object) -> bool:
    """Whether ``token`` is one of ``known_tokens``; every comparison runs (constant time)."""
    supplied = _as_bytes(token)
    if supplied is None:
        return False
    matched = False
    for known in known_tokens:
        matched |= hmac.compare_digest(supplied, known.encode("utf-8"))
    return matched


def check_token(known_tokens: Iterable[str], token: object) -> None:
    """401 unless ``token`` is one of ``known_tokens``."""
    if token is None or token == "" or token == b"":
        raise Unauthorized("token is required")
    if not token_matches(known_tokens, token):
        raise Unauthorized("invalid token")


def query_token(request: web.Request) -> str | None:
    """``?token=`` if the query string has one."""
    return request.query.get("token")


def bearer_token(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def require_bearer(request: web.Request) -> None:
    """401 unless the request carries ``Authorization: Bearer <a server token>``."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Authorization: Bearer <token> is required")
    check_token(request.app[keys.CONFIG].server.tokens, token)


def is_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address((request.remote or "").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def require_metrics_access(request: web.Request) -> None:
    """/metrics: ``server.metrics_token`` (Bearer or ?token=) when set, else loopback only."""
    token = request.app[keys.CONFIG].server.metrics_token
    if not token:
        if not is_loopback(request):
            raise Unauthorized("/metrics answers loopback clients only (or set metrics_token)")
        return
    check_token((token,), bearer_token(request) or query_token(request))


def viewer_token(request: web.Request) -> str | None:
    """A viewer's token: ``Authorization: Bearer`` (scripts) or ``?token=`` (pages, and the
    browser's EventSource, which cannot set headers)."""
    return bearer_token(request) or query_token(request) or None


def require_viewer(request: web.Request, conference_id: str) -> None:
    """401 unless the request may watch ``conference_id``: a ``server.viewer_tokens`` token,
    a signed link for this conference that has not expired (``terra/links.py``), or a
    server token."""
    config = request.app[keys.CONFIG]
    token = viewer_token(request)
    if token is None:
        raise Unauthorized("token is required (?token= or Authorization: Bearer)")
    if token_matches(config.server.viewer_tokens, token):
        return
    if _as_bytes(token) is not None and verify_link(
        config.server.link_secret, conference_id, token, time.time()
    ):
        return
    check_token(config.server.tokens, token)


def require_operator(request: web.Request) -> None:
    """401 unless ``?token=`` or ``Authorization: Bearer`` is a server token (not a viewer's:
    what it opens spans conferences)."""
    check_token(request.app[keys.CONFIG].server.tokens, viewer_token(request))
