"""cluster.batching: serve: the replica that batches with Ray Serve's ``@serve.batch``, run
in this process without a cluster (``@serve.batch`` is an asyncio queue on the replica's
event loop). Two stand-ins, on purpose: FakeEngine for the model (what is checked is the
order of the requests in a model call and which request gets which answer, not the text),
and a replica context holding only ``max_ongoing_requests`` (``@serve.batch`` reads it to
warn about a bound; outside a deployment Serve has none). tests/test_cluster.py and
benchmarks/scale.py --batching run the real replicas."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from terra.audio import SAMPLE_RATE
from terra.recognizer.options import DecodeOptions
from terra.recognizer.types import Priority, Recognition, RecognitionRequest

from .conftest import make_config
from .fakes import FakeEngine

pytest.importorskip("ray.serve", reason="the cluster extra: pip install -e '.[cluster]'")

from terra.recognizer import ray_app  # noqa: E402  (needs ray)


class RecordingEngine(FakeEngine):
    """FakeEngine that records each call's priorities and fails a call holding a request
    whose language is ``fail``."""

    def __init__(self) -> None:
        super().__init__()
        self.orders: list[list[Priority]] = []

    def recognize(self, requests: Sequence[RecognitionRequest]) -> list[Recognition]:
        self.orders.append([r.priority for r in requests])
        if any(r.language == "fail" for r in requests):
            raise RuntimeError("this request breaks the model")
        return super().recognize(requests)


def request(level: float, priority: Priority, language: str = "en") -> RecognitionRequest:
    audio = np.full(SAMPLE_RATE, level, np.float32)  # FakeEngine's word: from the energy
    return RecognitionRequest(audio, language, priority, DecodeOptions())


@pytest.fixture
async def replica(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[ray_app.ServeBatchReplica]:
    engine = RecordingEngine()
    monkeypatch.setattr("terra.app.build_engine", lambda config: engine)
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=32))
    monkeypatch.setattr("ray.serve.get_replica_context", lambda: context)
    replica = ray_app.ServeBatchReplica(make_config(tmp_path, cluster={"batching": "serve"}))
    yield replica
    # Serve's batch queue cancels its task when it is collected, and when no event loop runs
    # then it makes one (ray._common.utils.get_or_create_event_loop) that nobody closes; a
    # later test's garbage collection then fails on the unclosed loop. Collect it here,
    # while this test's loop runs. (In a replica the loop runs for the process's life.)
    del replica._batch
    gc.collect()


async def test_serve_batch_runs_finals_first_and_answers_each_its_own(
    replica: ray_app.ServeBatchReplica,
) -> None:
    requests = [
        request(0.02, Priority.PROGRESS),
        request(0.05, Priority.BACKGROUND),
        request(0.08, Priority.FINAL),
        request(0.11, Priority.PROGRESS),
        request(0.14, Priority.FINAL),
    ]
    results = await asyncio.gather(*(replica.recognize(r) for r in requests))
    engine = replica._engine
    assert isinstance(engine, RecordingEngine)
    assert engine.orders == [
        [Priority.FINAL, Priority.FINAL, Priority.PROGRESS, Priority.PROGRESS, Priority.BACKGROUND]
    ]  # one call, gathered by @serve.batch, finals first
    expected = FakeEngine().recognize(requests)
    assert [r.text if r else None for r in results] == [r.text for r in expected]
    assert len({r.text for r in expected}) == len(requests)  # each request its own words


async def test_serve_batch_fails_only_the_request_that_fails(
    replica: ray_app.ServeBatchReplica,
) -> None:
    requests = [
        request(0.02, Priority.FINAL),
        request(0.05, Priority.FINAL, language="fail"),
        request(0.08, Priority.PROGRESS),
    ]
    results = await asyncio.gather(
        *(replica.recognize(r) for r in requests), return_exceptions=True
    )
    assert isinstance(results[1], RuntimeError)
    assert [getattr(r, "text", None) for r in (results[0], results[2])] == [
        r.text for r in FakeEngine().recognize([requests[0], requests[2]])
    ]
