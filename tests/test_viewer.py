"""The viewers' routes over HTTP on the real app: the event feed (Server-Sent Events), the
transcript, the conference list, the pages, and who may see them.

Recognition here is FakeEngine's (tests/fakes.py, a fake: these tests are about the feed,
not about what was said); the audio is a real clip. Where a test needs many events fast it
publishes them through the app's own hub (``app[keys.FEED]``), as the live service does.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from terra import keys
from terra.links import sign_link
from terra.stream import TextElem
from tests.conftest import SPEECH, TOKEN, ServerFactory, load_clip, post_fragment, stream_samples

VIEWER_TOKEN = "watch-only"
SECRET = "link-secret"
READ_TIMEOUT_S = 30


@dataclass(frozen=True, slots=True)
class Event:
    id: str | None
    kind: str
    data: Any


async def events_of(response: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    """Parse a text/event-stream as it arrives (comments, the pings, skipped)."""
    fields: dict[str, str] = {}
    data: list[str] = []
    while True:
        raw = await response.content.readline()
        if not raw:
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield Event(
                    fields.get("id"), fields.get("event", "message"), json.loads("\n".join(data))
                )
            fields, data = {}, []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            else:
                fields[name] = value


async def take(stream: AsyncIterator[Event], count: int) -> list[Event]:
    """The next ``count`` events, not counting the ``hello`` each connection opens with."""
    got: list[Event] = []
    async with asyncio.timeout(READ_TIMEOUT_S):
        async for event in stream:
            if event.kind != "hello":
                got.append(event)
            if len(got) == count:
                break
    return got


def seq(event: Event) -> int:
    assert event.id is not None
    return int(event.id.rpartition("-")[2])


def elem(combination: str, text: str, status: str = "final", conference: str = "c1") -> TextElem:
    return TextElem(
        timestamp="2026-11-30T08:00:00.000000",
        timestamp_float=1_700_000_000.0,
        duration=1000,
        conference_id=conference,
        participant_id="p1",
        text=text,
        id=combination,
        post_ids=(),
        status=status,
    )


async def viewer_server(make_fast_server: ServerFactory, **feed: Any) -> TestClient[Any, Any]:
    return await make_fast_server(
        server={"tokens": [TOKEN], "viewer_tokens": [VIEWER_TOKEN], "link_secret": SECRET},
        # A pass as soon as audio comes: each POST waits for text covering its fragment.
        stream={"progress_min_interval_ms": 0},
        feed=feed,
    )


async def join(client: TestClient[Any, Any], conference: str, name: str = "Anna") -> None:
    """A participant's first fragment (silence): the conference is live from then on."""
    status, body = await post_fragment(
        client, conference_id=conference, participant_id="p1", participant_name=name
    )
    assert status == 200, body


async def test_feed_carries_live_text_in_order_with_names(
    make_fast_server: ServerFactory,
) -> None:
    client = await viewer_server(make_fast_server)
    await join(client, "c1")
    response = await client.get("/conferences/c1/events", params={"token": VIEWER_TOKEN})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    stream = events_of(response)
    (snapshot,) = await take(stream, 1)
    assert snapshot.kind == "snapshot"
    assert [p["participant_name"] for p in snapshot.data["participants"]] == ["Anna"]

    samples = load_clip(SPEECH / "clips/faster_whisper/jfk.flac")
    answers = await stream_samples(
        client, samples, conference_id="c1", participant_id="p1", participant_name="Anna"
    )
    finals_posted = [e for answer in answers for e in answer if e["status"] == "final"]
    assert finals_posted, "the fake engine said nothing: the test would check nothing"

    seen: list[Event] = []
    async with asyncio.timeout(READ_TIMEOUT_S):
        async for event in stream:
            seen.append(event)
            finals_seen = [e for e in seen if e.kind == "final" and e.data["text"].strip()]
            if len(finals_seen) == len(finals_posted):
                break
    assert [seq(e) for e in seen] == list(range(seq(snapshot) + 1, seq(snapshot) + 1 + len(seen)))
    finals = [e.data for e in seen if e.kind == "final" and e.data["text"].strip()]
    assert [f["text"] for f in finals] == [f["text"] for f in finals_posted]
    assert all(f["participant_name"] == "Anna" for f in finals)
    # The TextElem fields are there, as /process gives them.
    assert set(finals_posted[0]) <= set(finals[0])
    # Each combination's progress comes before its final, never after.
    closed: set[str] = set()
    for event in seen:
        if event.kind == "final":
            closed.add(event.data["id"])
        elif event.kind == "progress":
            assert event.data["id"] not in closed
    assert any(e.kind == "progress" for e in seen)
    response.close()

    transcript = await client.get("/conferences/c1/transcript", params={"token": VIEWER_TOKEN})
    assert [f["text"] for f in (await transcript.json())["finals"]] == [
        f["text"] for f in finals_posted
    ]


async def test_reconnect_with_last_event_id_loses_nothing(make_fast_server: ServerFactory) -> None:
    client = await viewer_server(make_fast_server)
    await join(client, "c1")
    hub = client.app[keys.FEED]
    response = await client.get("/conferences/c1/events", params={"token": VIEWER_TOKEN})
    stream = events_of(response)
    await take(stream, 1)  # the snapshot
    hub.text(elem("k1", "one"), "Anna")
    (first,) = await take(stream, 1)
    response.close()  # the connection drops
    for n, text in enumerate(["two", "three", "four"], start=2):
        hub.text(elem(f"k{n}", text), "Anna")

    headers = {"Last-Event-ID": first.id or "", "Authorization": f"Bearer {VIEWER_TOKEN}"}
    again = await client.get("/conferences/c1/events", headers=headers)
    resumed = await take(events_of(again), 3)
    assert [e.kind for e in resumed] == ["final"] * 3
    assert [e.data["text"] for e in resumed] == ["two", "three", "four"]
    assert [seq(e) for e in resumed] == [seq(first) + 1, seq(first) + 2, seq(first) + 3]
    again.close()


async def _stalled_viewer(port: int, path: str) -> socket.socket:
    """A viewer that connects, sends its request and then never reads (a tiny receive
    window, so the server's writes to it stall quickly)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    return sock


async def test_hundred_viewers_get_everything_in_order_while_ingest_goes_on(
    make_fast_server: ServerFactory,
) -> None:
    limit = 20
    events = 100
    client = await viewer_server(make_fast_server, viewer_queue=limit)
    await join(client, "c1")
    hub = client.app[keys.FEED]
    path = f"/conferences/c1/events?token={VIEWER_TOKEN}"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{client.port}", connector=connector) as s:
        responses = [await s.get(path) for _ in range(100)]
        streams = [events_of(r) for r in responses]
        await asyncio.gather(*(take(st, 1) for st in streams))  # every snapshot is there
        feed = hub.get("c1")
        assert feed is not None and len(feed.viewers) == 100
        # Each reader takes the finals and p2's participant_joined (its first fragment).
        readers = [asyncio.ensure_future(take(st, events + 1)) for st in streams]
        for n in range(events):
            hub.text(elem(f"k{n}", f"{n} final text"), "Anna")
            assert all(len(v) <= limit for v in feed.viewers)  # bounded per viewer
            if n % 10 == 0:
                # Ingest goes on while the viewers read: each POST is answered. p2 talks on
                # (each 1 s fragment follows the one before).
                status, _ = await post_fragment(
                    client, conference_id="c1", participant_id="p2", start_time=1e9 + n // 10
                )
                assert status == 200
        received = await asyncio.gather(*readers)
        for got in received:  # every viewer got every event, in order
            texts = [e.data["text"].split()[0] for e in got if e.kind == "final"]
            assert texts == [str(n) for n in range(events)]
        assert not any(v.overflowed for v in feed.viewers)
        for r in responses:
            r.close()


async def test_a_stalled_viewer_is_cut_off_and_resumes_without_loss(
    make_fast_server: ServerFactory,
) -> None:
    limit = 20
    events = 160
    client = await viewer_server(make_fast_server, viewer_queue=limit)
    await join(client, "c1")
    hub = client.app[keys.FEED]
    path = f"/conferences/c1/events?token={VIEWER_TOKEN}"
    assert client.port is not None
    stalled = await _stalled_viewer(client.port, path)
    reader = await client.get(path)
    stream = events_of(reader)
    await take(stream, 1)
    feed = hub.get("c1")
    assert feed is not None
    loop = asyncio.get_running_loop()
    data = b""
    while b"event: snapshot" not in data:  # its snapshot came: it is attached; now it stalls
        data += await asyncio.wait_for(loop.sock_recv(stalled, 4096), READ_TIMEOUT_S)
    assert len(feed.viewers) == 2
    # 48 kB events, 7.7 MB in all: more than the kernel buffers hold for a socket that
    # takes nothing, so the server's writes to the stalled viewer block.
    text = "word " * 9600
    readers = asyncio.ensure_future(take(stream, events))
    for n in range(events):
        hub.text(elem(f"k{n}", f"{n} {text}"), "Anna")  # never waits for a viewer
        assert all(len(v) <= limit for v in feed.viewers)
        await asyncio.sleep(0)  # let the connections write
    got = await readers
    assert [e.data["text"].split()[0] for e in got] == [str(n) for n in range(events)]
    assert len(feed.viewers) == 1  # the stalled one was dropped, the reader kept

    # Its connection was cut: what it got ends before the last event.
    try:
        while chunk := await asyncio.wait_for(loop.sock_recv(stalled, 1 << 20), READ_TIMEOUT_S):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        stalled.close()
    ids = [
        line.split()[1]
        for line in data.decode("utf-8", "replace").splitlines()
        if line.startswith("id: ")
    ]
    assert ids and ids[-1] != got[-1].id
    # Reconnecting with the last id it saw, it gets exactly what it missed.
    resumed = await client.get(path, headers={"Last-Event-ID": ids[-1]})
    rest = await take(events_of(resumed), seq(got[-1]) - int(ids[-1].rpartition("-")[2]))
    assert rest[-1].id == got[-1].id
    assert [seq(e) for e in rest] == list(
        range(int(ids[-1].rpartition("-")[2]) + 1, seq(got[-1]) + 1)
    )
    resumed.close()
    reader.close()


async def test_access_rules(make_fast_server: ServerFactory) -> None:
    client = await viewer_server(make_fast_server)
    await join(client, "c1")
    await join(client, "c2")
    now = int(time.time())
    link_c1 = sign_link(SECRET, "c1", now + 600)
    expired_c1 = sign_link(SECRET, "c1", now - 1)
    other_secret = sign_link("another-secret", "c1", now + 600)

    async def status(path: str, token: str | None = None, bearer: str | None = None) -> int:
        params = {"token": token} if token is not None else {}
        headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {}
        async with client.get(path, params=params, headers=headers) as response:
            if response.status != 200:
                assert "detail" in await response.json()
            return response.status

    for page in ("/conferences/{}/transcript", "/live/{}", "/minutes/{}/view"):
        c1, c2, unknown = page.format("c1"), page.format("c2"), page.format("nobody")
        assert await status(c1) == 401
        assert await status(c1, "wrong") == 401
        assert await status(c1, VIEWER_TOKEN) == 200
        assert await status(c1, bearer=VIEWER_TOKEN) == 200
        assert await status(c1, TOKEN) == 200  # the ingest token works too
        assert await status(c1, link_c1) == 200
        assert await status(c2, link_c1) == 401  # a link opens its own conference only
        assert await status(c1, expired_c1) == 401
        assert await status(c1, other_secret) == 401
        assert await status(unknown, VIEWER_TOKEN) == 404
        assert await status(unknown, "wrong") == 401  # no token, no hint it exists or not
    assert await status("/conferences/c1/events", "wrong") == 401
    assert await status("/conferences/nobody/events", link_c1) == 401
    # The operator's list takes an ingest token only.
    assert await status("/conferences", VIEWER_TOKEN) == 401
    assert await status("/conferences", link_c1) == 401
    listed = await client.get("/conferences", params={"token": TOKEN})
    assert {c["conference_id"] for c in (await listed.json())["conferences"]} == {"c1", "c2"}
    # The minutes viewer's data and downloads take the viewer's token too.
    assert await status("/minutes/c1", link_c1) == 200
    assert await status("/minutes/c2", link_c1) == 401


async def test_pages_and_assets_are_served_from_the_package(
    make_fast_server: ServerFactory,
) -> None:
    client = await viewer_server(make_fast_server)
    await join(client, "c1")
    live = await client.get("/live/c1", params={"token": VIEWER_TOKEN})
    assert live.headers["Content-Type"].startswith("text/html")
    html = await live.text()
    assert '<script src="/assets/live.js"' in html and "http" not in html  # nothing remote
    minutes = await client.get("/minutes/c1/view", params={"token": VIEWER_TOKEN})
    assert '<script src="/assets/minutes.js"' in await minutes.text()
    for name, kind in (
        ("live.js", "javascript"),
        ("live.css", "css"),
        ("minutes.js", "javascript"),
    ):
        asset = await client.get(f"/assets/{name}")
        assert asset.status == 200 and kind in asset.headers["Content-Type"]
        assert "EventSource" in await asset.text() or name != "live.js"
    assert (await client.get("/assets/..%2Fapp.py")).status == 404
    assert (await client.get("/assets/missing.js")).status == 404


async def test_every_asset_a_page_loads_is_served(make_fast_server: ServerFactory) -> None:
    # The page scripts import viewer.js: a script, stylesheet or module a page loads and
    # /assets/ does not serve would leave that page blank.
    client = await viewer_server(make_fast_server)
    await join(client, "c1")
    for page in ("/live/c1", "/minutes/c1/view"):
        html = await (await client.get(page, params={"token": VIEWER_TOKEN})).text()
        pending = re.findall(r'(?:src|href)="/assets/([^"]+)"', html)
        loaded = set()
        while pending:
            name = pending.pop()
            loaded.add(name)
            asset = await client.get(f"/assets/{name}")
            assert asset.status == 200, (page, name)
            imports = re.findall(r'from "/assets/([^"]+)"', await asset.text())
            pending.extend(set(imports) - loaded)
        assert "viewer.js" in loaded, page


@pytest.mark.parametrize("bad", ["", "12.", "abc.def", "9999999999.zz", "1.2.3"])
def test_malformed_links_are_refused(bad: str) -> None:
    from terra.links import verify_link

    assert not verify_link(SECRET, "c1", bad, time.time())


def test_terra_link_prints_links_that_open_the_conference(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from terra.cli import main
    from terra.links import verify_link

    monkeypatch.setenv("TERRA_LINK_SECRET", SECRET)
    assert main(["link", "c1", "--hours", "2", "--url", "http://terra.example:9001/"]) == 0
    live, minutes = capsys.readouterr().out.split()
    assert live.startswith("http://terra.example:9001/live/c1?token=")
    assert minutes.startswith("http://terra.example:9001/minutes/c1/view?token=")
    token = live.partition("token=")[2]
    assert verify_link(SECRET, "c1", token, time.time() + 7000)
    assert not verify_link(SECRET, "c1", token, time.time() + 7300)
    assert not verify_link(SECRET, "c2", token, time.time())
    monkeypatch.delenv("TERRA_LINK_SECRET")
    assert main(["link", "c1"]) == 2  # no secret: no links
