"""The minutes service: durable compile jobs behind GET /minutes/{conference_id}.

A compile is a job of kind ``minutes`` (its id is the conference's) on the shared job
runner (:mod:`terra.jobs.runner`): it survives a restart, is taken over by another front
end sharing the folders when its own dies, and is failed after ``jobs.max_attempts``
starts that never finished. ``minutes.workers`` compiles run at once per front end, one
per conference at most (the lease). A compile is async: it reads the spool and runs the VAD
in a thread and awaits the recognizer scheduler at background priority, at most
``minutes.max_in_flight`` requests at a time, so live text always goes first. Requests are
answered from the job store, so any front end answers for any conference.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from zoneinfo import ZoneInfo

from terra.config import JobsConfig, MinutesConfig
from terra.jobs.runner import Clock, Done, JobFailed, JobRunner, Progress
from terra.jobs.store import Job, JobStatus
from terra.minutes.compiler import CompileResult, MinutesCompiler
from terra.minutes.formats import to_xml
from terra.minutes.types import Minutes
from terra.recognizer.options import DecodePasses
from terra.recognizer.types import Recognition, RecognitionRequest
from terra.retry import Submit, until_taken
from terra.spool import conference_digest, read_conference, remove_stale_temps, write_atomic
from terra.tasks import gather_or_cancel

log = logging.getLogger(__name__)

KIND = "minutes"


class State(Enum):
    NOT_FOUND = "not_found"  # nothing spooled, nothing compiled
    QUEUED_NOW = "queueplacing"  # this call queued a compile
    RUNNING = "running"  # queued or running
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class MinutesAnswer:
    state: State
    job: Job | None = None
    minutes: Minutes | None = None


class MinutesService:
    def __init__(
        self,
        config: MinutesConfig,
        jobs: JobsConfig,
        spool_root: Path,
        submit: Submit,
        *,
        decode: DecodePasses,
        model: str = "",
        zone: ZoneInfo | None = None,
        fsync: bool = True,
        clock: Clock = time.time,
    ) -> None:
        self._spool_root = spool_root
        self._submit = submit
        self._compiler = MinutesCompiler(config, self._recognize, decode=decode, model=model)
        self._zone = zone
        self._fsync = fsync
        self.results_dir = Path(config.dir)
        self.runner = JobRunner.for_section(
            config, KIND, self._compile, jobs, fsync=fsync, clock=clock
        )
        self.store = self.runner.store
        self._lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Take up the compiles nobody runs (left by a process that died), start workers;
        remove the results' temp files killed writers left (wall-clock file times)."""
        await asyncio.to_thread(remove_stale_temps, self.results_dir, time.time())
        await self.runner.start()

    async def stop(self) -> None:
        """Stop compiling; a running compile goes back in the queue for the next start."""
        await self.runner.stop()

    # -- the request path ----------------------------------------------------------------
    async def request(self, conference_id: str) -> MinutesAnswer:
        """What GET /minutes answers: queue a compile when there is none for the current
        audio, report one under way, or hand over the compiled minutes."""
        async with self._lock:
            active = self.runner.active(conference_id)
            if active is not None and not active.status.is_terminal():
                return MinutesAnswer(State.RUNNING, active)
            job = await asyncio.to_thread(self.store.get, KIND, conference_id)
            if job is not None and not job.status.is_terminal():
                # Queued or running here or on another front end; if nobody holds it (its
                # front end died), take it up here rather than leave the client waiting.
                await self.runner.take_up(job)
                return MinutesAnswer(State.RUNNING, job)
            digest = await asyncio.to_thread(self._digest, conference_id)
            if job is not None and job.status is JobStatus.SUCCEEDED:
                if digest is None or digest == job.params.get("digest"):
                    minutes = await asyncio.to_thread(self._load, job)
                    if minutes is not None:
                        return MinutesAnswer(State.DONE, job, minutes)
            if digest is None:
                return MinutesAnswer(State.NOT_FOUND, job)
            if job is not None and job.status is JobStatus.FAILED:
                if digest == job.params.get("digest"):
                    return MinutesAnswer(State.FAILED, job)
            queued = await self.runner.create(conference_id, digest=digest)
            log.info("minutes compile queued", extra={"conference_id": conference_id})
            return MinutesAnswer(State.QUEUED_NOW, queued)

    def _digest(self, conference_id: str) -> str | None:
        participants = read_conference(self._spool_root, conference_id)
        return conference_digest(participants) if participants else None

    def _load(self, job: Job) -> Minutes | None:
        if not job.result_path:
            return None
        try:
            data = json.loads(Path(job.result_path).read_text(encoding="utf-8"))
            return Minutes.from_json(data)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning(
                "compiled minutes %s are unreadable (%s): compiling again",
                job.result_path,
                e,
                extra={"conference_id": job.id},
            )
            return None

    # -- the job -------------------------------------------------------------------------
    async def _compile(self, job: Job, progress: Progress) -> Done:
        """The whole compile, awaited; a failure anywhere (the writes too) fails the job."""
        result = await self._compiler.compile(self._spool_root, job.id, progress)
        path = await asyncio.to_thread(self._save, result, job.id)
        log.info(
            "minutes compiled: %d phrases from %.1f s of audio in %.1f s",
            len(result.minutes.phrases),
            result.minutes.audio_s,
            result.seconds,
            extra={"conference_id": job.id},
        )
        return Done(
            str(path),
            {
                "digest": result.digest,
                "audio_s": result.minutes.audio_s,
                "speech_s": round(result.speech_s, 3),
                "compile_s": round(result.seconds, 3),
                "phrases": len(result.minutes.phrases),
            },
        )

    async def _recognize(self, requests: Sequence[RecognitionRequest]) -> list[Recognition]:
        """Through the scheduler; a request dropped because its queue is full is sent again.
        One that fails fails them all, with none of the others left waiting."""
        return await gather_or_cancel(until_taken(self._submit, r) for r in requests)

    def _save(self, result: CompileResult, job_id: str) -> Path:
        minutes = result.minutes
        data = json.dumps(minutes.to_json(), ensure_ascii=False).encode("utf-8")
        xml = to_xml(minutes, self._zone)  # before anything is written: all or nothing

        def still_ours() -> None:
            # A compile that stalled past its lease (another front end took the job over
            # and may have written newer minutes) must not replace that front end's files.
            if not self.runner.holds(job_id):
                raise JobFailed("the lease was lost to another front end: result not written")

        path = self.results_dir / f"{minutes.conference_id}.json"
        write_atomic(path, data, self._fsync, before_publish=still_ours)
        # The protocol as a file too, for operators; requests render from the JSON.
        write_atomic(path.with_suffix(".xml"), xml, self._fsync, before_publish=still_ours)
        return path
