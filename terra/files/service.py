"""Durable file-recognition jobs for one dialect: uploads, a queue, workers, cancel, expiry.

Jobs live in the shared :class:`terra.jobs.JobStore` (kind = the dialect), so queued and
running jobs survive a restart. Uploaded audio and results are plain files under
``files.dir``; both, and finished jobs, are removed ``files.retention_s`` after they were
written. Each dialect owns one service through a ``cleanup_ctx`` that starts and stops it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterable, Callable, Coroutine
from pathlib import Path
from typing import Any

from terra.config import FilesConfig
from terra.files.upload import save_stream
from terra.jobs import Job, JobStatus, JobStore, new_job
from terra.spool import write_atomic

log = logging.getLogger(__name__)

# The work for a job: its JSON result, or an exception (the job fails with its message).
Runner = Callable[[Job], Coroutine[Any, Any, Any]]
# Told about every job that reached a terminal state (e.g. to send a webhook).
Listener = Callable[[Job], None]


class QueueFull(RuntimeError):
    """More jobs are waiting than ``files.max_queued`` allows."""


class JobFailed(RuntimeError):
    """A runner's failure with a message meant for the client."""


class FileJobService:
    def __init__(
        self,
        config: FilesConfig,
        kind: str,
        runner: Runner,
        *,
        fsync: bool = True,
        listener: Listener | None = None,
    ) -> None:
        self._config = config
        self.kind = kind
        self._runner = runner
        self._fsync = fsync
        self._listener = listener
        self.store = JobStore(Path(config.jobs_dir), fsync=fsync)
        self.uploads = Path(config.dir) / kind / "uploads"
        self.results = Path(config.dir) / kind / "results"
        self._jobs: dict[str, Job] = {}  # queued or running in this process
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        for job in await asyncio.to_thread(self.store.recover, self.kind):
            self._jobs[job.id] = job
            self._queue.put_nowait(job.id)
        self._tasks = [
            asyncio.create_task(self._work(), name=f"{self.kind}-{i}")
            for i in range(self._config.workers)
        ]
        self._tasks.append(asyncio.create_task(self._sweeper(), name=f"{self.kind}-sweep"))

    async def stop(self) -> None:
        """Stop; a running job stays ``running`` on disk and is taken up again at start-up."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- files ---------------------------------------------------------------------------
    async def save_upload(self, chunks: AsyncIterable[bytes], limit: int) -> str:
        """Stream an upload to disk and return its id (:class:`UploadTooLarge` past
        ``limit`` bytes, with nothing kept)."""
        file_id = str(uuid.uuid4())
        await save_stream(chunks, self.uploads / file_id, limit, fsync=self._fsync)
        return file_id

    def upload_path(self, file_id: str) -> Path | None:
        try:
            path = self.uploads / str(uuid.UUID(file_id))
        except ValueError:
            return None
        return path if path.is_file() else None

    def result_path(self, result_id: str) -> Path | None:
        try:
            path = self.results / f"{uuid.UUID(result_id)}.json"
        except ValueError:
            return None
        return path if path.is_file() else None

    # -- jobs ----------------------------------------------------------------------------
    async def create(self, **params: Any) -> Job:
        """Queue a job; :class:`QueueFull` when too many are waiting."""
        async with self._lock:
            waiting = sum(1 for j in self._jobs.values() if j.status is JobStatus.QUEUED)
            if waiting >= self._config.max_queued:
                raise QueueFull(f"{waiting} {self.kind} jobs are waiting")
            job = new_job(self.kind, str(uuid.uuid4()), time.time(), **params)
            await asyncio.to_thread(self.store.put, job)
            self._jobs[job.id] = job
            self._queue.put_nowait(job.id)
        return job

    async def get(self, job_id: str) -> Job | None:
        active = self._jobs.get(job_id)
        if active is not None:
            return active
        try:
            return await asyncio.to_thread(self.store.get, self.kind, job_id)
        except ValueError:  # not a valid id: no such job
            return None

    async def cancel(self, job_id: str, *, running_too: bool) -> tuple[Job | None, bool]:
        """Cancel a queued job (and a running one when ``running_too``). Returns the job's
        state and whether it is canceled now; a canceled job stays canceled (idempotent)."""
        async with self._lock:
            job = await self.get(job_id)
            if job is None:
                return None, False
            if job.status is JobStatus.CANCELED:
                return job, True
            if job.status is JobStatus.RUNNING and running_too and job_id in self._running:
                self._running[job_id].cancel()
            elif job.status is not JobStatus.QUEUED:
                return job, False
            canceled = job.canceled(time.time())
            await asyncio.to_thread(self.store.put, canceled)
            self._jobs.pop(job_id, None)
        self._notify(canceled)
        return canceled, True

    def _notify(self, job: Job) -> None:
        if self._listener is not None:
            try:
                self._listener(job)
            except Exception:  # a listener must not break the job flow
                log.exception("%s job listener failed for %s", self.kind, job.id)

    # -- workers -------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            async with self._lock:
                queued = self._jobs.get(job_id)
                if queued is None or queued.status is not JobStatus.QUEUED:
                    continue  # canceled while it waited
                job = queued.started(time.time())
                self._jobs[job_id] = job
                await asyncio.to_thread(self.store.put, job)
                task: asyncio.Task[Any] = asyncio.create_task(self._runner(job))
                self._running[job_id] = task
            try:
                await self._finish(job, task)
            finally:
                self._running.pop(job_id, None)

    async def _finish(self, job: Job, task: asyncio.Task[Any]) -> None:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and not (asyncio.current_task() or task).cancelling():
                return  # canceled by a client: cancel() wrote the state
            task.cancel()
            raise  # shutting down: the job stays running on disk and resumes
        except Exception as e:  # a task boundary: the job fails, the worker goes on
            message = str(e) if isinstance(e, JobFailed) else f"{type(e).__name__}: {e}"
            if not isinstance(e, JobFailed):
                log.exception("%s job %s failed", self.kind, job.id)
            done = job.failed(time.time(), message)
        else:
            path = self.results / f"{job.id}.json"
            data = json.dumps(result, ensure_ascii=False).encode("utf-8")
            await asyncio.to_thread(write_atomic, path, data, self._fsync)
            done = job.succeeded(time.time(), str(path))
        async with self._lock:
            current = self._jobs.get(job.id)
            if current is None or current.status is not JobStatus.RUNNING:
                return  # canceled meanwhile
            await asyncio.to_thread(self.store.put, done)
            self._jobs.pop(job.id, None)
        log.info("%s job %s %s", self.kind, job.id, done.status.value)
        self._notify(done)

    # -- expiry --------------------------------------------------------------------------
    async def _sweeper(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sweep, time.time())
            except Exception:  # a task boundary: try again next time
                log.exception("%s sweep failed", self.kind)
            await asyncio.sleep(self._config.sweep_interval_s)

    def sweep(self, now: float) -> int:
        """Remove uploads, results and finished jobs older than the retention. Blocking."""
        limit = now - self._config.retention_s
        removed = 0
        for folder in (self.uploads, self.results):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                try:
                    if path.stat().st_mtime < limit:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        for job in self.store.jobs(self.kind):
            if job.status.is_terminal() and (job.finished_at or job.created_at) < limit:
                self.store.delete(self.kind, job.id)
                removed += 1
        return removed
