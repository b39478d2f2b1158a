"""Schemathesis hooks for tests/test_schemathesis.py (loaded by ``SCHEMATHESIS_HOOKS``).

Every generated request carries the test server's valid token (a Bearer header on the
SaluteSpeech and connecte routes, ``?token=`` and the body's ``token`` elsewhere), so the
fuzzing reaches the handlers behind the token check instead of stopping at 401. On
``/process``, half of the cases (those whose generated audio has an even length) get a real
0.5 s WAV, and ids and a time the case left out are filled in (the spec's clients always send
them), so hostile values of the other fields reach the live path past decoding.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import schemathesis
from schemathesis import Case
from schemathesis.hooks import HookContext

from terra.audio import SAMPLE_RATE, encode_wav

TOKEN = os.environ.get("TERRA_FUZZ_TOKEN", "")
FILLED: dict[str, Any] = {
    "conference_id": "fuzz-conference",
    "participant_id": "fuzz-participant",
    "timestamp_float": lambda: f"{time.time():.6f}",
}
BEARER_PREFIXES = ("/rest/v1/", "/api/v1/")
WAV = encode_wav((0.1 * np.sin(np.arange(SAMPLE_RATE // 2) * 0.05)).astype(np.float32))


@schemathesis.hook
def map_case(context: HookContext, case: Case[Any]) -> Case[Any]:
    path = case.operation.path
    if path.startswith(BEARER_PREFIXES):
        case.headers["Authorization"] = f"Bearer {TOKEN}"
    else:
        case.query["token"] = TOKEN
        if isinstance(case.body, dict) and "token" in case.body:
            case.body["token"] = TOKEN
    if path == "/process" and isinstance(case.body, dict):
        body: dict[str, Any] = case.body
        audio = body.get("audiofile")
        if isinstance(audio, bytes | str) and len(audio) % 2 == 0:
            body["audiofile"] = WAV
        for name, value in FILLED.items():
            if name not in body and name not in case.query:
                case.query[name] = value() if callable(value) else value
    return case
