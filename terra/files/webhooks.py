"""Webhooks: a job that ended ``succeeded`` or ``failed`` POSTed to the ``webhook`` URL its
params name (connecte's ``Webhook-URL``). A canceled job sends none: the connecte spec calls
the Webhook-URL "когда прогноз обновит статус на succeeded или failed".

A :class:`Webhooks` is a kind's :class:`terra.jobs.runner.Notifier`: the runner sends each
notice under the job's lease, and a webhook a restart interrupted is sent again by whoever
takes the job next. A POST is retried by the one retry policy (:mod:`terra.retry`) on
connection errors, timeouts, 408, 429 and 5xx. Webhooks have their own connection pool,
timeout and answer-size limit, apart from the audio downloads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from terra.config import FilesConfig
from terra.files.fetch import Fetcher, FetchError
from terra.jobs.store import Job, JobStatus
from terra.retry import Backoff, Retryable, Sleep, retryable_status, retrying

log = logging.getLogger(__name__)

# The ended job as the webhook sends it (the API's serialisation).
Payload = Callable[[Job], Awaitable[dict[str, Any]]]

# The end states the connecte spec sends a callback for (canceled is not one of them).
SENT_ON = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED})


class Webhooks:
    """POSTs ``payload(job)`` to ``job.params["webhook"]`` (``files.webhook_*`` settings)."""

    def __init__(
        self, config: FilesConfig, payload: Payload, *, sleep: Sleep = asyncio.sleep
    ) -> None:
        self._payload = payload
        self._sleep = sleep
        # Their own pool, a short timeout, and only the head of an answer read.
        self.fetcher = Fetcher(
            config.url_allow, config.webhook_max_response_bytes, config.webhook_timeout_s
        )
        self.backoff = Backoff(
            config.webhook_backoff_s, config.webhook_backoff_max_s, config.webhook_tries
        )

    def wants(self, job: Job) -> bool:
        return job.status in SENT_ON and bool(job.params.get("webhook"))

    async def send(self, job: Job) -> None:
        """POST the ended job to its webhook until it is taken (any answer
        :func:`terra.retry.retryable_status` does not retry) or the tries are spent."""
        url = str(job.params["webhook"])
        payload = await self._payload(job)
        try:
            async for attempt in retrying(self.backoff, sleep=self._sleep):
                with attempt:
                    try:
                        status = await self.fetcher.post_json(url, payload)
                    except FetchError:
                        raise  # refused by the address guard: never retried
                    except Exception as e:  # connection errors and timeouts are retried
                        raise Retryable(f"{type(e).__name__}: {e}") from e
                    if retryable_status(status):
                        raise Retryable(f"HTTP {status}")
                    log.info(
                        "webhook for %s: HTTP %d (try %d)",
                        job.id,
                        status,
                        attempt.retry_state.attempt_number,
                    )
        except FetchError as e:
            log.warning("webhook for %s refused: %s", job.id, e)
        except Retryable as e:
            log.warning("webhook for %s given up after %d tries: %s", job.id, self.backoff.tries, e)

    async def close(self) -> None:
        await self.fetcher.close()
