"""The engine's model calls: generation limits and batching, on the packaged model."""

from __future__ import annotations

import ctranslate2
import numpy as np
import pytest

from terra.audio import SAMPLE_RATE
from terra.recognizer.engine import MAX_WINDOW_S, Stage, WhisperEngine, generation_limit
from terra.recognizer.naive import NaiveEngine
from terra.recognizer.options import DecodeOptions, DecodeRules
from terra.recognizer.types import DropReason, Priority, RecognitionRequest

from .conftest import SPEECH, cer, clip, load_clip

pytestmark = pytest.mark.model

PLANERKA = SPEECH / "meetings" / "planerka_ru"
EOT = 50257


@pytest.mark.parametrize(("context", "budget"), [(0, 20), (60, 30), (200, 40), (223, 100)])
def test_generation_limit_leaves_room_for_the_budget(
    engine: WhisperEngine, context: int, budget: int
) -> None:
    """CTranslate2 4.8 counts the prompt in max_length and halves it besides; the limit the
    engine passes must still let the whole budget be generated (end of text suppressed)."""
    model = engine._ct2  # the real CTranslate2 model: what is checked is its behaviour
    audio = load_clip(SPEECH / "long" / "ru_60s.wav")[: 8 * SAMPLE_RATE]
    features = engine._features(audio, 10.0)
    sot = [50258, 50263, 50359]  # <|startoftranscript|><|ru|><|transcribe|>
    prompt = ([50361, *range(300, 300 + context)] if context else []) + sot
    limit = generation_limit(len(prompt), budget)
    result = model.generate(
        ctranslate2.StorageView.from_array(features[np.newaxis]),
        [prompt],
        max_length=limit,
        suppress_tokens=[-1, EOT],
    )[0]
    assert len(result.sequences_ids[0]) >= min(budget, 448 - len(prompt) - 1)


def test_a_short_tail_after_a_long_context_keeps_its_words(engine: WhisperEngine) -> None:
    """A long combination's final decodes only its uncommitted tail with all the committed
    text as context: the tail's words must all come back (they were lost when the context
    ate the token budget)."""
    anna = load_clip(PLANERKA / "anna.flac")
    opening = anna[int(0.3 * SAMPLE_RATE) : int(13.0 * SAMPLE_RATE)]
    tail = anna[int(7.3 * SAMPLE_RATE) : int(13.0 * SAMPLE_RATE)]  # "Первый вопрос ..."
    context = engine.recognize(
        [RecognitionRequest(opening, "ru", Priority.FINAL, DecodeOptions(beam_size=5))]
    )[0].tokens
    long_context = tuple(t for t in context if t < EOT) * 4  # ~4 sentences said before
    assert len(long_context) > 100
    expected = "Первый вопрос касается запуска новой версии сервиса в понедельник."
    for beam in (1, 5):
        result = engine.recognize(
            [
                RecognitionRequest(
                    tail,
                    "ru",
                    Priority.FINAL,
                    DecodeOptions(beam_size=beam),
                    prompt_tokens=long_context,
                )
            ]
        )[0]
        assert cer(expected, result.text) <= 0.15, (beam, result.text)


def test_beam_search_that_loops_is_decoded_again(engine: WhisperEngine) -> None:
    """Beam 5 with timestamp tokens loops on this 12.7 s cut in a 20 s window ("Доброе
    утро, коллеги!" over and over); the engine decodes it again in a 30 s window."""
    anna = load_clip(PLANERKA / "anna.flac")
    opening = anna[int(0.3 * SAMPLE_RATE) : int(13.0 * SAMPLE_RATE)]
    result = engine.recognize(
        [RecognitionRequest(opening, "ru", Priority.FINAL, DecodeOptions(beam_size=5))]
    )[0]
    expected = (
        "Доброе утро, коллеги. Давайте начнём планёрку, у нас сегодня три вопроса. "
        "Первый вопрос касается запуска новой версии сервиса в понедельник."
    )
    assert result.compression_ratio <= 2.4
    assert cer(expected, result.text) <= 0.15, result.text


def test_one_call_serves_mixed_windows_and_contexts(engine: WhisperEngine) -> None:
    """Short and long audio, with and without context, share one model call and each gets
    the text it gets alone."""
    jfk = clip("clips/faster_whisper/jfk.flac")
    audio = load_clip(jfk.path)
    anna = load_clip(PLANERKA / "anna.flac")
    opening = anna[int(0.3 * SAMPLE_RATE) : int(7.0 * SAMPLE_RATE)]
    said = engine.recognize(
        [RecognitionRequest(opening, "ru", Priority.FINAL, DecodeOptions(beam_size=1))]
    )[0].tokens
    context = tuple(t for t in said if t < EOT)
    assert len(context) > 20
    requests = [
        RecognitionRequest(
            audio[: 3 * SAMPLE_RATE], "en", Priority.PROGRESS, DecodeOptions(beam_size=1)
        ),
        RecognitionRequest(
            audio[: 7 * SAMPLE_RATE], "en", Priority.PROGRESS, DecodeOptions(beam_size=1)
        ),
        RecognitionRequest(
            anna[int(7.3 * SAMPLE_RATE) : int(13.0 * SAMPLE_RATE)],
            "ru",
            Priority.PROGRESS,
            DecodeOptions(),
            prompt_tokens=context,
        ),
        RecognitionRequest(
            anna[int(7.3 * SAMPLE_RATE) : int(13.0 * SAMPLE_RATE)],
            "ru",
            Priority.PROGRESS,
            DecodeOptions(),
            prompt_tokens=context[-20:],
        ),
    ]
    assert len({engine.batch_key(r) for r in requests}) == 1
    together, timings = engine.recognize_timed(requests)
    assert [t.batch_size for t in timings] == [2, 2]  # no context | context
    alone = [engine.recognize([r])[0] for r in requests]
    for a, b in zip(alone, together):
        assert a.text.strip() and cer(a.text, b.text) <= 0.1, (a.text, b.text)


def test_decode_rules_are_per_request_within_one_call(engine: WhisperEngine) -> None:
    """Two requests in one model call, one whose rules drop any text Whisper doubts is
    speech at all (no_speech_drop_threshold below every probability): the guards apply each
    request's own rules, and say why the text went."""
    audio = load_clip(clip("clips/faster_whisper/jfk.flac").path)[: 4 * SAMPLE_RATE]
    strict = DecodeOptions(rules=DecodeRules(no_speech_drop_threshold=-1.0))
    requests = [
        RecognitionRequest(audio, "en", Priority.PROGRESS, DecodeOptions()),
        RecognitionRequest(audio, "en", Priority.PROGRESS, strict),
    ]
    (kept, dropped), timings = engine.recognize_timed(requests)
    assert [t.batch_size for t in timings] == [2]
    assert kept.dropped_reason is None and kept.text.strip()
    assert dropped.dropped_reason is DropReason.NO_SPEECH
    assert (dropped.text, dropped.tokens, dropped.segments) == ("", (), ())


def test_a_call_is_timed_by_stage(engine: WhisperEngine) -> None:
    """recognize_timed splits each call's time into its stages (benchmarks.profile_pass reads
    them): a progress pass with word times encodes, generates and aligns; one without word
    times does not align; the stages add up to the call."""
    audio = load_clip(clip("clips/faster_whisper/jfk.flac").path)[: 4 * SAMPLE_RATE]
    words = DecodeOptions(word_timestamps=True)
    for options, aligned in ((words, True), (DecodeOptions(), False)):
        _, (timing,) = engine.recognize_timed(
            [RecognitionRequest(audio, "en", Priority.PROGRESS, options)]
        )
        for stage in (Stage.FEATURES, Stage.ENCODE, Stage.GENERATE):
            assert timing.wall[stage] > 0 and timing.cpu[stage] > 0, stage
        assert (timing.wall[Stage.ALIGN] > 0) is aligned
        assert sum(timing.wall.values()) == pytest.approx(timing.seconds, rel=1e-6)


def test_the_naive_baseline_transcribes_each_request_alone(engine: WhisperEngine) -> None:
    """``recognizer.mode: naive``, the benchmarks' baseline: one faster-whisper
    ``transcribe()`` per request over the 30 s window, never sharing a call (on the packaged
    model's weights, the ones the session's engine loaded)."""
    naive = NaiveEngine(engine._model)
    jfk = clip("clips/faster_whisper/jfk.flac")
    request = RecognitionRequest(load_clip(jfk.path), "en", Priority.FINAL, DecodeOptions())
    again = RecognitionRequest(request.audio, "en", Priority.FINAL, DecodeOptions())
    assert naive.batch_key(request) != naive.batch_key(again)
    result = naive.recognize([request])[0]
    assert cer(jfk.transcript, result.text) <= 0.15, result.text
    assert (result.language, result.window_s) == ("en", MAX_WINDOW_S)
    assert result.tokens and naive.decode_text(result.tokens).strip() == result.text.strip()
