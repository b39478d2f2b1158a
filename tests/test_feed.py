"""The viewers' feed hub (terra/feed.py), driven directly: ordering, snapshots, resumes
with Last-Event-ID, bounded history and bounded viewer queues."""

from __future__ import annotations

import json
from typing import Any

from terra.config import FeedConfig
from terra.feed import EventKind, FeedEvent, FeedHub
from terra.stream import TextElem


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


def elem(
    combination: str,
    text: str,
    status: str = "progress",
    participant: str = "p1",
    conference: str = "c1",
    translation: str | None = None,
) -> TextElem:
    return TextElem(
        timestamp="2026-11-30T08:00:00.000000",
        timestamp_float=1_700_000_000.0,
        duration=1200,
        conference_id=conference,
        participant_id=participant,
        text=text,
        id=combination,
        post_ids=("a",),
        status=status,
        translation=translation,
    )


def hub(**config: Any) -> FeedHub:
    return FeedHub(FeedConfig(**config), clock=Clock())


def data(event: FeedEvent) -> Any:
    return json.loads(event.data)


def test_events_come_in_order_with_increasing_ids() -> None:
    feed = hub()
    woken: list[int] = []
    viewer, first = feed.attach("c1", None, lambda: woken.append(1))
    assert [e.kind for e in first] == [EventKind.SNAPSHOT]
    feed.participant_joined("c1", "p1", "Anna")
    feed.text(elem("k1", "hello"), "Anna")
    feed.text(elem("k1", "hello"), "Anna")  # unchanged progress: nothing new to show
    feed.text(elem("k1", "hello world"), "Anna")
    feed.text(elem("k1", "Hello, world.", "final", translation="Hello, world."), "Anna")
    events = viewer.take()
    assert [e.kind for e in events] == [
        EventKind.JOINED,
        EventKind.PROGRESS,
        EventKind.PROGRESS,
        EventKind.FINAL,
    ]
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert len(woken) == 1  # at its first event: the sender then takes all there is
    final = data(events[-1])
    assert final["participant_name"] == "Anna"
    assert final["text"] == "Hello, world."
    assert final["translation"] == "Hello, world."
    assert final["status"] == "final"
    assert final["post_ids"] == ["a"]


def test_snapshot_has_participants_finals_and_progress() -> None:
    feed = hub()
    feed.participant_joined("c1", "p1", "Anna")
    feed.participant_joined("c1", "p2", "Boris")
    feed.text(elem("k1", "first", "final"), "Anna")
    feed.text(elem("k2", "growing", participant="p2"), "Boris")
    feed.text(elem("k3", "", "final"), "Anna")  # an empty final: not in the transcript
    _, first = feed.attach("c1", None, lambda: None)
    (snapshot,) = first
    assert snapshot.kind is EventKind.SNAPSHOT
    assert snapshot.seq == 5  # the last event it includes
    state = data(snapshot)
    assert [p["participant_name"] for p in state["participants"]] == ["Anna", "Boris"]
    assert [f["text"] for f in state["finals"]] == ["first"]
    assert [p["text"] for p in state["progress"]] == ["growing"]
    # The final replaces its combination's progress.
    feed.text(elem("k2", "grown", "final", participant="p2"), "Boris")
    _, again = feed.attach("c1", None, lambda: None)
    assert data(again[0])["progress"] == []


def test_resume_with_last_event_id_sends_only_what_was_missed() -> None:
    feed = hub()
    viewer, _ = feed.attach("c1", None, lambda: None)
    feed.participant_joined("c1", "p1", "Anna")
    feed.text(elem("k1", "one", "final"), "Anna")
    seen = viewer.take()
    feed.detach("c1", viewer)
    feed.text(elem("k2", "two", "final"), "Anna")
    feed.text(elem("k3", "three", "final"), "Anna")
    _, missed = feed.attach("c1", seen[-1].id, lambda: None)
    assert [data(e)["text"] for e in missed] == ["two", "three"]
    _, none_missed = feed.attach("c1", missed[-1].id, lambda: None)
    assert none_missed == []


def test_resume_beyond_the_history_or_from_another_server_gets_a_snapshot() -> None:
    feed = hub(history_events=3)
    feed.participant_joined("c1", "p1", "Anna")
    first = feed.get("c1")
    assert first is not None
    old_id = first.history[-1].id
    for n in range(5):
        feed.text(elem(f"k{n}", f"text {n}", "final"), "Anna")
    assert len(first.history) == 3  # bounded
    _, events = feed.attach("c1", old_id, lambda: None)
    assert [e.kind for e in events] == [EventKind.SNAPSHOT]
    assert len(data(events[0])["finals"]) == 5
    # An id from another server run (another epoch), a future one, or garbage: snapshot.
    for bad in ("0-1", f"{old_id.split('-')[0]}-99", "nonsense"):
        _, events = feed.attach("c1", bad, lambda: None)
        assert [e.kind for e in events] == [EventKind.SNAPSHOT]


def test_a_slow_viewer_overflows_alone_and_publishing_never_waits() -> None:
    feed = hub(viewer_queue=10)
    slow, _ = feed.attach("c1", None, lambda: None)
    fast, _ = feed.attach("c1", None, lambda: None)
    feed.participant_joined("c1", "p1", "Anna")
    received: list[FeedEvent] = []
    for n in range(50):
        feed.text(elem(f"k{n}", f"text {n}", "final"), "Anna")
        received.extend(fast.take())  # the fast viewer keeps up
        assert len(slow) <= 10  # bounded whatever happens
    assert slow.overflowed and len(slow) == 0
    assert not fast.overflowed
    assert [e.seq for e in received] == list(range(1, 52))


def test_conferences_are_separate_and_listed_while_active() -> None:
    feed = hub()
    viewer, _ = feed.attach("c1", None, lambda: None)
    feed.participant_joined("c2", "p9", "Zoe")
    feed.text(elem("z1", "secret", "final", participant="p9", conference="c2"), "Zoe")
    assert viewer.take() == []  # nothing of c2 reaches a c1 viewer
    listed = {c["conference_id"]: c for c in feed.conferences()}
    assert set(listed) == {"c1", "c2"}
    assert listed["c2"]["finals"] == 1
    feed.participant_left("c2", "p9")
    assert [c["conference_id"] for c in feed.conferences()] == ["c1"]


def test_finals_kept_are_bounded() -> None:
    feed = hub(max_finals=3)
    for n in range(7):
        feed.text(elem(f"k{n}", f"text {n}", "final"), "Anna")
    state = feed.get("c1")
    assert state is not None
    assert [f["text"] for f in state.finals] == ["text 4", "text 5", "text 6"]
    assert state.finals_dropped == 4


def test_ended_conferences_are_forgotten_after_retention() -> None:
    clock = Clock()
    feed = FeedHub(FeedConfig(retention_s=60), clock=clock)
    feed.participant_joined("c1", "p1", "Anna")
    feed.participant_left("c1", "p1")
    assert feed.get("c1") is not None
    clock.now += 120
    feed.participant_joined("c2", "p1", "Anna")
    feed.participant_left("c2", "p1")  # prunes what ended long ago
    assert feed.get("c1") is None
    assert feed.get("c2") is not None


def test_an_ended_conference_goes_after_retention_with_nobody_else_leaving() -> None:
    """No participant leaves and no viewer detaches after it ended: the feed is still
    forgotten once ``retention_s`` has passed on the hub's clock, when it is looked up or
    a viewer asks for it (it used to stay until one of those events)."""
    clock = Clock()
    feed = FeedHub(FeedConfig(retention_s=60), clock=clock)
    feed.participant_joined("c1", "p1", "Anna")
    feed.participant_joined("c2", "p2", "Boris")
    feed.text(elem("k1", "the first meeting", "final", conference="c1"), "Anna")
    feed.text(elem("k2", "the second meeting", "final", participant="p2", conference="c2"), "Boris")
    feed.participant_left("c1", "p1")
    clock.now += 30
    assert feed.get("c1") is not None  # within retention
    clock.now += 60
    assert feed.get("c1") is None
    assert feed.get("c2") is not None  # in session: kept
    feed.participant_left("c2", "p2")
    clock.now += 120
    _, first = feed.attach("c2", None, lambda: None)
    assert [e.kind for e in first] == [EventKind.SNAPSHOT]
    assert data(first[0])["finals"] == []  # a fresh feed, not the one that had expired


def test_a_viewer_is_woken_at_its_first_event_at_half_full_and_at_overflow() -> None:
    feed = hub(viewer_queue=10)
    woken: list[int] = []
    viewer, _ = feed.attach("c1", None, lambda: woken.append(len(viewer)))
    for n in range(11):
        feed.text(elem(f"k{n}", f"text {n}", "final"), "Anna")
    assert woken == [1, 5, 0]  # first event, half full, overflowed (queue dropped)
    assert viewer.overflowed


def test_a_viewer_resuming_into_a_feed_made_again_after_retention_gets_a_snapshot() -> None:
    """A conference whose feed was forgotten (ended past retention_s) and then started
    again gets a feed whose ids cannot be taken for the old one's: a viewer coming back with
    the old feed's last id gets a snapshot, not the new feed's events after that number."""
    clock = Clock()
    feed = FeedHub(FeedConfig(retention_s=60), clock=clock)
    viewer, _ = feed.attach("c1", None, lambda: None)
    feed.participant_joined("c1", "p1", "Anna")
    for n in range(5):
        feed.text(elem(f"k{n}", f"old {n}", "final"), "Anna")
    last_seen = viewer.take()[-1].id
    feed.detach("c1", viewer)
    feed.participant_left("c1", "p1")
    clock.now += 120
    assert feed.get("c1") is None  # forgotten
    feed.participant_joined("c1", "p1", "Anna")  # the same conference id, again
    for n in range(9):
        feed.text(elem(f"n{n}", f"new {n}", "final"), "Anna")
    _, first = feed.attach("c1", last_seen, lambda: None)
    assert [e.kind for e in first] == [EventKind.SNAPSHOT]
    assert [f["text"] for f in data(first[0])["finals"]] == [f"new {n}" for n in range(9)]
