"""Awaiting several coroutines at once where one failure fails them all.

``asyncio.gather`` raises the first failure but leaves the others running, untracked (a
failed job's other recognition requests would go on queueing at the recognizer).
:func:`gather_or_cancel` runs them in an ``asyncio.TaskGroup``, which cancels and awaits
the others first, and raises that failure as itself, not in an ``ExceptionGroup``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def gather_or_cancel(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """The results in order; when one raises, the others are cancelled and awaited, then
    its exception is raised (the first one, when several failed)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]
