"""The recognizer on a Ray cluster, seen from a front end (``recognizer.backend: ray``).

Requests wait here, most urgent first (final, progress, background), until fewer than
``cluster.max_in_flight`` are at the cluster; while they wait, a newer progress request
replaces an older one with the same key and ``withdraw`` drops one: the same
``waiting.WaitingQueue`` as the local scheduler's. Sent requests go to the Serve app
(``ray_app``) through a DeploymentHandle; Serve routes each to a replica, whose own
scheduler batches it with others. A request the cluster could not take (:data:`RESENDABLE`:
its replica died or is unreachable, Serve's queue for the app is full, the app has no
replica to take it, being deleted or failed) is sent again, to whichever replica Serve
picks, by the one retry policy (:mod:`terra.retry`) for ``cluster.retry_s``: no final is
lost, and live text resumes once a replica answers. An error the recognizer raised on the
request (Ray's ``RayTaskError``) fails it at once: sent again, it would fail again.

Audio travels as float32 numpy arrays inside the pickled request (Ray serializes numpy
buffers out of band, without copying them into the pickle).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from terra.config import ClusterConfig, RecognizerConfig
from terra.metrics import Metrics
from terra.recognizer.types import Recognition
from terra.recognizer.waiting import QueuedRecognizer, Waiting
from terra.retry import Backoff, Retryable, retrying
from terra.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# The cluster's "not now" answers: the request was not recognized, and another try may be.
# RayActorError covers ActorDiedError (the replica died with the request, or before it) and
# ActorUnavailableError (its node is unreachable for now); BackPressureError: the app's
# router holds max_queued_requests already; DeploymentUnavailableError: the app has no
# running replica (it failed to deploy, or is being deleted); ReplicaUnavailableError: the
# replica Serve picked left. Anything else (the recognizer's own error, a cancellation, a
# request that does not pickle) is the request's answer, and final.
RESENDABLE: tuple[type[BaseException], ...] = (
    RayActorError,
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)


def resend_policy(config: ClusterConfig) -> Backoff:
    """0.1 s, doubling up to 2 s, for ``cluster.retry_s``."""
    return Backoff(first_s=0.1, max_s=2.0, within_s=config.retry_s)


def join(config: ClusterConfig) -> None:
    """Join the configured Ray cluster as a driver, in its namespace (once per process; the
    cluster's own logs stay on the cluster). Blocking."""
    if not ray.is_initialized():
        ray.init(address=config.address, namespace=config.namespace, log_to_driver=False)


def connect(config: ClusterConfig) -> Any:
    """Join the Ray cluster as a driver and return the recognizer app's DeploymentHandle
    (blocking; the app must have been deployed by ``terra recognizer``)."""
    join(config)
    try:
        return serve.get_app_handle(config.app_name)
    except Exception as e:  # Serve raises a bare RayServeException for a missing app
        raise RuntimeError(
            f"no Ray Serve app {config.app_name!r} at {config.address!r}: "
            f"deploy it with `terra recognizer` ({e})"
        ) from e


class RayRecognizer(QueuedRecognizer):
    """The ``Recognizer`` of a front end whose model runs in a Ray Serve app."""

    def __init__(
        self,
        handle: Any,  # ray.serve.handle.DeploymentHandle of the recognizer app
        config: ClusterConfig,
        recognizer_config: RecognizerConfig,
        metrics: Metrics,
    ) -> None:
        super().__init__(recognizer_config, metrics)
        self._handle = handle
        self._config = config
        self._resend = resend_policy(config)
        self._in_flight = 0
        self._dispatcher: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()

    @property
    def depth(self) -> int:
        """Requests waiting here or sent and not answered."""
        return len(self._waiting) + self._in_flight

    async def _dispatch(self) -> None:
        while True:
            while not self._waiting or self._in_flight >= self._config.max_in_flight:
                await self._wakeup.wait()
                self._wakeup.clear()
            entry = self._waiting.first()
            self._waiting.take([entry])
            self._in_flight += 1
            task = asyncio.create_task(self._send(entry), name="recognizer-send")
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _send(self, entry: Waiting) -> None:
        try:
            async for attempt in retrying(self._resend):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        if entry.future.done():  # its caller gave up: not sent again
                            return
                        self._metrics.resent_requests.inc()
                    result = await self._call(entry)
                    self._answer(entry, result)
                    return
        except Exception as e:  # the recognizer failed on it, or retry_s is spent: keep serving
            log.exception("recognizer request failed")
            self._fail(entry, e)
        finally:
            if not entry.future.done():  # cancelled by stop()
                entry.future.cancel()
            self._in_flight -= 1
            self._metrics.queue_depth.set(self.depth)
            self._wakeup.set()

    async def _call(self, entry: Waiting) -> Recognition | None:
        """One try at the cluster; its "not now" answers raise :class:`Retryable`."""
        try:
            result: Recognition | None = await self._handle.recognize.remote(entry.request)
        except RESENDABLE as e:
            log.warning(
                "the cluster did not take a %s request (%s: %s); trying again",
                entry.request.priority.name.lower(),
                type(e).__name__,
                e,
            )
            raise Retryable(f"{type(e).__name__}: {e}") from e
        return result

    @staticmethod
    def _fail(entry: Waiting, error: BaseException) -> None:
        if not entry.future.done():
            entry.future.set_exception(RuntimeError(f"recognizer failed: {error}"))

    async def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch(), name="recognizer-dispatch")

    async def stop(self) -> None:
        await cancel_and_wait([*self._sends, *([self._dispatcher] if self._dispatcher else [])])
        self._waiting.cancel_all()
