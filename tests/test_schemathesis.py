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
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from hypothesis import settings

from terra.api.docs import load_document
from tests.conftest import ROOT, TOKEN, ServerFactory
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


async def test_no_server_errors_on_generated_requests(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    # /translate_to_any past its "disabled" 404: the LibreTranslate stand-in (a stand-in, not
    # LibreTranslate: see its module) behind the http backend.
    translator = await LibreTranslateStandIn().start()
    try:
        await _fuzz(make_fast_server, tmp_path, translator.url)
    finally:
        await translator.close()


async def _fuzz(make_fast_server: ServerFactory, tmp_path: Path, translator_url: str) -> None:
    client = await make_fast_server(
        translate={"enabled": True, "backend": "http", "url": translator_url, "retries": 0},
        files={
            "dir": str(tmp_path / "files"),
            "jobs_dir": str(tmp_path / "file-jobs"),
            # Fetching generated audio URLs fails fast (no network here, or not public).
            "url_timeout_s": 2.0,
            "sync_timeout_s": 1.0,
            "webhook_tries": 1,
        },
    )
    max_examples, phases = PLANS[settings.get_current_profile_name()]
    report = tmp_path / "schemathesis.json"
    config = tmp_path / "schemathesis.toml"
    # Reach the connecte handler past its model check (the path's company/model).
    config.write_text('[parameters]\ncompany = "openai"\nmodel = "whisper"\n', encoding="utf-8")
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
        "TERRA_FUZZ_TOKEN": TOKEN,
        "PYTHONPATH": str(ROOT),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        str(client.make_url("/openapi.json")),
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(max_examples),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--phases",
        phases,
        "--request-timeout",
        "30",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--exclude-path",
        EVENTS,
        cwd=tmp_path,  # its .schemathesis cache stays out of the checkout
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=280)
    text = output.decode("utf-8", errors="replace")
    assert report.exists(), text[-4000:]
    run = json.loads(report.read_text(encoding="utf-8"))
    counts = (
        f"{run['operations']['tested']} operations, "
        f"{run['test_cases']['generated']} test cases, "
        f"{run['test_cases']['with_failures']} with failures"
    )
    print(f"schemathesis: {counts}")
    assert run["complete"], text[-4000:]
    assert run["failures"] == [] and run["errors"] == [], f"{counts}\n{text[-8000:]}"
    assert process.returncode == 0, text[-4000:]
    operations = run["operations"]
    assert operations["tested"] == operations["selected"] and operations["errored"] == 0
    # All but the excluded event stream and GET /openapi.json, the document itself, which
    # schemathesis does not test (20 of the 22 documented operations).
    assert operations["selected"] >= len(documented(load_document())) - 2
