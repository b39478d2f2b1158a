"""recognizer.backend: ray end to end: a real local Ray cluster (a head and a second node,
each its own `ray start` process with one CPU), the recognizer deployed on it by
`terra recognizer` (two replicas, one model thread each), and a `terra serve` front end
with backend ray, all real processes on loopback, streaming real speech.

One cluster serves the whole module (starting Ray and two replicas takes most of a minute).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml

from benchmarks.common import free_port
from benchmarks.raycluster import BIN, START_S, LocalRayCluster, cpu_seconds_of
from terra.audio import SAMPLE_RATE

from .conftest import ROOT, SPEECH, TOKEN, cer, clip, finals, load_clip, post_fragment
from .conftest import stream_samples as _stream_samples

pytest.importorskip("ray.serve", reason="the cluster extra: pip install -e '.[cluster]'")

pytestmark = [pytest.mark.model, pytest.mark.cluster, pytest.mark.timeout(600)]

APP = "terra-recognizer-test"
RU = clip("clips/speech_to_phrase_ru/ru_01.wav")
EN = clip("clips/faster_whisper/jfk.flac")
CER_BOUND = 0.10  # as tests/test_process_e2e.py (measured 0.000 on both, local backend)


@dataclass
class Cluster:
    url: str
    ray: LocalRayCluster
    front_end: subprocess.Popen[bytes]
    log: Path

    def replica_pids(self) -> list[int]:
        return self.ray.replica_pids(APP)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    ray = LocalRayCluster(tmp, node_cpus=(1, 1))  # a head and a second node, one CPU each
    http_port = free_port()
    config = {
        "server": {"tokens": [TOKEN], "log_json": False, "port": http_port, "host": "127.0.0.1"},
        "model": {"models_dir": str(ROOT / "models")},
        "spool": {"dir": str(tmp / "spool")},
        "minutes": {"dir": str(tmp / "minutes"), "jobs_dir": str(tmp / "jobs")},
        "files": {"dir": str(tmp / "files"), "jobs_dir": str(tmp / "file-jobs")},
        "recognizer": {"backend": "ray"},
        "stream": {"max_clock_skew_s": 0},  # the fragments carry 2024 stamps (conftest)
        "cluster": {
            "address": ray.address,
            "app_name": APP,
            "num_cpus": 1,
            "min_replicas": 2,
            "max_replicas": 2,
        },
    }
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    front_end: subprocess.Popen[bytes] | None = None
    try:
        ray.start()
        # Two replicas of one CPU each: one per node. Returns once both are running.
        deployed = subprocess.run(
            [str(BIN / "terra"), "recognizer", "--config", str(config_path)],
            capture_output=True,
            timeout=START_S,
        )
        assert deployed.returncode == 0, deployed.stderr.decode(errors="replace")[-3000:]
        log = tmp / "front-end.log"
        with log.open("wb") as out:
            front_end = subprocess.Popen(
                [str(BIN / "terra"), "serve", "--config", str(config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{http_port}"
        _wait_healthy(url, front_end, log)
        yield Cluster(url, ray, front_end, log)
    finally:
        if front_end is not None:
            front_end.terminate()
            front_end.wait(timeout=30)
        ray.stop()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_S
    while True:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "the front end did not come up"
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)


async def _metric(session: aiohttp.ClientSession, name: str) -> float:
    async with session.get("/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def test_finals_on_real_speech_through_the_cluster(cluster: Cluster) -> None:
    """Two participants at once, each clip's finals as accurate as with the local backend."""
    async with aiohttp.ClientSession(base_url=cluster.url) as session:
        client: Any = session  # the conftest helpers only call client.post(path, ...)
        ru_answers, en_answers = await asyncio.gather(
            _stream_samples(client, load_clip(RU.path), participant_id="ru", lang="ru"),
            _stream_samples(client, load_clip(EN.path), participant_id="en", lang="en"),
        )
        health = await (await session.get("/healthz")).json()
    ru_text = " ".join(e["text"] for e in finals(ru_answers))
    en_text = " ".join(e["text"] for e in finals(en_answers))
    assert cer(RU.transcript, ru_text) <= CER_BOUND, ru_text
    assert cer(EN.transcript, en_text) <= CER_BOUND, en_text
    assert health["status"] == "ok"


async def test_kill_9_a_replica_under_load_loses_no_final(cluster: Cluster) -> None:
    """Four talkers at real-time pace; one replica is killed with requests in it. Its
    requests are sent again to the other replica, every final comes back recognized, live
    text resumes for every talker, and Ray starts a new replica."""
    talkers = [
        ("long/en_60s.wav", "en"),
        ("long/ru_60s.wav", "ru"),
        ("long/en_60s.wav", "en"),
        ("long/ru_60s.wav", "ru"),
    ]
    chunk = 2 * SAMPLE_RATE
    fragments = 12  # 24 s of speech each
    replicas = cluster.replica_pids()
    assert len(replicas) == 2, replicas
    killed_at: list[float] = []
    victims: list[int] = []
    all_have_text = asyncio.Event()
    with_text: set[int] = set()
    answered_after_kill: dict[int, float] = {}

    async def talk(index: int, session: aiohttp.ClientSession) -> list[list[dict[str, Any]]]:
        path, lang = talkers[index]
        samples = load_clip(SPEECH / path)[index * 5 * SAMPLE_RATE :]
        samples = np.concatenate([samples[: fragments * chunk], np.zeros(chunk, np.float32)])
        answers = []
        started = time.monotonic()
        for n, offset in enumerate(range(0, samples.size, chunk)):
            # Real-time pace: fragment n leaves 2n seconds after the first.
            await asyncio.sleep(max(0.0, started + 2 * n - time.monotonic()))
            post_id = f"t{index}-{n}"
            status, body = await post_fragment(
                session,  # type: ignore[arg-type]  # only .post(path, ...) is used
                samples[offset : offset + chunk],
                conference_id="kill-test",
                participant_id=f"talker-{index}",
                post_id=post_id,
                lang=lang,
                start_time=1_719_512_467.0 + offset / SAMPLE_RATE,
            )
            assert status == 200, body
            answers.append(body)
            if any(e["text"].strip() for e in body):
                with_text.add(index)
                if len(with_text) == len(talkers):
                    all_have_text.set()
                if killed_at and index not in answered_after_kill:
                    mine = [e for e in body if post_id in e["post_ids"] and e["text"].strip()]
                    if mine:
                        answered_after_kill[index] = time.monotonic() - killed_at[0]
        return answers

    async def kill_when_loaded() -> None:
        await all_have_text.wait()  # every talker's text flows: both replicas have work
        # The victim is a replica inside a model call (its CPU time grows): it holds
        # requests that only a resend can save.
        while True:
            before = [cpu_seconds_of(pid) for pid in replicas]
            await asyncio.sleep(0.1)  # a sampling interval, not a synchronisation
            busy = [cpu_seconds_of(pid) - b for pid, b in zip(replicas, before)]
            if max(busy) >= 0.05:  # half the interval: inside a model call
                victim = replicas[busy.index(max(busy))]
                break
        os.kill(victim, signal.SIGKILL)
        killed_at.append(time.monotonic())
        victims.append(victim)

    async with aiohttp.ClientSession(base_url=cluster.url) as session:
        killer = asyncio.create_task(kill_when_loaded())
        answers = await asyncio.gather(*(talk(i, session) for i in range(len(talkers))))
        killer.cancel()
        resent = await _metric(session, "terra_recognizer_resent_total")

    log = await asyncio.to_thread(cluster.log.read_text, errors="replace")
    assert killed_at, "the replica was never killed"
    assert resent >= 1, ("no request was in the killed replica", log[-5000:])
    assert "final recognition failed" not in log
    for index, talker_answers in enumerate(answers):
        settled = finals(talker_answers)
        assert settled and all(e["text"].strip() for e in settled), (index, settled)
        # A fragment posted after the kill was answered with text made from its audio.
        assert index in answered_after_kill, (index, talker_answers[-4:])
    # Ray replaces the dead replica (a fresh process, the model loaded again).
    deadline = time.monotonic() + START_S
    while victims[0] in (now := cluster.replica_pids()) or len(now) < 2:
        assert time.monotonic() < deadline, cluster.replica_pids()
        await asyncio.sleep(0.5)
