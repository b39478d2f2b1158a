"""The recognizer as a Ray Serve application (``terra recognizer``).

Each replica loads the model once and batches the requests it receives in one of two ways
(``cluster.batching``, measured against each other in benchmarks/results/scale_batching.md):

- ``terra`` (the default): terra's own scheduler, as in a single terra process: requests
  wait in its priority queue (final before progress before background), a model call takes
  the most urgent one and the waiting requests that share its batch key.
- ``serve``: Ray Serve's ``@serve.batch``: requests are gathered first come, first served
  (up to ``recognizer.max_batch_size``, waiting at most ``recognizer.batch_wait_ms``), each
  gathered batch is one ``engine.recognize`` call (which splits it by batch key, finals'
  groups first). Priority then holds only where requests wait longest, on the front end
  (``ray_client``: finals leave first once ``cluster.max_in_flight`` are out).

Ray places the replicas (``cluster.num_cpus`` / ``num_gpus`` each), restarts one that dies,
and Serve autoscales between ``min_replicas`` and ``max_replicas`` on each replica's queue
(requests waiting or running in it, Serve's ``target_ongoing_requests``), with the delays of
``cluster.upscale_delay_s`` / ``downscale_delay_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve

from terra.config import ClusterConfig, Config
from terra.metrics import create_metrics
from terra.recognizer.ray_client import join
from terra.recognizer.scheduler import RecognizerScheduler, recognize_isolated
from terra.recognizer.types import Recognition, RecognitionEngine, RecognitionRequest

log = logging.getLogger(__name__)


def replica_config(config: Config) -> Config:
    """The configuration a replica runs with: its own workers and model threads (all of
    its CPUs by default), and the model folder as an absolute path (replicas do not start
    in the operator's directory). The cluster section is left out: Serve restarts every
    replica when their constructor's arguments change, and a new replica count or address
    is no reason to."""
    cluster = config.cluster
    threads = cluster.replica_threads or max(
        1, math.floor(cluster.num_cpus) // cluster.replica_workers
    )
    return dataclasses.replace(
        config,
        model=dataclasses.replace(
            config.model,
            cpu_threads=threads,
            models_dir=str(Path(config.model.models_dir).absolute()),
        ),
        recognizer=dataclasses.replace(
            config.recognizer, workers=cluster.replica_workers, backend="local"
        ),
        cluster=ClusterConfig(),
    )


class RecognizerReplica:
    """One Serve replica: the model, loaded once, behind terra's scheduler."""

    def __init__(self, config: Config) -> None:
        from terra.app import build_engine  # the replica's process only

        engine = build_engine(config)
        self._scheduler = RecognizerScheduler(engine, config.recognizer, create_metrics())
        self._started = False
        log.info("recognizer replica ready (pid %d)", os.getpid())

    async def recognize(self, request: RecognitionRequest) -> Recognition | None:
        if not self._started:  # the scheduler's workers need the replica's event loop
            self._started = True
            await self._scheduler.start()
        return await self._scheduler.submit(request)

    def pid(self) -> int:
        """This replica's process id (for operators and the failure tests)."""
        return os.getpid()


class ServeBatchReplica:
    """One Serve replica batching with ``@serve.batch`` (``cluster.batching: serve``)."""

    def __init__(self, config: Config) -> None:
        from terra.app import build_engine  # the replica's process only

        self._engine: RecognitionEngine = build_engine(config)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recognizer")
        # Serve's batch queue, made for this replica with the configured limits.
        self._batch = serve.batch(
            max_batch_size=config.recognizer.max_batch_size,
            batch_wait_timeout_s=config.recognizer.batch_wait_ms / 1000,
        )(self._run_batch)
        log.info("recognizer replica (serve.batch) ready (pid %d)", os.getpid())

    async def recognize(self, request: RecognitionRequest) -> Recognition | None:
        result: Recognition | Exception = await self._batch(request)
        if isinstance(result, Exception):  # this request failed alone: its caller gets it
            raise result
        return result

    async def _run_batch(self, requests: list[RecognitionRequest]) -> list[Recognition | Exception]:
        # Finals first: the engine runs its groups in the order their first request comes.
        order = sorted(range(len(requests)), key=lambda i: int(requests[i].priority))
        results = await self._recognize([requests[i] for i in order])
        out: list[Recognition | Exception] = list(results)
        for position, index in enumerate(order):
            out[index] = results[position]
        return out

    async def _recognize(
        self, requests: Sequence[RecognitionRequest]
    ) -> list[Recognition | Exception]:
        """As the scheduler's (only the request that fails gets the error), the error as a
        value: an exception raised here would fail every request of Serve's batch."""
        loop = asyncio.get_running_loop()
        return await recognize_isolated(loop, self._executor, self._engine, requests)

    def pid(self) -> int:
        return os.getpid()


def recognizer_app(config: Config) -> Any:
    """The bound Serve application (``serve.run`` deploys it)."""
    cluster = config.cluster
    options: dict[str, Any] = {
        "name": "Recognizer",
        "ray_actor_options": {"num_cpus": cluster.num_cpus, "num_gpus": cluster.num_gpus},
        "max_ongoing_requests": cluster.max_ongoing_requests,
    }
    if cluster.min_replicas == cluster.max_replicas:
        options["num_replicas"] = cluster.min_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": cluster.min_replicas,
            "max_replicas": cluster.max_replicas,
            "target_ongoing_requests": cluster.target_queue,
            "upscale_delay_s": cluster.upscale_delay_s,
            "downscale_delay_s": cluster.downscale_delay_s,
            "metrics_interval_s": cluster.metrics_interval_s,
            "look_back_period_s": cluster.look_back_period_s,
        }
    replica = ServeBatchReplica if cluster.batching == "serve" else RecognizerReplica
    deployment = serve.deployment(**options)(replica)
    return deployment.bind(replica_config(config))


def deploy(config: Config) -> None:
    """Deploy (or update) the recognizer app on the configured cluster and wait until its
    replicas are running. Serve keeps it there after this process exits."""
    cluster = config.cluster
    join(cluster)
    serve.start(proxy_location="Disabled")  # requests come through handles, not HTTP
    serve.run(recognizer_app(config), name=cluster.app_name, route_prefix=None)
    log.info("recognizer app %r running on %s", cluster.app_name, cluster.address)


def undeploy(config: Config) -> None:
    cluster = config.cluster
    join(cluster)
    serve.delete(cluster.app_name)
