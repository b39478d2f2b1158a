"""File-recognition jobs for one dialect: uploads and results on disk, jobs on the runner.

Jobs run on the shared :class:`terra.jobs.runner.JobRunner` (kind = the dialect), so they
survive a restart and are taken over by another front end sharing the folders. Uploaded
audio and results are plain files under ``files.dir``; both, and finished jobs, are removed
``files.retention_s`` after they were written, except an upload that a job not finished yet
(here or on another front end) still reads: it is kept until that job ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable
from pathlib import Path
from typing import Any

from terra.config import FilesConfig, JobsConfig
from terra.files.upload import save_stream
from terra.jobs.runner import Done, JobRunner, Notifier, Progress
from terra.jobs.store import Job
from terra.spool import write_atomic
from terra.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# The work for a job: its JSON result, or an exception (the job fails with its message).
Recognize = Callable[[Job], Awaitable[Any]]


class FileJobService:
    def __init__(
        self,
        config: FilesConfig,
        jobs: JobsConfig,
        kind: str,
        recognize: Recognize,
        *,
        upload_param: str,
        fsync: bool = True,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: wall-clock seconds, for the jobs' times and the retention sweep's now
        (which file times are compared with)."""
        self._config = config
        self.kind = kind
        self._recognize = recognize
        self._upload_param = upload_param  # the job param that names the job's upload
        self._fsync = fsync
        self._clock = clock
        self.uploads = Path(config.dir) / kind / "uploads"
        self.results = Path(config.dir) / kind / "results"
        self.runner = JobRunner.for_section(
            config, kind, self._work, jobs, fsync=fsync, notifier=notifier, clock=clock
        )
        self._sweeper_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.runner.start()
        self._sweeper_task = asyncio.create_task(self._sweeper(), name=f"{self.kind}-sweep")

    async def stop(self) -> None:
        if self._sweeper_task is not None:
            await cancel_and_wait([self._sweeper_task])
        await self.runner.stop()

    async def _work(self, job: Job, progress: Progress) -> Done:
        result = await self._recognize(job)
        path = self.results / f"{job.id}.json"
        data = json.dumps(result, ensure_ascii=False).encode("utf-8")
        await asyncio.to_thread(write_atomic, path, data, self._fsync)
        return Done(str(path))

    # -- files ---------------------------------------------------------------------------
    async def save_upload(self, chunks: AsyncIterable[bytes], limit: int) -> str:
        """Stream an upload to disk and return its id (:class:`UploadTooLarge` past
        ``limit`` bytes, with nothing kept)."""
        file_id = str(uuid.uuid4())
        await save_stream(chunks, self.uploads / file_id, limit, fsync=self._fsync)
        return file_id

    def upload_path(self, file_id: str) -> Path | None:
        return _stored(self.uploads, file_id)

    def result_path(self, result_id: str) -> Path | None:
        return _stored(self.results, result_id, ".json")

    # -- jobs ----------------------------------------------------------------------------
    async def create(self, **params: Any) -> Job:
        """Queue a job; :class:`terra.jobs.runner.QueueFull` when too many are waiting."""
        return await self.runner.create(**params)

    async def get(self, job_id: str) -> Job | None:
        return await self.runner.get(job_id)

    async def cancel(self, job_id: str, *, running_too: bool) -> tuple[Job | None, bool]:
        return await self.runner.cancel(job_id, running_too=running_too)

    # -- expiry --------------------------------------------------------------------------
    async def _sweeper(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sweep, self._clock())
            except Exception:  # a task boundary: try again next time
                log.exception("%s sweep failed", self.kind)
            await asyncio.sleep(self._config.sweep_interval_s)

    def sweep(self, now: float) -> int:
        """Remove uploads, results and finished jobs older than the retention; an upload
        that an unfinished job still reads is kept. Blocking."""
        limit = now - self._config.retention_s
        needed = {str(job.params.get(self._upload_param)) for job in self.runner.unfinished()}
        removed = 0
        for folder in (self.uploads, self.results):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if folder == self.uploads and path.name in needed:
                    continue
                try:
                    if path.stat().st_mtime < limit:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed + self.runner.sweep(now, self._config.retention_s)


def _stored(folder: Path, file_id: str, suffix: str = "") -> Path | None:
    """``folder/{file_id}{suffix}`` when ``file_id`` is a UUID (the only ids this service
    gives out: a client's id never names another path) and the file is there; else None."""
    try:
        path = folder / f"{uuid.UUID(file_id)}{suffix}"
    except ValueError:
        return None
    return path if path.is_file() else None
