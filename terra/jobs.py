"""A durable job store: one small JSON file per job, written atomically. Blocking I/O.

Shared by every long-running task a client polls for (minutes now, the file dialects
later). A job file is replaced whole (temp file, fsync, rename) at each transition, so a
crash leaves either the old state or the new one; at start-up :meth:`JobStore.recover`
puts every job that was queued or running back in the queue::

    {root}/{kind}/{job_id}.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from terra.params import is_safe_id
from terra.spool import write_atomic

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


@dataclass(frozen=True, slots=True)
class Job:
    """One job's state. Times are unix seconds; ``progress`` runs from 0 to 1."""

    kind: str
    id: str
    status: JobStatus
    created_at: float
    queued_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    error: str | None = None
    result_path: str | None = None
    attempts: int = 0  # how many times it was started (a restart mid-run makes it 2)
    params: dict[str, Any] = field(default_factory=dict)

    # -- transitions (each returns the new state) --------------------------------------
    def started(self, now: float) -> Job:
        return dataclasses.replace(
            self,
            status=JobStatus.RUNNING,
            started_at=now,
            progress=0.0,
            attempts=self.attempts + 1,
        )

    def progressed(self, fraction: float) -> Job:
        return dataclasses.replace(self, progress=min(1.0, max(0.0, fraction)))

    def succeeded(self, now: float, result_path: str, **params: Any) -> Job:
        return dataclasses.replace(
            self,
            status=JobStatus.SUCCEEDED,
            finished_at=now,
            progress=1.0,
            error=None,
            result_path=result_path,
            params={**self.params, **params},
        )

    def failed(self, now: float, error: str) -> Job:
        return dataclasses.replace(self, status=JobStatus.FAILED, finished_at=now, error=error)

    def canceled(self, now: float) -> Job:
        return dataclasses.replace(self, status=JobStatus.CANCELED, finished_at=now)

    def requeued(self) -> Job:
        """Back in the queue after a restart; ``queued_at`` is kept (the client's timestamp)."""
        return dataclasses.replace(self, status=JobStatus.QUEUED, started_at=None, progress=0.0)

    # -- persistence ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["status"] = JobStatus(values["status"])
        return cls(**values)


def new_job(kind: str, job_id: str, now: float, **params: Any) -> Job:
    return Job(kind, job_id, JobStatus.QUEUED, created_at=now, queued_at=now, params=params)


class JobStore:
    """Jobs as files under ``root/{kind}/``; kinds and ids are ``[A-Za-z0-9_-]{1,128}``."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync

    def path(self, kind: str, job_id: str) -> Path:
        if not is_safe_id(kind) or not is_safe_id(job_id):
            raise ValueError(f"job kind and id must match [A-Za-z0-9_-]{{1,128}}: {kind}/{job_id}")
        return self.root / kind / f"{job_id}.json"

    def get(self, kind: str, job_id: str) -> Job | None:
        path = self.path(kind, job_id)
        try:
            return Job.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Writes are atomic, so this is damage from outside: say so, treat it as absent.
            log.warning("job file %s is unreadable (%s): ignored", path, e)
            return None

    def put(self, job: Job) -> None:
        data = json.dumps(job.to_json(), ensure_ascii=False, indent=1).encode("utf-8")
        write_atomic(self.path(job.kind, job.id), data, self.fsync)

    def delete(self, kind: str, job_id: str) -> None:
        self.path(kind, job_id).unlink(missing_ok=True)

    def jobs(self, kind: str) -> list[Job]:
        folder = self.root / kind
        if not folder.is_dir():
            return []
        jobs = []
        for path in sorted(folder.glob("*.json")):
            if path.name.startswith("."):
                continue
            job = self.get(kind, path.stem)
            if job is not None:
                jobs.append(job)
        return jobs

    def recover(self, kind: str) -> list[Job]:
        """Jobs a previous process left queued or running, back to queued, oldest first."""
        pending = []
        for job in self.jobs(kind):
            if job.status is JobStatus.RUNNING:
                job = job.requeued()
                self.put(job)
                log.info("job %s/%s was running at shutdown: queued again", kind, job.id)
            if job.status is JobStatus.QUEUED:
                pending.append(job)
        return sorted(pending, key=lambda j: j.queued_at)
