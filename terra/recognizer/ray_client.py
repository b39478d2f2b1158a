"""The recognizer on a Ray cluster, seen from a front end (``recognizer.backend: ray``).

Requests wait here, most urgent first (final, progress, background), until fewer than
``cluster.max_in_flight`` are at the cluster; while they wait, a newer progress request
replaces an older one with the same key and ``withdraw`` drops one: the same
``waiting.WaitingQueue`` as the local scheduler's. Sent requests go to the Serve app
(``ray_app``) through a DeploymentHandle; Serve routes each to a replica, whose own
scheduler batches it with others. A request whose replica died (kill -9, a lost node) is
sent again, to whichever replica Serve picks, for ``cluster.retry_s``: no final is lost,
and live text resumes once a replica answers.

Audio travels as float32 numpy arrays inside the pickled request (Ray serializes numpy
buffers out of band, without copying them into the pickle).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError

from terra.config import ClusterConfig, RecognizerConfig
from terra.metrics import Metrics
from terra.recognizer.types import Recognition
from terra.recognizer.waiting import QueuedRecognizer, Waiting

log = logging.getLogger(__name__)

_RESEND_DELAY_S = (0.1, 0.25, 0.5, 1.0, 2.0)  # then 2 s until retry_s has passed


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
        deadline = time.monotonic() + self._config.retry_s
        attempts = 0
        try:
            while True:
                attempts += 1
                try:
                    result: Recognition | None = await self._handle.recognize.remote(entry.request)
                    break
                except RayActorError as e:  # the replica died with the request, or before it
                    if time.monotonic() >= deadline:
                        self._fail(entry, e)
                        return
                    self._metrics.resent_requests.inc()
                    delay = _RESEND_DELAY_S[min(attempts, len(_RESEND_DELAY_S)) - 1]
                    log.warning(
                        "recognizer replica lost a %s request (attempt %d); sending it again",
                        entry.request.priority.name.lower(),
                        attempts,
                    )
                    await asyncio.sleep(delay)
                except Exception as e:  # the recognizer failed on it: fail it, keep serving
                    log.exception("recognizer request failed")
                    self._fail(entry, e)
                    return
            self._answer(entry, result)
        finally:
            if not entry.future.done():  # cancelled by stop()
                entry.future.cancel()
            self._in_flight -= 1
            self._metrics.queue_depth.set(self.depth)
            self._wakeup.set()

    @staticmethod
    def _fail(entry: Waiting, error: BaseException) -> None:
        if not entry.future.done():
            entry.future.set_exception(RuntimeError(f"recognizer failed: {error}"))

    async def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch(), name="recognizer-dispatch")

    async def stop(self) -> None:
        tasks = [*self._sends, *([self._dispatcher] if self._dispatcher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._waiting.cancel_all()
