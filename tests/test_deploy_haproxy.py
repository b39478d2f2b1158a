"""The rules of deploy/haproxy.cfg, run by Debian's haproxy, without the model.

The two front ends here are fakes, on purpose: the test is about HAProxy's routing and
retries, and a fake can do what a real front end does only by luck, close a connection
without answering at a chosen moment. Each fake answers with its name and the query string
HAProxy sent it. tests/test_cluster.py runs the same config in front of real front ends."""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import aiohttp
import pytest

from terra.config import ServerConfig

from .deployment import haproxy_environment, servers_up, start_haproxy
from .test_minutes_e2e import free_port

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="Debian's haproxy (scripts/test)"),
]

AUDIO = bytes(range(256)) * 256  # 64 KB with NUL bytes, like a 2 s WAV


@dataclass(slots=True)
class FakeFrontEnd:
    """Answers GET /healthz (503 while ``saturated``, as terra's does), and anything else
    with ``{name} {query}``; while ``dying``, it reads a request and closes the connection
    without a word (a process killed mid-request). A viewer's GET .../events is held open
    (an SSE stream: its first line names the front end), counted in ``viewers``."""

    name: str
    dying: bool = False
    saturated: bool = False
    port: int = 0
    viewers: int = 0
    server: asyncio.Server | None = field(default=None, repr=False)
    connections: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    async def start(self) -> None:
        # On its old port when it starts again (a front end restarted); with terra's listen
        # backlog: with asyncio's (100) a busy test process dropped viewers' connections and
        # HAProxy sent them to the other front end.
        self.server = await asyncio.start_server(
            self._connection, "127.0.0.1", self.port, backlog=ServerConfig().backlog
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = next(
                    (
                        int(h.split(":", 1)[1])
                        for h in lines
                        if h.lower().startswith("content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                path, _, query = target.partition("?")
                if path != "/healthz" and self.dying:
                    break
                if path.endswith("/events"):
                    self.viewers += 1
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                        + f"{self.name} {query}\n".encode()
                    )
                    await writer.drain()
                    await reader.read()  # open until HAProxy closes it
                    break
                body = f"{self.name} {query}".encode()
                status = (
                    b"503 Service Unavailable"
                    if path == "/healthz" and self.saturated
                    else b"200 OK"
                )
                writer.write(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\nContent-Type: text/plain\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.connections.discard(task)


@dataclass(frozen=True, slots=True)
class Balancer:
    url: str
    stats: str
    front_ends: dict[str, FakeFrontEnd]


@asynccontextmanager
async def running_balancer(folder: Path, check_interval: str = "1s") -> AsyncIterator[Balancer]:
    """HAProxy with the shipped config in front of two fakes; health checks every
    ``check_interval`` (the cfg's default, 1 s, unless a test waits for their verdicts)."""
    fakes = {name: FakeFrontEnd(name) for name in ("fe1", "fe2")}
    for fake in fakes.values():
        await fake.start()
    lb, stats = free_port(), free_port()
    ports = [fakes["fe1"].port, fakes["fe2"].port]
    environment = haproxy_environment(folder, lb, stats, ports, check_interval=check_interval)
    haproxy = start_haproxy(environment, folder / "haproxy.log")
    try:
        await servers_up(f"http://127.0.0.1:{stats}", {"fe1", "fe2"})
        yield Balancer(f"http://127.0.0.1:{lb}", f"http://127.0.0.1:{stats}", fakes)
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        for fake in fakes.values():
            assert fake.server is not None
            fake.server.close()
            # HAProxy's connections are gone: each handler sees its end and returns (left
            # to the loop's close, an audience's handlers were cancelled and logged).
            await asyncio.wait_for(asyncio.gather(*fake.connections), 10)


@pytest.fixture
async def balancer(tmp_path: Path) -> AsyncIterator[Balancer]:
    async with running_balancer(tmp_path) as running:
        yield running


async def send(
    session: aiohttp.ClientSession,
    url: str,
    conference: str,
    style: str,
    post_id: str | None = "post-1",
) -> tuple[int, str, dict[str, list[str]]]:
    """POST /process with the conference id where ``style`` says; (status, server, query)."""
    params = {"participant_id": "p1"}
    if post_id is not None:
        params["post_id"] = post_id
    if style == "query":
        params["conference_id"] = conference
    form = aiohttp.FormData(quote_fields=False)
    form.add_field("token", "t")
    if style == "field":
        form.add_field("conference_id", conference)
    filename = f"{conference}:a-p1_20240628_14_20_15_123456.wav" if style == "filename" else "x.wav"
    form.add_field("audiofile", AUDIO, filename=filename, content_type="application/octet-stream")
    if style == "field-after":
        form.add_field("conference_id", conference)
    async with session.post(f"{url}/process", params=params, data=form) as response:
        text = await response.text()
    if response.status != 200:
        return response.status, "", {}
    name, _, query = text.partition(" ")
    return response.status, name, parse_qs(query)


async def test_the_conference_id_is_found_wherever_the_client_put_it(balancer: Balancer) -> None:
    async with aiohttp.ClientSession() as session:
        owners = {}
        for conference in (f"conf-{i}" for i in range(8)):
            seen = set()
            for style in ("query", "field", "filename"):
                status, name, query = await send(session, balancer.url, conference, style)
                assert status == 200
                assert query["conference_id"] == [conference], (style, query)
                seen.add(name)
            async with session.get(f"{balancer.url}/minutes/{conference}") as response:
                seen.add((await response.text()).split(" ")[0])
            async with session.get(f"{balancer.url}/conferences/{conference}/events") as response:
                seen.add((await response.content.readline()).decode().split(" ")[0])
            assert len(seen) == 1, (conference, seen)  # one front end per conference
            owners[conference] = seen.pop()
        assert set(owners.values()) == {"fe1", "fe2"}, "both front ends get conferences"

        # After the audio, with an anonymous file name: not found, passed on as it came.
        status, _, query = await send(session, balancer.url, "conf-0", "field-after")
        assert status == 200 and "conference_id" not in query


async def test_a_request_a_dying_front_end_never_answered_is_sent_to_another(
    balancer: Balancer,
) -> None:
    async with aiohttp.ClientSession() as session:
        _, owner, _ = await send(session, balancer.url, "conf-x", "query")
        # A second conference of the same front end (the first moves with its retry).
        second = ""
        for conference in (f"conf-y{i}" for i in range(32)):
            if (await send(session, balancer.url, conference, "query"))[1] == owner:
                second = conference
                break
        assert second
        balancer.front_ends[owner].dying = True
        started = time.monotonic()
        status, name, _ = await send(session, balancer.url, "conf-x", "query", post_id="p-2")
        assert (status, name != owner) == (200, True)  # retried on the other front end
        assert time.monotonic() - started < 5
        # Without a post_id a resend could store the fragment twice: no retry, the client
        # gets the failure (502, or its connection closed as the front end's was). An empty
        # post_id= is no id to terra either.
        for post_id in (None, ""):
            try:
                status, _, _ = await send(session, balancer.url, second, "query", post_id=post_id)
            except aiohttp.ServerDisconnectedError:
                status = 0
            assert status in (0, 502), repr(post_id)


async def test_a_saturated_front_end_keeps_its_conferences_and_gets_no_new_ones(
    tmp_path: Path,
) -> None:
    """/healthz's 503 (saturated) means "no new conferences", not "move the ones you have":
    their participants' live streams are there. A dead front end's conferences do move.
    The test waits for three verdicts of HAProxy's health checks (NOLB, DOWN, UP again,
    each two checks): they run every 200 ms here, the same rules at a fifth of the
    shipped interval."""
    async with running_balancer(tmp_path, "200ms") as balancer, aiohttp.ClientSession() as session:
        _, owner, _ = await send(session, balancer.url, "conf-kept", "query")
        other = next(name for name in balancer.front_ends if name != owner)
        balancer.front_ends[owner].saturated = True
        await servers_up(balancer.stats, {other})  # HAProxy has seen the 503s
        status, name, _ = await send(session, balancer.url, "conf-kept", "field", post_id="p-2")
        assert (status, name) == (200, owner), "a saturated front end keeps its conferences"
        for conference in (f"new-{i}" for i in range(6)):
            status, name, _ = await send(session, balancer.url, conference, "query")
            assert (status, name) == (200, other), "and gets no new ones"

        server = balancer.front_ends[owner].server
        assert server is not None
        server.close()  # now it dies: health checks are refused
        await servers_up(balancer.stats, {owner}, state="DOWN")
        status, name, _ = await send(session, balancer.url, "conf-kept", "query", post_id="p-3")
        assert (status, name) == (200, other), "a dead front end's conferences move"

        balancer.front_ends[owner].saturated = False
        await balancer.front_ends[owner].start()  # it comes back
        await servers_up(balancer.stats, {owner, other})
        status, name, _ = await send(session, balancer.url, "conf-kept", "query", post_id="p-4")
        assert (status, name) == (200, other), "and stay where they went (no second move)"


async def test_viewers_of_a_conference_do_not_starve_its_talkers(balancer: Balancer) -> None:
    """Each viewer's event stream holds a connection to the conference's front end for as
    long as it watches; terra does not bound viewers. A big audience must not use up what
    HAProxy lets through to that front end, or the talkers' fragments wait in HAProxy's
    queue and are refused (503), fragments terra would have taken."""
    audience = 600
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limit[0] < 4 * audience:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit[1], 8 * audience), limit[1]))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        _, owner, _ = await send(session, balancer.url, "big", "query")
        responses = await asyncio.gather(
            *(session.get(f"{balancer.url}/conferences/big/events") for _ in range(audience))
        )
        try:
            assert {r.status for r in responses} == {200}
            assert balancer.front_ends[owner].viewers == audience
            status, name, _ = await send(session, balancer.url, "big", "query", post_id="p-2")
            assert (status, name) == (200, owner)
        finally:
            for response in responses:
                response.close()


async def test_a_request_that_does_not_arrive_in_time_is_a_json_408(tmp_path: Path) -> None:
    """HAProxy reads a body before terra sees it, so a body that never arrives whole is
    HAProxy's to refuse (after TERRA_LB_BODY_TIMEOUT, here 200 ms): with a JSON error, as
    terra answers every 4xx ("detail"; "status" and "message" for SaluteSpeech clients)."""
    lb, stats = free_port(), free_port()
    environment = haproxy_environment(tmp_path, lb, stats, [free_port()])
    haproxy = start_haproxy({**environment, "TERRA_LB_BODY_TIMEOUT": "200ms"}, tmp_path / "log")
    try:
        deadline = time.monotonic() + 30
        while True:  # until HAProxy listens
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", lb)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "HAProxy did not start"
                await asyncio.sleep(0.1)
        writer.write(
            b"POST /process?conference_id=c1 HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 65536\r\n\r\n"
            + AUDIO[:1000]  # and no more
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    finally:
        haproxy.terminate()
        haproxy.wait(10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"content-type: application/json" in head.lower(), answer
    error = json.loads(body)
    assert error["status"] == 408 and "in time" in error["detail"] and error["message"], error
