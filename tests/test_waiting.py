"""The waiting queue both recognizer backends share (terra/recognizer/waiting.py): priority
order, coalescing that keeps the replaced request's place, shedding at ``max_queue``
(never a final), withdraw, and the saturation rule. No model, no server: the queue alone."""

from __future__ import annotations

import asyncio

import numpy as np

from terra.metrics import Metrics, create_metrics
from terra.recognizer.options import DecodeOptions
from terra.recognizer.types import Priority, RecognitionRequest
from terra.recognizer.waiting import WaitingQueue

SILENCE = np.zeros(1600, dtype=np.float32)


def request(language: str, priority: Priority = Priority.PROGRESS) -> RecognitionRequest:
    return RecognitionRequest(SILENCE, language, priority, DecodeOptions())


def order(queue: WaitingQueue) -> list[str | None]:
    return [e.request.language for e in queue.in_order()]


def dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("terra_recognizer_dropped_total", {"reason": reason})
    return value or 0.0


async def test_finals_first_then_progress_then_background_each_in_arrival_order() -> None:
    queue = WaitingQueue(max_queue=10, metrics=create_metrics())
    queue.submit(request("bg", Priority.BACKGROUND))
    queue.submit(request("p1"))
    queue.submit(request("f1", Priority.FINAL))
    queue.submit(request("p2"))
    queue.submit(request("f2", Priority.FINAL))
    assert order(queue) == ["f1", "f2", "p1", "p2", "bg"]
    assert queue.queued_finals == 2 and len(queue) == 5


async def test_a_replacing_request_keeps_the_replaced_ones_place_and_arrival_time() -> None:
    metrics = create_metrics()
    queue = WaitingQueue(max_queue=10, metrics=metrics)
    old_a = queue.submit(request("a1"), coalesce_key="a")
    queue.submit(request("b"), coalesce_key="b")
    arrived = queue.in_order()[0].enqueued_at
    new_a = queue.submit(request("a2"), coalesce_key="a")
    assert old_a.done() and old_a.result() is None  # superseded
    assert not new_a.done()
    assert order(queue) == ["a2", "b"]  # a's newer request stands where its older one stood
    assert queue.in_order()[0].enqueued_at == arrived
    assert dropped(metrics, "superseded") == 1


async def test_progress_is_shed_at_max_queue_but_a_final_never_is() -> None:
    metrics = create_metrics()
    queue = WaitingQueue(max_queue=2, metrics=metrics)
    queue.submit(request("p1"))
    queue.submit(request("p2"))
    shed = queue.submit(request("p3"))
    final = queue.submit(request("f", Priority.FINAL))
    assert shed.done() and shed.result() is None
    assert not final.done()
    assert order(queue) == ["f", "p1", "p2"]
    assert dropped(metrics, "progress") == 1


async def test_a_replacement_at_the_bound_is_not_shed() -> None:
    """Replacing frees the replaced request's slot first: a talker's newest progress is
    kept even when the queue is at ``max_queue``."""
    queue = WaitingQueue(max_queue=2, metrics=create_metrics())
    queue.submit(request("a1"), coalesce_key="a")
    queue.submit(request("b"), coalesce_key="b")
    newer = queue.submit(request("a2"), coalesce_key="a")
    assert not newer.done()
    assert order(queue) == ["a2", "b"]


async def test_withdraw_resolves_the_waiting_request_to_none() -> None:
    queue = WaitingQueue(max_queue=10, metrics=create_metrics())
    future = queue.submit(request("a"), coalesce_key="a")
    assert queue.is_waiting("a")
    queue.withdraw("a")
    queue.withdraw("nobody")  # no such key: nothing happens
    assert future.done() and future.result() is None
    assert not queue.is_waiting("a") and len(queue) == 0


async def test_a_taken_request_is_no_longer_waiting_nor_withdrawn() -> None:
    queue = WaitingQueue(max_queue=10, metrics=create_metrics())
    future = queue.submit(request("a"), coalesce_key="a")
    queue.take(queue.in_order()[:1])
    assert not queue.is_waiting("a")
    queue.withdraw("a")  # the backend answers it now: withdraw must not touch it
    assert not future.done()
    later = queue.submit(request("a2"), coalesce_key="a")  # a new one waits again
    assert queue.is_waiting("a") and not later.done() and not future.done()


async def test_cancel_all_cancels_every_waiting_future() -> None:
    queue = WaitingQueue(max_queue=10, metrics=create_metrics())
    futures = [queue.submit(request("a"), "a"), queue.submit(request("f", Priority.FINAL))]
    queue.cancel_all()
    assert all(f.cancelled() for f in futures)
    assert len(queue) == 0 and not queue.is_waiting("a")


async def test_saturated_by_the_number_of_finals_or_by_how_long_one_waits() -> None:
    queue = WaitingQueue(max_queue=10, metrics=create_metrics())
    queue.submit(request("p"))
    assert not queue.saturated(max_queued_finals=2, saturated_wait_s=60)  # progress only
    queue.submit(request("f1", Priority.FINAL))
    assert not queue.saturated(max_queued_finals=2, saturated_wait_s=60)
    assert queue.saturated(max_queued_finals=2, saturated_wait_s=0)  # a final has waited
    queue.submit(request("f2", Priority.FINAL))
    assert queue.saturated(max_queued_finals=2, saturated_wait_s=60)


async def test_owed_final_seconds_are_the_audio_of_the_waiting_finals_only() -> None:
    queue = WaitingQueue(max_queue=10, metrics=create_metrics())
    second = np.zeros(16_000, dtype=np.float32)
    queue.submit(RecognitionRequest(second, "p", Priority.PROGRESS, DecodeOptions()), "p")
    assert queue.owed_final_s == 0.0
    final = RecognitionRequest(np.tile(second, 3), "f", Priority.FINAL, DecodeOptions())
    queue.submit(final)
    queue.submit(RecognitionRequest(second, "g", Priority.FINAL, DecodeOptions()))
    assert queue.owed_final_s == 4.0
    queue.take([e for e in queue.in_order() if e.request is final])
    assert queue.owed_final_s == 1.0  # a taken final is the backend's, no longer waiting


async def test_a_request_its_caller_cancelled_leaves_the_queue() -> None:
    """A cancelled future (its job canceled or failed, the server stopping) takes its
    request out of the queue: no model time for a result nobody waits for, and the counts
    (finals, owed audio) do not keep it."""
    queue = WaitingQueue(max_queue=10, metrics=create_metrics())
    gone = queue.submit(request("gone", Priority.FINAL))
    queue.submit(request("kept", Priority.FINAL))
    keyed = queue.submit(request("keyed"), coalesce_key="k")
    gone.cancel()
    keyed.cancel()
    # The queue hears of a cancel through the future's callback, on the loop's next round.
    loop = asyncio.get_running_loop()
    next_round = loop.create_future()
    loop.call_soon(next_round.set_result, None)
    await next_round
    assert order(queue) == ["kept"]
    assert queue.queued_finals == 1 and queue.owed_final_s == SILENCE.size / 16_000
    assert not queue.is_waiting("k")
