"""The job store, leases and the one job runner, without the model.

The work of a job is a stand-in (:class:`FakeWork`, a fake: the real kinds need the model
and are tested in test_minutes, test_salute and test_connecte); it runs until the test
releases it, so every step is synchronised by events, never by sleeping. Time that matters
(lease expiry) comes from an injected clock the tests move by hand.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from terra.config import JobsConfig
from terra.jobs.runner import Done, JobFailed, JobRunner, Progress, QueueFull
from terra.jobs.store import Job, JobStatus, JobStore, Lease, new_job

KIND = "demo"
LEASE_S = 30.0


class Clock:
    """An injected wall clock (unix seconds) that only the test moves."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeWork:
    """A fake job kind: records each run, reports progress 0.5, then waits for the test to
    release it (or to fail it)."""

    def __init__(self, released: bool = False) -> None:
        self.runs: list[str] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if released:
            self.release.set()
        self.cancelled: list[str] = []
        self.stopped = asyncio.Event()  # set when a run is cancelled
        self.error: BaseException | None = None

    async def __call__(self, job: Job, progress: Progress) -> Done:
        self.runs.append(job.id)
        self.started.set()
        progress(0.5)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(job.id)
            self.stopped.set()
            raise
        if self.error is not None:
            raise self.error
        return Done(f"/results/{job.id}.json", {"words": 3})


def runner_for(
    root: Path,
    work: FakeWork,
    clock: Clock,
    *,
    owner: str,
    workers: int = 1,
    max_queued: int = 0,
    max_attempts: int = 3,
) -> JobRunner:
    config = JobsConfig(max_attempts=max_attempts, lease_s=LEASE_S, scan_interval_s=3600)
    return JobRunner(
        JobStore(root, fsync=False),
        KIND,
        work,
        config,
        workers=workers,
        max_queued=max_queued,
        clock=clock,
        owner=owner,
    )


@pytest.fixture
async def runners() -> AsyncIterator[list[JobRunner]]:
    """Runners a test started; stopped at its end."""
    started: list[JobRunner] = []
    yield started
    for runner in started:
        await runner.stop()


async def started(runner: JobRunner, runners: list[JobRunner]) -> JobRunner:
    await runner.start()
    runners.append(runner)
    return runner


# -- the store ------------------------------------------------------------------------------


def test_store_round_trip_and_listing(tmp_path: Path) -> None:
    store = JobStore(tmp_path, fsync=False)
    assert store.get(KIND, "j1") is None
    queued = new_job(KIND, "j1", 100.0, digest="abc")
    store.put(queued)
    assert store.get(KIND, "j1") == queued
    store.put(queued.started(101.0).progressed(0.4))
    store.put(new_job(KIND, "j2", 99.0).started(99.5).succeeded(100.0, "/x.json", n=1))
    (tmp_path / KIND / "broken.json").write_text("{not json", encoding="utf-8")
    (tmp_path / KIND / ".tmp-123.json").write_text("{}", encoding="utf-8")
    assert store.claim(KIND, "j1", "me", 0.0, 10.0) is not None  # a lease is not a job
    jobs = {j.id: j for j in store.jobs(KIND)}
    assert set(jobs) == {"j1", "j2"}
    assert jobs["j1"].status is JobStatus.RUNNING and jobs["j1"].attempts == 1
    assert jobs["j2"].params == {"n": 1} and jobs["j2"].progress == 1.0
    assert JobStatus.SUCCEEDED.is_terminal() and not JobStatus.RUNNING.is_terminal()
    assert jobs["j1"].interrupted().status is JobStatus.QUEUED
    assert jobs["j1"].interrupted().attempts == 0
    data = queued.to_json() | {"added_later": 1}
    assert Job.from_json(data) == queued
    with pytest.raises(ValueError):
        store.path(KIND, "../etc")
    store.delete(KIND, "j1")
    assert store.get(KIND, "j1") is None and store.lease(KIND, "j1") is None


def test_lease_is_exclusive_until_it_expires(tmp_path: Path) -> None:
    store = JobStore(tmp_path, fsync=False)
    a = store.claim(KIND, "j", "A", now=0.0, lease_s=10.0)
    assert a is not None and a.generation == 1 and a.owner == "A"
    assert store.claim(KIND, "j", "B", now=5.0, lease_s=10.0) is None  # live: not B's
    assert store.claim(KIND, "j", "A", now=5.0, lease_s=10.0) is None  # not twice either
    a = store.renew(a, now=8.0, lease_s=10.0)
    assert a is not None and a.until == 18.0
    assert store.claim(KIND, "j", "B", now=17.0, lease_s=10.0) is None  # renewed: still A's
    b = store.claim(KIND, "j", "B", now=19.0, lease_s=10.0)  # A stopped renewing
    assert b is not None and b.generation == 2
    assert store.renew(a, now=19.5, lease_s=10.0) is None  # A finds it lost
    assert not store.holds(a) and store.holds(b)
    store.release(b)
    lease = store.lease(KIND, "j")
    assert lease is not None and not lease.live(20.0) and lease.generation == 2
    c = store.claim(KIND, "j", "C", now=20.0, lease_s=10.0)  # released: taken at once
    assert c is not None and c.generation == 3  # generations are never reused


def test_only_one_of_many_racing_claims_wins(tmp_path: Path) -> None:
    store = JobStore(tmp_path, fsync=False)
    for round_ in range(5):
        job_id = f"j{round_}"
        owners = [f"w{i}" for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            leases = list(
                pool.map(store.claim, [KIND] * 8, [job_id] * 8, owners, [0.0] * 8, [10.0] * 8)
            )
        assert sum(lease is not None for lease in leases) == 1


# -- the lifecycle --------------------------------------------------------------------------


async def test_runner_lifecycle_queued_running_succeeded(
    tmp_path: Path, runners: list[JobRunner]
) -> None:
    clock, work = Clock(), FakeWork()
    runner = await started(runner_for(tmp_path, work, clock, owner="A"), runners)
    job = await runner.create(x=1)
    assert job.status is JobStatus.QUEUED and job.params == {"x": 1}
    await work.started.wait()
    running = await runner.get(job.id)
    assert running is not None and running.status is JobStatus.RUNNING
    assert running.progress == 0.5 and running.attempts == 1
    stored = runner.store.get(KIND, job.id)
    assert stored is not None and stored.status is JobStatus.RUNNING
    lease = runner.store.lease(KIND, job.id)
    assert lease is not None and lease.owner == "A" and lease.live(clock())

    work.release.set()
    done = await runner.wait(job.id, 10.0)
    assert done is not None and done.status is JobStatus.SUCCEEDED
    assert done.result_path == f"/results/{job.id}.json" and done.params == {"x": 1, "words": 3}
    assert done.status.is_terminal() and done.finished_at == clock.now
    assert runner.store.get(KIND, job.id) == done
    released = runner.store.lease(KIND, job.id)
    assert released is not None and not released.live(clock())
    assert runner.active(job.id) is None


async def test_runner_failures_carry_a_reason(tmp_path: Path, runners: list[JobRunner]) -> None:
    clock, work = Clock(), FakeWork(released=True)
    runner = await started(runner_for(tmp_path, work, clock, owner="A"), runners)
    work.error = JobFailed("the audio is not audio")
    first = await runner.create()
    failed = await runner.wait(first.id, 10.0)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert failed.error == "the audio is not audio"
    work.error = RuntimeError("boom")
    second = await runner.create()
    failed = await runner.wait(second.id, 10.0)
    assert failed is not None and failed.error == "RuntimeError: boom"


async def test_cancel_queued_and_running(tmp_path: Path, runners: list[JobRunner]) -> None:
    clock, work = Clock(), FakeWork()
    runner = await started(runner_for(tmp_path, work, clock, owner="A", max_queued=1), runners)
    running = await runner.create()
    await work.started.wait()
    queued = await runner.create()
    with pytest.raises(QueueFull):
        await runner.create()
    canceled, ok = await runner.cancel(queued.id, running_too=False)
    assert ok and canceled is not None and canceled.status is JobStatus.CANCELED
    assert await runner.cancel(queued.id, running_too=False) == (canceled, True)  # idempotent
    job, ok = await runner.cancel(running.id, running_too=False)
    assert not ok and job is not None and job.status is JobStatus.RUNNING
    job, ok = await runner.cancel(running.id, running_too=True)
    assert ok and job is not None and job.status is JobStatus.CANCELED
    stored = runner.store.get(KIND, running.id)
    assert stored is not None and stored.status is JobStatus.CANCELED
    assert (await runner.cancel("no-such-job", running_too=True)) == (None, False)
    # The next job runs: the worker is free, the canceled queued one never ran.
    third = await runner.create()
    work.release.set()
    done = await runner.wait(third.id, 10.0)
    assert done is not None and done.status is JobStatus.SUCCEEDED
    assert work.runs == [running.id, third.id] and work.cancelled == [running.id]
    stored = runner.store.get(KIND, running.id)
    assert stored is not None and stored.status is JobStatus.CANCELED  # never overwritten


# -- crash loops and restarts ---------------------------------------------------------------


async def test_a_job_started_max_attempts_times_is_failed_not_retaken(
    tmp_path: Path, runners: list[JobRunner]
) -> None:
    """Hardening row 4: a job whose every start killed the server (left running by each
    crash) is failed with the reason at the next start, not taken up forever."""
    store = JobStore(tmp_path, fsync=False)
    poison = new_job(KIND, "poison", 10.0)
    for _ in range(3):  # three starts, each killed mid-run
        poison = poison.started(11.0)
    store.put(poison)
    store.put(new_job(KIND, "second-try", 20.0).started(21.0))  # killed once
    clock, work = Clock(), FakeWork(released=True)
    runner = await started(runner_for(tmp_path, work, clock, owner="A"), runners)
    failed = await runner.wait("poison", 10.0)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert "started 3 times without finishing" in str(failed.error)
    retried = await runner.wait("second-try", 10.0)
    assert retried is not None and retried.status is JobStatus.SUCCEEDED
    assert retried.attempts == 2 and retried.queued_at == 20.0
    assert work.runs == ["second-try"]


async def test_stop_puts_the_job_back_and_lets_its_lease_go(
    tmp_path: Path, runners: list[JobRunner]
) -> None:
    clock, work = Clock(), FakeWork()
    first = runner_for(tmp_path, work, clock, owner="A")
    await first.start()
    job = await first.create()
    await work.started.wait()
    await first.stop()
    stored = first.store.get(KIND, job.id)
    assert stored is not None and stored.status is JobStatus.QUEUED and stored.attempts == 0
    lease = first.store.lease(KIND, job.id)
    assert lease is not None and not lease.live(clock())
    assert work.cancelled == [job.id]

    again = FakeWork(released=True)  # the next start (or another front end) at once
    second = await started(runner_for(tmp_path, again, clock, owner="B"), runners)
    done = await second.wait(job.id, 10.0)
    assert done is not None and done.status is JobStatus.SUCCEEDED and done.attempts == 1


# -- several front ends on one folder -------------------------------------------------------


async def ended(job_id: str, *front_ends: JobRunner) -> Job | None:
    """The job once it ended on whichever front end ran it."""
    waits = [asyncio.create_task(r.wait(job_id, 60.0)) for r in front_ends]
    finished, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return finished.pop().result()


async def test_a_job_that_ends_while_a_wait_reads_it_wakes_that_wait(
    tmp_path: Path, runners: list[JobRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``wait`` read the job, then listened for its end: a job that ended in between was
    waited for until the timeout (two front ends' tests hung under load). Here the job ends
    while the second wait reads it; that wait must wake at the end."""
    work = FakeWork()
    runner = await started(runner_for(tmp_path, work, Clock(), owner="A"), runners)
    job = await runner.create()
    await work.started.wait()
    read = runner.get
    first_read = asyncio.Event()

    async def read_as_it_ends(job_id: str) -> Job | None:
        seen = await read(job_id)  # running
        if not first_read.is_set():  # the first wait's read: it listens once this returns
            first_read.set()
            return seen
        work.release.set()
        await first  # the runner has written the end and woken the waits it knew
        return seen

    monkeypatch.setattr(runner, "get", read_as_it_ends)
    first = asyncio.create_task(runner.wait(job.id, 60.0))
    await first_read.wait()
    done = await asyncio.wait_for(runner.wait(job.id, 60.0), 10)  # not 60 s
    assert done is not None and done.status is JobStatus.SUCCEEDED


async def test_two_front_ends_never_run_one_job_twice(
    tmp_path: Path, runners: list[JobRunner]
) -> None:
    clock = Clock()
    work_a, work_b = FakeWork(released=True), FakeWork(released=True)
    a = await started(runner_for(tmp_path, work_a, clock, owner="A", workers=2), runners)
    b = await started(runner_for(tmp_path, work_b, clock, owner="B", workers=2), runners)
    jobs = [await a.create() for _ in range(8)]
    assert await b.scan() > 0  # B finds jobs nobody holds and takes them too
    for job in jobs:
        done = await ended(job.id, a, b)
        assert done is not None and done.status is JobStatus.SUCCEEDED
    runs = work_a.runs + work_b.runs
    assert sorted(runs) == sorted(j.id for j in jobs)  # each exactly once
    for job in jobs:  # any front end answers for any job, from the store
        answer = await b.get(job.id)
        assert answer is not None and answer.status is JobStatus.SUCCEEDED


async def test_a_dead_front_ends_job_is_taken_over_after_its_lease(
    tmp_path: Path, runners: list[JobRunner]
) -> None:
    clock = Clock()
    work_a, work_b = FakeWork(), FakeWork(released=True)
    a = await started(runner_for(tmp_path, work_a, clock, owner="A"), runners)
    job = await a.create()
    await work_a.started.wait()
    b = await started(runner_for(tmp_path, work_b, clock, owner="B"), runners)
    assert await b.scan() == 0  # A holds a live lease
    answer = await b.get(job.id)  # but B answers for it
    assert answer is not None and answer.status is JobStatus.RUNNING

    clock.now += LEASE_S + 1  # A hangs (or died): its lease is not renewed
    assert await b.scan() == 1
    done = await b.wait(job.id, 10.0)
    assert done is not None and done.status is JobStatus.SUCCEEDED and done.attempts == 2
    await a.renew()  # A wakes up: its lease is lost, its work stopped, nothing written
    await work_a.stopped.wait()
    assert work_a.cancelled == [job.id]
    assert a.store.get(KIND, job.id) == done
    assert work_b.runs == [job.id]


async def test_a_cancel_on_another_front_end_stands(
    tmp_path: Path, runners: list[JobRunner]
) -> None:
    clock = Clock()
    work_a, work_b = FakeWork(), FakeWork(released=True)
    a = await started(runner_for(tmp_path, work_a, clock, owner="A"), runners)
    b = await started(runner_for(tmp_path, work_b, clock, owner="B"), runners)
    running = await a.create()
    await work_a.started.wait()
    queued = await a.create()  # waits in A's queue behind the running one
    canceled, ok = await b.cancel(queued.id, running_too=False)
    assert ok and canceled is not None and canceled.status is JobStatus.CANCELED
    canceled, ok = await b.cancel(running.id, running_too=True)
    assert ok and canceled is not None and canceled.status is JobStatus.CANCELED
    work_a.release.set()  # A finishes the work it was doing: its result must not win
    await a.renew()  # (or A sees the cancel at its next renewal)
    for job in (running, queued):
        stored = a.store.get(KIND, job.id)
        assert stored is not None and stored.status is JobStatus.CANCELED
    third = await a.create()  # A's worker goes on; the canceled queued job never ran
    done = await a.wait(third.id, 10.0)
    assert done is not None and done.status is JobStatus.SUCCEEDED
    assert work_a.runs == [running.id, third.id] and work_b.runs == []
    assert (await a.get(running.id)) == a.store.get(KIND, running.id)


# -- terminal notices (webhooks) ------------------------------------------------------------


async def test_a_notice_interrupted_by_a_restart_is_sent_again(
    tmp_path: Path, runners: list[JobRunner]
) -> None:
    clock = Clock()
    sent: list[str] = []
    calls = asyncio.Event()
    hold = asyncio.Event()

    class SlowNotifier:
        def wants(self, job: Job) -> bool:
            return True

        async def send(self, job: Job) -> None:
            calls.set()
            await hold.wait()  # the receiver is slow: the server stops meanwhile
            sent.append(job.id)

    def runner(owner: str) -> JobRunner:
        config = JobsConfig(lease_s=LEASE_S, scan_interval_s=3600)
        store = JobStore(tmp_path, fsync=False)
        return JobRunner(
            store,
            KIND,
            FakeWork(released=True),
            config,
            notifier=SlowNotifier(),
            clock=clock,
            owner=owner,
        )

    first = runner("A")
    await first.start()
    job = await first.create()
    done = await first.wait(job.id, 10.0)
    assert done is not None and done.status is JobStatus.SUCCEEDED and done.notify_pending
    await calls.wait()
    await first.stop()
    pending = first.store.get(KIND, job.id)
    assert pending is not None and pending.notify_pending and sent == []

    hold.set()
    second = await started(runner("B"), runners)
    await second.notices_sent()
    assert sent == [job.id]
    delivered = second.store.get(KIND, job.id)
    assert delivered is not None and not delivered.notify_pending
    assert delivered.status is JobStatus.SUCCEEDED


# -- races inside one front end -------------------------------------------------------------


class ClaimsWait(JobStore):
    """Test double: each lease claim waits in its thread for the test (the first for
    ``first``, any later one for ``later``), so the test, not thread timing, orders two
    claims of one job."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=False)
        self._loop = asyncio.get_running_loop()
        self._count = 0
        self._counting = threading.Lock()
        self.first_waits = asyncio.Event()
        self.first = threading.Event()
        self.later = threading.Event()

    def claim(self, kind: str, job_id: str, owner: str, now: float, lease_s: float) -> Lease | None:
        with self._counting:
            self._count += 1
            first = self._count == 1
        if first:
            self._loop.call_soon_threadsafe(self.first_waits.set)
        (self.first if first else self.later).wait()
        return super().claim(kind, job_id, owner, now, lease_s)


async def test_a_notice_and_a_worker_claiming_one_job_share_the_lease(tmp_path: Path) -> None:
    """A queued job with a notice is canceled while a worker claims it: the notice's claim
    lost to the worker's, as if another front end held the job, and the notice was not sent
    (the worker leaves it to the notice under way): it waited for a scan or a restart."""
    sent: list[str] = []

    class Notices:
        def wants(self, job: Job) -> bool:
            return True

        async def send(self, job: Job) -> None:
            sent.append(job.id)

    store = ClaimsWait(tmp_path)
    config = JobsConfig(lease_s=LEASE_S, scan_interval_s=3600)
    clock = Clock()
    runner = JobRunner(store, KIND, FakeWork(), config, notifier=Notices(), clock=clock, owner="A")
    job = await runner.create()  # not started: the test is the worker
    try:
        worker = asyncio.create_task(runner.run_one(job.id))
        await store.first_waits.wait()  # the worker's claim is in its thread
        canceled, ok = await runner.cancel(job.id, running_too=False)
        assert ok and canceled is not None and canceled.status is JobStatus.CANCELED
        store.first.set()  # the worker's claim wins; the notice's (if it claims) comes later
        await worker
        store.later.set()
        await runner.notices_sent()
    finally:
        store.first.set()
        store.later.set()
    assert sent == [job.id]
    stored = store.get(KIND, job.id)
    assert stored is not None and stored.status is JobStatus.CANCELED and not stored.notify_pending
    lease = store.lease(KIND, job.id)
    assert lease is not None and not lease.live(clock())


class RunningWriteWaits(JobStore):
    """Test double: the write that marks a job running waits in its thread until the test
    lets it go (``go``), so a cancel can be asked while that write is in progress."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=False)
        self._loop = asyncio.get_running_loop()
        self.waits = asyncio.Event()
        self.go = threading.Event()

    def put(self, job: Job) -> None:
        if job.status is JobStatus.RUNNING and not self.go.is_set():
            self._loop.call_soon_threadsafe(self.waits.set)
            self.go.wait()
        super().put(job)


async def test_a_cancel_while_running_is_written_stands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel asked while the worker's "running" write was in its thread read the job as
    queued, wrote it canceled and let the lease go; "running" then landed over the cancel:
    the job stood running with no lease, and the next scan ran it again."""
    store, work, clock = RunningWriteWaits(tmp_path), FakeWork(), Clock()
    config = JobsConfig(lease_s=LEASE_S, scan_interval_s=3600)
    runner = JobRunner(store, KIND, work, config, clock=clock, owner="A")
    job = await runner.create()  # not started: the test is the worker
    read, read_during_write = runner.get, []

    async def noted_read(job_id: str) -> Job | None:  # the cancel's first step
        if not store.go.is_set():
            read_during_write.append(job_id)
        return await read(job_id)

    monkeypatch.setattr(runner, "get", noted_read)
    try:
        worker = asyncio.create_task(runner.run_one(job.id))
        await store.waits.wait()  # "running" is being written
        canceling = asyncio.create_task(runner.cancel(job.id, running_too=True))

        def after_the_cancels_first_step() -> None:  # call_soon: runs after that step
            if read_during_write:  # it did not wait for the start: it answers first
                canceling.add_done_callback(lambda _: store.go.set())
            else:  # it waits for the worker: the write lands
                store.go.set()

        asyncio.get_running_loop().call_soon(after_the_cancels_first_step)
        canceled, ok = await canceling
        work.release.set()
        await worker
    finally:
        store.go.set()
        work.release.set()
    assert ok and canceled is not None and canceled.status is JobStatus.CANCELED
    stored = store.get(KIND, job.id)
    assert stored is not None and stored.status is JobStatus.CANCELED
    assert await runner.scan() == 0  # nothing to run again
    lease = store.lease(KIND, job.id)
    assert lease is not None and not lease.live(clock())


class ResultWriteWaits(JobStore):
    """Test double: a job's result write waits in its thread until the test lets it go
    (``go``); a later write putting the job back in the queue lands after it, as it would
    after a write already under way in its thread."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=False)
        self._loop = asyncio.get_running_loop()
        self.waits = asyncio.Event()
        self.go = threading.Event()
        self._under_way = threading.Event()
        self._landed = threading.Event()

    def put(self, job: Job) -> None:
        if job.status is JobStatus.SUCCEEDED and not self._under_way.is_set():
            self._under_way.set()
            self._loop.call_soon_threadsafe(self.waits.set)
            self.go.wait()
            super().put(job)
            self._landed.set()
            return
        if job.status is JobStatus.QUEUED and self._under_way.is_set():
            self._landed.wait()
        super().put(job)


async def test_a_stop_while_the_result_is_written_keeps_the_result(tmp_path: Path) -> None:
    """stop() cancelled the worker while its result write was in its thread, then found the
    job running here and wrote it back in the queue over the result: the job ran again
    after the restart."""
    store, work, clock = ResultWriteWaits(tmp_path), FakeWork(released=True), Clock()
    config = JobsConfig(lease_s=LEASE_S, scan_interval_s=3600)
    runner = JobRunner(store, KIND, work, config, clock=clock, owner="A")
    await runner.start()
    job = await runner.create()
    try:
        await store.waits.wait()  # the result is being written
        # stop() cancels the workers before its first wait; the write goes on after that.
        asyncio.get_running_loop().call_soon(store.go.set)
        await runner.stop()
    finally:
        store.go.set()
    stored = store.get(KIND, job.id)
    assert stored is not None and stored.status is JobStatus.SUCCEEDED
    assert stored.result_path == f"/results/{job.id}.json"
    lease = store.lease(KIND, job.id)
    assert lease is not None and not lease.live(clock())
