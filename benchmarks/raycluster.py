"""A real Ray cluster on this machine, for the tests and the scale benchmark.

Each node is a ``ray start --block`` process in a session of its own (``setsid``), with its
own CPU count; everything Ray starts for that node (raylet, workers, the Serve replicas)
stays in the node's session, so the cluster is found and ended by session id, never by
process name (other Ray clusters may run on the same machine). The dashboard is off, and
the workers run at the same priority as everything else (Ray's default is nice 15).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BIN = Path(sys.executable).parent
START_S = 300.0  # a cold start on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return -1


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def cpu_seconds_of(pid: int) -> float:
    """User plus system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LocalRayCluster:
    """``node_cpus[0]`` CPUs on the head, one more node per further entry."""

    def __init__(self, workdir: Path, node_cpus: Sequence[int]) -> None:
        self.workdir = workdir
        self.node_cpus = tuple(node_cpus)
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's socket paths must stay short: a temp dir of its own under /tmp.
        self._ray_tmp = f"/tmp/terra-ray-{os.getpid()}-{self.port}"
        self.nodes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for index, cpus in enumerate(self.node_cpus):
            args = [
                f"--num-cpus={cpus}",
                "--node-ip-address=127.0.0.1",
                f"--dashboard-agent-listen-port={_free_port()}",
            ]
            if index == 0:
                args += [
                    "--head",
                    f"--port={self.port}",
                    "--include-dashboard=false",
                    f"--ray-client-server-port={_free_port()}",
                    f"--temp-dir={self._ray_tmp}",
                    "--disable-usage-stats",
                ]
            else:
                args.append(f"--address={self.address}")
            log = self.workdir / f"ray-node-{index}.log"
            with log.open("wb") as out:
                node = subprocess.Popen(
                    [str(BIN / "ray"), "start", "--block", *args],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    # Ray runs its workers at nice 15 by default: on a shared machine the
                    # replicas would yield to every other process (the front end, the client).
                    env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0"},
                    start_new_session=True,
                )
            self.nodes.append(node)
            self._wait_started(node, log)

    @staticmethod
    def _wait_started(node: subprocess.Popen[bytes], log: Path) -> None:
        deadline = time.monotonic() + START_S
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if node.poll() is not None:
                raise RuntimeError(f"ray start failed: {log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{log.name}: Ray did not start in {START_S} s")
            time.sleep(0.2)

    @property
    def sessions(self) -> list[int]:
        return [node.pid for node in self.nodes]

    def replica_pids(self, app_name: str) -> list[int]:
        """The Serve replicas of ``app_name`` (Ray titles them ray::ServeReplica:APP:...)."""
        found = []
        sessions = set(self.sessions)
        for pid in _pids():
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if f"ServeReplica:{app_name}:" in title and _sid(pid) in sessions:
                found.append(pid)
        return sorted(found)

    def cpu_seconds(self) -> float:
        """CPU time of every process of the cluster so far (live processes only)."""
        sessions = set(self.sessions)
        return sum(cpu_seconds_of(pid) for pid in _pids() if _sid(pid) in sessions)

    def stop(self) -> None:
        """End every process of the cluster's sessions: SIGTERM, then SIGKILL."""
        sessions = set(self.sessions)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [pid for pid in _pids() if _sid(pid) in sessions]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while any(_sid(pid) in sessions for pid in pids) and time.monotonic() < deadline:
                for node in self.nodes:  # reap the nodes: a zombie keeps its session id
                    node.poll()
                time.sleep(0.2)
        for node in self.nodes:
            node.wait(timeout=30)
        self.nodes.clear()
