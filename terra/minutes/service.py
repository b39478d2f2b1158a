"""The minutes service: durable compile jobs behind GET /minutes/{conference_id}.

A job per conference lives in the job store (one status file each), so queued and running
compiles survive a restart: :meth:`MinutesService.start` puts them back in the queue.
``minutes.workers`` compiles run at once, one per conference at most. A compile runs in a
thread of its own (reading the spool, VAD, phrases); its recognition requests hop back onto
the event loop and go through the recognizer scheduler at background priority, at most
``minutes.max_in_flight`` at a time, so live text always goes first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from terra.config import MinutesConfig
from terra.jobs import Job, JobStatus, JobStore, new_job
from terra.minutes.compiler import CompileCancelled, CompileResult, compile_minutes
from terra.minutes.formats import to_xml
from terra.minutes.types import Minutes
from terra.recognizer.types import Recognition, RecognitionRequest
from terra.spool import conference_digest, read_conference, write_atomic

log = logging.getLogger(__name__)

KIND = "minutes"
PROGRESS_WRITE_S = 2.0  # the status file's progress is refreshed at most this often
RETRY_MAX_S = 10.0  # backoff cap when the recognizer queue is full

Submit = Callable[[RecognitionRequest], "asyncio.Future[Recognition | None]"]


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
        spool_root: Path,
        submit: Submit,
        *,
        language_confidence: float = 0.6,
        model: str = "",
        zone: ZoneInfo | None = None,
        fsync: bool = True,
    ) -> None:
        self._config = config
        self._spool_root = spool_root
        self._submit = submit
        self._language_confidence = language_confidence
        self._model = model
        self._zone = zone
        self._fsync = fsync
        self.store = JobStore(Path(config.jobs_dir), fsync=fsync)
        self.results_dir = Path(config.dir)
        self._jobs: dict[str, Job] = {}  # queued or running in this process
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._workers: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._stopping = threading.Event()
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix="minutes")

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Take up the jobs a previous process left queued or running, then start workers."""
        for job in await asyncio.to_thread(self.store.recover, KIND):
            self._enqueue(job)
            log.info("minutes compile recovered", extra={"conference_id": job.id})
        self._workers = [
            asyncio.create_task(self._work(), name=f"minutes-{i}")
            for i in range(self._config.workers)
        ]

    async def stop(self) -> None:
        """Stop compiling; a running job stays ``running`` on disk and resumes at start-up."""
        self._stopping.set()
        for task in list(self._in_flight):
            task.cancel()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)

    def _enqueue(self, job: Job) -> None:
        self._jobs[job.id] = job
        self._queue.put_nowait(job.id)

    # -- the request path ----------------------------------------------------------------
    async def request(self, conference_id: str) -> MinutesAnswer:
        """What GET /minutes answers: queue a compile when there is none for the current
        audio, report one under way, or hand over the compiled minutes."""
        async with self._lock:
            active = self._jobs.get(conference_id)
            if active is not None:
                return MinutesAnswer(State.RUNNING, active)
            job = await asyncio.to_thread(self.store.get, KIND, conference_id)
            if job is not None and not job.status.is_terminal():
                # Left by a process that did not recover it (e.g. another one sharing the
                # folders): take it up here rather than leave the client waiting forever.
                job = job.requeued()
                self._enqueue(job)
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
            queued = new_job(KIND, conference_id, time.time(), digest=digest)
            await asyncio.to_thread(self.store.put, queued)
            self._enqueue(queued)
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

    # -- workers -------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            conference_id = await self._queue.get()
            try:
                await self._run(conference_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # a task boundary: log it, keep the worker
                log.exception("minutes worker failed", extra={"conference_id": conference_id})
                self._jobs.pop(conference_id, None)

    async def _run(self, conference_id: str) -> None:
        queued = self._jobs.get(conference_id)
        if queued is None:
            return
        job = queued.started(time.time())
        self._jobs[conference_id] = job
        await asyncio.to_thread(self.store.put, job)
        log.info(
            "minutes compile started (attempt %d)", job.attempts, extra={"conference_id": job.id}
        )
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self._compile, job, loop)
        except CompileCancelled:
            return  # shutting down: the job stays "running" on disk and resumes at start-up
        except Exception as e:
            if self._stopping.is_set():
                return
            log.exception("minutes compile failed", extra={"conference_id": job.id})
            failed = job.failed(time.time(), f"{type(e).__name__}: {e}")
            await asyncio.to_thread(self.store.put, failed)
            self._jobs.pop(conference_id, None)
            return
        path = await asyncio.to_thread(self._save, result)
        done = job.succeeded(
            time.time(),
            str(path),
            digest=result.digest,
            audio_s=result.minutes.audio_s,
            speech_s=round(result.speech_s, 3),
            compile_s=round(result.seconds, 3),
            phrases=len(result.minutes.phrases),
        )
        await asyncio.to_thread(self.store.put, done)
        self._jobs.pop(conference_id, None)
        log.info(
            "minutes compiled: %d phrases from %.1f s of audio in %.1f s",
            len(result.minutes.phrases),
            result.minutes.audio_s,
            result.seconds,
            extra={"conference_id": job.id},
        )

    def _compile(self, job: Job, loop: asyncio.AbstractEventLoop) -> CompileResult:
        """In a worker thread: the whole compile, recognition bridged to the loop."""
        last_write = time.monotonic()

        def progress(fraction: float) -> None:
            nonlocal last_write
            current = job.progressed(fraction)
            loop.call_soon_threadsafe(self._progressed, current)
            if time.monotonic() - last_write >= PROGRESS_WRITE_S:
                last_write = time.monotonic()
                self.store.put(current)

        def recognize(requests: Sequence[RecognitionRequest]) -> list[Recognition]:
            if self._stopping.is_set():
                raise CompileCancelled()
            future = asyncio.run_coroutine_threadsafe(self._recognize(requests), loop)
            try:
                return future.result()
            except concurrent.futures.CancelledError as e:
                raise CompileCancelled() from e

        return compile_minutes(
            self._spool_root,
            job.id,
            self._config,
            recognize,
            language_confidence=self._language_confidence,
            model=self._model,
            progress=progress,
            cancelled=self._stopping.is_set,
        )

    def _progressed(self, job: Job) -> None:
        if job.id in self._jobs and self._jobs[job.id].status is JobStatus.RUNNING:
            self._jobs[job.id] = job

    async def _recognize(self, requests: Sequence[RecognitionRequest]) -> list[Recognition]:
        """Through the scheduler; a request dropped because its queue is full is sent again."""
        task = asyncio.current_task()
        assert task is not None
        if self._stopping.is_set():
            raise asyncio.CancelledError()
        self._in_flight.add(task)
        try:
            results: list[Recognition | None] = [None] * len(requests)
            waiting = list(range(len(requests)))
            delay = 0.5
            while waiting:
                futures = [self._submit(requests[i]) for i in waiting]
                try:
                    answers = await asyncio.gather(*futures)
                except asyncio.CancelledError:
                    for future in futures:
                        future.cancel()
                    raise
                for i, answer in zip(waiting, answers):
                    results[i] = answer
                waiting = [i for i in waiting if results[i] is None]
                if waiting:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
            return [r for r in results if r is not None]
        finally:
            self._in_flight.discard(task)

    def _save(self, result: CompileResult) -> Path:
        minutes = result.minutes
        data = json.dumps(minutes.to_json(), ensure_ascii=False).encode("utf-8")
        path = self.results_dir / f"{minutes.conference_id}.json"
        write_atomic(path, data, self._fsync)
        # The protocol as a file too, for operators; requests render from the JSON.
        write_atomic(path.with_suffix(".xml"), to_xml(minutes, self._zone), self._fsync)
        return path
