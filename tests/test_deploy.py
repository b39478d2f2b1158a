"""Several front ends behind HAProxy: the shipped deploy/haproxy.cfg (only its addresses
set, through the environment it reads), Debian's `haproxy`, and two real `terra serve`
processes sharing one spool and one jobs directory, on loopback with the real model.

Conference affinity from the query string, a multipart field and the file name; a post
counted once across front ends; and a front end killed with SIGKILL while the English
stand-up streams through HAProxy: its conference moves, live text resumes on the other
front end, every fragment that got a 200 is on disk and in the minutes."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml

from terra.audio import SAMPLE_RATE, Samples, encode_wav
from terra.models import resolve_model

from .conftest import ROOT, TOKEN, ServerFactory, load_clip, post_fragment
from .test_minutes_e2e import (
    STANDUP,
    T0,
    check_xml,
    free_port,
    load_tracks,
    start_server,
    wait_healthy,
)

pytestmark = [
    pytest.mark.model,
    pytest.mark.deploy,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="Debian's haproxy (scripts/test)"),
]

HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
NAMES = {"john": "John", "maria": "Maria", "peter": "Peter"}
PACE_S = 1.0  # a 2 s fragment each second: twice real time, to keep the module short
KILL_AFTER = 8  # fragments per participant answered before the owner is killed


@dataclass(frozen=True, slots=True)
class FrontEnd:
    name: str  # HAProxy's server name
    url: str
    process: subprocess.Popen[bytes]


@dataclass(frozen=True, slots=True)
class Cluster:
    url: str  # HAProxy
    stats_url: str
    front_ends: tuple[FrontEnd, ...]
    spool: Path


def front_end_config(folder: Path, shared: Path, port: int) -> Path:
    """One front end: its own port, the spool and the job stores shared with the others."""
    config = {
        "server": {"host": "127.0.0.1", "port": port, "tokens": [TOKEN], "log_json": False},
        "model": {"name": "base", "models_dir": str(ROOT / "models"), "cpu_threads": 1},
        "recognizer": {"workers": 1},
        "stream": {"max_clock_skew_s": 0},  # the meeting is streamed at its recorded time
        "spool": {"dir": str(shared / "spool"), "fsync": False},
        "minutes": {"dir": str(shared / "minutes"), "jobs_dir": str(shared / "jobs")},
        "files": {"dir": str(shared / "files"), "jobs_dir": str(shared / "file-jobs")},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def servers_up(stats_url: str, names: set[str], timeout_s: float = 30) -> None:
    """Until HAProxy's own health checks report exactly ``names`` up."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"{stats_url}/metrics") as response:
                    text = await response.text()
            except aiohttp.ClientConnectionError:  # HAProxy not listening yet
                text = ""
            up = set(
                re.findall(
                    r'haproxy_server_status\{proxy="terra_frontends",server="(\w+)",state="UP"\} 1',
                    text,
                )
            )
            if up == names:
                return
            assert time.monotonic() < deadline, f"HAProxy sees {up} up, not {names}"
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("cluster")
    resolve_model("base", ROOT / "models", allow_download=False)  # assembled once, not by both
    ports = [free_port() for _ in range(4)]
    log = open(folder / "server.log", "ab")  # the processes' stderr: read it when a run fails
    processes: list[subprocess.Popen[bytes]] = []
    try:
        front_ends = []
        for i, port in enumerate(ports[:2], 1):
            config = front_end_config(folder / f"fe{i}", folder, port)
            process = start_server(config, log)
            processes.append(process)
            front_ends.append(FrontEnd(f"fe{i}", f"http://127.0.0.1:{port}", process))
        environment = {
            **os.environ,
            "TERRA_LB_BIND": f"127.0.0.1:{ports[2]}",
            "TERRA_STATS_BIND": f"127.0.0.1:{ports[3]}",
            "TERRA_HAPROXY_SOCKET": str(folder / "haproxy.sock"),
            "TERRA_FRONTEND_1": f"127.0.0.1:{ports[0]}",
            "TERRA_FRONTEND_2": f"127.0.0.1:{ports[1]}",
            "TERRA_FRONTEND_3": "absent.invalid:9001",  # two front ends here: the third is left out
        }
        haproxy = subprocess.Popen(
            ["haproxy", "-db", "-f", str(HAPROXY_CFG)],
            stdout=log,
            stderr=log,
            env=environment,
        )
        processes.append(haproxy)
        stats_url = f"http://127.0.0.1:{ports[3]}"

        async def ready() -> None:
            await asyncio.gather(*(wait_healthy(f.url, f.process, 120) for f in front_ends))
            await servers_up(stats_url, {"fe1", "fe2"})

        asyncio.run(ready())
        yield Cluster(
            f"http://127.0.0.1:{ports[2]}", stats_url, tuple(front_ends), folder / "spool"
        )
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


# -- posting ------------------------------------------------------------------------------


async def post(
    session: aiohttp.ClientSession,
    url: str,
    samples: Samples,
    *,
    conference: str,
    participant: str,
    start: float,
    post_id: str,
    style: str = "query",
    online: bool = True,
    lang: str = "en",
) -> tuple[int, Any]:
    """POST /process with the ids in the query string (``query``), as multipart fields
    before the audio (``fields``), only in the file name (``filename``), or as fields after
    the audio with an anonymous file name (``fields-after``: HAProxy cannot see them)."""
    ids = {"conference_id": conference, "participant_id": participant}
    params = {
        "participant_name": NAMES.get(participant, participant),
        "online": "true" if online else "false",
        "offline": "true",
        "post_id": post_id,
        "timestamp_float": repr(start),
        "lang1": lang,
    }
    moment = time.strftime("%Y%m%d_%H_%M_%S", time.localtime(start))
    filename = f"{conference}:a-{participant}_{moment}_{int(start % 1 * 1e6):06d}.wav"
    form = aiohttp.FormData(quote_fields=False)
    form.add_field("token", TOKEN)
    if style == "query":
        params.update(ids)
    elif style == "fields":
        for name, value in ids.items():
            form.add_field(name, value)
    elif style == "filename":
        del params["timestamp_float"]  # the file name's time (second precision) is used
    if style != "filename":
        filename = "fragment.wav"
    audio = encode_wav(samples)
    form.add_field("audiofile", audio, filename=filename, content_type="application/octet-stream")
    if style == "fields-after":
        for name, value in ids.items():
            form.add_field(name, value)
    async with session.post(f"{url}/process", params=params, data=form) as response:
        return response.status, await response.json()


async def counter(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


def spooled_keys(spool: Path, conference: str, participant: str) -> list[str]:
    folder = spool / conference / participant
    return sorted(p.stem.split("_", 1)[1] for p in folder.glob("*.wav"))


# -- affinity -----------------------------------------------------------------------------


async def test_one_front_end_per_conference_wherever_its_id_is(cluster: Cluster) -> None:
    speech = load_clip(STANDUP / "maria.flac")[: 2 * SAMPLE_RATE]
    async with aiohttp.ClientSession() as session:
        for style in ("query", "fields", "filename"):
            conference = f"affinity-{style}"
            before = [
                await counter(session, f.url, "terra_spooled_fragments_total")
                for f in cluster.front_ends
            ]
            for i in range(3):
                for participant in ("john", "maria", "peter"):
                    status, body = await post(
                        session,
                        cluster.url,
                        speech,
                        conference=conference,
                        participant=participant,
                        start=T0 + 2 * i,
                        post_id=f"{style}-{participant}-{i}",
                        style=style,
                        online=False,
                    )
                    assert (status, body) == (200, []), (style, body)
            after = [
                await counter(session, f.url, "terra_spooled_fragments_total")
                for f in cluster.front_ends
            ]
            added = sorted(a - b for a, b in zip(after, before))
            assert added == [0.0, 9.0], (style, added)  # all nine on one front end
            for participant in ("john", "maria", "peter"):
                assert len(spooled_keys(cluster.spool, conference, participant)) == 3

        # Ids only after the audio: HAProxy cannot route it, any front end answers.
        status, body = await post(
            session,
            cluster.url,
            speech,
            conference="affinity-after",
            participant="john",
            start=T0,
            post_id="after-0",
            style="fields-after",
            online=False,
        )
        assert (status, body) == (200, [])
        assert spooled_keys(cluster.spool, "affinity-after", "john") == ["after-0"]


async def test_a_post_is_counted_once_across_front_ends(cluster: Cluster) -> None:
    """Affinity lost: a client's retry reaches the front end that did not store the post."""
    first, second = cluster.front_ends
    speech = load_clip(STANDUP / "maria.flac")[: 2 * SAMPLE_RATE]
    async with aiohttp.ClientSession() as session:

        async def send(front_end: FrontEnd, post_id: str, start: float) -> None:
            status, _ = await post(
                session,
                front_end.url,
                speech,
                conference="dedupe",
                participant="maria",
                start=start,
                post_id=post_id,
                online=False,
            )
            assert status == 200

        # Both front ends have a live session for the participant before the retry.
        await send(first, "post-1", T0)
        await send(second, "post-2", T0 + 2)
        duplicates = await counter(session, second.url, "terra_duplicate_fragments_total")
        await send(first, "post-3", T0 + 4)
        await send(second, "post-3", T0 + 4)  # the same post again, on the other front end
        assert await counter(session, second.url, "terra_duplicate_fragments_total") == (
            duplicates + 1
        )
    assert spooled_keys(cluster.spool, "dedupe", "maria") == ["post-1", "post-2", "post-3"]


# -- a front end killed under load ------------------------------------------------------


async def test_front_end_killed_under_load(cluster: Cluster) -> None:
    conference = "standup-failover"
    tracks = load_tracks(STANDUP)
    step = 2 * SAMPLE_RATE
    counts = {p: -(-samples.size // step) for p, samples in tracks.items()}
    answered: dict[str, set[int]] = {p: set() for p in tracks}
    finals: list[tuple[float, str, dict[str, Any]]] = []  # (monotonic, participant, elem)
    errors: list[str] = []
    halfway = asyncio.Event()
    started = time.monotonic()

    async def participant(name: str, samples: Samples, session: aiohttp.ClientSession) -> None:
        for i in range(counts[name]):
            # Each fragment on its own clock (the load), whatever the answers' pace.
            await asyncio.sleep(max(0.0, started + i * PACE_S - time.monotonic()))
            piece = samples[i * step : (i + 1) * step]
            for _ in range(20):  # a conference server sends a failed fragment again
                try:
                    status, body = await post(
                        session,
                        cluster.url,
                        piece,
                        conference=conference,
                        participant=name,
                        start=T0 + i * 2,
                        post_id=f"{name}-{i}",
                    )
                except aiohttp.ClientError as e:
                    status, body = 0, str(e)
                if status == 200:
                    break
                errors.append(f"{name}-{i}: {status} {body}")
                await asyncio.sleep(0.25)
            assert status == 200, f"{name}-{i} never got a 200"
            answered[name].add(i)
            finals.extend(
                (time.monotonic(), name, e) for e in body if e["status"] == "final" and e["text"]
            )
            if min(len(a) for a in answered.values()) >= KILL_AFTER:
                halfway.set()

    async def participants(session: aiohttp.ClientSession) -> list[int]:
        counts = []
        for front_end in cluster.front_ends:
            async with session.get(f"{front_end.url}/healthz") as response:
                counts.append((await response.json())["participants"])
        return counts

    async def killer(session: aiohttp.ClientSession, before: list[int]) -> tuple[FrontEnd, float]:
        await halfway.wait()
        added = [now - then for now, then in zip(await participants(session), before)]
        owners = [f for f, n in zip(cluster.front_ends, added) if n]
        assert len(owners) == 1 and max(added) == len(tracks), "the conference on one front end"
        owners[0].process.send_signal(signal.SIGKILL)
        owners[0].process.wait(10)
        return owners[0], time.monotonic()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        before = await participants(session)
        kill = asyncio.ensure_future(killer(session, before))
        await asyncio.gather(*(participant(n, s, session) for n, s in tracks.items()))
        killed, killed_at = await kill
        survivor = next(f for f in cluster.front_ends if f is not killed)
        await servers_up(cluster.stats_url, {survivor.name})

        # A closing silence, so that the last combinations close and their finals come.
        for name in tracks:
            status, body = await post(
                session,
                cluster.url,
                np.zeros(step, np.float32),
                conference=conference,
                participant=name,
                start=T0 + counts[name] * 2,
                post_id=f"{name}-tail",
            )
            assert status == 200
            finals.extend(
                (time.monotonic(), name, e) for e in body if e["status"] == "final" and e["text"]
            )

        # Live text resumed on the survivor: finals of speech after the kill came back.
        after_kill = [at for at, _, _ in finals if at > killed_at]
        assert after_kill, f"no final after the kill; errors: {errors}"
        async with session.get(f"{cluster.stats_url}/metrics") as response:
            moved = re.findall(
                r"^haproxy_backend_(retry|redispatch)_warnings_total"
                r'\{proxy="terra_frontends"\} (\d+)',
                await response.text(),
                re.MULTILINE,
            )
        # What happened, for the record (`pytest -s`); timings on a shared CPU are indicative.
        print(
            f"failover: first final {min(after_kill) - killed_at:.2f} s after the kill; "
            f"HAProxy {dict(moved)}; fragments the client had to send again: {len(errors)}"
        )
        async with session.get(f"{survivor.url}/healthz") as response:
            assert (await response.json())["participants"] >= len(tracks)

        # The viewers' routes reach the conference's front end: its transcript has the finals.
        async with session.get(
            f"{cluster.url}/conferences/{conference}/transcript", params={"token": TOKEN}
        ) as response:
            assert response.status == 200
            transcript = await response.json()
        assert {f["id"] for f in transcript["finals"]} >= {
            e["id"] for at, _, e in finals if at > killed_at
        }

        # Every fragment that got a 200 is on disk, once.
        for name in tracks:
            expected = sorted([f"{name}-{i}" for i in range(counts[name])] + [f"{name}-tail"])
            assert spooled_keys(cluster.spool, conference, name) == expected

        # ... and in the minutes, compiled by the survivor.
        deadline = time.monotonic() + 150
        while True:
            assert time.monotonic() < deadline, "the minutes were not compiled"
            async with session.get(
                f"{cluster.url}/minutes/{conference}", params={"token": TOKEN}
            ) as response:
                assert response.status == 200
                if response.content_type == "application/xml":
                    body_xml = await response.read()
                    break
            await asyncio.sleep(0.5)
    check_xml(body_xml, STANDUP, NAMES)


# -- the same without processes -----------------------------------------------------------


async def test_two_apps_on_one_spool_count_a_post_once(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """The in-process version of the retry above (both apps share tmp_path's spool)."""
    one, two = await make_server(), await make_server()
    speech = load_clip(STANDUP / "john.flac")[: 2 * SAMPLE_RATE]
    assert (await post_fragment(one, speech, post_id="a", online=False))[0] == 200
    assert (await post_fragment(two, speech, post_id="b", start_time=T0 + 2, online=False))[
        0
    ] == 200
    assert (await post_fragment(one, speech, post_id="c", start_time=T0 + 4, online=False))[
        0
    ] == 200
    assert (await post_fragment(two, speech, post_id="c", start_time=T0 + 4, online=False))[
        0
    ] == 200
    metrics = await (await two.get("/metrics")).text()
    assert "terra_duplicate_fragments_total 1.0" in metrics
    assert spooled_keys(tmp_path / "spool", "conf-1", "p-1") == ["a", "b", "c"]
