"""connecte webhooks without the model: a real loopback receiver that answers huge, never,
or normally; the retry policy's delays through an injected sleep; a webhook a restart
interrupted is sent by the next start."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from terra.config import FilesConfig, JobsConfig
from terra.files.connecte import KIND, ConnecteService
from terra.jobs.store import Job, JobStatus, JobStore, new_job
from terra.recognizer.options import DecodeOptions
from terra.recognizer.types import Recognition, RecognitionRequest

from .fakes import RecordedSleeps


class Receiver:
    """A webhook receiver on loopback: /ok records the body, /huge answers without end,
    /silent never answers."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.got = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/ok", self.ok)
        self.app.router.add_post("/huge", self.huge)
        self.app.router.add_post("/silent", self.silent)

    async def ok(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        self.got.set()
        return web.json_response({"thanks": True})

    async def huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        block = b"x" * 65536
        while True:  # 1.5 GB and more: until the client goes away
            await response.write(block)

    async def silent(self, request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    receiving = Receiver()
    server = TestServer(receiving.app, host="127.0.0.1")
    await server.start_server()
    yield receiving, str(server.make_url("")).rstrip("/")
    await server.close()


def no_recognizer(request: RecognitionRequest) -> asyncio.Future[Recognition | None]:
    raise AssertionError("these tests recognize nothing")


async def payload(job: Job) -> dict[str, Any]:
    return {"id": job.id, "status": job.status.value}


def service_for(
    tmp_path: Path, sleep: RecordedSleeps | None = None, **files: Any
) -> ConnecteService:
    config = FilesConfig(
        dir=str(tmp_path / "files"),
        jobs_dir=str(tmp_path / "file-jobs"),
        url_allow=("127.0.0.1",),
        **files,
    )
    return ConnecteService(
        config,
        JobsConfig(),
        DecodeOptions(),
        no_recognizer,
        payload,
        fsync=False,
        sleep=sleep or RecordedSleeps(),
    )


async def test_a_huge_answer_is_read_only_up_to_the_limit(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    """Hardening row 10: a receiver answering gigabytes cost terra gigabytes. Only the first
    ``webhook_max_response_bytes`` are read; the connection is dropped (a read of the whole
    answer would run into the timeout here instead)."""
    _, url = receiver
    service = service_for(tmp_path, webhook_timeout_s=5.0, webhook_max_response_bytes=4096)
    try:
        assert await service.webhooks.fetcher.post_json(f"{url}/huge", {"id": "p1"}) == 200
        assert service.webhooks.fetcher is not service.fetcher  # webhooks have their own pool
    finally:
        await service.stop()


async def test_a_receiver_that_never_answers_times_out_and_is_retried(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    _, url = receiver
    sleeps = RecordedSleeps()
    service = service_for(
        tmp_path,
        sleeps,
        webhook_timeout_s=0.05,
        webhook_tries=4,
        webhook_backoff_s=0.5,
        webhook_backoff_max_s=1.0,
    )
    job = new_job(KIND, "p1", 1.0, webhook=f"{url}/silent").failed(2.0, "no audio")
    try:
        with pytest.raises(TimeoutError):
            await service.webhooks.fetcher.post_json(f"{url}/silent", {"id": "p1"})
        await service.webhooks.send(job)  # gives up after its tries, raises nothing
        assert sleeps.delays == [0.5, 1.0, 1.0]
    finally:
        await service.stop()


async def test_a_webhook_interrupted_by_a_restart_is_sent_at_the_next_start(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    receiving, url = receiver
    store = JobStore(tmp_path / "file-jobs", fsync=False)
    job = new_job(KIND, "p1", 1.0, webhook=f"{url}/ok").started(2.0).failed(3.0, "bad audio")
    store.put(job.with_notice(True))  # ended, its webhook not delivered: then kill -9
    service = service_for(tmp_path)
    await service.start()
    try:
        await receiving.got.wait()
        await service.jobs.runner.notices_sent()
        assert receiving.received == [{"id": "p1", "status": "failed"}]
        stored = store.get(KIND, "p1")
        assert stored is not None and stored.status is JobStatus.FAILED
        assert not stored.notify_pending
    finally:
        await service.stop()
