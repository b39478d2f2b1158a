"""terra/tasks.py: stopping background tasks (real asyncio tasks, no fakes)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from terra.tasks import cancel_and_wait


async def test_cancel_and_wait_returns_after_each_task_has_cleaned_up() -> None:
    started = [asyncio.Event() for _ in range(3)]
    cleaned: list[int] = []

    async def background(i: int) -> None:
        started[i].set()
        try:
            await asyncio.Event().wait()  # runs until it is stopped
        finally:
            await asyncio.sleep(0)  # an await during cleanup: still waited for
            cleaned.append(i)

    tasks = [asyncio.create_task(background(i)) for i in range(3)]
    for event in started:
        await event.wait()
    await cancel_and_wait(tasks)
    assert sorted(cleaned) == [0, 1, 2]
    assert all(t.cancelled() for t in tasks)


async def test_a_task_that_had_failed_is_logged_and_the_others_still_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> None:
        raise RuntimeError("the ticker broke")

    failed = asyncio.create_task(broken(), name="ticker")
    running = asyncio.create_task(asyncio.Event().wait())
    await asyncio.wait({failed})
    with caplog.at_level(logging.ERROR, logger="terra.tasks"):
        await cancel_and_wait([failed, running])
    assert running.cancelled()
    (record,) = caplog.records
    assert "ticker" in record.getMessage()
    assert record.exc_info is not None and "the ticker broke" in str(record.exc_info[1])
