"""The conference feed: what viewers of a conference see, with bounded history. Pure.

``FeedHub`` is the ``LiveListener`` that the live service calls where a participant joins,
where progress or final text is set and where a session expires. It keeps, per conference:
the participants, the finals so far (bounded), each open combination's newest progress,
and the last ``history_events`` events with increasing ids. A viewer connecting gets a
snapshot of that state; a viewer reconnecting with ``Last-Event-ID`` gets the events it
missed when they are still in the history (else a fresh snapshot, so nothing is lost).

Each viewer has a bounded queue. Publishing never waits for a viewer: a viewer whose queue
is full is marked ``overflowed`` (its queue dropped) and the route closes its connection;
the browser's EventSource reconnects with ``Last-Event-ID`` and resumes. Each event is
serialised once, and its JSON string shared by every viewer's queue.

Nothing here knows about HTTP, threads or asyncio: a viewer is woken through a callback.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from terra.config import FeedConfig
from terra.stream import TextElem


class EventKind(Enum):
    SNAPSHOT = "snapshot"
    PROGRESS = "progress"
    FINAL = "final"
    JOINED = "participant_joined"
    LEFT = "participant_left"


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One event as it goes out: ``id`` is ``{epoch}-{n}``, ``data`` its JSON text (one
    line), ``frame`` the Server-Sent Events bytes, encoded once for every viewer."""

    id: str
    seq: int
    kind: EventKind
    data: str
    frame: bytes = b""

    @classmethod
    def make(cls, epoch: str, seq: int, kind: EventKind, payload: dict[str, object]) -> FeedEvent:
        event_id = f"{epoch}-{seq}"
        data = json.dumps(payload, ensure_ascii=False)  # no raw newline: one data line
        frame = f"id: {event_id}\nevent: {kind.value}\ndata: {data}\n\n".encode()
        return cls(event_id, seq, kind, data, frame)


@dataclass(slots=True)
class Participant:
    participant_id: str
    name: str
    joined_at: float
    active: bool = True

    def to_json(self) -> dict[str, object]:
        return {
            "participant_id": self.participant_id,
            "participant_name": self.name,
            "joined_at": round(self.joined_at, 3),
            "active": self.active,
        }


class Viewer:
    """One connected viewer: a bounded queue of events not sent yet. ``wake`` is called when
    the queue gets its first event, when it is half full, and when it overflows: the sender
    may wait a little after the first to write several events at once."""

    def __init__(self, limit: int, wake: Callable[[], None]) -> None:
        self._queue: deque[FeedEvent] = deque()
        self._limit = limit
        self._wake = wake
        self.overflowed = False

    def push(self, event: FeedEvent) -> None:
        if self.overflowed:
            return
        if len(self._queue) >= self._limit:
            # Fell behind: drop what it holds; it reconnects and resumes with Last-Event-ID.
            self.overflowed = True
            self._queue.clear()
            self._wake()
            return
        self._queue.append(event)
        if len(self._queue) == 1 or len(self._queue) == self.half:
            self._wake()

    @property
    def half(self) -> int:
        return max(1, self._limit // 2)

    def take(self) -> list[FeedEvent]:
        events = list(self._queue)
        self._queue.clear()
        return events

    def __len__(self) -> int:
        return len(self._queue)


@dataclass(slots=True)
class ConferenceFeed:
    conference_id: str
    epoch: str
    history_limit: int
    finals_limit: int
    started_at: float
    seq: int = 0
    history: deque[FeedEvent] = field(default_factory=deque)
    participants: dict[str, Participant] = field(default_factory=dict)
    finals: deque[dict[str, object]] = field(default_factory=deque)
    finals_dropped: int = 0
    # Each combination's newest progress (by combination id) until its final comes.
    progress: dict[str, dict[str, object]] = field(default_factory=dict)
    viewers: set[Viewer] = field(default_factory=set)
    last_event_at: float = 0.0
    ended_at: float | None = None

    def publish(self, kind: EventKind, payload: dict[str, object], now: float) -> FeedEvent:
        self.seq += 1
        event = FeedEvent.make(self.epoch, self.seq, kind, payload)
        self.history.append(event)
        while len(self.history) > self.history_limit:
            self.history.popleft()
        self.last_event_at = now
        for viewer in self.viewers:
            viewer.push(event)
        return event

    def snapshot(self) -> dict[str, object]:
        return {
            "conference_id": self.conference_id,
            "participants": [p.to_json() for p in self.participants.values()],
            "finals": list(self.finals),
            "finals_dropped": self.finals_dropped,
            "progress": list(self.progress.values()),
        }

    def snapshot_event(self) -> FeedEvent:
        """The state now, with the id of the last event it includes."""
        return FeedEvent.make(self.epoch, self.seq, EventKind.SNAPSHOT, self.snapshot())

    def since(self, last_event_id: str | None) -> list[FeedEvent] | None:
        """The events after ``last_event_id``, or None when they are not all in the history
        (another epoch, or older than what is kept): the viewer then needs a snapshot."""
        if not last_event_id:
            return None
        epoch, _, number = last_event_id.rpartition("-")
        if epoch != self.epoch or not number.isdigit():
            return None
        seq = int(number)
        if seq > self.seq:
            return None
        oldest = self.history[0].seq if self.history else self.seq + 1
        if seq < oldest - 1:
            return None
        return [e for e in self.history if e.seq > seq]

    def summary(self) -> dict[str, object]:
        return {
            "conference_id": self.conference_id,
            "started_at": round(self.started_at, 3),
            "last_event_at": round(self.last_event_at, 3),
            "participants": [p.to_json() for p in self.participants.values() if p.active],
            "finals": len(self.finals) + self.finals_dropped,
            "viewers": len(self.viewers),
        }


def _text_payload(elem: TextElem, name: str) -> dict[str, object]:
    return {**elem.to_json(), "participant_name": name}


class FeedHub:
    """Every conference's feed. Called on the event loop only (by the live service and the
    viewer routes); ``clock`` gives wall-clock seconds."""

    def __init__(self, config: FeedConfig, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self._epoch = format(int(clock() * 1000), "x")  # a restarted server starts a new one
        self._feeds_made = 0  # and a feed made again (after retention) a new one of its own
        self._feeds: OrderedDict[str, ConferenceFeed] = OrderedDict()

    # -- the LiveListener side -----------------------------------------------------------
    def participant_joined(self, conference_id: str, participant_id: str, name: str) -> None:
        now = self._clock()
        feed = self._feed(conference_id, now)
        feed.ended_at = None
        known = feed.participants.get(participant_id)
        if known is not None and known.active and known.name == name:
            return
        participant = Participant(participant_id, name, now)
        feed.participants[participant_id] = participant
        feed.publish(
            EventKind.JOINED, {"conference_id": conference_id, **participant.to_json()}, now
        )

    def participant_left(self, conference_id: str, participant_id: str) -> None:
        feed = self._feeds.get(conference_id)
        if feed is None or participant_id not in feed.participants:
            return
        now = self._clock()
        participant = feed.participants[participant_id]
        participant.active = False
        for key in [k for k, v in feed.progress.items() if v["participant_id"] == participant_id]:
            del feed.progress[key]
        feed.publish(EventKind.LEFT, {"conference_id": conference_id, **participant.to_json()}, now)
        if not any(p.active for p in feed.participants.values()):
            feed.ended_at = now
        self._prune(now)

    def text(self, elem: TextElem, name: str) -> None:
        """A combination's progress text changed, or its final settled (even an empty one:
        a viewer drops that combination's progress line)."""
        now = self._clock()
        feed = self._feed(elem.conference_id, now)
        if elem.participant_id not in feed.participants:
            feed.participants[elem.participant_id] = Participant(elem.participant_id, name, now)
        payload = _text_payload(elem, name)
        if elem.status == "final":
            feed.progress.pop(elem.id, None)
            if elem.text.strip():
                feed.finals.append(payload)
                while len(feed.finals) > feed.finals_limit:
                    feed.finals.popleft()
                    feed.finals_dropped += 1
            feed.publish(EventKind.FINAL, payload, now)
            return
        previous = feed.progress.get(elem.id)
        if previous is not None and previous["text"] == elem.text:
            return  # nothing a viewer would see changed
        feed.progress[elem.id] = payload
        feed.publish(EventKind.PROGRESS, payload, now)

    # -- the viewer side -----------------------------------------------------------------
    def get(self, conference_id: str) -> ConferenceFeed | None:
        self._prune(self._clock())
        return self._feeds.get(conference_id)

    def conferences(self) -> list[dict[str, object]]:
        """The conferences with a participant still in session, newest activity first."""
        active = [f for f in self._feeds.values() if f.ended_at is None]
        active.sort(key=lambda f: f.last_event_at, reverse=True)
        return [f.summary() for f in active]

    def attach(
        self, conference_id: str, last_event_id: str | None, wake: Callable[[], None]
    ) -> tuple[Viewer, list[FeedEvent]]:
        """Register a viewer; returns it with what to send first: the missed events when
        ``last_event_id`` can be resumed from, else a snapshot."""
        feed = self._feed(conference_id, self._clock())
        viewer = Viewer(self._config.viewer_queue, wake)
        feed.viewers.add(viewer)
        missed = feed.since(last_event_id)
        return viewer, missed if missed is not None else [feed.snapshot_event()]

    def detach(self, conference_id: str, viewer: Viewer) -> None:
        feed = self._feeds.get(conference_id)
        if feed is not None:
            feed.viewers.discard(viewer)
        self._prune(self._clock())

    # -- bookkeeping ---------------------------------------------------------------------
    def _feed(self, conference_id: str, now: float) -> ConferenceFeed:
        feed = self._feeds.get(conference_id)
        if feed is None or feed.ended_at is not None:
            # Not on the path of a conference in session (its every text): a new or ended
            # one, whose feed may have outlived retention_s with nobody leaving since.
            self._prune(now)
            feed = self._feeds.get(conference_id)
        if feed is None:
            self._feeds_made += 1
            feed = ConferenceFeed(
                conference_id,
                f"{self._epoch}.{self._feeds_made}",
                self._config.history_events,
                self._config.max_finals,
                started_at=now,
                last_event_at=now,
            )
            self._feeds[conference_id] = feed
        self._feeds.move_to_end(conference_id)
        return feed

    def _prune(self, now: float) -> None:
        """Forget ended conferences nobody watches, after ``retention_s`` (their minutes stay
        on disk), and the oldest ended ones beyond ``max_conferences``. Run where a
        participant leaves, a viewer detaches, a feed is looked up (``get``) and a new or
        ended conference's feed is fed or attached to: no timer of its own."""
        ended = [f for f in self._feeds.values() if f.ended_at is not None and not f.viewers]
        for feed in ended:
            assert feed.ended_at is not None
            if now - feed.ended_at > self._config.retention_s:
                del self._feeds[feed.conference_id]
        excess = len(self._feeds) - self._config.max_conferences
        for feed in list(self._feeds.values()):
            if excess <= 0:
                break
            if feed.ended_at is not None and not feed.viewers:
                del self._feeds[feed.conference_id]
                excess -= 1
