"""backend ray, front-end side (recognizer/ray_client.py): what a request the cluster cannot
take now becomes. On a real local Ray cluster (one node) with a real Serve app whose router
holds at most one request (``max_queued_requests=1``) for a replica that takes one at a
time: a burst of finals past it gets Serve's BackPressureError, and every final must still be
answered, each once and with its own text; a final sent while the app is deleted and
deployed again (Serve's DeploymentUnavailableError) is answered by the new app; an error the
replica raises on a request is its answer, not sent again.

The replica is a stand-in, not the recognizer: what is checked is Serve's router and
terra's client, and the model would only make the burst slower (tests/test_cluster.py runs
the real one). Two more tests use a fake DeploymentHandle, named so below: the moments they
need (a caller giving up between two tries; every try refused until ``cluster.retry_s`` is
spent) cannot be placed on a real cluster without timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import pytest

from terra.audio import SAMPLE_RATE
from terra.config import ClusterConfig, RecognizerConfig
from terra.metrics import Metrics, create_metrics
from terra.recognizer.options import DecodeOptions
from terra.recognizer.types import Priority, Recognition, RecognitionRequest

from .fakes import recognition_of

pytest.importorskip("ray.serve", reason="the cluster extra: pip install -e '.[cluster]'")

import ray  # noqa: E402  (needs the cluster extra)
from ray import serve  # noqa: E402
from ray.exceptions import ActorDiedError  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

from benchmarks.raycluster import LocalRayCluster  # noqa: E402
from terra.recognizer.ray_client import RayRecognizer, connect, join  # noqa: E402

APP = "terra-resend-test"
NAMESPACE = "terra-resend-test"
HOLD_S = 0.3  # the stand-in's time per request: a burst sent at once overlaps in full
BURST = 6


def request(key: str, priority: Priority = Priority.FINAL) -> RecognitionRequest:
    """A request the stand-in tells apart by its ``language`` field."""
    return RecognitionRequest(np.zeros(SAMPLE_RATE, np.float32), key, priority, DecodeOptions())


def stand_in_app() -> Any:
    """The Serve app: one replica, one request at a time, one more held by the router.
    Defined in a function so that Ray ships the class by value (the replica cannot import
    tests/)."""

    @serve.deployment(
        name="StandIn",
        num_replicas=1,
        max_ongoing_requests=1,
        max_queued_requests=1,
        ray_actor_options={"num_cpus": 0},
    )
    class StandIn:
        def __init__(self) -> None:
            self.calls: dict[str, int] = {}

        async def recognize(self, request: RecognitionRequest) -> Recognition:
            key = str(request.language)
            self.calls[key] = self.calls.get(key, 0) + 1
            if key == "bad":
                raise ValueError("the replica rejects this request")
            await asyncio.sleep(HOLD_S)  # the model's time, so that requests overlap
            return recognition_of(f"text of {key}")

        def calls_made(self) -> dict[str, int]:
            return dict(self.calls)

    return StandIn.bind()  # type: ignore[attr-defined]  # serve.deployment's Deployment


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    ray_cluster = LocalRayCluster(tmp_path_factory.mktemp("ray"), node_cpus=(1,))
    try:
        ray_cluster.start()
        config = ClusterConfig(address=ray_cluster.address, namespace=NAMESPACE, app_name=APP)
        join(config)  # terra's own: this test process is the front end's driver
        serve.start(proxy_location="Disabled")
        serve.run(stand_in_app(), name=APP, route_prefix=None)
        yield config
    finally:
        if ray.is_initialized():
            ray.shutdown()
        ray_cluster.stop()


def resent(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("terra_recognizer_resent_total") or 0.0


@pytest.fixture
async def client(cluster: ClusterConfig) -> AsyncIterator[tuple[RayRecognizer, Metrics, Any]]:
    handle = connect(cluster)  # terra's own connect: the app's DeploymentHandle
    metrics = create_metrics()
    config = ClusterConfig(
        address=cluster.address,
        namespace=cluster.namespace,
        app_name=cluster.app_name,
        max_in_flight=BURST,
        retry_s=60.0,
    )
    recognizer = RayRecognizer(handle, config, RecognizerConfig(), metrics)
    await recognizer.start()
    yield recognizer, metrics, handle
    await recognizer.stop()


@pytest.mark.cluster
async def test_a_burst_past_serves_queue_is_answered_in_full(
    client: tuple[RayRecognizer, Metrics, Any],
) -> None:
    recognizer, metrics, handle = client
    keys = [f"final{i}" for i in range(BURST)]
    futures = [recognizer.submit(request(key)) for key in keys]
    results = await asyncio.gather(*futures)
    assert [r.text if r else None for r in results] == [f"text of {key}" for key in keys]
    # Serve refused some of the burst (one request at the replica, one held: the rest were
    # BackPressureError), and terra sent those again; each reached the replica once.
    assert resent(metrics) >= 1
    calls = await handle.calls_made.remote()
    assert {key: calls.get(key) for key in keys} == dict.fromkeys(keys, 1)
    assert recognizer.depth == 0  # every in-flight slot given back


@pytest.mark.cluster
async def test_an_error_the_replica_raises_is_the_answer(
    client: tuple[RayRecognizer, Metrics, Any],
) -> None:
    recognizer, metrics, handle = client
    with pytest.raises(RuntimeError, match="rejects this request"):
        await recognizer.submit(request("bad"))
    assert (await handle.calls_made.remote())["bad"] == 1
    assert resent(metrics) == 0
    assert recognizer.depth == 0


@pytest.mark.cluster
async def test_a_final_sent_while_the_app_is_redeployed_is_answered_by_the_new_one(
    client: tuple[RayRecognizer, Metrics, Any],
) -> None:
    """An operator's `terra recognizer --delete`, then `terra recognizer`: meanwhile Serve
    answers DeploymentUnavailableError (the app has no replica), and the final waits for the
    new app instead of failing."""
    recognizer, metrics, handle = client
    # A front end that has been sending: its handle's router follows the app's state.
    assert (await recognizer.submit(request("before"))) == recognition_of("text of before")
    serve.delete(APP)  # returns once the app is gone; the router knows it before then
    final = recognizer.submit(request("during"))
    await asyncio.to_thread(serve.run, stand_in_app(), name=APP, route_prefix=None)
    assert (await final) == recognition_of("text of during")
    assert resent(metrics) >= 1  # refused while the app was away, sent again
    assert (await handle.calls_made.remote()) == {"during": 1}  # the new replica's count
    assert recognizer.depth == 0


class FakeHandle:
    """A fake DeploymentHandle: ``recognize.remote(request)`` runs ``answer`` on it and
    records each request it was given."""

    def __init__(self, answer: Callable[[RecognitionRequest], Recognition]) -> None:
        self.sent: list[str] = []
        self._answer = answer
        self.recognize = self

    async def remote(self, request: RecognitionRequest) -> Recognition:
        self.sent.append(str(request.language))
        return self._answer(request)


def fake_client(handle: FakeHandle, retry_s: float, max_in_flight: int) -> RayRecognizer:
    config = ClusterConfig(retry_s=retry_s, max_in_flight=max_in_flight)
    return RayRecognizer(handle, config, RecognizerConfig(), create_metrics())


async def test_a_request_its_caller_gave_up_is_not_sent_again() -> None:
    gave_up: list[asyncio.Future[Recognition | None]] = []

    def answer(r: RecognitionRequest) -> Recognition:
        if r.language == "gone":  # its caller gives up while it is out, and the replica dies
            gave_up[0].cancel()
            raise ActorDiedError()
        return recognition_of(str(r.language))

    handle = FakeHandle(answer)
    recognizer = fake_client(handle, retry_s=60.0, max_in_flight=1)
    await recognizer.start()
    try:
        gave_up.append(recognizer.submit(request("gone")))
        after = recognizer.submit(request("next"))
        # One in flight at a time: "next" is sent once the first request's send has ended.
        assert (await after) == recognition_of("next")
        assert handle.sent == ["gone", "next"]
        assert recognizer.depth == 0
    finally:
        await recognizer.stop()


async def test_a_final_the_cluster_never_takes_fails_after_retry_s() -> None:
    def answer(r: RecognitionRequest) -> Recognition:
        raise BackPressureError(num_queued_requests=1, max_queued_requests=1)

    handle = FakeHandle(answer)
    recognizer = fake_client(handle, retry_s=0.5, max_in_flight=1)
    await recognizer.start()
    try:
        with pytest.raises(RuntimeError, match="BackPressureError"):
            await recognizer.submit(request("never"))
        assert len(handle.sent) >= 2  # sent again while retry_s lasted, then given up
        assert recognizer.depth == 0
    finally:
        await recognizer.stop()
