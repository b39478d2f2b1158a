"""The one job runner: a queue, workers, leases, recovery, cancel, retention, terminal notices.

One :class:`JobRunner` per job kind (``minutes``, ``salute``, ``connecte``) runs that kind's
``work`` coroutine for each job, with the lifecycle of :class:`~terra.jobs.store.JobStatus`::

    queued ──► running ──► succeeded | failed | canceled

Before a job runs, its lease is claimed in the store (see :mod:`terra.jobs.store`), so of
all the front ends sharing the job folder exactly one runs it; the lease is renewed every
third of ``jobs.lease_s`` while the work goes on, and a runner that finds it lost stops the
work without writing. Every ``jobs.scan_interval_s`` (and at start-up) the runner looks for
jobs nobody holds a live lease on (left queued or running by a process that died, or
queued on another front end that is busy) and takes them up. A job started
``jobs.max_attempts`` times without finishing (each start killed the server) is failed
with that reason instead of being taken again. Stopping the server puts a running job back
in the queue without counting the attempt, and lets its lease go at once.

A kind may have a :class:`Notifier` (connecte's webhooks): a job that reaches a terminal
state with a notice to send is written with ``notify_pending``, and the notice is sent
under the job's lease; a notice a restart interrupted is sent by whoever takes the lease
next. Times come from the injected ``clock`` (unix seconds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from terra.config import JobsConfig
from terra.jobs.store import Job, JobStatus, JobStore, Lease, new_job
from terra.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Progress = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class Done:
    """What a job's work produced: the result file and facts to keep in the job's params."""

    result_path: str
    params: dict[str, Any] = field(default_factory=dict)


# The work for a job: a Done, or an exception (the job fails with its message).
Work = Callable[[Job, Progress], Coroutine[Any, Any, Done]]


class Notifier(Protocol):
    """A kind's terminal notices (e.g. webhooks)."""

    def wants(self, job: Job) -> bool:
        """Whether this ended job has a notice to send."""
        ...

    async def send(self, job: Job) -> None:
        """Send it; return when it is delivered or given up."""
        ...


class QueueSection(Protocol):
    """The config section of a kind's queue (``minutes``, ``files``): where its jobs are
    kept, how many run at once here, how many may wait here."""

    @property
    def jobs_dir(self) -> str: ...

    @property
    def workers(self) -> int: ...

    @property
    def max_queued(self) -> int: ...


class QueueFull(RuntimeError):
    """More jobs of the kind are waiting than its ``max_queued`` allows."""


class JobFailed(RuntimeError):
    """A work function's failure with a message meant for the client."""


def node_id(config: JobsConfig) -> str:
    """This process's name in leases: ``jobs.node_id``, or host, pid and a random part."""
    if config.node_id:
        return f"{config.node_id}-{uuid.uuid4().hex[:8]}"
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        kind: str,
        work: Work,
        config: JobsConfig,
        *,
        workers: int = 1,
        max_queued: int = 0,
        notifier: Notifier | None = None,
        clock: Clock = time.time,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.kind = kind
        self._work = work
        self._config = config
        self._workers_count = workers
        self._max_queued = max_queued
        self._notifier = notifier
        self._clock = clock
        self.owner = owner or node_id(config)
        self._active: dict[str, Job] = {}  # queued here, or running here
        self._leases: dict[str, Lease] = {}  # held by this process
        self._claims: dict[str, asyncio.Future[Lease | None]] = {}  # under way here
        self._running: dict[str, asyncio.Task[Done]] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._writes = asyncio.Lock()  # a progress write and a terminal one never cross
        self._waiters: dict[str, list[asyncio.Future[Job]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._notices: set[asyncio.Task[None]] = set()
        self._stopping = False

    @classmethod
    def for_section(
        cls,
        section: QueueSection,
        kind: str,
        work: Work,
        config: JobsConfig,
        *,
        fsync: bool = True,
        notifier: Notifier | None = None,
        clock: Clock = time.time,
    ) -> JobRunner:
        """The runner of ``kind`` as its config section sets it up, its store in the
        section's ``jobs_dir``."""
        return cls(
            JobStore(Path(section.jobs_dir), fsync=fsync),
            kind,
            work,
            config,
            workers=section.workers,
            max_queued=section.max_queued,
            notifier=notifier,
            clock=clock,
        )

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Remove the temp files killed writers left (file times are wall-clock time), take
        up what nobody runs, then start the workers and the lease keeper."""
        removed = await asyncio.to_thread(self.store.remove_stale_temps, self.kind, time.time())
        if removed:
            log.info("%s: %d temp files left by killed writers removed", self.kind, removed)
        await self.scan()
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"{self.kind}-{i}")
            for i in range(self._workers_count)
        ]
        self._tasks.append(asyncio.create_task(self._keeper(), name=f"{self.kind}-leases"))

    async def stop(self) -> None:
        """Stop: running jobs go back in the queue (the attempt does not count) and their
        leases are let go, so another front end (or the next start) takes them at once."""
        self._stopping = True
        await cancel_and_wait(self._tasks)
        await cancel_and_wait(self._notices)
        for job_id, lease in list(self._leases.items()):
            job = self._active.get(job_id)
            if job is not None and job.status is JobStatus.RUNNING:
                await asyncio.to_thread(self.store.put, job.interrupted())
            await asyncio.to_thread(self.store.release, lease)
        self._leases.clear()

    # -- the client's side ---------------------------------------------------------------
    async def create(self, job_id: str | None = None, **params: Any) -> Job:
        """Write a new job (queued; ``job_id`` or a fresh UUID) to the store and queue it
        here; :class:`QueueFull` when too many of this kind are waiting here."""
        job = new_job(self.kind, job_id or str(uuid.uuid4()), self._clock(), **params)
        async with self._lock:
            if self._max_queued:
                waiting = sum(1 for j in self._active.values() if j.status is JobStatus.QUEUED)
                if waiting >= self._max_queued:
                    raise QueueFull(f"{waiting} {self.kind} jobs are waiting")
            await asyncio.to_thread(self.store.put, job)
            self._enqueue(job)
        return job

    async def get(self, job_id: str) -> Job | None:
        """The job as stored, or as this process runs it (its progress is fresher here)."""
        active = self._active.get(job_id)
        if active is not None and job_id in self._running:
            return active
        try:
            return await asyncio.to_thread(self.store.get, self.kind, job_id)
        except ValueError:  # not a valid id: no such job
            return None

    def holds(self, job_id: str) -> bool:
        """Whether this process still holds the job's lease, as stored (blocking: for the
        work's thread, just before it publishes a result another front end may own now)."""
        lease = self._leases.get(job_id)
        return lease is not None and self.store.holds(lease)

    def active(self, job_id: str) -> Job | None:
        """The job while it is queued or running in this process."""
        return self._active.get(job_id)

    async def take_up(self, job: Job) -> bool:
        """Queue a stored, unfinished job here unless somebody holds a live lease on it."""
        if job.id in self._active:
            return True
        lease = await asyncio.to_thread(self.store.lease, self.kind, job.id)
        if lease is not None and lease.live(self._clock()):
            return False
        self._enqueue(job)
        return True

    async def cancel(self, job_id: str, *, running_too: bool) -> tuple[Job | None, bool]:
        """Cancel a queued job (and a running one when ``running_too``). Returns the job's
        state and whether it is canceled now; a canceled job stays canceled (idempotent).
        A job running on another front end is canceled in the store; its runner sees that
        at its next lease renewal and stops it."""
        async with self._lock:
            job = await self.get(job_id)
            if job is None:
                return None, False
            if job.status is JobStatus.CANCELED:
                return job, True
            canceled = job.canceled(self._clock())
            if job.status is JobStatus.RUNNING and running_too:
                task = self._running.get(job_id)
                if task is not None:
                    self._active[job_id] = canceled  # the worker sees it and writes nothing
                    task.cancel()
            elif job.status is JobStatus.QUEUED and job_id in self._active:
                self._active.pop(job_id, None)  # the worker skips it
            elif job.status is JobStatus.QUEUED:
                # Queued on another front end: take its lease first, so that nobody starts
                # it while the cancel is written.
                fresh, cancelable = await self._claim_to_cancel(job_id, running_too)
                if fresh is None or fresh.status is JobStatus.CANCELED:
                    return fresh, fresh is not None
                if not cancelable:
                    return fresh, False
                canceled = fresh.canceled(self._clock())
            else:
                return job, False
            await self._finish(canceled)
        return canceled, True

    async def _claim(self, job_id: str) -> Lease | None:
        """The job's lease, claimed for this process and kept until let go; None when
        another process holds it. A claim here while another of this process's claims of
        the job is under way (a worker and a notice at once) shares that one's answer: the
        process must not lose its own job to itself."""
        under_way = self._claims.get(job_id)
        if under_way is not None:
            return await asyncio.shield(under_way)
        claim = asyncio.ensure_future(
            asyncio.to_thread(
                self.store.claim, self.kind, job_id, self.owner, self._clock(), self._config.lease_s
            )
        )
        self._claims[job_id] = claim
        try:
            lease = await claim
        finally:
            self._claims.pop(job_id, None)
        if lease is not None:
            self._leases[job_id] = lease
        return lease

    async def _claim_to_cancel(self, job_id: str, running_too: bool) -> tuple[Job | None, bool]:
        """The stored job, and whether to cancel it: a queued one under a lease taken here;
        one that another front end has just started only when ``running_too`` (its runner
        sees the cancel in the store and stops)."""
        lease = await self._claim(job_id)  # let go by _finish, or below
        fresh = await asyncio.to_thread(self.store.get, self.kind, job_id)
        cancelable = fresh is not None and (
            (fresh.status is JobStatus.QUEUED and lease is not None)
            or (not fresh.status.is_terminal() and running_too)
        )
        if not cancelable and lease is not None:
            await self._let_go(job_id)
        return fresh, cancelable

    async def wait(self, job_id: str, timeout_s: float) -> Job | None:
        """The job once it ends here, or as it is after ``timeout_s``."""
        # Waiting before reading: a job that ends while the store is read wakes this waiter
        # (registered after the read, it would wait out the timeout).
        waiter: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(waiter)
        try:
            job = await self.get(job_id)
            if job is None or job.status.is_terminal():
                return job
            return await asyncio.wait_for(asyncio.shield(waiter), max(0.0, timeout_s))
        except TimeoutError:
            return await self.get(job_id)
        finally:
            waiting = self._waiters.get(job_id, [])
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self._waiters.pop(job_id, None)

    async def notices_sent(self) -> None:
        """Wait for the terminal notices under way here (tests; a stop does not wait: it
        cancels them, and the ones still ``notify_pending`` are sent again at the next start)."""
        while self._notices:
            await asyncio.gather(*self._notices, return_exceptions=True)

    # -- recovery and takeover -----------------------------------------------------------
    async def scan(self) -> int:
        """Queue every job of this kind that is unfinished (or owes its notice) and that
        nobody holds a live lease on. Returns how many were queued."""
        now = self._clock()

        def orphans() -> list[Job]:
            found = []
            for job in self.store.jobs(self.kind):
                if job.id in self._active or (job.status.is_terminal() and not job.notify_pending):
                    continue
                lease = self.store.lease(self.kind, job.id)
                if lease is None or not lease.live(now):
                    found.append(job)
            return sorted(found, key=lambda j: j.queued_at)

        taken = 0
        for job in await asyncio.to_thread(orphans):
            if job.id in self._active:
                continue
            log.info("%s job %s taken up (%s, no live lease)", self.kind, job.id, job.status)
            if job.status.is_terminal():
                self._send_notice(job)  # only its notice is owed
            else:
                self._enqueue(job)
            taken += 1
        return taken

    async def renew(self) -> None:
        """Renew every lease held here; stop the work of a job whose lease was lost or that
        was canceled elsewhere; write running jobs' progress."""
        now = self._clock()
        for job_id, lease in list(self._leases.items()):
            renewed = await asyncio.to_thread(self.store.renew, lease, now, self._config.lease_s)
            task = self._running.get(job_id)
            if renewed is None:
                log.warning("%s job %s: lease lost to another front end", self.kind, job_id)
                self._leases.pop(job_id, None)
                if task is not None:
                    task.cancel()  # not awaited: the other leases are renewed meanwhile
                continue
            self._leases[job_id] = renewed
            stored = await asyncio.to_thread(self.store.get, self.kind, job_id)
            if stored is not None and stored.status is JobStatus.CANCELED and task is not None:
                log.info("%s job %s canceled elsewhere: stopped", self.kind, job_id)
                self._active[job_id] = stored
                task.cancel()
                continue
            if stored is None or stored.status is not JobStatus.RUNNING:
                continue
            async with self._writes:  # never after (over) the worker's terminal write
                current = self._active.get(job_id)
                if (
                    job_id in self._running
                    and current is not None
                    and current.status is JobStatus.RUNNING
                    and current.progress != stored.progress
                ):
                    await asyncio.to_thread(self.store.put, current)

    async def _keeper(self) -> None:
        renew_every = self._config.lease_s / 3
        # start() has just scanned; scanning again at once would race the first jobs created
        # here (queued, not yet leased) and take them up as orphans.
        next_scan = time.monotonic() + self._config.scan_interval_s
        while True:
            try:
                await self.renew()
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + self._config.scan_interval_s
                    await self.scan()
            except Exception:  # a task boundary: try again next time
                log.exception("%s lease keeper failed", self.kind)
            await asyncio.sleep(min(renew_every, self._config.scan_interval_s))

    # -- retention -----------------------------------------------------------------------
    def unfinished(self) -> list[Job]:
        """Jobs of this kind queued or running, here or on another front end. Blocking."""
        return [job for job in self.store.jobs(self.kind) if not job.status.is_terminal()]

    def sweep(self, now: float, retention_s: float) -> int:
        """Remove finished jobs (and their leases) older than ``retention_s``. Blocking."""
        removed = 0
        for job in self.store.jobs(self.kind):
            finished = job.finished_at or job.created_at
            if job.status.is_terminal() and not job.notify_pending and finished < now - retention_s:
                self.store.delete(self.kind, job.id)
                removed += 1
        return removed

    # -- workers -------------------------------------------------------------------------
    def _enqueue(self, job: Job) -> None:
        self._active[job.id] = job
        self._queue.put_nowait(job.id)

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                await self.run_one(job_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # a task boundary: log it, keep the worker
                log.exception("%s worker failed on %s", self.kind, job_id)
                self._active.pop(job_id, None)

    async def run_one(self, job_id: str) -> Job | None:
        """Claim, run and finish one queued job (what a worker does with each id)."""
        if job_id not in self._active:
            return None  # canceled while it waited
        lease = await self._claim(job_id)
        if lease is None:
            log.info("%s job %s is held by another front end", self.kind, job_id)
            self._active.pop(job_id, None)
            return None
        try:
            return await self._run_leased(job_id, lease)
        finally:
            if job_id not in self._notices_for():
                await self._let_go(job_id)

    def _notices_for(self) -> set[str]:
        return {t.get_name() for t in self._notices}

    async def _let_go(self, job_id: str) -> None:
        if self._stopping:
            return  # stop() writes back and releases what is still held
        lease = self._leases.pop(job_id, None)
        self._active.pop(job_id, None)
        if lease is not None:
            await asyncio.to_thread(self.store.release, lease)

    async def _run_leased(self, job_id: str, lease: Lease) -> Job | None:
        stored = await asyncio.to_thread(self.store.get, self.kind, job_id)
        if stored is None:
            return None
        if stored.status.is_terminal():
            if stored.notify_pending:
                self._send_notice(stored)
            return stored
        if stored.attempts >= self._config.max_attempts:
            failed = stored.failed(
                self._clock(),
                f"started {stored.attempts} times without finishing (the server stopped "
                "during each attempt): given up",
            )
            log.warning("%s job %s: %s", self.kind, job_id, failed.error)
            await self._finish(failed)
            return failed

        def progress(fraction: float) -> None:
            current = self._active.get(job_id)
            if current is not None and current.status is JobStatus.RUNNING:
                self._active[job_id] = current.progressed(fraction)

        # Under cancel()'s lock: a cancel comes before the "running" write (and this sees
        # it), or after the work is registered (and stops it); never while "running" is
        # being written, which would land over the cancel.
        async with self._lock:
            queued = self._active.get(job_id)
            if queued is None or queued.status.is_terminal():
                return queued  # canceled while it was claimed: cancel() wrote that
            job = stored.started(self._clock())
            self._active[job_id] = job
            await asyncio.to_thread(self.store.put, job)
            task = asyncio.create_task(self._work(job, progress), name=f"{self.kind}-{job_id}")
            self._running[job_id] = task
        log.info("%s job %s started (attempt %d)", self.kind, job_id, job.attempts)
        try:
            done = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                await cancel_and_wait([task])  # the server is stopping: stop() writes it back
                raise
            return self._active.get(job_id)  # canceled by a client or lost: nothing to write
        except Exception as e:  # a task boundary: the job fails, the worker goes on
            if not isinstance(e, JobFailed):
                log.exception("%s job %s failed", self.kind, job_id)
            message = str(e) if isinstance(e, JobFailed) else f"{type(e).__name__}: {e}"
            ended = job.failed(self._clock(), message)
        else:
            ended = job.succeeded(self._clock(), done.result_path, **done.params)
        finally:
            self._running.pop(job_id, None)
        current = self._active.get(job_id)
        if current is None or current.status is not JobStatus.RUNNING:
            return current  # canceled meanwhile: cancel() wrote that
        if not await asyncio.to_thread(self.store.holds, lease):
            log.warning("%s job %s: lease lost, result not written", self.kind, job_id)
            return None
        stored = await asyncio.to_thread(self.store.get, self.kind, job_id)
        if stored is not None and stored.status is JobStatus.CANCELED:
            log.info("%s job %s was canceled elsewhere: result dropped", self.kind, job_id)
            return stored  # a front end canceled it while it ran: the cancel stands
        await self._finish(ended)
        log.info("%s job %s %s", self.kind, job_id, ended.status.value)
        return ended

    async def _finish(self, job: Job) -> None:
        """Write a terminal state, wake waiters, start the notice."""
        notice = self._notifier is not None and self._notifier.wants(job)
        job = job.with_notice(notice)
        async with self._writes:
            write = asyncio.ensure_future(asyncio.to_thread(self.store.put, job))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # The server stops: the write goes on in its thread, so it is waited for
                # and stop() finds the job ended (it would write "queued" over the result).
                await write
                if self._stopping:
                    self._active[job.id] = job
                raise
        if notice:
            self._active[job.id] = job  # until the notice is sent
        else:
            await self._let_go(job.id)  # before waking anyone: the lease is free when they look
        for waiter in self._waiters.pop(job.id, []):
            if not waiter.done():
                waiter.set_result(job)
        if notice:
            self._send_notice(job)

    def _send_notice(self, job: Job) -> None:
        if job.id in self._notices_for():
            return
        task = asyncio.create_task(self._deliver(job), name=job.id)
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def _deliver(self, job: Job) -> None:
        assert self._notifier is not None
        if job.id not in self._leases:
            if await self._claim(job.id) is None:
                return  # another front end sends it
            stored = await asyncio.to_thread(self.store.get, self.kind, job.id)
            if stored is None or not stored.notify_pending:
                await self._let_go(job.id)
                return  # sent meanwhile
            job = stored
        try:
            await self._notifier.send(job)
        except Exception:  # a task boundary: a notice must not break the job flow
            log.exception("%s job %s: notice failed", self.kind, job.id)
        current = await asyncio.to_thread(self.store.get, self.kind, job.id)
        if current is not None and current.notify_pending:
            await asyncio.to_thread(self.store.put, current.with_notice(False))
        await self._let_go(job.id)
