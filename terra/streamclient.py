"""``terra stream``: play audio files to a Terra server the way a conference server does.

Each participant's file is cut into fragments that are POSTed in order to ``/process``
(online, multipart ``token`` + ``audiofile``) at real-time pace or faster; the TextElems
that come back are reported as they change, and the finals are returned at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soundfile as sf

from terra.audio import SAMPLE_RATE, Samples, encode_wav, ms_to_samples, to_mono_16k
from terra.params import ParamError, is_safe_id, validate_id

TextElem = dict[str, Any]
OnElems = Callable[[str, list[TextElem]], None]
OnError = Callable[[str, str], None]

DEFAULT_URL = "http://127.0.0.1:9001"
DEFAULT_TOKEN = "ivcs"
TOKEN_ENV = "TERRA_TOKEN"

# A fragment may wait behind others in the server's recognition queue: allow for it.
_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=10)
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_DETAIL_CHARS = 500


@dataclass(frozen=True, slots=True)
class ParticipantSource:
    """One participant: the id and name sent with every fragment, and the file played."""

    participant_id: str
    name: str
    path: Path


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """How to stream; ``terra stream``'s options have these names (``stream_settings``)."""

    url: str
    conference_id: str
    chunk_ms: int
    speed: float
    token: str
    lang: str | None
    offline: bool
    tail_silence_ms: int
    settle_fragments: int = 10


@dataclass(frozen=True, slots=True, eq=False)
class Fragment:
    index: int
    offset_samples: int
    samples: Samples


class AudioLoadError(ValueError):
    """A participant's file cannot be read as audio."""


class ServerAnswerError(Exception):
    """``/process`` answered with something other than a 200 JSON list."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class StreamError(Exception):
    """One or more participants stopped early; ``finals`` holds what every one received."""

    def __init__(self, failures: dict[str, str], finals: dict[str, list[TextElem]]) -> None:
        lines = "; ".join(f"{pid}: {message}" for pid, message in failures.items())
        super().__init__(f"{len(failures)} participant(s) stopped: {lines}")
        self.failures = failures
        self.finals = finals


# --- pure helpers -------------------------------------------------------------------------


def fragment_filename(conference_id: str, participant_id: str, start: datetime) -> str:
    """The spec's audiofile name: ``{conf}:a-{participant}_{YYYYMMDD}_{HH}_{MM}_{SS}_{us}.wav``."""
    return (
        f"{conference_id}:a-{participant_id}_{start:%Y%m%d}_{start:%H}_{start:%M}_{start:%S}"
        f"_{start.microsecond:06d}.wav"
    )


def cut_fragments(samples: Samples, chunk_ms: int) -> list[Samples]:
    """Consecutive ``chunk_ms`` views of 16 kHz samples; the last, shorter chunk is kept."""
    step = ms_to_samples(chunk_ms)
    if step <= 0:
        raise ValueError(f"chunk_ms must be positive, got {chunk_ms}")
    return [samples[start : start + step] for start in range(0, samples.size, step)]


def plan_fragments(samples: Samples, chunk_ms: int, tail_silence_ms: int) -> list[Fragment]:
    """The file's fragments followed by ``tail_silence_ms`` of silence, cut the same way."""
    silence = np.zeros(ms_to_samples(tail_silence_ms), dtype=np.float32)
    pieces = cut_fragments(samples, chunk_ms) + cut_fragments(silence, chunk_ms)
    fragments: list[Fragment] = []
    offset = 0
    for index, piece in enumerate(pieces):
        fragments.append(Fragment(index=index, offset_samples=offset, samples=piece))
        offset += piece.size
    return fragments


def participant_id_for(name: str) -> str:
    """``name`` if it is a valid id; otherwise its ``[A-Za-z0-9_-]`` form plus a short hash.

    The hash keeps distinct names distinct after sanitising (``Анна`` and ``Пётр`` would
    otherwise both become ``_``).
    """
    if is_safe_id(name):
        return name
    cleaned = _UNSAFE_ID_CHARS.sub("_", name).strip("_")[:100]
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned}-{digest}" if cleaned else digest


def parse_participant(value: str) -> ParticipantSource:
    """``NAME=FILE`` or ``ID:NAME=FILE`` (split at the first ``=`` and then the first ``:``)."""
    who, sep, file = value.partition("=")
    if not sep or not who or not file:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE or ID:NAME=FILE, got {value!r}")
    given_id, colon, name = who.partition(":")
    if not colon:
        given_id, name = "", who
    if not name:
        raise argparse.ArgumentTypeError(f"the participant name is empty in {value!r}")
    if given_id:
        _valid_id("participant id", given_id)
    path = Path(file).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {file}")
    return ParticipantSource(given_id or participant_id_for(name), name, path)


def check_unique_ids(participants: list[ParticipantSource]) -> None:
    seen: set[str] = set()
    for participant in participants:
        if participant.participant_id in seen:
            raise ValueError(
                f"participant id {participant.participant_id!r} is used twice: "
                "give distinct names or ID:NAME=FILE"
            )
        seen.add(participant.participant_id)


class ChangeTracker:
    """Which TextElems of one participant's answers are news: a new final id, or new progress."""

    def __init__(self) -> None:
        self.finals: dict[str, TextElem] = {}
        self._progress: tuple[str, str] | None = None

    def update(self, elems: list[TextElem]) -> list[TextElem]:
        changed: list[TextElem] = []
        for elem in elems:
            elem_id, text = str(elem.get("id", "")), str(elem.get("text", ""))
            if elem.get("status") == "final":
                if elem_id not in self.finals:
                    self.finals[elem_id] = elem
                    changed.append(elem)
            elif (elem_id, text) != self._progress:
                self._progress = (elem_id, text)
                changed.append(elem)
        return changed


# --- audio loading ------------------------------------------------------------------------


def load_audio(path: Path) -> Samples:
    """Any file soundfile reads, down-mixed to mono and resampled to 16 kHz."""
    try:
        with sf.SoundFile(path) as f:
            rate = f.samplerate
            frames = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioLoadError(f"cannot read {path} as audio: {e}") from e
    return to_mono_16k(frames, rate)


# --- HTTP ---------------------------------------------------------------------------------


def _query(
    settings: StreamSettings, participant: ParticipantSource, start: float
) -> dict[str, str]:
    query = {
        "conference_id": settings.conference_id,
        "participant_id": participant.participant_id,
        "participant_name": participant.name,
        "online": "true",
        "offline": "true" if settings.offline else "false",
        "post_id": str(uuid.uuid4()),
        "timestamp_float": f"{start:.6f}",
    }
    if settings.lang:
        query["lang1"] = settings.lang
    return query


def _form(
    settings: StreamSettings, participant: ParticipantSource, fragment: Fragment, start: float
) -> aiohttp.FormData:
    # quote_fields=False: aiohttp would otherwise percent-encode the ':' in the file name.
    form = aiohttp.FormData(quote_fields=False)
    form.add_field("token", settings.token)
    name = fragment_filename(
        settings.conference_id, participant.participant_id, datetime.fromtimestamp(start)
    )
    form.add_field(
        "audiofile",
        encode_wav(fragment.samples),
        filename=name,
        content_type="application/octet-stream",
    )
    return form


async def _error_detail(response: aiohttp.ClientResponse) -> str:
    text = await response.text(errors="replace")
    try:
        body = json.loads(text)
    except ValueError:
        return text[:_MAX_DETAIL_CHARS] or response.reason or ""
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:_MAX_DETAIL_CHARS]
    return json.dumps(body, ensure_ascii=False)[:_MAX_DETAIL_CHARS]


async def post_fragment(
    session: aiohttp.ClientSession,
    settings: StreamSettings,
    participant: ParticipantSource,
    fragment: Fragment,
    start: float,
) -> list[TextElem]:
    """POST one fragment to ``/process`` and return the TextElems of the answer."""
    async with session.post(
        f"{settings.url.rstrip('/')}/process",
        params=_query(settings, participant, start),
        data=_form(settings, participant, fragment, start),
    ) as response:
        if response.status != 200:
            raise ServerAnswerError(response.status, await _error_detail(response))
        body = await response.json(content_type=None)
    if not isinstance(body, list) or not all(isinstance(elem, dict) for elem in body):
        raise ServerAnswerError(200, f"expected a JSON list of TextElems, got {body!r:.200}")
    return body


# --- streaming ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Clock:
    """The session start, as unix seconds (for timestamps) and loop time (for pacing)."""

    wall: float
    loop: float


@dataclass(eq=False)
class _Player:
    """Sends one participant's fragments in order and keeps track of its answers."""

    session: aiohttp.ClientSession
    settings: StreamSettings
    participant: ParticipantSource
    fragments: list[Fragment]
    clock: _Clock
    on_elems: OnElems
    tracker: ChangeTracker = field(default_factory=ChangeTracker)

    async def run(self) -> str | None:
        """Play to the end, or stop at the first failed request and return why."""
        try:
            await self._play()
        except ServerAnswerError as e:
            return str(e)
        except (aiohttp.ClientError, TimeoutError) as e:
            return f"cannot reach {self.settings.url}: {type(e).__name__}: {e}"
        return None

    async def _play(self) -> None:
        elems: list[TextElem] = []
        for fragment in self.fragments:
            elems = await self._send(fragment)
        # A conference server keeps sending while a participant is connected: go on with
        # silence until nothing is left in progress, so the last finals are collected too.
        last = self.fragments[-1] if self.fragments else None
        step = ms_to_samples(self.settings.chunk_ms)
        offset = last.offset_samples + last.samples.size if last else 0
        index = last.index + 1 if last else 0
        for extra in range(self.settings.settle_fragments):
            if not any(e.get("status") == "progress" for e in elems):
                break
            silence = np.zeros(step, dtype=np.float32)
            elems = await self._send(Fragment(index + extra, offset + extra * step, silence))

    async def _send(self, fragment: Fragment) -> list[TextElem]:
        loop = asyncio.get_running_loop()
        speed = self.settings.speed
        offset_s = fragment.offset_samples / SAMPLE_RATE
        if speed > 0:
            delay = self.clock.loop + offset_s / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        elems = await post_fragment(
            self.session, self.settings, self.participant, fragment, self.clock.wall + offset_s
        )
        changed = self.tracker.update(elems)
        if changed:
            self.on_elems(self.participant.participant_id, changed)
        return elems


async def stream_participants(
    settings: StreamSettings,
    participants: list[ParticipantSource],
    *,
    on_elems: OnElems,
    on_error: OnError | None = None,
    session_start: float | None = None,
) -> dict[str, list[TextElem]]:
    """Play every participant's file concurrently; return each participant's finals.

    ``on_elems(participant_id, elems)`` gets only what changed in an answer: finals not
    seen before and progress whose id or text differs from the last one. ``speed`` 1 is real
    time, 0 sends each fragment as soon as the previous answer is in. ``session_start``
    (unix seconds, default now) is the time of the first sample. A participant whose request
    fails stops; the others go on, ``on_error(participant_id, message)`` is told at once, and
    :class:`StreamError` is raised at the end. Finals are keyed by participant id, in order
    of arrival, one per TextElem id. Duplicate participant ids raise ``ValueError`` and an
    unreadable file :class:`AudioLoadError`, both before anything is sent.
    """
    check_unique_ids(participants)
    audio = await asyncio.gather(*(asyncio.to_thread(load_audio, p.path) for p in participants))
    plans = [
        plan_fragments(samples, settings.chunk_ms, settings.tail_silence_ms) for samples in audio
    ]
    failures: dict[str, str] = {}
    clock = _Clock(
        wall=time.time() if session_start is None else session_start,
        loop=asyncio.get_running_loop().time(),
    )

    async def run(player: _Player) -> None:
        message = await player.run()
        if message is not None:
            failures[player.participant.participant_id] = message
            if on_error is not None:
                on_error(player.participant.participant_id, message)

    async with aiohttp.ClientSession(timeout=_REQUEST_TIMEOUT) as session:
        players = [
            _Player(session, settings, participant, plan, clock, on_elems)
            for participant, plan in zip(participants, plans, strict=True)
        ]
        async with asyncio.TaskGroup() as group:
            for player in players:
                group.create_task(run(player))
    finals = {p.participant.participant_id: list(p.tracker.finals.values()) for p in players}
    if failures:
        raise StreamError(failures, finals)
    return finals


# --- command line -------------------------------------------------------------------------


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def _speed(value: str) -> float:
    if value.strip().lower() == "max":
        return 0.0
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"speed must be a number >= 0 or 'max', got {value}")
    return number


def _valid_id(name: str, value: str) -> str:
    """``value`` when it is a valid id (the server's rule, ``params.validate_id``)."""
    try:
        return validate_id(name, value)
    except ParamError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _conference_id(value: str) -> str:
    return _valid_id("conference id", value)


def _token(value: str) -> str:
    return value or os.environ.get(TOKEN_ENV) or DEFAULT_TOKEN


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``terra stream``."""
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server base URL ({DEFAULT_URL})")
    parser.add_argument(
        "--conference",
        required=True,
        type=_conference_id,
        dest="conference_id",
        metavar="ID",
        help="conference_id sent with every fragment",
    )
    parser.add_argument(
        "--participant",
        action="append",
        required=True,
        type=parse_participant,
        dest="participants",
        metavar="[ID:]NAME=FILE",
        help="a participant and the audio file it speaks (repeatable). NAME is the "
        "participant_name; the participant_id is ID if given, else NAME when it already is "
        "[A-Za-z0-9_-], else NAME with other characters replaced by '_' plus a short hash",
    )
    parser.add_argument(
        "--chunk-ms", type=_positive_int, default=2000, help="fragment length in ms (2000)"
    )
    parser.add_argument(
        "--speed",
        type=_speed,
        default=1.0,
        help="1 = real time, 2 = twice as fast, 0 or 'max' = no waiting (1)",
    )
    parser.add_argument(
        "--token",
        type=_token,
        default="",
        help=f"API token (${TOKEN_ENV}, else '{DEFAULT_TOKEN}')",
    )
    parser.add_argument("--lang", default=None, help="lang1 language hint (ru, en, ...)")
    parser.add_argument(
        "--offline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask the server to keep the fragments for the minutes (on)",
    )
    parser.add_argument(
        "--tail-silence-ms",
        type=_non_negative_int,
        default=2000,
        help="silence sent after each file so the last phrase settles (2000)",
    )
    parser.add_argument(
        "--settle-fragments",
        type=_non_negative_int,
        default=10,
        help="at most this many more silent fragments while text is still in progress (10)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print each changed TextElem as one JSON line"
    )


def _clock(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{int(hours):02d}:{int(minutes):02d}:{secs:04.1f}"


class Printer:
    """Prints what changed: one JSON line per TextElem, or ``name  progress|FINAL  text``."""

    def __init__(
        self, participants: list[ParticipantSource], session_start: float, as_json: bool
    ) -> None:
        self.names = {p.participant_id: p.name for p in participants}
        self.width = max((len(p.name) for p in participants), default=0)
        self.session_start = session_start
        self.as_json = as_json

    def elems(self, participant_id: str, elems: list[TextElem]) -> None:
        for elem in elems:
            line = (
                json.dumps(elem, ensure_ascii=False)
                if self.as_json
                else self.line(participant_id, elem)
            )
            if line is not None:
                print(line, flush=True)

    def line(self, participant_id: str, elem: TextElem) -> str | None:
        name = self.names.get(participant_id, participant_id).ljust(self.width)
        text = str(elem.get("text", "")).strip()
        if elem.get("status") != "final":
            return f"{name}  progress  {text}" if text else None
        offset = float(elem.get("timestamp_float", 0.0)) - self.session_start
        duration = float(elem.get("duration", 0)) / 1000
        return f"{name}  FINAL     [{_clock(offset)} +{duration:.1f}s]  {text}"

    def error(self, participant_id: str, message: str) -> None:
        name = self.names.get(participant_id, participant_id)
        print(f"terra stream: {name} stopped: {message}", file=sys.stderr, flush=True)


def stream_settings(args: argparse.Namespace) -> StreamSettings:
    """The settings ``add_stream_arguments``'s options parsed to (named as the fields)."""
    return StreamSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(StreamSettings)}
    )


def run_stream_command(args: argparse.Namespace) -> int:
    """Run ``terra stream``: 0 when every participant played to the end, 1 if one stopped."""
    participants: list[ParticipantSource] = args.participants
    try:
        check_unique_ids(participants)
    except ValueError as e:
        print(f"terra stream: {e}", file=sys.stderr)
        return 2
    session_start = time.time()
    printer = Printer(participants, session_start, args.json)
    try:
        asyncio.run(
            stream_participants(
                stream_settings(args),
                participants,
                on_elems=printer.elems,
                on_error=printer.error,
                session_start=session_start,
            )
        )
    except AudioLoadError as e:
        print(f"terra stream: {e}", file=sys.stderr)
        return 2
    except StreamError:
        return 1  # each failure was printed as it happened
    except KeyboardInterrupt:
        return 130
    return 0
