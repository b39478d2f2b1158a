"""Shared fixtures: the real packaged model (loaded once), the real server on loopback
with it (``make_server``) or with FakeEngine (``make_fast_server``, the fast tier), and the
real speech in ../shared/data/speech/."""

from __future__ import annotations

import csv
import functools
import gc
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, settings

from terra.app import create_app
from terra.audio import SAMPLE_RATE, Samples, encode_wav
from terra.config import Config, load_config
from terra.models import resolve_model
from terra.recognizer.engine import WhisperEngine, load_whisper
from terra.recognizer.options import EngineSettings
from terra.recognizer.types import RecognitionEngine
from terra.streamclient import load_audio
from tests.fakes import FakeEngine

if TYPE_CHECKING:
    from tests.test_schemathesis import Fuzz

# How many examples the generated tests run (hypothesis's property tests, and the
# schemathesis fuzz, which reads the profile's name): "dev" by default, the fast tier;
# scripts/test (the whole suite, CI) runs `--hypothesis-profile=ci`, with more examples and
# schemathesis's boundary-coverage phase.
settings.register_profile(
    "dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", settings.get_profile("dev"), max_examples=100)
settings.load_profile("dev")

ROOT = Path(__file__).resolve().parents[1]
SPEECH = Path(os.environ.get("TERRA_SPEECH_DIR", ROOT.parent / "shared" / "data" / "speech"))
TOKEN = "test-token"


@dataclass(frozen=True, slots=True)
class Clip:
    path: Path
    lang: str
    transcript: str


def clip(relative: str) -> Clip:
    with open(SPEECH / "manifest.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["path"] == relative:
                return Clip(SPEECH / relative, row["lang"], row["transcript"])
    raise KeyError(relative)


def load_clip(path: Path) -> Samples:
    """The clip's samples, decoded and resampled once per session (the tests load the same
    few clips dozens of times, 10-20 ms each); each caller gets its own copy to change."""
    return _decoded(path).copy()


@functools.cache
def _decoded(path: Path) -> Samples:
    return load_audio(path)


def normalise(text: str) -> str:
    text = text.lower().replace("ё", "е")
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def cer(reference: str, hypothesis: str) -> float:
    import jiwer

    return float(jiwer.cer(normalise(reference), normalise(hypothesis)))


@pytest.fixture(scope="session")
def engine() -> WhisperEngine:
    """The packaged `base` model, assembled into models/ if needed, loaded once."""
    path = resolve_model("base", ROOT / "models", allow_download=False)
    settings = EngineSettings(model_path=path, cpu_threads=2)
    return WhisperEngine(load_whisper(settings), settings)


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    overrides: dict[str, dict[str, Any]] = {
        "server": {"tokens": [TOKEN]},
        "spool": {"dir": str(tmp_path / "spool")},
        "minutes": {"dir": str(tmp_path / "minutes"), "jobs_dir": str(tmp_path / "jobs")},
        # The file dialects' uploads and jobs too: under the default var/ (in the checkout)
        # they were shared by every test and every run, and each server start took up the
        # unfinished jobs that other tests and earlier runs had left there.
        "files": {"dir": str(tmp_path / "files"), "jobs_dir": str(tmp_path / "file-jobs")},
        # The tests' fragments carry fixed times (2024, or 1970 + 1000 s): no window around
        # the clock (tests/test_hostile_http.py checks the window).
        "stream": {"max_clock_skew_s": 0},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(None, environ={}, overrides=overrides)


ServerFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@asynccontextmanager
async def _servers(engine: RecognitionEngine, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    clients: list[TestClient[Any, Any]] = []

    async def start(**sections: dict[str, Any]) -> TestClient[Any, Any]:
        config = make_config(tmp_path, **sections)
        client: TestClient[Any, Any] = TestClient(
            TestServer(create_app(config, engine=engine), host="127.0.0.1")
        )
        await client.start_server()
        clients.append(client)
        return client

    try:
        yield start
    finally:
        for client in clients:
            await client.close()


@pytest.fixture
async def make_server(engine: WhisperEngine, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start the real app on a loopback port with the shared real engine (the model tier)."""
    async with _servers(engine, tmp_path) as start:
        yield start


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def make_fast_server(fake_engine: FakeEngine, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start the real app on a loopback port with FakeEngine (tests/fakes.py) instead of
    the model: for validation and HTTP contract tests, which do not depend on the text."""
    async with _servers(fake_engine, tmp_path) as start:
        yield start


async def post_fragment(
    client: TestClient[Any, Any],
    samples: Samples | None = None,
    *,
    conference_id: str | None = "conf-1",
    participant_id: str | None = "p-1",
    participant_name: str = "Speaker",
    start_time: float | None = 1_719_512_467.0,
    post_id: str | None = None,
    online: bool = True,
    offline: bool = True,
    lang: str | None = None,
    token: str | None = TOKEN,
    filename: str = "fragment.wav",
    audio_bytes: bytes | None = None,
    extra: dict[str, str] | None = None,
) -> tuple[int, Any]:
    params: dict[str, str] = {
        "participant_name": participant_name,
        "online": "true" if online else "false",
        "offline": "true" if offline else "false",
        "post_id": post_id or str(uuid.uuid4()),
    }
    if conference_id is not None:
        params["conference_id"] = conference_id
    if participant_id is not None:
        params["participant_id"] = participant_id
    if start_time is not None:
        params["timestamp_float"] = repr(start_time)
    if lang:
        params["lang1"] = lang
    params.update(extra or {})
    form = aiohttp.FormData(quote_fields=False)
    if token is not None:
        form.add_field("token", token)
    data = (
        audio_bytes
        if audio_bytes is not None
        else encode_wav(samples if samples is not None else np.zeros(SAMPLE_RATE, np.float32))
    )
    form.add_field("audiofile", data, filename=filename, content_type="application/octet-stream")
    response = await client.post("/process", params=params, data=form)
    return response.status, await response.json()


async def stream_samples(
    client: TestClient[Any, Any],
    samples: Samples,
    *,
    chunk_s: float = 2.0,
    tail_silence_s: float = 2.0,
    start_time: float = 1_719_512_467.0,
    **kwargs: Any,
) -> list[list[dict[str, Any]]]:
    """POST ``samples`` in fragments (as fast as answers come), then silence; every answer."""
    chunk = int(chunk_s * SAMPLE_RATE)
    padded = np.concatenate([samples, np.zeros(int(tail_silence_s * SAMPLE_RATE), np.float32)])
    answers = []
    for offset in range(0, padded.size, chunk):
        status, body = await post_fragment(
            client,
            padded[offset : offset + chunk],
            start_time=start_time + offset / SAMPLE_RATE,
            **kwargs,
        )
        assert status == 200, body
        answers.append(body)
    return answers


def finals(answers: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for answer in answers:
        for elem in answer:
            if elem["status"] == "final":
                assert elem["id"] not in seen, "a final was delivered twice"
                seen[elem["id"]] = elem
    return list(seen.values())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep the fast tier honest: a test that loads the real model (directly or through a
    fixture) must be marked ``model``, so ``pytest -m "not model"`` never loads it."""
    unmarked = [
        item.nodeid
        for item in items
        if "engine" in getattr(item, "fixturenames", ())
        and item.get_closest_marker("model") is None
    ]
    if unmarked:
        raise pytest.UsageError("these load the model, mark them model: " + ", ".join(unmarked))


FUZZ = pytest.StashKey["Fuzz"]()
FUZZ_TEST = "tests/test_schemathesis.py::test_no_server_errors_on_generated_requests"


def pytest_collection_finish(session: pytest.Session) -> None:
    """In the fast tier (the dev profile), start the schemathesis fuzz as soon as its test is
    selected: a subprocess that computes for a while (about 6 s), so it runs beside the
    other tests instead of after them; its test waits for it. The whole suite (the ci
    profile, about 35 s of fuzzing) runs it when its test comes, beside nothing, so it never
    slows the model tests."""
    # What imports and collection made (modules, test items, strategies: about half the
    # objects alive at the end) is kept until the process ends (the little garbage in it
    # too): frozen, out of the cyclic collector's reach, each full collection walks only
    # what the tests made (about 0.5 s less per run).
    gc.freeze()
    if session.config.option.collectonly or settings.get_current_profile_name() != "dev":
        return
    if any(item.nodeid == FUZZ_TEST for item in session.items):
        start_fuzz(session.config)


def start_fuzz(config: pytest.Config) -> Fuzz:
    from tests.test_schemathesis import Fuzz

    config.stash[FUZZ] = fuzz = Fuzz()
    fuzz.start()
    return fuzz


def pytest_sessionfinish(session: pytest.Session) -> None:
    fuzz = session.config.stash.get(FUZZ, None)
    if fuzz is not None:
        fuzz.remove()


@pytest.fixture
def fuzz(request: pytest.FixtureRequest) -> Fuzz:
    """The schemathesis run: the one pytest_collection_finish started, or one started now."""
    started = request.config.stash.get(FUZZ, None)
    return started if started is not None else start_fuzz(request.config)
