"""files/transcribe.py's task handling: a file's chunks go to the recognizer at most
``max_in_flight`` at a time, and a chunk that fails fails the file with nothing of it left
running. The recognizer here is a fake ``submit`` whose futures the test resolves (these are
the orchestration's rules, not recognition); the chunks are planned by the real VAD."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from terra.audio import SAMPLE_RATE
from terra.files.transcribe import FileOptions, plan, transcribe
from terra.recognizer.options import DecodeOptions
from terra.recognizer.types import Recognition, RecognitionRequest
from tests.test_overload import VOICED

# Six utterances of 1 s, 4 s apart: six chunks (further apart than chunk_join_ms).
TRACK = np.concatenate([np.concatenate([VOICED, np.zeros(4 * SAMPLE_RATE, np.float32)])] * 6)


async def test_a_failed_chunk_fails_its_file_with_nothing_of_it_left_running() -> None:
    options = FileOptions(decode=DecodeOptions(), max_in_flight=1)
    assert len(plan(TRACK, options)) == 6
    loop = asyncio.get_running_loop()
    submitted: list[asyncio.Future[Recognition | None]] = []
    first = asyncio.Event()

    def submit(request: RecognitionRequest) -> asyncio.Future[Recognition | None]:
        future: asyncio.Future[Recognition | None] = loop.create_future()
        submitted.append(future)
        first.set()
        return future

    job = asyncio.create_task(transcribe([TRACK], options, submit))
    await first.wait()
    submitted[0].set_exception(RuntimeError("recognizer failed: a poison chunk"))
    with pytest.raises(RuntimeError, match="poison chunk"):
        await job
    # The file failed: none of its tasks is still waiting for a turn (they used to go on
    # sending the rest of the file to the recognizer), and a chunk that was sent as the
    # failure came in was let go (its future cancelled, nobody waits for it).
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []
    assert len(submitted) <= options.max_in_flight + 1
    assert all(f.cancelled() for f in submitted[1:])
