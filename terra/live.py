"""The live service: participant sessions, spooling, and recognition of their combinations.

Runs on the event loop and never blocks it: spooling goes to a thread, recognition to the
scheduler. Each participant's fragments are handled under that participant's lock, so a
post_id sent twice is counted once, and two participants never share state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from terra.audio import SAMPLE_RATE, Samples, encode_wav, samples_to_ms
from terra.config import RecognizerConfig, StreamConfig
from terra.metrics import Metrics
from terra.params import FragmentParams
from terra.recognizer.agreement import Agreement
from terra.recognizer.backend import Recognizer
from terra.recognizer.options import DecodePasses
from terra.recognizer.types import Priority, Recognition, RecognitionRequest, Vocabulary
from terra.spool import Spool, post_key
from terra.stream import (
    Combination,
    CombinationState,
    Fragment,
    ParticipantStream,
    TextElem,
)
from terra.tasks import cancel_and_wait

log = logging.getLogger(__name__)

REORDER_MS = 400
TICK_S = 0.1


class LiveListener(Protocol):
    """Told what viewers of a conference see (``feed.FeedHub``). Called on the event loop;
    must not block or raise."""

    def participant_joined(self, conference_id: str, participant_id: str, name: str) -> None: ...

    def participant_left(self, conference_id: str, participant_id: str) -> None: ...

    def text(self, elem: TextElem, name: str) -> None:
        """A combination's progress text was set, or its final (status ``final``)."""


class _NoListener:
    def participant_joined(self, conference_id: str, participant_id: str, name: str) -> None:
        pass

    def participant_left(self, conference_id: str, participant_id: str) -> None:
        pass

    def text(self, elem: TextElem, name: str) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _Pass:
    """What a progress request was made from."""

    version: int
    offset: int  # where its audio starts in the combination (the commit point then)
    audio_samples: int
    post_ids: tuple[str, ...]  # the fragments whose audio it included


async def _outcome(
    future: asyncio.Future[Recognition | None], failure: str, session: Session
) -> Recognition | None:
    """The recognition, or None when it failed (logged with ``failure``): a failed pass
    keeps the text the participant already has. A request the recognizer cancelled (both
    backends cancel those still queued when they stop) failed too; only a cancellation of
    the task awaiting it (the live service stopping) goes on."""
    try:
        return await future
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.error("%s: its request was cancelled", failure, extra=session.ids)
        return None
    except Exception:
        log.exception(failure, extra=session.ids)
        return None


def _settled(result: Recognition | None) -> asyncio.Future[Recognition | None]:
    future: asyncio.Future[Recognition | None] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


@dataclass(slots=True)
class Session:
    stream: ParticipantStream
    name: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    seen_posts: set[str] = field(default_factory=set)
    unspooled_posts: set[str] = field(default_factory=set)  # seen with offline=false only
    language: str | None = None
    captions: str | None = None
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)
    last_progress_at: float = 0.0
    last_seen: float = 0.0
    # Fragments waiting for text that covers them: (combination id, its version, arrival).
    uncovered: list[tuple[str, int, float]] = field(default_factory=list)
    closed_at: dict[str, float] = field(default_factory=dict)
    # Each open combination's progress request, queued or running (at most one each).
    progress_requests: dict[str, asyncio.Future[Recognition | None]] = field(default_factory=dict)
    # POSTs waiting for text: each is woken when this participant's text changes.
    waiters: set[asyncio.Event] = field(default_factory=set)

    def notify(self) -> None:
        for event in self.waiters:
            event.set()

    @property
    def ids(self) -> dict[str, str]:
        return {
            "conference_id": self.stream.conference_id,
            "participant_id": self.stream.participant_id,
        }


class LiveService:
    def __init__(
        self,
        stream_config: StreamConfig,
        recognizer_config: RecognizerConfig,
        decode: DecodePasses,
        scheduler: Recognizer,
        spool: Spool,
        metrics: Metrics,
        vocabulary: Vocabulary,
        listener: LiveListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``decode``: the progress, final and caption passes' options (``decode_passes``).
        ``vocabulary`` is used for its token helpers only; recognition goes through the
        scheduler. ``listener`` is told of joins, leaves and text (the viewers' feed).
        ``clock`` (seconds, monotonic) times everything here: ticks, waits, idle sessions."""
        self._clock = clock
        self._stream_config = stream_config
        self._recognizer_config = recognizer_config
        self._decode = decode
        self._scheduler = scheduler
        self._spool = spool
        self._metrics = metrics
        self._vocabulary = vocabulary
        self._listener: LiveListener = listener if listener is not None else _NoListener()
        self._sessions: dict[tuple[str, str], Session] = {}
        # New participants holding a place (``admit``) until their session exists: the
        # number of their requests under way.
        self._joining: dict[tuple[str, str], int] = {}
        self._ticker: asyncio.Task[None] | None = None

    # -- sessions ------------------------------------------------------------------------
    async def _session(self, conference_id: str, participant_id: str, name: str) -> Session:
        key = (conference_id, participant_id)
        session = self._sessions.get(key)
        if session is None:
            seen = await asyncio.to_thread(
                self._spool.known_post_keys, conference_id, participant_id
            )
            session = self._sessions.get(key)  # another request may have created it meanwhile
            if session is None:
                stream = ParticipantStream(self._stream_config, conference_id, participant_id)
                session = Session(
                    stream=stream, name=name, seen_posts=seen, last_seen=self._clock()
                )
                self._sessions[key] = session
                self._joining.pop(key, None)  # its place is the session now
                self._metrics.active_participants.set(len(self._sessions))
                self._listener.participant_joined(conference_id, participant_id, name)
        if name and session.name != name:  # a renamed participant
            session.name = name
            self._listener.participant_joined(conference_id, participant_id, name)
        return session

    def admit(
        self, conference_id: str, participant_id: str
    ) -> contextlib.AbstractContextManager[object] | None:
        """A place for a fragment of this participant, held for its request (``with``), or
        None when there is none. A known participant always has one; a new one while the
        participants and the new ones holding a place are fewer than
        ``stream.max_participants``. A new one holds its place from here until its session
        exists, so first requests under way at once never pass the bound, and gives it back
        if its request ends before (a fragment refused, a client gone)."""
        key = (conference_id, participant_id)
        if key in self._sessions:
            return contextlib.nullcontext()
        if (
            key not in self._joining
            and len(self._sessions) + len(self._joining) >= self._stream_config.max_participants
        ):
            return None
        self._joining[key] = self._joining.get(key, 0) + 1
        place = contextlib.ExitStack()
        place.callback(self._give_back_place, key)
        return place

    def _give_back_place(self, key: tuple[str, str]) -> None:
        count = self._joining.pop(key, 0) - 1  # absent once its session exists
        if count > 0:
            self._joining[key] = count

    @property
    def saturated(self) -> bool:
        """The box should take no new conferences: the recognizer does not keep up with the
        finals, or the participants are at their bound."""
        return (
            self._scheduler.saturated or len(self._sessions) >= self._stream_config.max_participants
        )

    # -- the POST path -------------------------------------------------------------------
    async def process(self, fragment: FragmentParams, samples: Samples) -> list[TextElem]:
        """Spool (if asked), feed the stream, and answer with the participant's TextElems."""
        session = await self._session(
            fragment.conference_id, fragment.participant_id, fragment.participant_name
        )
        session.last_seen = self._clock()
        if fragment.language and session.language != fragment.language:
            session.language = fragment.language
        session.captions = fragment.captions
        async with session.lock:
            key = post_key(fragment.post_id) if fragment.post_id is not None else None
            duplicate = key is not None and key in session.seen_posts
            # A post seen live only (offline=false) and sent again with offline=true is
            # spooled now: a 200 with offline on means the fragment is on disk.
            if fragment.offline and (not duplicate or key in session.unspooled_posts):
                # The spool is shared by every front end: a post another one stored (affinity
                # lost, a client's retry) is on disk, and not counted twice.
                if await asyncio.to_thread(self._spool_fragment, fragment, samples):
                    self._metrics.spooled_fragments.inc()
                else:
                    duplicate = True
                session.unspooled_posts.discard(key or "")
            elif key is not None and not duplicate and not fragment.offline:
                session.unspooled_posts.add(key)
            if key is not None:
                session.seen_posts.add(key)
            if duplicate:
                self._metrics.duplicate_fragments.inc()
                log.info("duplicate post_id %s ignored", fragment.post_id, extra=session.ids)
            else:
                self._metrics.fragments.inc()
                self._metrics.fragment_audio_seconds.inc(samples.size / SAMPLE_RATE)
                if fragment.online:  # online=false: store only, no recognizer time
                    self._feed(session, fragment, samples)
        if not fragment.online:
            return []
        await self._wait_for_text(session, fragment.post_id)
        return session.stream.take_answer()

    def _feed(self, session: Session, fragment: FragmentParams, samples: Samples) -> None:
        """Add a fragment to the live stream (held there if an earlier one is missing)."""
        update = session.stream.add(
            Fragment(fragment.post_id, fragment.start_time, samples),
            now=self._clock(),
        )
        if update.ahead:
            log.warning(
                "fragment %s is far ahead of the live timeline: set aside until the next "
                "fragment continues it",
                fragment.post_id,
                extra=session.ids,
            )
        if update.late:
            log.warning(
                "fragment %s is older than the live timeline: spooled only",
                fragment.post_id,
                extra=session.ids,
            )
        if session.stream.open is not None and not update.held:
            opened = session.stream.open
            session.uncovered.append((opened.id, opened.version, self._clock()))
        self._dispatch_finals(session, update.closed)
        self._request_progress(session)

    def _agreement(self, combination: Combination) -> Agreement:
        if combination.agreement is None:
            combination.agreement = Agreement(self._recognizer_config.agreement)
        return combination.agreement

    def _prompt(self, text: str) -> tuple[int, ...]:
        return self._vocabulary.encode_text(text) if text.strip() else ()

    def _spool_fragment(self, fragment: FragmentParams, samples: Samples) -> bool:
        """Store the fragment; False when the spool has this post already."""
        stored = self._spool.write(
            fragment.conference_id,
            fragment.participant_id,
            fragment.participant_name,
            fragment.start_time,
            samples_to_ms(samples.size),
            fragment.post_id,
            fragment.language,
            encode_wav(samples),
        )
        return stored is not None

    async def _wait_for_text(self, session: Session, post_id: str | None) -> None:
        """Wait, at most ``answer_wait_ms``, until the answer has text made from this
        fragment's audio (a TextElem lists its post_id); for a fragment no combination holds
        (silence, noise), until the finals in flight are known."""
        deadline = self._clock() + self._stream_config.answer_wait_ms / 1000
        while not self._answered(session, post_id):
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            event = asyncio.Event()
            session.waiters.add(event)
            try:
                # Woken on every text change; the tick bounds a wait on what is not notified.
                await asyncio.wait_for(event.wait(), min(remaining, TICK_S))
            except TimeoutError:
                pass
            finally:
                session.waiters.discard(event)

    @staticmethod
    def _answered(session: Session, post_id: str | None) -> bool:
        stream = session.stream
        if post_id is None:
            return not any(not t.done() for t in session.in_flight)
        if stream.holds(post_id):
            return False
        covered = stream.covered(post_id)
        if covered is None:
            return stream.pending_finals == 0
        return covered

    # -- recognition ---------------------------------------------------------------------
    def _track(self, session: Session, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        session.in_flight.add(task)
        task.add_done_callback(session.in_flight.discard)

    def _observe_coverage(
        self, session: Session, combination: Combination, version: int | None
    ) -> None:
        """Text latency: from a fragment's arrival to text made from audio that includes it."""
        now = self._clock()
        keep = []
        for entry in session.uncovered:
            combination_id, needed, arrived = entry
            if combination_id == combination.id and (version is None or needed <= version):
                self._metrics.text_latency.labels("progress").observe(now - arrived)
            else:
                keep.append(entry)
        session.uncovered = keep
        if version is None and combination.id in session.closed_at:
            closed = session.closed_at.pop(combination.id)
            self._metrics.text_latency.labels("final").observe(now - closed)

    def _dispatch_finals(
        self, session: Session, closed: tuple[Combination, ...] | list[Combination]
    ) -> None:
        for combination in closed:
            session.closed_at[combination.id] = self._clock()
            # A progress pass still waiting for this combination would be work for nothing:
            # its final is asked for now, over the same audio.
            self._scheduler.withdraw(combination.id)
            # A long combination's final decodes only the audio after the last committed
            # word (with the committed words as context), a short one's all of it; no
            # progress pass commits from now on.
            agreement = self._agreement(combination)
            start = agreement.close(combination.length)
            owed = self._scheduler.owed_final_s  # the audio of the finals waiting
            if owed >= self._recognizer_config.max_owed_final_s:
                # The bound on owed finals: this one is settled now, from the text the live
                # passes made, with no model call, so what an overload leaves owed (memory,
                # and the drain once it stops) stays bounded. With `offline` on its audio is
                # in the spool, for the minutes.
                self._metrics.unrecognized_finals.inc()
                self._track(
                    session,
                    self._settle_final(
                        session,
                        combination,
                        agreement,
                        _settled(None),
                        # No translation either; an English speaker's caption is its text.
                        _settled(None)
                        if session.captions == "en" and session.language != "en"
                        else None,
                    ),
                )
                continue
            # Overload: past overload_finals_s owed, this one is decoded greedy (all its
            # audio still): the owed work drains sooner once the load stops.
            overloaded = owed >= self._recognizer_config.overload_finals_s
            if overloaded:
                self._metrics.overload_finals.inc()
            request = RecognitionRequest(
                audio=combination.audio[start:],
                language=session.language,
                priority=Priority.FINAL,
                options=self._decode.overload_final if overloaded else self._decode.final,
                prompt_tokens=self._prompt(agreement.final_prompt()),
            )
            future = self._scheduler.submit(request)
            translation = None
            if session.captions == "en" and session.language != "en":
                # Whisper's translate task over the whole combination, batched with the rest.
                translation = self._scheduler.submit(
                    RecognitionRequest(
                        audio=combination.audio,
                        language=session.language,
                        priority=Priority.FINAL,
                        options=(
                            self._decode.overload_translate
                            if overloaded
                            else self._decode.translate
                        ),
                    )
                )
            self._track(
                session, self._settle_final(session, combination, agreement, future, translation)
            )

    async def _settle_final(
        self,
        session: Session,
        combination: Combination,
        agreement: Agreement,
        future: asyncio.Future[Recognition | None],
        translation: asyncio.Future[Recognition | None] | None = None,
    ) -> None:
        result = await _outcome(
            future, "final recognition failed; keeping the progress text", session
        )
        english: str | None = None
        if translation is not None:
            translated = await _outcome(translation, "caption translation failed", session)
            english = translated.text if translated is not None else ""
        if result is None:
            text = combination.text
        else:
            text = agreement.final_text(result.text)
            self._learn_language(session, result)
        if english is None and session.captions == "en":
            english = text  # an English speaker's caption is the text itself
        session.stream.set_final(combination, text, english)
        self._listener.text(session.stream.elem(combination, "final"), session.name)
        session.notify()
        self._observe_coverage(session, combination, None)
        if text.strip():
            self._metrics.finals.inc()
        log.info(
            "final %s (%d ms, %s, %d characters)",
            combination.id,
            combination.duration_ms,
            combination.close_reason.value if combination.close_reason else "?",
            len(text),
            extra=session.ids,
        )
        log.debug("final %s: %s", combination.id, text, extra=session.ids)  # transcripts: DEBUG

    def _progress_interval(self) -> float:
        load = self._scheduler.depth / max(self._recognizer_config.max_batch_size, 1)
        return self._stream_config.progress_min_interval_ms / 1000 * max(1.0, load)

    def _request_progress(self, session: Session) -> None:
        combination = session.stream.open
        if combination is None or combination.version <= combination.requested_version:
            return
        if combination.id in session.progress_requests and not self._scheduler.is_waiting(
            combination.id
        ):
            # Its pass is running: a second one beside it would decode the same audio and be
            # stale when the first commits. The first one's settling asks again.
            return
        now = self._clock()
        if now - session.last_progress_at < self._progress_interval():
            return
        if self._scheduler.queued_finals >= self._recognizer_config.max_queued_finals:
            return  # overload: the finals take the whole recognizer (the text is not lost)
        session.last_progress_at = now
        combination.requested_version = combination.version
        agreement = self._agreement(combination)
        request = RecognitionRequest(
            audio=combination.audio[agreement.committed_samples :],
            language=session.language,
            priority=Priority.PROGRESS,
            options=self._decode.progress,  # with word times when commits are on
            prompt_tokens=self._prompt(agreement.prompt()),
        )
        future = self._scheduler.submit(request, coalesce_key=combination.id)
        session.progress_requests[combination.id] = future
        pass_ = _Pass(
            combination.version,
            agreement.committed_samples,
            request.audio.size,
            tuple(combination.post_ids),
        )
        self._track(session, self._settle_progress(session, combination, pass_, future))

    async def _settle_progress(
        self,
        session: Session,
        combination: Combination,
        pass_: _Pass,
        future: asyncio.Future[Recognition | None],
    ) -> None:
        try:
            result = await _outcome(future, "progress recognition failed", session)
        finally:
            if session.progress_requests.get(combination.id) is future:  # not superseded
                del session.progress_requests[combination.id]
        if result is None:
            return
        self._settle_progress_result(session, combination, pass_, result)
        self._request_progress(session)  # audio that came while it ran

    def _settle_progress_result(
        self, session: Session, combination: Combination, pass_: _Pass, result: Recognition
    ) -> None:
        self._learn_language(session, result)
        agreement = self._agreement(combination)
        if not agreement.settle(pass_.offset, pass_.audio_samples, result):
            return  # a newer pass committed meanwhile: this one's text is stale
        session.stream.set_progress(combination, pass_.version, agreement.text, pass_.post_ids)
        session.notify()
        if (
            combination.state is not CombinationState.FINAL
            and combination.text_version == pass_.version
        ):
            self._listener.text(session.stream.elem(combination, "progress"), session.name)
        log.debug(
            "pass over %.2f s: committed %d words, %.2f s uncommitted",
            pass_.audio_samples / SAMPLE_RATE,
            len(agreement.committed),
            agreement.uncommitted_s,
            extra=session.ids,
        )
        self._observe_coverage(session, combination, pass_.version)

    def _learn_language(self, session: Session, result: Recognition) -> None:
        if session.language is None and (
            result.language_probability >= self._decode.progress.rules.language_confidence
        ):
            session.language = result.language
            log.info(
                "language locked to %s (p=%.2f)",
                result.language,
                result.language_probability,
                extra=session.ids,
            )

    # -- timers --------------------------------------------------------------------------
    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.tick()

    def tick(self) -> None:
        """What time alone decides, at the clock's present reading: held fragments released,
        quiet combinations closed (their finals asked for), progress asked for, idle sessions
        expired. The ticker calls it every TICK_S; a test may call it after moving its clock."""
        now = self._clock()
        for key, session in list(self._sessions.items()):
            if session.lock.locked():
                continue
            # Fragments of a combination dropped as noise are never covered: forget them.
            session.uncovered = [e for e in session.uncovered if now - e[2] < 60.0]
            closed = session.stream.tick(now, REORDER_MS)
            if closed:
                self._dispatch_finals(session, closed)
            self._request_progress(session)
            idle = now - session.last_seen
            if idle > self._stream_config.session_ttl_s and not session.in_flight:
                self._sessions.pop(key, None)
                self._metrics.active_participants.set(len(self._sessions))
                self._listener.participant_left(*key)
                log.info("session expired after %.0f s idle", idle, extra=session.ids)

    async def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever(), name="live-ticker")

    async def stop(self) -> None:
        if self._ticker is not None:
            await cancel_and_wait([self._ticker])
        await cancel_and_wait([t for s in self._sessions.values() for t in s.in_flight])

    def snapshot(self) -> dict[str, int | bool]:
        return {
            "participants": len(self._sessions),
            "pending_finals": sum(s.stream.pending_finals for s in self._sessions.values()),
            "saturated": self.saturated,
        }
