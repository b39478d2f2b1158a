"""The one retry policy: exponential backoff (the delay doubles from ``first_s`` up to
``max_s``) over a number of tries or a span of time, on failures marked :class:`Retryable`. Built on
``tenacity`` (its ``AsyncRetrying``); the sleep is injectable so tests count delays instead
of waiting them.

Used by the webhooks, the HTTP translator, every resubmit of a recognition request the
scheduler dropped because its queue was full, and the resend of a request the Ray cluster
could not take (``recognizer/ray_client.py``, for ``cluster.retry_s``). HTTP answers worth
another try are the ones :func:`retryable_status` names (408, 429 and 5xx); any other answer
is final.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_never,
    wait_exponential,
)
from tenacity.stop import stop_base

from terra.recognizer.types import Recognition, RecognitionRequest

Sleep = Callable[[float], Awaitable[None]]
Submit = Callable[[RecognitionRequest], "asyncio.Future[Recognition | None]"]


class Retryable(Exception):
    """A failure worth another try (a connection error, a 429, a full queue ...)."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Wait ``first_s``, then twice as long each time, at most ``max_s``; ``tries``
    attempts in all, and none after ``within_s`` seconds from the first (0: no bound)."""

    first_s: float
    max_s: float
    tries: int = 0
    within_s: float = 0.0


# A request the recognizer dropped (queue full) is sent again, for as long as it takes.
RESUBMIT = Backoff(first_s=0.5, max_s=10.0)


def retryable_status(status: int) -> bool:
    """HTTP answers worth another try: timeouts, rate limits and server errors."""
    return status in (408, 429) or status >= 500


def retrying(policy: Backoff, *, sleep: Sleep = asyncio.sleep) -> AsyncRetrying:
    """``async for attempt in retrying(policy): with attempt: ...``; the last
    :class:`Retryable` is raised when the tries are spent, anything else at once."""
    stop: stop_base = stop_after_attempt(policy.tries) if policy.tries > 0 else stop_never
    if policy.within_s > 0:
        stop = stop | stop_after_delay(policy.within_s)
    return AsyncRetrying(
        stop=stop,
        wait=wait_exponential(multiplier=policy.first_s, max=policy.max_s),
        retry=retry_if_exception_type(Retryable),
        sleep=sleep,
        reraise=True,
    )


async def until_taken(
    submit: Submit, request: RecognitionRequest, *, sleep: Sleep = asyncio.sleep
) -> Recognition:
    """One request through the scheduler; dropped because its queue is full means: wait,
    send it again (:data:`RESUBMIT`)."""
    async for attempt in retrying(RESUBMIT, sleep=sleep):
        with attempt:
            result = await submit(request)
            if result is None:
                raise Retryable("the recognizer queue is full")
            return result
    raise AssertionError("unreachable: RESUBMIT never stops")
