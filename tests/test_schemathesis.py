"""schemathesis against the served OpenAPI document: the real app on a loopback port, every
documented operation fuzzed (examples, boundary coverage, random and malformed data) with the
valid token (tests/schemathesis_hooks.py), and not one 5xx answer.

How much it generates follows the hypothesis profile (tests/conftest.py): the fast tier
("dev") runs each operation's examples and two random cases per operation (a smoke run,
about 6 s); the whole suite ("ci", scripts/test) adds the boundary-coverage phase (about 700
cases), the stateful phase (the documented links: upload, then recognize, then get) and 25
random cases per operation (about a minute on 2 cores).

The engine is tests/fakes.py's FakeEngine, a fake: this is about HTTP validation (bodies,
parameters, headers, ids), which does not depend on what the model would hear. The seed is
fixed.

The run is a subprocess that mostly computes (its requests take well under a second),
against a server on its own event loop in a thread. In the fast tier it starts when
collection ends (tests/conftest.py, ``pytest_collection_finish``) and goes on beside the
other tests; in the whole suite it starts when this test comes. The test waits for its end
and checks its report.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer
from hypothesis import settings

from terra.api.docs import load_document
from terra.app import create_app
from tests.conftest import ROOT, TOKEN, make_config
from tests.fakes import FakeEngine
from tests.libretranslate_standin import LibreTranslateStandIn
from tests.test_openapi import documented

# Per profile: random cases per operation, and the phases run.
PLANS = {
    "dev": (2, "examples,fuzzing"),
    "ci": (25, "examples,coverage,fuzzing,stateful"),
}
SEED = 20261130
# The event stream stays open while its conference lives: not a request/response to fuzz
# (tests/test_feed.py covers it).
EVENTS = "/conferences/{conference_id}/events"
TIMEOUT_S = 280


class Fuzz:
    """One schemathesis run: the real app (with FakeEngine) and the LibreTranslate stand-in
    (a stand-in, not LibreTranslate: see its module) served by an event loop of their own in
    a thread, and the schemathesis command line against them in a subprocess."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="terra-fuzz-"))
        self.report = self.folder / "schemathesis.json"
        self.output = self.folder / "schemathesis.out"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fuzz-server")
        self._servers: list[Any] = []
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._thread.start()
        url = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(60)
        max_examples, phases = PLANS[settings.get_current_profile_name()]
        config = self.folder / "schemathesis.toml"
        # Reach the connecte handler past its model check (the path's company/model).
        config.write_text('[parameters]\ncompany = "openai"\nmodel = "whisper"\n', "utf-8")
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
            "TERRA_FUZZ_TOKEN": TOKEN,
            "PYTHONPATH": str(ROOT),
        }
        command = [
            sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", url,
            "--checks", "not_a_server_error", "--max-examples", str(max_examples),
            "--seed", str(SEED), "--workers", "1", "--phases", phases,
            "--request-timeout", "30", "--report", "json", "--report-json-path", str(self.report),
            "--exclude-path", EVENTS,
        ]  # fmt: skip
        with open(self.output, "wb") as output:
            # cwd: its .schemathesis cache stays out of the checkout
            self._process = subprocess.Popen(
                command, cwd=self.folder, env=env, stdout=output, stderr=subprocess.STDOUT
            )

    async def _serve(self) -> str:
        translator = await LibreTranslateStandIn().start()
        self._servers.append(translator)
        config = make_config(
            self.folder,
            translate={"enabled": True, "backend": "http", "url": translator.url, "retries": 0},
            files={
                "dir": str(self.folder / "files"),
                "jobs_dir": str(self.folder / "file-jobs"),
                # Fetching generated audio URLs fails fast (no network here, or not public).
                "url_timeout_s": 2.0,
                "sync_timeout_s": 1.0,
                "webhook_tries": 1,
            },
        )
        server = TestServer(create_app(config, engine=FakeEngine()), host="127.0.0.1")
        await server.start_server()
        self._servers.append(server)
        return str(server.make_url("/openapi.json"))

    def finish(self) -> tuple[int, str]:
        """Wait for the run to end; its exit status and output."""
        assert self._process is not None, "the fuzz was not started"
        try:
            code = self._process.wait(TIMEOUT_S)
        finally:
            self.stop()
        return code, self.output.read_text("utf-8", errors="replace")

    def stop(self) -> None:
        """End the run (if it still goes on) and the servers; idempotent."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(60)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(60)
            self._loop.close()

    async def _close(self) -> None:
        for server in reversed(self._servers):
            await server.close()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def test_no_server_errors_on_generated_requests(fuzz: Fuzz) -> None:
    code, text = fuzz.finish()
    assert fuzz.report.exists(), text[-4000:]
    run = json.loads(fuzz.report.read_text(encoding="utf-8"))
    counts = (
        f"{run['operations']['tested']} operations, "
        f"{run['test_cases']['generated']} test cases, "
        f"{run['test_cases']['with_failures']} with failures"
    )
    print(f"schemathesis: {counts}")
    assert run["complete"], text[-4000:]
    assert run["failures"] == [] and run["errors"] == [], f"{counts}\n{text[-8000:]}"
    assert code == 0, text[-4000:]
    operations = run["operations"]
    assert operations["tested"] == operations["selected"] and operations["errored"] == 0
    # All but the excluded event stream and GET /openapi.json, the document itself, which
    # schemathesis does not test (20 of the 22 documented operations).
    assert operations["selected"] >= len(documented(load_document())) - 2
