"""The recognizer as a Ray Serve application (``terra recognizer``).

Each replica loads the model once and runs terra's own scheduler over it: the requests the
replica receives wait in its priority queue (final before progress before background) and
share model calls by the engine's batch rules, exactly as in a single terra process. Ray
places the replicas (``cluster.num_cpus`` / ``num_gpus`` each), restarts one that dies, and
Serve autoscales between ``min_replicas`` and ``max_replicas`` on each replica's queue
(requests waiting or running in it, Serve's ``target_ongoing_requests``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import ray
from ray import serve

from terra.config import ClusterConfig, Config
from terra.metrics import create_metrics
from terra.recognizer.scheduler import RecognizerScheduler
from terra.recognizer.types import Recognition, RecognitionRequest

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
        }
    deployment = serve.deployment(**options)(RecognizerReplica)
    return deployment.bind(replica_config(config))


def deploy(config: Config) -> None:
    """Deploy (or update) the recognizer app on the configured cluster and wait until its
    replicas are running. Serve keeps it there after this process exits."""
    cluster = config.cluster
    if not ray.is_initialized():
        ray.init(address=cluster.address, namespace=cluster.namespace, log_to_driver=False)
    serve.start(proxy_location="Disabled")  # requests come through handles, not HTTP
    serve.run(recognizer_app(config), name=cluster.app_name, route_prefix=None)
    log.info("recognizer app %r running on %s", cluster.app_name, cluster.address)


def undeploy(config: Config) -> None:
    cluster = config.cluster
    if not ray.is_initialized():
        ray.init(address=cluster.address, namespace=cluster.namespace, log_to_driver=False)
    serve.delete(cluster.app_name)
