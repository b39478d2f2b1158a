"""The pieces of a multi-machine deployment, as the tests start them on loopback: terra front
ends sharing one spool and one jobs directory, and Debian's haproxy running the shipped
deploy/haproxy.cfg (only its addresses set, through the environment it reads); the posting
and counting helpers the deployment tests share. The Ray cluster is
benchmarks/raycluster.py's."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.metrics import metric, parse_metrics
from terra.audio import Samples, encode_wav

from .conftest import ROOT, TOKEN

HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
NAMES = {"john": "John", "maria": "Maria", "peter": "Peter"}  # the English stand-up's


@dataclass(frozen=True, slots=True)
class FrontEnd:
    name: str  # HAProxy's server name
    url: str
    process: subprocess.Popen[bytes]


def front_end_config(folder: Path, shared: Path, port: int, **sections: dict[str, Any]) -> Path:
    """One front end: its own port, the spool and the job stores shared with the others;
    ``sections`` are merged over these (the recognizer backend, the cluster)."""
    config: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "tokens": [TOKEN], "log_json": False},
        "model": {"name": "base", "models_dir": str(ROOT / "models"), "cpu_threads": 1},
        "recognizer": {"workers": 1},
        "stream": {"max_clock_skew_s": 0},  # the meeting is streamed at its recorded time
        "spool": {"dir": str(shared / "spool"), "fsync": False},
        "minutes": {"dir": str(shared / "minutes"), "jobs_dir": str(shared / "jobs")},
        "files": {"dir": str(shared / "files"), "jobs_dir": str(shared / "file-jobs")},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def haproxy_environment(
    folder: Path,
    bind: int,
    stats: int,
    front_ends: list[int],
    *,
    check_interval: str = "1s",
) -> dict[str, str]:
    """The variables deploy/haproxy.cfg reads, for front ends on these loopback ports (the
    cfg names three; the third is left unresolvable, which leaves it out). The health
    checks run every ``check_interval``, the cfg's default unless a test that waits for
    their state changes asks for shorter."""
    addresses = [f"127.0.0.1:{port}" for port in front_ends]
    addresses += ["absent.invalid:9001"] * (3 - len(addresses))
    return {
        **os.environ,
        "TERRA_LB_BIND": f"127.0.0.1:{bind}",
        "TERRA_STATS_BIND": f"127.0.0.1:{stats}",
        "TERRA_HAPROXY_SOCKET": str(folder / "haproxy.sock"),
        "TERRA_HEALTH_CHECK_INTERVAL": check_interval,
        **{f"TERRA_FRONTEND_{i}": address for i, address in enumerate(addresses, 1)},
    }


def start_haproxy(environment: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:  # the child keeps its own descriptor
        return subprocess.Popen(
            ["haproxy", "-db", "-f", str(HAPROXY_CFG)],
            stdout=output,
            stderr=output,
            env=environment,
        )


async def servers_up(
    stats_url: str, names: set[str], timeout_s: float = 30, state: str = "UP"
) -> None:
    """Until HAProxy's own health checks report exactly ``names`` up (or in ``state``:
    DOWN, NOLB)."""
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
                    r'haproxy_server_status\{proxy="terra_frontends",server="(\w+)",state="'
                    + state
                    + r'"\} 1',
                    text,
                )
            )
            if up == names:
                return
            assert time.monotonic() < deadline, f"HAProxy sees {up} {state}, not {names}"
            await asyncio.sleep(0.05)  # HAProxy's state is read, not pushed: polled


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
    """A front end's Prometheus counter or gauge (0 when absent)."""
    async with session.get(f"{url}/metrics") as response:
        return metric(parse_metrics(await response.text()), name)


def spooled_keys(spool: Path, conference: str, participant: str) -> list[str]:
    folder = spool / conference / participant
    return sorted(p.stem.split("_", 1)[1] for p in folder.glob("*.wav"))
