"""Two front ends on one shared folder (spool, files, job stores): any front end answers for
any job, and each job runs on one of them. Two real apps in this process, on loopback, with
FakeEngine (tests/fakes.py: what these tests check does not depend on the text). The
multi-process kill tests are the deploy tests'; the lease rules are tested in test_jobs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from terra import keys
from terra.api.salute import SALUTE
from terra.audio import SAMPLE_RATE
from terra.jobs.store import JobStatus

from .conftest import SPEECH, TOKEN, ServerFactory, load_clip, post_fragment
from .test_jobs import ended

AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = 1_719_512_467.0


async def two_front_ends(make_fast_server: ServerFactory, tmp_path: Path) -> tuple[Any, Any]:
    files = {"dir": str(tmp_path / "files"), "jobs_dir": str(tmp_path / "file-jobs")}
    a = await make_fast_server(files=files)
    b = await make_fast_server(files=files)
    return a, b


async def test_a_salute_task_created_on_one_front_end_is_answered_by_the_other(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    a, b = await two_front_ends(make_fast_server, tmp_path)
    samples = load_clip(SPEECH / "meetings" / "standup_en" / "maria.flac")[: 4 * SAMPLE_RATE]
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    response = await a.post("/rest/v1/data:upload", data=buffer.getvalue(), headers=AUTH)
    file_id = (await response.json())["result"]["request_file_id"]
    response = await a.post(
        "/rest/v1/speech:async_recognize",
        json={"options": {"audio_encoding": "WAV"}, "request_file_id": file_id},
        headers=AUTH,
    )
    task_id = (await response.json())["result"]["id"]
    done = await ended(task_id, a.app[SALUTE].runner, b.app[SALUTE].runner)
    assert done is not None and done.status is JobStatus.SUCCEEDED
    for front_end in (b, a):
        response = await front_end.get("/rest/v1/task:get", params={"id": task_id}, headers=AUTH)
        body = await response.json()
        assert response.status == 200 and body["result"]["status"] == "DONE", body
        response = await front_end.get(
            "/rest/v1/data:download", params={"response_file_id": task_id}, headers=AUTH
        )
        assert response.status == 200 and isinstance(await response.json(), list)


async def test_minutes_spooled_on_one_front_end_are_compiled_and_served_by_either(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    a, b = await two_front_ends(make_fast_server, tmp_path)
    samples = load_clip(SPEECH / "meetings" / "standup_en" / "maria.flac")[: 6 * SAMPLE_RATE]
    for i, offset in enumerate(range(0, samples.size, 2 * SAMPLE_RATE)):
        piece = samples[offset : offset + 2 * SAMPLE_RATE]
        status, _ = await post_fragment(
            a, piece, conference_id="shared-1", start_time=T0 + i * 2.0, online=False
        )
        assert status == 200
    response = await b.get("/minutes/shared-1", params={"token": TOKEN})
    assert (await response.json())["status"] == "queueplacing"
    response = await a.get("/minutes/shared-1", params={"token": TOKEN})
    assert response.status == 200
    if response.content_type == "application/json":  # not done yet: the same job, not a new one
        assert (await response.json())["status"] == "running"
    done = await ended("shared-1", a.app[keys.MINUTES].runner, b.app[keys.MINUTES].runner)
    assert done is not None and done.status is JobStatus.SUCCEEDED
    bodies = []
    for front_end in (a, b):
        response = await front_end.get("/minutes/shared-1", params={"token": TOKEN})
        assert response.status == 200
        bodies.append(await response.text())
    assert bodies[0] == bodies[1] and "shared-1" in bodies[0]
    assert np.isfinite(done.params["audio_s"]) and done.attempts == 1
