"""deploy/: the compose file, the front ends' config and the HAProxy config fit together.

Docker cannot run on the development machine, so docker-compose.yml is checked for its
structure (services, shared volume, the addresses HAProxy is given) rather than started,
and its front ends' healthcheck command is run against a real front end;
deploy/haproxy.cfg runs for real in tests/test_cluster.py."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from terra.config import load_config

from .conftest import ROOT, ServerFactory, post_fragment
from .test_minutes_e2e import free_port
from .test_overload import VOICED

DEPLOY = ROOT / "deploy"


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return document


def haproxy_servers() -> dict[str, str]:
    """fe name -> the environment variable its address comes from."""
    text = (DEPLOY / "haproxy.cfg").read_text()
    return dict(re.findall(r'^\s*server (\w+) "\$\{(\w+)-[^}]*\}"', text, re.MULTILINE))


def test_compose_has_every_part_and_front_ends_share_storage() -> None:
    services = compose()["services"]
    assert {"ray-head", "recognizer", "recognizer-deploy", "haproxy"} <= set(services)
    front_ends = sorted(name for name in services if name.startswith("frontend"))
    assert len(front_ends) >= 2
    config = load_config(DEPLOY / "terra.yaml", environ={})
    shared = [
        Path(config.spool.dir),
        Path(config.minutes.dir),
        Path(config.minutes.jobs_dir),
        Path(config.files.dir),
        Path(config.files.jobs_dir),
    ]
    for name in front_ends:
        service = services[name]
        assert "terra serve" in service["command"]
        assert service["environment"]["TERRA_RECOGNIZER_BACKEND"] == "ray"
        mounts = dict(v.split(":")[:2][::-1] for v in service["volumes"])
        assert mounts["/etc/terra/config.yaml"] == "./terra.yaml"
        volume = mounts["/var/lib/terra"]
        assert volume in compose()["volumes"]
        assert all(d.is_relative_to("/var/lib/terra") for d in shared), shared
    assert "ray start --head" in services["ray-head"]["command"]
    assert "terra recognizer" in services["recognizer-deploy"]["command"]
    assert (ROOT / services["recognizer"]["build"]["dockerfile"]).is_file()


def test_haproxy_gets_one_server_per_front_end() -> None:
    services = compose()["services"]
    haproxy = services["haproxy"]
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    environment = haproxy["environment"]
    servers = haproxy_servers()
    addresses = {environment[variable] for variable in servers.values()}
    front_ends = {name for name in services if name.startswith("frontend")}
    assert addresses == {f"{name}:9001" for name in front_ends}
    assert environment["TERRA_LB_BIND"].endswith(":9001")


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="Debian's haproxy (scripts/test)")
def test_haproxy_accepts_the_config_with_the_compose_environment() -> None:
    environment = {**os.environ, **compose()["services"]["haproxy"]["environment"]}
    result = subprocess.run(
        ["haproxy", "-c", "-f", str(DEPLOY / "haproxy.cfg")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr


def haproxy_seconds(value: str) -> float:
    """An HAProxy time (``65s``, ``500ms``, ``2m``; milliseconds without a unit)."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert match is not None, value
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 0.001}[match.group(2)]
    return int(match.group(1)) * scale


def test_haproxy_waits_for_a_body_longer_than_terra_does() -> None:
    """With option http-buffer-request HAProxy reads a body (up to its 128 KB buffer) before
    terra sees a byte of it, within `timeout http-request`. Shorter than terra's own
    server.body_timeout_s, it cut with its own 408 a slow upload terra would take."""
    text = (DEPLOY / "haproxy.cfg").read_text()
    assert re.search(r"^\s*option http-buffer-request$", text, re.MULTILINE)
    value = re.search(r"^\s*timeout http-request (.+)$", text, re.MULTILINE)
    assert value is not None
    default = re.fullmatch(r'"\$\{\w+-(\w+)\}"|(\w+)', value.group(1))
    assert default is not None, value.group(1)
    waits_s = haproxy_seconds(default.group(1) or default.group(2))
    terra_s = load_config(DEPLOY / "terra.yaml", environ={}).server.body_timeout_s
    assert waits_s > terra_s, (waits_s, terra_s)


async def test_the_compose_health_check_keeps_a_saturated_front_end_healthy(
    make_fast_server: ServerFactory,
) -> None:
    """Docker runs the front ends' healthcheck command; a failing one marks the container
    unhealthy (Swarm replaces it). A saturated front end (/healthz 503) is busy, not broken:
    replacing it would drop every participant on it. A front end that does not answer
    fails the check. FakeEngine: the model is beside the point."""
    check = compose()["services"]["frontend1"]["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"]

    async def returncode(address: str) -> int:
        code = check[3].replace("127.0.0.1:9001", address)
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
        return await process.wait()

    client = await make_fast_server(stream={"max_participants": 1})
    status, _ = await post_fragment(client, VOICED, lang="en")
    assert status == 200
    assert (await client.get("/healthz")).status == 503  # saturated: participants at the bound
    assert await returncode(f"127.0.0.1:{client.port}") == 0
    assert await returncode(f"127.0.0.1:{free_port()}") != 0  # nobody there
