"""Minutes without the model: chunking and phrases, the job store, the formats against the
XSD, the compiler on real speech with a stand-in recognizer, and the service's durability."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from lxml import etree

from terra.audio import SAMPLE_RATE, Samples, encode_wav, samples_to_ms
from terra.chunking import plan_chunks, speech_regions, split_long
from terra.config import Config, JobsConfig, MinutesConfig
from terra.jobs import JobStatus, JobStore, new_job
from terra.minutes.compiler import (
    CompileResult,
    MinutesCompiler,
    NothingSpooled,
    Progress,
    in_thread,
    looks_wrong,
    phrases_of,
)
from terra.minutes.formats import render, to_json, to_md, to_srt, to_vtt, to_xml, validate_xml
from terra.minutes.service import MinutesService, State
from terra.minutes.types import Minutes, Phrase, Speaker
from terra.recognizer.options import decode_passes
from terra.recognizer.types import (
    DropReason,
    Priority,
    Recognition,
    RecognitionRequest,
    Segment,
    Word,
)
from terra.retry import Submit
from terra.spool import Spool

from .conftest import SPEECH, load_clip

T0 = 1_719_512_467.0


def flags(pattern: str) -> np.ndarray:
    return np.array([c == "#" for c in pattern], dtype=np.bool_)


def recognition(text: str, segments: tuple[Segment, ...] = (), **kwargs: object) -> Recognition:
    values: dict[str, object] = {
        "text": text,
        "tokens": (1, 2, 3),
        "language": "ru",
        "language_probability": 0.99,
        "no_speech_prob": 0.01,
        "avg_logprob": -0.2,
        "compression_ratio": 1.2,
        "window_s": 10.0,
        "segments": segments,
    }
    values.update(kwargs)
    return Recognition(**values)  # type: ignore[arg-type]


# -- chunking and phrases ------------------------------------------------------------------


def test_speech_regions_join_short_pauses_drop_blips_and_pad() -> None:
    #              0         1         2         3
    #              0123456789012345678901234567890123
    pattern = flags("..####.##........#.......#####....")
    regions = speech_regions(pattern, min_speech=3, min_silence=3, pad=1)
    # 2-9 joined across a 1-frame pause, the lone frame at 17 dropped, 25-30 kept; padded.
    assert regions == [(1, 10), (24, 31)]
    assert speech_regions(flags(""), 1, 1, 1) == []
    # padding stops in the middle of a pause: two utterances stay two
    assert speech_regions(flags("###...###"), 1, 2, 2) == [(0, 4), (4, 9)]


def test_split_long_cuts_in_the_longest_pause() -> None:
    pattern = flags("#" * 12 + "...." + "#" * 4 + "." + "#" * 9)
    pieces = split_long(0, pattern.size, pattern, max_frames=20)
    assert pieces[0] == (0, 14)  # the middle of the 4-frame pause at 12..16
    assert pieces[-1][1] == pattern.size
    assert all(b - a <= 20 for a, b in pieces)
    hard = split_long(0, 50, flags("#" * 50), max_frames=20)
    assert hard == [(0, 20), (20, 40), (40, 50)]


def test_plan_chunks_joins_close_regions_up_to_the_limit() -> None:
    pattern = flags("#" * 100)
    chunks = plan_chunks([(0, 10), (15, 30), (60, 70), (72, 95)], pattern, 40, 10, 30)
    assert [(s, e) for s, e, _ in chunks] == [(0, 30), (60, 95)]
    # each joined chunk falls back to its regions
    assert chunks[0][2] == ((0, 10), (15, 30))
    # a chunk of one short region has no fallback; a long one is split in two
    single = plan_chunks([(0, 20)], pattern, 40, 10, 30)
    assert single[0][2] == ()
    long = plan_chunks([(0, 36)], flags("#" * 20 + ".." + "#" * 14), 40, 10, 30)
    assert long[0][2] == ((0, 21), (21, 36))


def test_phrases_cut_at_pauses_and_sentence_ends() -> None:
    words = (
        Word(0.1, 0.5, " Доброе", 0.9),
        Word(0.5, 0.9, " утро.", 0.9),
        Word(1.3, 1.8, " Начнём", 0.9),  # 0.4 s after a sentence end: new phrase
        Word(1.9, 2.3, " планёрку", 0.9),
        Word(4.0, 4.5, " итак", 0.9),  # 1.7 s pause: new phrase
    )
    result = recognition("...", (Segment(0.1, 4.5, "...", words),))
    phrases = phrases_of(result, "anna", 10.0, 15.0, phrase_pause_s=1.0, sentence_pause_s=0.3)
    assert [p.text for p in phrases] == ["Доброе утро.", "Начнём планёрку", "итак"]
    assert phrases[0].start_s == pytest.approx(10.1) and phrases[0].end_s == pytest.approx(10.9)
    assert phrases[2].start_s == pytest.approx(14.0)
    assert {p.participant_id for p in phrases} == {"anna"} and phrases[0].language == "ru"


def test_phrases_without_words_or_segments() -> None:
    segments = (Segment(0.0, 2.0, " Раз."), Segment(3.5, 5.0, " Два."))
    by_segment = phrases_of(recognition("Раз. Два.", segments), "p", 1.0, 7.0, 1.0, 0.3)
    assert [(p.start_s, p.end_s, p.text) for p in by_segment] == [
        (1.0, 3.0, "Раз."),
        (4.5, 6.0, "Два."),
    ]
    plain = phrases_of(recognition(" Всё вместе"), "p", 1.0, 7.0, 1.0, 0.3)
    assert [(p.start_s, p.end_s, p.text) for p in plain] == [(1.0, 7.0, "Всё вместе")]
    assert phrases_of(recognition(""), "p", 0.0, 1.0, 1.0, 0.3) == []


def test_looks_wrong_catches_loops_not_speech() -> None:
    loop = "Доброе утро, коллеги. Давайте начнем. Доброе утро, коллеги. Доброе утро, коллеги."
    assert looks_wrong(recognition(loop), 2.0)
    assert looks_wrong(recognition("ok", compression_ratio=2.5), 2.0)
    assert looks_wrong(recognition("ok", avg_logprob=-1.5), 2.0)
    fine = "Доброе утро, коллеги. Давайте начнём планёрку, у нас сегодня три вопроса."
    assert not looks_wrong(recognition(fine), 2.0)
    assert not looks_wrong(
        recognition("", dropped_reason=DropReason.NO_SPEECH, avg_logprob=-3), 2.0
    )


# -- formats -------------------------------------------------------------------------------


def sample_minutes() -> Minutes:
    return Minutes(
        conference_id="trash6bb3f34f-b29a",
        start_time=T0,
        end_time=T0 + 65.5,
        participants=(
            Speaker("p-1", "Анна <Иванова> & Co", "ru"),
            Speaker("p-2", 'John "JJ" Smith', None),
        ),
        phrases=(
            Phrase("p-1", 0.35, 2.35, "Доброе утро, коллеги! <b>Скобки</b> & *звёзды*", "ru"),
            Phrase("p-2", 1.0, 1.0, "Overlapping, at the same time.", "en"),
            Phrase("p-1", 61.2, 65.5, "Спасибо.", "ru"),
        ),
        audio_s=131.0,
        generated_at=T0 + 100,
        model="base",
    )


def test_xml_validates_and_keeps_everything() -> None:
    minutes = sample_minutes()
    data = to_xml(minutes)
    assert data.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    assert validate_xml(data) == []
    root = etree.fromstring(data)
    assert root.get("conference_id") == minutes.conference_id
    assert float(root.get("duration_s")) == pytest.approx(65.5)
    names = [p.get("name") for p in root.iterfind("participants/participant")]
    assert names == ["Анна <Иванова> & Co", 'John "JJ" Smith']
    phrases = root.findall("phrases/phrase")
    assert [p.text for p in phrases] == [p.text for p in minutes.phrases]
    assert "Доброе утро".encode() in data  # UTF-8, not character references
    first = phrases[0]
    assert first.get("speaker") == "Анна <Иванова> & Co" and first.get("participant_id") == "p-1"
    assert float(first.get("start_float")) == pytest.approx(T0 + 0.35)
    assert float(first.get("start_s")) == pytest.approx(0.35)
    assert first.get("start").startswith("2024-06-2")  # ISO 8601 with the zone offset


def test_xsd_rejects_a_phrase_of_an_unknown_participant() -> None:
    root = etree.fromstring(to_xml(sample_minutes()))
    root.find("phrases/phrase").set("participant_id", "nobody")
    assert any("nobody" in e for e in validate_xml(etree.tostring(root)))
    root = etree.fromstring(to_xml(sample_minutes()))
    root.find("phrases/phrase").set("start", "yesterday")
    assert validate_xml(etree.tostring(root))


def test_xml_takes_text_with_characters_xml_cannot_carry() -> None:
    """Whisper's byte-level tokens can decode to control characters (or U+FFFE): the
    protocol still renders, valid, without them. Before, lxml refused such text, so the
    compile's result write (XML first, all or nothing) failed the minutes job for good."""
    minutes = dataclasses.replace(
        sample_minutes(),
        phrases=(Phrase("p-1", 0.35, 2.35, "bell\x07 form\x0cfeed\x00 \ufffe end\tok", "ru"),),
    )
    data = to_xml(minutes)
    assert validate_xml(data) == []
    text = etree.fromstring(data).find("phrases/phrase").text
    assert text == "bell formfeed  end\tok"


def test_subtitle_cues_hold_whole_phrases_whatever_their_text() -> None:
    """A blank line ends an SRT or WebVTT cue: a phrase whose text held one (here followed
    by what reads as the next cue) cut its cue short and made players show a forged cue.
    Line breaks in cue text are folded into spaces; each phrase is one cue of one text line."""
    text = "first\n\n2\n00:00:09,000 --> 00:00:10,000\r\n \nforged"
    folded = "first 2 00:00:09,000 --> 00:00:10,000 forged"
    minutes = dataclasses.replace(
        sample_minutes(),
        phrases=(Phrase("p-1", 0.35, 2.35, text, "ru"), Phrase("p-2", 3.0, 4.0, "next", "en")),
    )
    timing = re.compile(r"\d\d:\d\d:\d\d[,.]\d{3} --> \d\d:\d\d:\d\d[,.]\d{3}")
    srt = to_srt(minutes).decode().strip().split("\n\n")
    vtt = to_vtt(minutes).decode().strip().split("\n\n")
    assert vtt.pop(0) == "WEBVTT"
    for cues in (srt, vtt):
        assert [cue.split("\n")[0] for cue in cues] == ["1", "2"], cues
        for cue in cues:
            lines = cue.split("\n")
            assert len(lines) == 3 and timing.fullmatch(lines[1]), cue
    assert srt[0].split("\n")[2] == f"Анна <Иванова> & Co: {folded}"
    escaped = folded.replace(">", "&gt;")
    assert vtt[0].split("\n")[2] == f"<v Анна &lt;Иванова&gt; &amp; Co>{escaped}"


def test_text_formats_name_the_speakers() -> None:
    minutes = sample_minutes()
    srt = to_srt(minutes).decode()
    assert srt.startswith("1\n00:00:00,350 --> 00:00:02,350\nАнна <Иванова> & Co: Доброе утро")
    assert "00:01:01,200 --> 00:01:05,500" in srt
    assert "00:00:01,000 --> 00:00:01,500" in srt  # an instant still gets a visible cue
    vtt = to_vtt(minutes).decode()
    assert vtt.startswith("WEBVTT\n\n1\n00:00:00.350 --> 00:00:02.350\n")
    assert "<v Анна &lt;Иванова&gt; &amp; Co>Доброе утро, коллеги! &lt;b&gt;" in vtt
    md = to_md(minutes).decode()
    assert "**[00:00:00] Анна \\<Иванова\\> & Co:** Доброе утро" in md
    assert "\\*звёзды\\*" in md and "Participants: Анна" in md
    document = json.loads(to_json(minutes))
    assert [p["speaker"] for p in document["phrases"]] == [
        "Анна <Иванова> & Co",
        'John "JJ" Smith',
        "Анна <Иванова> & Co",
    ]
    assert document["phrases"][0]["start_s"] == 0.35
    assert document["participants"][1]["language"] is None
    assert render(minutes, "md") == md.encode()
    assert Minutes.from_json(json.loads(json.dumps(minutes.to_json()))) == minutes


# -- the compiler on real audio with a stand-in recognizer ----------------------------------


MEETING = SPEECH / "meetings" / "standup_en"


def spool_track(
    spool: Spool,
    conference: str,
    participant: str,
    samples: Samples,
    start: float,
    chunk_s: float = 2.0,
    name: str | None = None,
) -> None:
    step = int(chunk_s * SAMPLE_RATE)
    for i, offset in enumerate(range(0, samples.size, step)):
        piece = samples[offset : offset + step]
        spool.write(
            conference,
            participant,
            name or participant.title(),
            start + offset / SAMPLE_RATE,
            samples_to_ms(piece.size),
            f"{participant}-{i}",
            None,
            encode_wav(piece),
        )


class StandIn:
    """Says which participant's audio it got, timed over the whole request."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[RecognitionRequest]] = []
        self.fail = fail

    def __call__(self, requests: Sequence[RecognitionRequest]) -> list[Recognition]:
        if self.fail:
            raise RuntimeError("the recognizer broke")
        self.calls.append(list(requests))
        out = []
        for request in requests:
            seconds = request.audio.size / SAMPLE_RATE
            text = f" speech of {seconds:.1f} seconds."
            out.append(recognition(text, (Segment(0.0, seconds, text),), language="en"))
        return out


def compile_minutes(
    spool_root: Path, conference_id: str, stand_in: StandIn, progress: Progress | None = None
) -> CompileResult:
    """A compile with the default settings and a blocking stand-in, as the command line runs
    one with the engine."""
    compiler = MinutesCompiler(MinutesConfig(), in_thread(stand_in), decode=decode_passes(Config()))
    return asyncio.run(compiler.compile(spool_root, conference_id, progress))


def test_compiler_keeps_overlapping_speech_as_two_phrases(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    maria = load_clip(MEETING / "maria.flac")[: 10 * SAMPLE_RATE]  # speech 0.5-4.8, 5.4-9.2
    peter = load_clip(MEETING / "peter.flac")[int(9.5 * SAMPLE_RATE) : 20 * SAMPLE_RATE]
    spool_track(spool, "c1", "maria", maria, T0)
    spool_track(spool, "c1", "peter", peter, T0 + 1.0)  # speaks 1.3-5.9 and 6.5-11.5
    (tmp_path / "c1" / "maria" / ".tmp-x.wav").write_bytes(b"half-written")
    seen: list[float] = []
    stand_in = StandIn()
    result = compile_minutes(tmp_path, "c1", stand_in, progress=seen.append)

    minutes = result.minutes
    assert [s.participant_id for s in minutes.participants] == ["maria", "peter"]
    assert minutes.start_time == T0 and minutes.end_time == pytest.approx(T0 + 11.5, abs=0.01)
    assert minutes.audio_s == pytest.approx(20.5, abs=0.01)
    starts = [p.start_s for p in minutes.phrases]
    assert starts == sorted(starts)
    by = {
        pid: [p for p in minutes.phrases if p.participant_id == pid] for pid in ("maria", "peter")
    }
    assert by["maria"] and by["peter"]
    assert any(
        a.start_s < b.end_s and b.start_s < a.end_s for a in by["maria"] for b in by["peter"]
    ), "overlapping speech must stay two overlapping phrases"
    assert by["maria"][0].start_s == pytest.approx(0.5, abs=0.4)
    assert by["peter"][0].start_s == pytest.approx(1.3, abs=0.4)
    # No lang1: one greedy request per participant detects the language on their speech.
    every = [r for call in stand_in.calls for r in call]
    detection = every[:2]
    assert [(r.language, r.options.beam_size) for r in detection] == [(None, 1), (None, 1)]
    assert all(r.audio.size > 4 * SAMPLE_RATE for r in detection)
    requests = every[2:]
    assert all(r.priority is Priority.BACKGROUND and r.options.beam_size == 5 for r in requests)
    assert all(r.options.word_timestamps and r.language == "en" for r in requests)
    assert max(len(c) for c in stand_in.calls) <= MinutesConfig().max_in_flight
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert result.digest and result.speech_s > 10


def test_compiler_rebuilds_the_timeline_with_holes_and_jitter(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    maria = load_clip(MEETING / "maria.flac")[: 10 * SAMPLE_RATE]
    # 1 s fragments: three, then nothing for 20 s, then seven whose clock jitters by 20 ms.
    spool_track(spool, "c1", "maria", maria[: 3 * SAMPLE_RATE], T0, chunk_s=1.0)
    for i in range(7):
        piece = maria[(3 + i) * SAMPLE_RATE : (4 + i) * SAMPLE_RATE]
        jitter = (-0.02, 0.02)[i % 2]
        start = T0 + 23.0 + i + jitter
        spool.write("c1", "maria", "Maria", start, 1000, f"late-{i}", None, encode_wav(piece))
    result = compile_minutes(tmp_path, "c1", StandIn())
    minutes = result.minutes
    # Jitter within the tolerance keeps the run's own clock: nothing lost, nothing doubled.
    assert minutes.audio_s == pytest.approx(10.0)
    assert minutes.end_time == pytest.approx(T0 + 23.0 - 0.02 + 7.0, abs=0.001)
    starts = [p.start_s for p in minutes.phrases]
    assert starts[0] == pytest.approx(0.5, abs=0.4)
    assert any(s >= 22.9 for s in starts), "speech after the hole is placed after it"
    assert not any(3.5 < s < 22.9 for s in starts), "the hole is silence"


def test_compiler_needs_audio(tmp_path: Path) -> None:
    with pytest.raises(NothingSpooled):
        compile_minutes(tmp_path, "nothing", StandIn())


# -- the service: states, one job per conference, restarts ----------------------------------


def fake_submit(recognize: StandIn, delay_s: float = 0.0) -> Submit:
    def submit(request: RecognitionRequest) -> asyncio.Future[Recognition | None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Recognition | None] = loop.create_future()

        def answer() -> None:
            if future.done():
                return
            try:
                future.set_result(recognize([request])[0])
            except Exception as e:  # noqa: BLE001 - handed to the awaiting side
                future.set_exception(e)

        loop.call_later(delay_s, answer)
        return future

    return submit


def service_for(tmp_path: Path, recognize: StandIn, delay_s: float = 0.0) -> MinutesService:
    return service_with(tmp_path, fake_submit(recognize, delay_s))


def service_with(tmp_path: Path, submit: Submit, workers: int = 1) -> MinutesService:
    config = MinutesConfig(
        dir=str(tmp_path / "minutes"), jobs_dir=str(tmp_path / "jobs"), workers=workers
    )
    return MinutesService(
        config,
        JobsConfig(),
        tmp_path / "spool",
        submit,
        decode=decode_passes(Config()),
        model="stand-in",
        fsync=False,
    )


async def test_service_states_and_one_compile_per_conference(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    service = service_for(tmp_path, StandIn(), delay_s=0.05)
    await service.start()
    try:
        assert (await service.request("c1")).state is State.NOT_FOUND
        spool_track(spool, "c1", "maria", load_clip(MEETING / "maria.flac")[: 6 * SAMPLE_RATE], T0)
        answers = await asyncio.gather(*(service.request("c1") for _ in range(5)))
        assert [a.state for a in answers].count(State.QUEUED_NOW) == 1
        assert {a.state for a in answers[1:]} == {State.RUNNING}
        queued_at = answers[0].job.queued_at  # type: ignore[union-attr]
        assert all(a.job.queued_at == queued_at for a in answers)  # type: ignore[union-attr]

        await service.runner.wait("c1", 30)
        done = await service.request("c1")
        assert done.state is State.DONE and done.minutes is not None and done.minutes.phrases
        assert (tmp_path / "minutes" / "c1.xml").is_file()
        assert (await service.request("c1")).state is State.DONE  # no second compile

        spool_track(spool, "c1", "john", load_clip(MEETING / "john.flac")[: 2 * SAMPLE_RATE], T0)
        assert (await service.request("c1")).state is State.QUEUED_NOW  # new audio: fresh one
        await service.runner.wait("c1", 30)
        again = await service.request("c1")
        assert again.state is State.DONE
        assert [s.participant_id for s in again.minutes.participants] == ["john", "maria"]  # type: ignore[union-attr]
    finally:
        await service.stop()


async def test_service_reports_a_failed_compile(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    spool_track(spool, "c1", "maria", load_clip(MEETING / "maria.flac")[: 4 * SAMPLE_RATE], T0)
    service = service_for(tmp_path, StandIn(fail=True))
    await service.start()
    try:
        assert (await service.request("c1")).state is State.QUEUED_NOW
        await service.runner.wait("c1", 30)
        failed = await service.request("c1")
        assert failed.state is State.FAILED and "the recognizer broke" in str(failed.job.error)  # type: ignore[union-attr]
    finally:
        await service.stop()


async def test_a_failed_request_fails_the_compile_with_none_of_its_siblings_left(
    tmp_path: Path,
) -> None:
    """A compile sends up to ``minutes.max_in_flight`` requests at once: when one fails,
    the others are cancelled before the job fails (they used to stay queued at the
    recognizer, awaited by nobody). The fake submit's futures are resolved by the test."""
    spool = Spool(tmp_path / "spool", fsync=False)
    for name, start_s in (("maria", 0), ("peter", 9), ("john", 20)):  # a turn each
        turn = load_clip(MEETING / f"{name}.flac")[start_s * SAMPLE_RATE :][: 6 * SAMPLE_RATE]
        spool_track(spool, "c1", name, turn, T0)
    loop = asyncio.get_running_loop()
    sent: list[asyncio.Future[Recognition | None]] = []
    three = asyncio.Event()

    def submit(request: RecognitionRequest) -> asyncio.Future[Recognition | None]:
        sent.append(loop.create_future())
        if len(sent) == 3:
            three.set()
        return sent[-1]

    config = MinutesConfig(
        dir=str(tmp_path / "minutes"), jobs_dir=str(tmp_path / "jobs"), max_in_flight=3
    )
    service = MinutesService(
        config,
        JobsConfig(),
        tmp_path / "spool",
        submit,
        decode=decode_passes(Config()),
        fsync=False,
    )
    await service.start()
    try:
        assert (await service.request("c1")).state is State.QUEUED_NOW
        await asyncio.wait_for(three.wait(), 30)  # the three participants' language requests
        sent[0].set_exception(RuntimeError("recognizer failed: a poison request"))
        failed = await service.runner.wait("c1", 30)
        assert failed is not None and failed.status is JobStatus.FAILED
        assert "poison request" in str(failed.error)
        assert len(sent) == 3 and all(f.cancelled() for f in sent[1:])
        # and no task still runs a request (they used to wait on, awaited by nobody)
        running = [getattr(t.get_coro(), "__name__", "") for t in asyncio.all_tasks()]
        assert "until_taken" not in running
    finally:
        await service.stop()


async def test_a_failing_minutes_write_fails_the_job_once(tmp_path: Path) -> None:
    """Row 7 of the hardening issue: the write after a compile failed (there, a name the XML
    writer refused) and the job stayed running, compiled again at every poll. Whatever
    makes the write fail (here: the results folder is a file), the job fails with the
    reason, and polls answer that failure without compiling again."""
    spool = Spool(tmp_path / "spool", fsync=False)
    clip = load_clip(MEETING / "maria.flac")[: 4 * SAMPLE_RATE]
    spool_track(spool, "c1", "maria", clip, T0)
    (tmp_path / "minutes").write_text("not a folder", encoding="utf-8")
    stand_in = StandIn()
    service = service_for(tmp_path, stand_in)
    await service.start()
    try:
        assert (await service.request("c1")).state is State.QUEUED_NOW
        await service.runner.wait("c1", 30)
        calls = len(stand_in.calls)
        assert calls > 0
        for _ in range(3):
            failed = await service.request("c1")
            assert failed.state is State.FAILED and failed.job is not None
            assert "minutes" in str(failed.job.error)  # the path it could not write
        assert len(stand_in.calls) == calls  # no compile per poll
        stored = service.store.get("minutes", "c1")
        assert stored is not None and stored.status is JobStatus.FAILED
    finally:
        await service.stop()


async def test_service_takes_up_jobs_left_by_a_dead_process(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    for conference in ("c1", "c2"):
        spool_track(spool, conference, "maria", load_clip(MEETING / "maria.flac")[:64000], T0)
    store = JobStore(tmp_path / "jobs", fsync=False)
    store.put(new_job("minutes", "c1", 50.0).started(51.0).progressed(0.7))  # killed mid-run
    store.put(new_job("minutes", "c2", 60.0))  # still in the queue
    service = service_for(tmp_path, StandIn())
    await service.start()  # nobody asks for the minutes
    try:
        for conference in ("c1", "c2"):
            done = await service.runner.wait(conference, 30)
            assert done is not None and done.status is JobStatus.SUCCEEDED
        c1 = store.get("minutes", "c1")
        assert c1 is not None and c1.attempts == 2 and c1.queued_at == 50.0
        assert (await service.request("c1")).state is State.DONE
    finally:
        await service.stop()


async def test_service_stop_puts_a_running_job_back_to_resume(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    spool_track(spool, "c1", "maria", load_clip(MEETING / "maria.flac"), T0)
    asked = asyncio.Event()  # the compile's first request: it is running
    answer = fake_submit(StandIn(), 0.5)

    def submit(request: RecognitionRequest) -> asyncio.Future[Recognition | None]:
        asked.set()
        return answer(request)

    service = service_with(tmp_path, submit)
    await service.start()
    assert (await service.request("c1")).state is State.QUEUED_NOW
    await asyncio.wait_for(asked.wait(), 30)
    await service.stop()
    job = service.store.get("minutes", "c1")
    # Back in the queue; an attempt the server ended itself does not count.
    assert job is not None and job.status is JobStatus.QUEUED and job.attempts == 0
    assert not (tmp_path / "minutes" / "c1.json").exists()

    resumed = service_for(tmp_path, StandIn())
    await resumed.start()
    try:
        done = await resumed.runner.wait("c1", 30)
        assert done is not None and done.status is JobStatus.SUCCEEDED
    finally:
        await resumed.stop()


async def test_service_compiles_as_many_conferences_at_once_as_configured(tmp_path: Path) -> None:
    """Each compile has one request in flight at a time (minutes.max_in_flight 1): the
    requests waiting at once are the compiles running at once."""
    spool = Spool(tmp_path / "spool", fsync=False)
    clip = load_clip(MEETING / "maria.flac")[: 8 * SAMPLE_RATE]
    for conference in ("c1", "c2", "c3"):
        spool_track(spool, conference, "maria", clip, T0)
    assert MinutesConfig().max_in_flight == 1
    answer = fake_submit(StandIn(), 0.1)
    waiting: list[RecognitionRequest] = []
    most = 0

    def submit(request: RecognitionRequest) -> asyncio.Future[Recognition | None]:
        nonlocal most
        waiting.append(request)
        most = max(most, len(waiting))
        future = answer(request)
        future.add_done_callback(lambda _: waiting.remove(request))
        return future

    service = service_with(tmp_path, submit, workers=2)
    await service.start()
    try:
        for conference in ("c1", "c2", "c3"):
            assert (await service.request(conference)).state is State.QUEUED_NOW
        for conference in ("c1", "c2", "c3"):
            done = await service.runner.wait(conference, 30)
            assert done is not None and done.status is JobStatus.SUCCEEDED
        assert most == 2
    finally:
        await service.stop()


async def test_a_compile_that_lost_its_lease_does_not_overwrite_the_new_owners_minutes(
    tmp_path: Path,
) -> None:
    """Front end A stalls inside its minutes write past its lease (a disk or NFS stall); B
    takes the compile over, with audio spooled since, and finishes it. A's late write must
    not replace B's minutes, which the job's digest says are current. Two services on one
    set of folders stand for two front ends; the stall is a held thread, the lease's expiry
    a clock moved on (leases compare wall-clock times)."""
    spool = Spool(tmp_path / "spool", fsync=False)
    speech = load_clip(MEETING / "maria.flac")[: 4 * SAMPLE_RATE]
    spool_track(spool, "c1", "maria", speech, T0)
    now = [T0]
    config = MinutesConfig(dir=str(tmp_path / "minutes"), jobs_dir=str(tmp_path / "jobs"))

    def front_end() -> MinutesService:
        return MinutesService(
            config,
            JobsConfig(),
            tmp_path / "spool",
            fake_submit(StandIn()),
            decode=decode_passes(Config()),
            model="stand-in",
            fsync=False,
            clock=lambda: now[0],
        )

    a, b = front_end(), front_end()
    entered, held, written = threading.Event(), threading.Event(), threading.Event()
    save = a._save

    def stalled_save(result: CompileResult, job_id: str) -> Path:
        entered.set()
        held.wait(30)
        try:
            return save(result, job_id)
        finally:
            written.set()

    a._save = stalled_save  # type: ignore[method-assign]
    await a.start()
    await b.start()
    try:
        assert (await a.request("c1")).state is State.QUEUED_NOW
        assert await asyncio.to_thread(entered.wait, 30)  # A is writing, and stalls
        spool_track(spool, "c1", "john", speech, T0 + 4)  # spooled meanwhile
        now[0] += JobsConfig().lease_s + 1  # A's lease has run out
        assert (await b.request("c1")).state is State.RUNNING  # B takes it up
        await b.runner.wait("c1", 30)
        compiled = await b.request("c1")
        assert compiled.minutes is not None
        assert {p.participant_id for p in compiled.minutes.phrases} == {"maria", "john"}
        held.set()  # A's write goes on
        assert await asyncio.to_thread(written.wait, 30)
        done = await b.request("c1")
        assert done.state is State.DONE and done.minutes is not None
        assert {p.participant_id for p in done.minutes.phrases} == {"maria", "john"}
    finally:
        held.set()
        await a.stop()
        await b.stop()
