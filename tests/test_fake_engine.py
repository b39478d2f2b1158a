"""The fast tier's FakeEngine drives the real live path (VAD, combinations, commits, finals)
on real speech: its words come back as finals, each delivered once, in order."""

from __future__ import annotations

from tests.fakes import WORDS, FakeEngine, fake_text

from .conftest import SPEECH, ServerFactory, finals, load_clip, stream_samples


def test_fake_text_follows_the_audio() -> None:
    samples = load_clip(SPEECH / "long" / "en_60s.wav")[: 16_000 * 5]
    text = fake_text(samples)
    assert text and set(text.split()) <= set(WORDS)
    assert fake_text(samples * 0) == ""
    engine = FakeEngine()
    assert engine.decode_text(engine.encode_text(text)) == text


async def test_live_finals_on_the_fake(
    make_fast_server: ServerFactory, fake_engine: FakeEngine
) -> None:
    # A pass as soon as audio comes (each POST waits for text that covers its fragment).
    client = await make_fast_server(stream={"progress_min_interval_ms": 0})
    samples = load_clip(SPEECH / "long" / "en_60s.wav")[: 16_000 * 20]
    answers = await stream_samples(client, samples, lang="en")
    texts = [e["text"] for e in finals(answers)]
    assert texts, answers
    assert all(set(t.split()) <= set(WORDS) for t in texts)
    # Roughly one word per voiced half second: the commit path lost nothing and said
    # nothing twice.
    said = sum(len(t.split()) for t in texts)
    assert 10 <= said <= len(fake_text(samples).split()) + 4
    assert fake_engine.calls > 0
