"""The durable job store: one small JSON file per job, written atomically, and leases.
Blocking I/O; no asyncio.

Every long-running task a client polls for (minutes, SaluteSpeech tasks, connecte
predictions) is a job here. A job file is replaced whole (temp file, fsync, rename) at each
transition, so a crash leaves either the old state or the new one::

    {root}/{kind}/{job_id}.json                     the job's state
    {root}/{kind}/.leases/{job_id}/{generation}     who runs it, until when

The folder may be shared by several front ends (a shared file system). Whoever runs a job
holds its **lease**: a file created with ``O_CREAT | O_EXCL`` under the next generation
number, so of two processes that try to take the same job at once exactly one creates it.
The holder renews the lease (rewrites its own generation file) while it works; a lease not
renewed by its expiry can be taken, by creating the next generation. A holder that finds a
newer generation than its own has lost the job and stops; the last generation file is never
removed while the job exists (a released lease is one that expired at 0), so generation
numbers are never reused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from terra.params import is_safe_id
from terra.spool import fsync_dir, make_dirs, remove_stale_temps, write_atomic

log = logging.getLogger(__name__)

LEASES = ".leases"
HALF_WRITTEN_S = 10.0  # how long a lease file without content counts as taken


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
    attempts: int = 0  # how many times it was started and not stopped by the server itself
    params: dict[str, Any] = field(default_factory=dict)
    # Terminal, and its terminal notice (a webhook) is not delivered yet: sent again after
    # a restart, by whoever takes the job's lease.
    notify_pending: bool = False

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
        """Back in the queue; ``queued_at`` is kept (the client's timestamp)."""
        return dataclasses.replace(self, status=JobStatus.QUEUED, started_at=None, progress=0.0)

    def interrupted(self) -> Job:
        """Back in the queue because this server stopped: the attempt does not count."""
        return dataclasses.replace(self.requeued(), attempts=max(0, self.attempts - 1))

    def with_notice(self, pending: bool) -> Job:
        return dataclasses.replace(self, notify_pending=pending)

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


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to run one job until ``until`` (unix seconds), held by ``owner``."""

    kind: str
    job_id: str
    generation: int
    owner: str
    until: float

    def live(self, now: float) -> bool:
        return self.until > now


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
        shutil.rmtree(self._lease_dir(kind, job_id), ignore_errors=True)

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

    def remove_stale_temps(self, kind: str, now: float) -> int:
        """Remove the temp files killed writers left among the kind's job files and leases
        (see :func:`terra.spool.remove_stale_temps`). Returns how many. Blocking."""
        folder = self.root / kind
        removed = remove_stale_temps(folder, now)
        leases = folder / LEASES
        if leases.is_dir():
            for job_leases in leases.iterdir():
                removed += remove_stale_temps(job_leases, now)
        return removed

    # -- leases --------------------------------------------------------------------------
    def _lease_dir(self, kind: str, job_id: str) -> Path:
        return self.path(kind, job_id).parent / LEASES / job_id

    def lease(self, kind: str, job_id: str) -> Lease | None:
        """The job's newest lease (live or not), or None if it was never taken."""
        folder = self._lease_dir(kind, job_id)
        try:
            generations = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
        except FileNotFoundError:
            return None
        for generation in reversed(generations):
            try:
                data = json.loads((folder / str(generation)).read_text(encoding="utf-8"))
                return Lease(kind, job_id, generation, str(data["owner"]), float(data["until"]))
            except FileNotFoundError:
                continue  # removed as an old generation meanwhile
            except (OSError, ValueError, KeyError, TypeError):
                # Being written by its creator (O_EXCL, then the content): taken for a few
                # seconds more, in case its creator died between the two.
                try:
                    created = (folder / str(generation)).stat().st_mtime
                except OSError:
                    continue
                return Lease(kind, job_id, generation, "?", created + HALF_WRITTEN_S)
        return None

    def claim(self, kind: str, job_id: str, owner: str, now: float, lease_s: float) -> Lease | None:
        """Take the job's lease if nobody holds a live one; None if somebody does (or won
        the race for the same generation)."""
        current = self.lease(kind, job_id)
        if current is not None and current.live(now):
            return None
        generation = current.generation + 1 if current is not None else 1
        folder = self._lease_dir(kind, job_id)
        make_dirs(folder, self.fsync)
        lease = Lease(kind, job_id, generation, owner, now + lease_s)
        try:
            fd = os.open(folder / str(generation), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(self._lease_bytes(lease))
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        if self.fsync:
            fsync_dir(folder)
        for old in range(max(1, generation - 3), generation):
            (folder / str(old)).unlink(missing_ok=True)
        return lease

    def renew(self, lease: Lease, now: float, lease_s: float) -> Lease | None:
        """Extend a lease this process holds; None when it was lost (a newer generation)."""
        current = self.lease(lease.kind, lease.job_id)
        if current is None or current.generation != lease.generation:
            return None
        renewed = dataclasses.replace(lease, until=now + lease_s)
        self._write_lease(renewed)
        return renewed

    def release(self, lease: Lease) -> None:
        """Give the lease up (it stays as the newest generation, expired)."""
        current = self.lease(lease.kind, lease.job_id)
        if current is not None and current.generation == lease.generation:
            self._write_lease(dataclasses.replace(lease, until=0.0))

    def holds(self, lease: Lease) -> bool:
        current = self.lease(lease.kind, lease.job_id)
        return current is not None and current.generation == lease.generation

    def _write_lease(self, lease: Lease) -> None:
        folder = self._lease_dir(lease.kind, lease.job_id)
        write_atomic(folder / str(lease.generation), self._lease_bytes(lease), self.fsync)

    @staticmethod
    def _lease_bytes(lease: Lease) -> bytes:
        return json.dumps({"owner": lease.owner, "until": lease.until}).encode("utf-8")
