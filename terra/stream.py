"""One participant's live stream: fragments in time order, VAD, and combinations. Pure.

A combination (накопительная комбинация) opens when the VAD triggers on speech, grows
frame by frame, and closes on a pause, at the maximum length, or at a gap in the timeline.
A closed combination waits for its final text, then waits to be delivered; delivery order
is combination order. Nothing here knows about HTTP, threads or the recognizer.
"""

from __future__ import annotations

import bisect
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from zoneinfo import ZoneInfo

import numpy as np

from terra.audio import SAMPLE_RATE, Samples, ms_to_samples, samples_to_ms
from terra.config import StreamConfig, zone_of
from terra.recognizer.agreement import Agreement
from terra.vad import FrameVad


@dataclass(frozen=True, slots=True)
class Fragment:
    post_id: str | None
    start_time: float  # unix seconds of the first sample
    samples: Samples


class CombinationState(Enum):
    OPEN = "open"
    CLOSED = "closed"  # audio complete, final text not yet known
    FINAL = "final"  # final text known, not yet delivered


class CloseReason(Enum):
    PAUSE = "pause"
    MAX_LENGTH = "max_length"
    GAP = "gap"
    IDLE = "idle"


@dataclass(frozen=True, slots=True)
class TextElem:
    """One element of the Terra answer (ArrayOfTextElem)."""

    timestamp: str
    timestamp_float: float
    duration: int
    conference_id: str
    participant_id: str
    text: str
    id: str
    post_ids: tuple[str, ...]
    status: str
    translation: str | None = None  # live English captions, only when asked for

    def to_json(self) -> dict[str, object]:
        extra: dict[str, object] = {}
        if self.translation is not None:
            extra["translation"] = self.translation
        return {
            "timestamp": self.timestamp,
            "timestamp_float": self.timestamp_float,
            "duration": self.duration,
            "conference_id": self.conference_id,
            "participant_id": self.participant_id,
            "text": self.text,
            "id": self.id,
            "post_ids": list(self.post_ids),
            "status": self.status,
            **extra,
        }


@dataclass(slots=True)
class Combination:
    """A growing stretch of one participant's speech. Owned and mutated by its stream only."""

    id: str
    start_time: float
    buffer: Samples
    length: int = 0
    speech_samples: int = 0
    post_ids: list[str] = field(default_factory=list)
    state: CombinationState = CombinationState.OPEN
    close_reason: CloseReason | None = None
    version: int = 0  # bumps with every appended frame
    text: str = ""
    text_version: int = -1
    # The post_ids of the fragments whose audio the pass that made ``text`` included: a
    # progress TextElem lists these only, so a client knows which fragments its text covers.
    text_post_ids: tuple[str, ...] = ()
    requested_version: int = -1
    # Its hypothesis, commit and trim (made by the live service at its first progress pass).
    agreement: Agreement | None = None
    translation: str | None = None

    @property
    def audio(self) -> Samples:
        return self.buffer[: self.length]

    @property
    def duration_ms(self) -> int:
        return samples_to_ms(self.length)

    def add_post_id(self, post_id: str | None) -> None:
        if post_id and post_id not in self.post_ids:
            self.post_ids.append(post_id)


@dataclass(frozen=True, slots=True)
class StreamUpdate:
    closed: tuple[Combination, ...] = ()
    held: bool = False
    late: bool = False
    ahead: bool = False  # far ahead of the timeline: set aside until the next one confirms it


def format_timestamp(unix_seconds: float, zone: ZoneInfo | None) -> str:
    """ISO text of a time as the sender's file names carry it: local, no offset."""
    moment = (
        datetime.fromtimestamp(unix_seconds, zone) if zone else datetime.fromtimestamp(unix_seconds)
    )
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds")


class ParticipantStream:
    """Turns one participant's fragments into combinations."""

    def __init__(
        self,
        config: StreamConfig,
        conference_id: str,
        participant_id: str,
    ) -> None:
        self.config = config
        self.conference_id = conference_id
        self.participant_id = participant_id
        self._zone = zone_of(config.timezone)
        self._vad = FrameVad(config.vad_aggressiveness, config.vad_frame_ms)
        self._frame = self._vad.frame_samples
        self._max_samples = ms_to_samples(config.max_combination_ms)
        self._pause_samples = ms_to_samples(config.pause_ms)
        self._gap_samples = ms_to_samples(config.gap_ms)
        self._min_speech = ms_to_samples(config.min_speech_ms)
        trigger_frames = max(1, ms_to_samples(config.trigger_window_ms) // self._frame)
        self._trigger: deque[bool] = deque(maxlen=trigger_frames)
        self._pre_roll: deque[tuple[Samples, str | None]] = deque(
            maxlen=max(1, ms_to_samples(config.pre_roll_ms) // self._frame)
        )
        self._origin: float | None = None
        self._timeline_end = 0  # samples since origin that have been fed to the VAD
        self._held: list[tuple[int, float, Fragment]] = []  # (position, arrived_at, fragment)
        self._max_jump = ms_to_samples(config.max_jump_ms)
        # A fragment far ahead of the timeline, set aside: (position, fragment).
        self._jump: tuple[int, Fragment] | None = None
        self.open: Combination | None = None
        self._trailing_silence = 0
        self._last_pause_end = 0  # offset in the open combination just after a non-speech frame
        self.outbox: list[Combination] = []  # closed combinations, in order
        self.last_fragment_at: float | None = None

    # -- time ----------------------------------------------------------------------------
    def _position(self, start_time: float) -> int:
        assert self._origin is not None
        return int(round((start_time - self._origin) * SAMPLE_RATE))

    def _time_at(self, position: int) -> float:
        assert self._origin is not None
        return self._origin + position / SAMPLE_RATE

    # -- fragments -----------------------------------------------------------------------
    def add(self, fragment: Fragment, now: float) -> StreamUpdate:
        """Feed one fragment. ``now`` is a monotonic clock reading, used only for holding."""
        if self._origin is None:
            self._origin = fragment.start_time
        position = self._position(fragment.start_time)
        if position < self._timeline_end - self._gap_samples:
            return StreamUpdate(late=True)  # not the open combination's audio: no reason to wait
        self.last_fragment_at = now
        jumped: list[Combination] = []
        if position > self._timeline_end + self._max_jump:
            # One fragment stamped far ahead (a bad clock, a hostile client) must not move the
            # timeline and leave every later fragment "late": it is set aside, and fed only
            # when the next fragment continues it (a real jump, e.g. after a long mute).
            jump, self._jump = self._jump, None
            if jump is None or not self._continues(jump, position):
                self._jump = (position, fragment)
                return StreamUpdate(ahead=True)
            self._held.clear()
            jumped = self._feed(*jump)
        if position > self._timeline_end + self._gap_samples and not self._held:
            # Ahead of the timeline: maybe an earlier fragment is still in flight.
            self._hold(position, now, fragment)
            return StreamUpdate(held=True)
        if self._held and position > self._held[0][0]:
            self._hold(position, now, fragment)
            return StreamUpdate(held=True)
        closed = jumped + self._feed(position, fragment)
        closed.extend(self._drain_held(force_before=None))
        return StreamUpdate(closed=tuple(closed))

    def _continues(self, jump: tuple[int, Fragment], position: int) -> bool:
        start, fragment = jump
        end = start + fragment.samples.size
        return end - self._gap_samples <= position <= end + self._gap_samples

    def _hold(self, position: int, now: float, fragment: Fragment) -> None:
        keys = [p for p, _, _ in self._held]
        self._held.insert(bisect.bisect(keys, position), (position, now, fragment))

    def _drain_held(self, force_before: float | None) -> list[Combination]:
        closed: list[Combination] = []
        while self._held:
            position, arrived, fragment = self._held[0]
            contiguous = position <= self._timeline_end + self._gap_samples
            expired = force_before is not None and arrived <= force_before
            if not (contiguous or expired):
                break
            self._held.pop(0)
            closed.extend(self._feed(position, fragment))
        return closed

    def holds(self, fragment_post_id: str | None) -> bool:
        return any(f.post_id == fragment_post_id for _, _, f in self._held)

    def covered(self, post_id: str) -> bool | None:
        """Whether text of a combination holding ``post_id`` covers it; None when no
        combination waiting for delivery holds it (silence, noise, or already delivered)."""
        holders = [c for c in self._live() if post_id in c.post_ids]
        if not holders:
            return None
        return any(post_id in c.text_post_ids for c in holders)

    def _live(self) -> list[Combination]:
        return [*self.outbox, *([self.open] if self.open is not None else [])]

    def _feed(self, position: int, fragment: Fragment) -> list[Combination]:
        closed: list[Combination] = []
        if position > self._timeline_end + self._gap_samples:
            closed.extend(self._close_open(CloseReason.GAP))
            self._vad.reset()
            self._trigger.clear()
            self._pre_roll.clear()
            self._timeline_end = position
        audio, flags = self._vad.frames(fragment.samples)
        frame = self._frame
        for index, voiced in enumerate(flags):
            chunk = audio[index * frame : (index + 1) * frame]
            self._timeline_end += chunk.size  # the end of the frame being handled
            closed.extend(self._on_frame(chunk, bool(voiced), fragment.post_id))
        return closed

    def _on_frame(self, chunk: Samples, voiced: bool, post_id: str | None) -> list[Combination]:
        if self.open is None:
            # A copy: a view would keep the whole fragment (and its decode) alive (#11 row 5).
            self._pre_roll.append((chunk.copy(), post_id))
            self._trigger.append(voiced)
            needed = self.config.trigger_ratio * (self._trigger.maxlen or 1)
            if sum(self._trigger) >= needed:
                self._open_with_pre_roll()
            return []
        combination = self.open
        self._append(combination, chunk, post_id)
        if voiced:
            combination.speech_samples += chunk.size
            self._trailing_silence = 0
        else:
            self._trailing_silence += chunk.size
            self._last_pause_end = combination.length
        if self._trailing_silence >= self._pause_samples:
            return self._close_open(CloseReason.PAUSE)
        if combination.length + chunk.size > self._max_samples:  # the next frame won't fit
            return self._split_at_max()
        return []

    def _new_combination(self, start_position: int) -> Combination:
        return Combination(
            id=str(uuid.uuid4()),
            start_time=self._time_at(start_position),
            buffer=np.zeros(self._max_samples + self._frame, dtype=np.float32),
        )

    def _open_with_pre_roll(self) -> None:
        pre_roll = list(self._pre_roll)
        combination = self._new_combination(self._timeline_end - sum(c.size for c, _ in pre_roll))
        for chunk, post_id in pre_roll:
            self._append(combination, chunk, post_id)
        combination.speech_samples = sum(self._trigger) * self._frame
        self._pre_roll.clear()
        self._trigger.clear()
        self._trailing_silence = 0
        self._last_pause_end = 0
        self.open = combination

    def _append(self, combination: Combination, chunk: Samples, post_id: str | None) -> None:
        end = combination.length + chunk.size
        combination.buffer[combination.length : end] = chunk
        combination.length = end
        combination.version += 1
        combination.add_post_id(post_id)

    def _close_open(self, reason: CloseReason) -> list[Combination]:
        combination = self.open
        if combination is None:
            return []
        self.open = None
        self._trigger.clear()
        self._pre_roll.clear()
        if reason is CloseReason.PAUSE:
            # Keep a short tail of the pause: the recognizer adds its own silent margin.
            keep = min(self._trailing_silence, ms_to_samples(200))
            combination.length -= self._trailing_silence - keep
        self._trailing_silence = 0
        combination.close_reason = reason
        if combination.speech_samples < self._min_speech:
            return []
        combination.state = CombinationState.CLOSED
        self.outbox.append(combination)
        return [combination]

    def _split_at_max(self) -> list[Combination]:
        """Close at the maximum length, cutting at the latest pause in its last 5 s if any (not
        before its committed words)."""
        combination = self.open
        assert combination is not None
        cut = combination.length
        if self._last_pause_end > combination.length - ms_to_samples(5_000):
            cut = self._last_pause_end
        if combination.agreement is not None:
            # Never before committed words: they are this combination's text (its final keeps
            # them), so their audio must not go on into the next one to be said again.
            cut = max(cut, combination.agreement.committed_samples)
        carry = combination.buffer[cut : combination.length].copy()
        carry_post = combination.post_ids[-1] if combination.post_ids else None
        combination.length = cut
        self._trailing_silence = 0
        closed = self._close_open(CloseReason.MAX_LENGTH)
        start = self._timeline_end - carry.size
        successor = self._new_combination(start)
        if carry.size:
            self._append(successor, carry, carry_post)
            successor.speech_samples = carry.size
        self.open = successor
        self._last_pause_end = 0
        return closed

    # -- timers --------------------------------------------------------------------------
    def tick(self, now: float, reorder_ms: int) -> list[Combination]:
        """Release fragments held too long, and close a combination whose sender went quiet."""
        closed = self._drain_held(force_before=now - reorder_ms / 1000)
        idle_s = self.config.idle_close_ms / 1000
        if (
            self.open is not None
            and self.last_fragment_at is not None
            and not self._held
            and now - self.last_fragment_at >= idle_s
        ):
            closed.extend(self._close_open(CloseReason.IDLE))
        return closed

    # -- results -------------------------------------------------------------------------
    def set_progress(
        self,
        combination: Combination,
        version: int,
        text: str,
        post_ids: tuple[str, ...] = (),
    ) -> None:
        """The text of a progress pass made over the audio of ``version``, which included the
        fragments ``post_ids``."""
        if combination.state is CombinationState.FINAL or version < combination.text_version:
            return
        combination.text = text
        combination.text_version = version
        combination.text_post_ids = post_ids

    def set_final(
        self, combination: Combination, text: str, translation: str | None = None
    ) -> None:
        combination.translation = translation
        combination.text = text
        combination.text_version = combination.version
        combination.text_post_ids = tuple(combination.post_ids)
        combination.state = CombinationState.FINAL

    def elem(self, combination: Combination, status: str) -> TextElem:
        """The combination as a TextElem with ``status`` (``progress`` or ``final``). A final
        lists all of its combination's post_ids; a progress only those its text was made from."""
        return TextElem(
            timestamp=format_timestamp(combination.start_time, self._zone),
            timestamp_float=round(combination.start_time, 6),
            duration=combination.duration_ms,
            conference_id=self.conference_id,
            participant_id=self.participant_id,
            text=combination.text,
            id=combination.id,
            post_ids=combination.text_post_ids,
            status=status,
            translation=combination.translation,
        )

    def take_answer(self) -> list[TextElem]:
        """Undelivered finals (in order, removed once taken), then what is still in progress.

        A combination whose final is not known yet is listed as ``progress`` with its newest
        text, even an empty one: the client sees that text is still coming.
        """
        answer: list[TextElem] = []
        while self.outbox and self.outbox[0].state is CombinationState.FINAL:
            combination = self.outbox.pop(0)
            if combination.text.strip():
                answer.append(self.elem(combination, "final"))
        pending = list(self.outbox)
        if self.open is not None:
            pending.append(self.open)
        answer.extend(self.elem(c, "progress") for c in pending)
        return answer

    @property
    def pending_finals(self) -> int:
        return sum(1 for c in self.outbox if c.state is CombinationState.CLOSED)
