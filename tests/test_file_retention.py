"""The file dialects' retention sweep (terra/files/service.py) on real files and the
runner's real jobs, without the model: nothing here is recognized (the runners are not
started, so the jobs wait in the queue as behind a long backlog)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from terra.config import FilesConfig, JobsConfig
from terra.files.connecte import ConnecteService
from terra.files.salute import salute_service
from terra.files.service import FileJobService
from terra.files.upload import in_memory
from terra.jobs.store import Job
from terra.recognizer.options import DecodeOptions
from terra.recognizer.types import Recognition, RecognitionRequest

from .fakes import FakeEngine

AUDIO = b"\0" * 3200


def no_recognizer(request: RecognitionRequest) -> asyncio.Future[Recognition | None]:
    raise AssertionError("these tests recognize nothing")


async def payload(job: Job) -> dict[str, Any]:
    return {"id": job.id}


def uploads(service: FileJobService) -> set[str]:
    return {p.name for p in service.uploads.iterdir()}


async def test_an_upload_an_unfinished_job_reads_is_not_swept(tmp_path: Path) -> None:
    """An upload older than ``files.retention_s`` is kept while a queued or running job of
    either dialect (SaluteSpeech ``request_file_id``, connecte ``upload``) still reads it;
    once nothing unfinished needs it, it goes as before."""
    config = FilesConfig(dir=str(tmp_path / "files"), jobs_dir=str(tmp_path / "file-jobs"))
    jobs = JobsConfig()
    salute = salute_service(config, jobs, DecodeOptions(), FakeEngine(), no_recognizer, False)
    connecte = ConnecteService(config, jobs, DecodeOptions(), no_recognizer, payload, fsync=False)
    try:
        # SaluteSpeech: one task queued, one running, one done, and an upload nobody uses.
        queued, running, done, unused = [
            await salute.save_upload(in_memory(AUDIO), len(AUDIO)) for _ in range(4)
        ]
        await salute.create(request_file_id=queued, options={})
        job = await salute.create(request_file_id=running, options={})
        created = job.created_at
        salute.runner.store.put(job.started(created))
        job = await salute.create(request_file_id=done, options={})
        salute.runner.store.put(job.started(created).succeeded(created, "result.json"))
        # connecte: a prediction from a data: URI, queued; one from a URL (no upload).
        waiting = await connecte.jobs.save_upload(in_memory(AUDIO), len(AUDIO))
        await connecte.jobs.create(input={"audio": "data:..."}, upload=waiting)
        await connecte.jobs.create(input={"audio": "http://example.org/a.wav"}, upload="")

        late = created + config.retention_s + 1  # every file is past the retention
        salute.sweep(late)
        connecte.jobs.sweep(late)
        assert uploads(salute) == {queued, running}
        assert uploads(connecte.jobs) == {waiting}
        assert {unused, done}.isdisjoint(uploads(salute))

        # The jobs end: their uploads go at the next sweep.
        for pending in salute.runner.store.jobs(salute.kind):
            salute.runner.store.put(pending.canceled(created))
        for pending in connecte.jobs.runner.store.jobs(connecte.jobs.kind):
            connecte.jobs.runner.store.put(pending.canceled(created))
        salute.sweep(late)
        connecte.jobs.sweep(late)
        assert uploads(salute) == set() and uploads(connecte.jobs) == set()
    finally:
        await salute.stop()
        await connecte.stop()


class RecordingSweeps(FileJobService):
    """The real service; each sweep's ``now`` is recorded and the test woken (an event, not a
    sleep: the sweeper runs the sweep in a thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nows: list[float] = []
        self.swept = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def sweep(self, now: float) -> int:
        removed = super().sweep(now)
        self.nows.append(now)
        self._loop.call_soon_threadsafe(self.swept.set)
        return removed


async def test_the_sweeper_reads_the_services_clock(tmp_path: Path) -> None:
    """The background sweep asks the clock the service was given (as its jobs' times do),
    not the system's: with a clock three days on, the first round removes an upload
    written now."""
    config = FilesConfig(dir=str(tmp_path / "files"), jobs_dir=str(tmp_path / "file-jobs"))
    three_days_on = time.time() + config.retention_s + 60.0
    service = RecordingSweeps(
        config,
        JobsConfig(),
        "salute",
        payload,
        upload_param="file",
        fsync=False,
        clock=lambda: three_days_on,
    )
    upload = await service.save_upload(in_memory(AUDIO), len(AUDIO))
    assert uploads(service) == {upload}
    await service.start()
    try:
        await asyncio.wait_for(service.swept.wait(), 10)
    finally:
        await service.stop()
    assert service.nows[0] == three_days_on
    assert uploads(service) == set()
