"""Every part of a multi-machine deployment at once, real processes on loopback: a local Ray
cluster (a head and a second node, each its own ``ray start`` with one CPU), the recognizer
deployed on it by ``terra recognizer`` (two replicas, one model thread each), two
``terra serve`` front ends with ``recognizer.backend: ray`` sharing one spool and one jobs
directory, and Debian's haproxy running the shipped deploy/haproxy.cfg in front of them.

Conference affinity wherever the client put the conference id; a post counted once across
front ends; and the English stand-up streamed through HAProxy while first a recognizer
replica, then the conference's front end is killed with SIGKILL.

One deployment serves the whole module (starting Ray and two replicas takes most of a
minute); tests/test_deploy_haproxy.py checks HAProxy's rules alone, without the model.
"""

from __future__ import annotations

import asyncio
import os
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

from benchmarks.raycluster import BIN, START_S, LocalRayCluster, cpu_seconds_of
from terra.audio import SAMPLE_RATE, Samples
from terra.models import resolve_model

from .conftest import ROOT, TOKEN, load_clip
from .deployment import (
    NAMES,
    FrontEnd,
    counter,
    front_end_config,
    haproxy_environment,
    post,
    servers_up,
    spooled_keys,
    start_haproxy,
)
from .test_minutes_e2e import (
    STANDUP,
    T0,
    check_xml,
    free_port,
    load_tracks,
    start_server,
    wait_healthy,
)

pytest.importorskip("ray.serve", reason="the cluster extra: pip install -e '.[cluster]'")

pytestmark = [
    pytest.mark.model,
    pytest.mark.cluster,
    pytest.mark.deploy,
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="Debian's haproxy (scripts/test)"),
]

APP = "terra-recognizer-test"
PACE_S = 1.0  # a 2 s fragment each second per participant: twice real time
KILL_REPLICA_AFTER = 4  # fragments answered per participant before a replica is killed
# Live text must come back within this after a replica dies: generous, the cores are shared
# with everything else here; the measured time is printed (`pytest -s`).
RESUME_BOUND_S = 20.0


@dataclass(frozen=True, slots=True)
class Deployment:
    url: str  # HAProxy
    stats_url: str
    front_ends: tuple[FrontEnd, ...]
    spool: Path
    ray: LocalRayCluster
    log: Path  # the front ends' stderr

    def replica_pids(self) -> list[int]:
        return self.ray.replica_pids(APP)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("deployment")
    resolve_model("base", ROOT / "models", allow_download=False)  # assembled once, not by each
    ray = LocalRayCluster(folder, node_cpus=(1, 1))  # a head and a second node, one CPU each
    ports = [free_port() for _ in range(4)]
    cluster = {
        "address": ray.address,
        "app_name": APP,
        "num_cpus": 1,
        "min_replicas": 2,
        "max_replicas": 2,
    }
    backend: dict[str, dict[str, Any]] = {"recognizer": {"backend": "ray"}, "cluster": cluster}
    log_path = folder / "server.log"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        ray.start()
        # Two replicas of one CPU each, one per node; returns once both are running.
        config = front_end_config(folder / "recognizer", folder, 0, **backend)
        deployed = subprocess.run(
            [str(BIN / "terra"), "recognizer", "--config", str(config)],
            capture_output=True,
            timeout=START_S,
        )
        assert deployed.returncode == 0, deployed.stderr.decode(errors="replace")[-3000:]
        front_ends = []
        with open(log_path, "ab") as log:  # the children keep their own descriptors
            for i, port in enumerate(ports[:2], 1):
                config = front_end_config(folder / f"fe{i}", folder, port, **backend)
                processes.append(start_server(config, log))
                front_ends.append(FrontEnd(f"fe{i}", f"http://127.0.0.1:{port}", processes[-1]))
        environment = haproxy_environment(folder, ports[2], ports[3], ports[:2])
        processes.append(start_haproxy(environment, folder / "haproxy.log"))
        stats_url = f"http://127.0.0.1:{ports[3]}"

        async def ready() -> None:
            await asyncio.gather(*(wait_healthy(f.url, f.process, START_S) for f in front_ends))
            await servers_up(stats_url, {"fe1", "fe2"})

        asyncio.run(ready())
        yield Deployment(
            f"http://127.0.0.1:{ports[2]}",
            stats_url,
            tuple(front_ends),
            folder / "spool",
            ray,
            log_path,
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
        ray.stop()


# -- affinity -----------------------------------------------------------------------------


async def test_one_front_end_per_conference_wherever_its_id_is(deployment: Deployment) -> None:
    speech = load_clip(STANDUP / "maria.flac")[: 2 * SAMPLE_RATE]
    async with aiohttp.ClientSession() as session:
        for style in ("query", "fields", "filename"):
            conference = f"affinity-{style}"
            before = [
                await counter(session, f.url, "terra_spooled_fragments_total")
                for f in deployment.front_ends
            ]
            for i in range(3):
                for participant in ("john", "maria", "peter"):
                    status, body = await post(
                        session,
                        deployment.url,
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
                for f in deployment.front_ends
            ]
            added = sorted(a - b for a, b in zip(after, before))
            assert added == [0.0, 9.0], (style, added)  # all nine on one front end
            for participant in ("john", "maria", "peter"):
                assert len(spooled_keys(deployment.spool, conference, participant)) == 3

        # Ids only after the audio: HAProxy cannot route it, any front end answers.
        status, body = await post(
            session,
            deployment.url,
            speech,
            conference="affinity-after",
            participant="john",
            start=T0,
            post_id="after-0",
            style="fields-after",
            online=False,
        )
        assert (status, body) == (200, [])
        assert spooled_keys(deployment.spool, "affinity-after", "john") == ["after-0"]


async def test_a_post_is_counted_once_across_front_ends(deployment: Deployment) -> None:
    """Affinity lost: a client's retry reaches the front end that did not store the post."""
    first, second = deployment.front_ends
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
    assert spooled_keys(deployment.spool, "dedupe", "maria") == ["post-1", "post-2", "post-3"]


# -- a replica, then a front end killed under load ----------------------------------------


async def test_a_replica_then_a_front_end_killed_under_load(deployment: Deployment) -> None:
    """The stand-up streams through HAProxy (3 participants, 2 s fragments at twice real
    time, each fragment on its own clock whatever the answers' pace).

    1. A recognizer replica inside a model call is killed: its requests are sent again to
       the other replica, no final fails, and live text made from audio posted after the
       kill comes back within RESUME_BOUND_S.
    2. Then the front end that owns the conference is killed: HAProxy moves the
       conference to the other one, finals come back there, every fragment that got a 200
       is on disk once and the minutes (compiled by the survivor on the cluster) pass the
       same checks as the single-server end-to-end test."""
    conference = "standup-failover"
    tracks = load_tracks(STANDUP)
    step = 2 * SAMPLE_RATE
    counts = {p: -(-samples.size // step) for p, samples in tracks.items()}
    answered: dict[str, set[int]] = {p: set() for p in tracks}
    finals: list[tuple[float, str, dict[str, Any]]] = []  # (monotonic, participant, elem)
    errors: list[str] = []
    loaded = asyncio.Event()
    resumed = asyncio.Event()
    replica_killed_at: list[float] = []
    resumed_at: list[float] = []
    replicas = deployment.replica_pids()
    assert len(replicas) == 2, replicas
    started = time.monotonic()

    async def participant(name: str, samples: Samples, session: aiohttp.ClientSession) -> None:
        for i in range(counts[name]):
            await asyncio.sleep(max(0.0, started + i * PACE_S - time.monotonic()))
            piece = samples[i * step : (i + 1) * step]
            sent_at = time.monotonic()
            for _ in range(20):  # a conference server sends a failed fragment again
                try:
                    status, body = await post(
                        session,
                        deployment.url,
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
            if min(len(a) for a in answered.values()) >= KILL_REPLICA_AFTER:
                loaded.set()
            # Live text resumed: text made from this fragment's audio, posted after the kill.
            if replica_killed_at and sent_at > replica_killed_at[0] and not resumed.is_set():
                if any(f"{name}-{i}" in e["post_ids"] and e["text"].strip() for e in body):
                    resumed_at.append(time.monotonic())
                    resumed.set()

    async def spooled(session: aiohttp.ClientSession) -> list[float]:
        return [
            await counter(session, f.url, "terra_spooled_fragments_total")
            for f in deployment.front_ends
        ]

    async def kill_a_replica() -> int:
        await loaded.wait()
        # The victim is a replica inside a model call (its CPU time grows): it holds
        # requests that only a resend can save.
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, "no replica was ever busy"
            before = [cpu_seconds_of(pid) for pid in replicas]
            await asyncio.sleep(0.1)  # a sampling interval, not a synchronisation
            busy = [cpu_seconds_of(pid) - b for pid, b in zip(replicas, before)]
            if max(busy) >= 0.05:  # half the interval: inside a model call
                victim = replicas[busy.index(max(busy))]
                break
        os.kill(victim, signal.SIGKILL)
        replica_killed_at.append(time.monotonic())
        return victim

    async def kill_the_owner(
        session: aiohttp.ClientSession, before: list[float]
    ) -> tuple[FrontEnd, float, float]:
        """After live text resumed: the resends so far, and the conference's front end
        killed; (the killed one, when, requests resent until then)."""
        await asyncio.wait_for(resumed.wait(), RESUME_BOUND_S)
        resent = sum(
            [
                await counter(session, f.url, "terra_recognizer_resent_total")
                for f in deployment.front_ends
            ]
        )
        added = [now - then for now, then in zip(await spooled(session), before)]
        owners = [f for f, n in zip(deployment.front_ends, added) if n]
        assert len(owners) == 1, ("the conference on one front end", added)
        assert answered and min(len(a) for a in answered.values()) < min(counts.values()), (
            "the stream ended before the front end was killed: no load left"
        )
        owners[0].process.send_signal(signal.SIGKILL)
        owners[0].process.wait(10)
        return owners[0], time.monotonic(), resent

    async def chaos(session: aiohttp.ClientSession) -> tuple[int, FrontEnd, float, float]:
        before = await spooled(session)
        victim = await kill_a_replica()
        return (victim, *await kill_the_owner(session, before))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        kills = asyncio.ensure_future(chaos(session))
        await asyncio.gather(*(participant(n, s, session) for n, s in tracks.items()))
        victim, killed, killed_at, resent = await kills
        survivor = next(f for f in deployment.front_ends if f is not killed)
        await servers_up(deployment.stats_url, {survivor.name})

        # A closing silence, so that the last combinations close and their finals come.
        for name in tracks:
            status, body = await post(
                session,
                deployment.url,
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

        # 1. The replica's requests were sent again and no final failed for it.
        log = await asyncio.to_thread(deployment.log.read_text, errors="replace")
        assert resent >= 1, ("no request was in the killed replica", log[-5000:])
        assert "final recognition failed" not in log

        # 2. Live text resumed on the survivor: finals of speech after the kill came back.
        after_kill = [at for at, _, _ in finals if at > killed_at]
        assert after_kill, f"no final after the front end was killed; errors: {errors}"
        # What happened, for the record (`pytest -s`); timings on a shared CPU are indicative.
        print(
            f"replica killed: live text {resumed_at[0] - replica_killed_at[0]:.2f} s later, "
            f"{resent:.0f} request(s) resent; front end killed: first final "
            f"{min(after_kill) - killed_at:.2f} s later; the client sent {len(errors)} "
            "fragment(s) again"
        )
        async with session.get(f"{survivor.url}/healthz") as response:
            assert (await response.json())["participants"] >= len(tracks)

        # The viewers' routes reach the conference's front end: its transcript has the finals.
        async with session.get(
            f"{deployment.url}/conferences/{conference}/transcript", params={"token": TOKEN}
        ) as response:
            assert response.status == 200
            transcript = await response.json()
        assert {f["id"] for f in transcript["finals"]} >= {
            e["id"] for at, _, e in finals if at > killed_at
        }

        # Every fragment that got a 200 is on disk, once.
        for name in tracks:
            expected = sorted([f"{name}-{i}" for i in range(counts[name])] + [f"{name}-tail"])
            assert spooled_keys(deployment.spool, conference, name) == expected

        # ... and in the minutes, compiled by the survivor on the cluster.
        deadline = time.monotonic() + 150
        while True:
            assert time.monotonic() < deadline, "the minutes were not compiled"
            async with session.get(
                f"{deployment.url}/minutes/{conference}", params={"token": TOKEN}
            ) as response:
                assert response.status == 200
                if response.content_type == "application/xml":
                    body_xml = await response.read()
                    break
            await asyncio.sleep(0.5)
    check_xml(body_xml, STANDUP, NAMES)

    # Ray replaced the dead replica (a fresh process, the model loaded again).
    deadline = time.monotonic() + START_S
    while victim in (now := deployment.replica_pids()) or len(now) < 2:
        assert time.monotonic() < deadline, deployment.replica_pids()
        await asyncio.sleep(0.5)
