"""Awaiting several coroutines at once where one failure fails them all, and stopping
tasks.

``asyncio.gather`` raises the first failure but leaves the others running, untracked (a
failed job's other recognition requests would go on queueing at the recognizer).
:func:`gather_or_cancel` runs them in an ``asyncio.TaskGroup``, which cancels and awaits
the others first, and raises that failure as itself, not in an ``ExceptionGroup``.
:func:`cancel_and_wait` is how an owner stops its background tasks (as aiohttp's
``cleanup_ctx`` examples do): cancel each, then wait until each has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


async def gather_or_cancel(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """The results in order; when one raises, the others are cancelled and awaited, then
    its exception is raised (the first one, when several failed)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and return once each has ended. One that had failed (or fails while
    it stops) is logged, not raised: the others are still stopped. A cancel of the caller
    still reaches the caller."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    ended = await asyncio.gather(*pending, return_exceptions=True)
    for task, result in zip(pending, ended):
        if isinstance(result, Exception):
            name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
            log.error("%s had failed when it was stopped", name, exc_info=result)
