"""Domain errors and the one middleware that maps every error to an HTTP JSON answer."""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import ClientPayloadError, web

from terra.audio import AudioDecodeError, AudioTooLong
from terra.params import ParamError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A dialect's error JSON from (status, detail). Registered per path prefix in ERROR_BODIES;
# paths under no registered prefix get Terra's {"detail": ...}.
ErrorBody = Callable[[int, str], dict[str, Any]]
ERROR_BODIES = web.AppKey("error_bodies", dict[str, ErrorBody])


class ApiError(Exception):
    """An error with the HTTP status and the detail a client should see. A subclass names
    its status in its header: ``class NotFound(ApiError, status=404)``."""

    status = 400
    retry_after_s = 0  # when more than 0: a Retry-After header (come back later)

    def __init_subclass__(cls, status: int | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:  # else the parent's
            cls.status = status

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ApiError, status=400): ...


class Unauthorized(ApiError, status=401): ...


class NotFound(ApiError, status=404): ...


class PayloadTooLarge(ApiError, status=413): ...


class RequestTimeout(ApiError, status=408): ...


class TooManyRequests(ApiError, status=429): ...


class ServerError(ApiError, status=500): ...


class Unavailable(ApiError, status=503): ...


class ParticipantsFull(Unavailable):
    """The live service has ``stream.max_participants``: a new participant must come back
    later (or go to another box)."""

    retry_after_s = 30


class MinutesBusy(TooManyRequests):
    """``minutes.max_queued`` compiles wait here: a new one must be asked for later."""

    retry_after_s = 30


def _status_and_detail(error: BaseException) -> tuple[int, str] | None:
    """What the middleware answers for an error that is not an ApiError (those carry it)."""
    if isinstance(error, AudioTooLong):
        return 413, str(error)
    if isinstance(error, AudioDecodeError | ParamError):  # audio or a parameter: the client's
        return 400, str(error)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return 507, "the server's disk is full: nothing was stored, try again later"
    if isinstance(error, web.HTTPRequestEntityTooLarge):
        return 413, "the request body is larger than the configured limit"
    if isinstance(error, web.HTTPException) and error.status >= 400:
        return error.status, error.reason
    return None


def _error_json(request: web.Request, status: int, detail: str) -> web.Response:
    for prefix, body in request.app.get(ERROR_BODIES, {}).items():
        if request.path.startswith(prefix):
            return web.json_response(body(status, detail), status=status)
    return web.json_response({"detail": detail}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as JSON ``{"detail": ...}`` with the right status."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        mapped = _status_and_detail(e)
        assert mapped is not None
        return _error_json(request, mapped[0], mapped[1])
    except (ConnectionResetError, ClientPayloadError) as e:
        # The client went away mid-request (its body cut short): nobody is left to answer.
        log.debug("client disconnected during %s %s: %s", request.method, request.path, e)
        return web.Response(status=400)
    except ApiError as e:
        response = _error_json(request, e.status, e.detail)
        if e.retry_after_s > 0:
            response.headers["Retry-After"] = str(e.retry_after_s)
        return response
    except Exception as e:
        mapped = _status_and_detail(e)
        if mapped is None:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return _error_json(request, 500, "internal server error")
        return _error_json(request, mapped[0], mapped[1])
