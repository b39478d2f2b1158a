"""kill -9 under /process (issue 11, item 7): a real `terra serve` (real model) takes
fragments from three talkers, is killed with SIGKILL while they post, and is started again.
Every fragment it acknowledged (200) is on disk, a post_id sent again after the restart is
counted once, and the conference's minutes compile from what survived."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from terra.audio import SAMPLE_RATE, encode_wav
from terra.spool import post_key

from .conftest import SPEECH, TOKEN, load_clip
from .test_minutes_e2e import (
    free_port,
    server_log,
    start_server,
    stop_server,
    wait_healthy,
    write_config,
)

pytestmark = pytest.mark.model

CONFERENCE = "kill-9"
TALKERS = ("anna", "boris", "clara")


async def post(
    session: aiohttp.ClientSession, url: str, talker: str, index: int, t0: float, piece: bytes
) -> int:
    params = {
        "token": TOKEN,
        "conference_id": CONFERENCE,
        "participant_id": talker,
        "participant_name": talker.title(),
        "post_id": f"{talker}-{index}",
        "timestamp_float": repr(t0 + 2.0 * index),
        "lang1": "en",
        "online": "true",
        "offline": "true",
    }
    form = aiohttp.FormData()
    form.add_field("audiofile", piece, filename="f.wav", content_type="audio/wav")
    async with session.post(f"{url}/process", params=params, data=form) as response:
        await response.read()
        return response.status


class Acknowledged(list[str]):
    """The post_ids the server answered with 200; ``reached`` is set at ``enough`` of them."""

    def __init__(self, enough: int) -> None:
        super().__init__()
        self.enough = enough
        self.reached = asyncio.Event()

    def add(self, post_id: str) -> None:
        self.append(post_id)
        if len(self) >= self.enough:
            self.reached.set()


async def talk(
    url: str, talker: str, audio: np.ndarray, t0: float, acknowledged: Acknowledged
) -> None:
    """Post 2 s fragments back to back until the server goes away."""
    step = 2 * SAMPLE_RATE
    async with aiohttp.ClientSession() as session:
        for index, offset in enumerate(range(0, audio.size - step + 1, step)):
            piece = encode_wav(audio[offset : offset + step])
            try:
                status = await post(session, url, talker, index, t0, piece)
            except aiohttp.ClientError:
                return  # killed mid-request: not acknowledged
            assert status == 200
            acknowledged.add(f"{talker}-{index}")


def on_disk(spool: Path) -> set[str]:
    return {wav.stem.split("_", 1)[1] for wav in (spool / CONFERENCE).glob("*/*.wav")}


async def test_acknowledged_fragments_survive_kill_9(tmp_path: Path) -> None:
    audio = load_clip(SPEECH / "long" / "en_60s.wav")[: 40 * SAMPLE_RATE]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path, port)
    spool = tmp_path / "spool"
    t0 = time.time() - 60
    acknowledged = Acknowledged(15)  # well into the conversation, posts in flight
    with server_log(tmp_path) as log:
        first = start_server(config, log)
        try:
            await wait_healthy(url, first)
            talkers = [
                asyncio.create_task(talk(url, name, audio, t0, acknowledged)) for name in TALKERS
            ]
            await asyncio.wait_for(acknowledged.reached.wait(), 120)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            await asyncio.gather(*talkers)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        assert len(acknowledged) >= acknowledged.enough
        assert {post_key(p) for p in acknowledged} <= on_disk(spool)

        second = start_server(config, log)
        try:
            await wait_healthy(url, second)
            before = on_disk(spool)
            async with aiohttp.ClientSession() as session:
                # The same post_id again after the restart: counted once.
                again = acknowledged[0]
                talker, index = again.rsplit("-", 1)
                piece = encode_wav(audio[int(index) * 2 * SAMPLE_RATE :][: 2 * SAMPLE_RATE])
                assert await post(session, url, talker, int(index), t0, piece) == 200
                assert on_disk(spool) == before
                assert len(list((spool / CONFERENCE).glob(f"*/*_{again}.wav"))) == 1
                deadline = time.monotonic() + 180
                while True:
                    params = {"token": TOKEN}
                    async with session.get(f"{url}/minutes/{CONFERENCE}", params=params) as r:
                        if r.content_type == "application/xml":
                            body = await r.read()
                            break
                        assert r.status == 200, await r.text()
                    assert time.monotonic() < deadline, "the minutes did not compile"
                    await asyncio.sleep(0.5)
            assert b"<phrase " in body
            for talker in {p.rsplit("-", 1)[0] for p in acknowledged}:
                assert f'id="{talker}"'.encode() in body
        finally:
            stop_server(second)
