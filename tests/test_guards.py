"""Guards against Whisper's failure modes, and LocalAgreement prefixes (pure)."""

from __future__ import annotations

from terra.recognizer.guards import (
    collapse_repeats,
    compression_ratio,
    drop_reason,
    is_known_hallucination,
)
from terra.recognizer.options import DecodeRules
from terra.recognizer.types import DropReason


def test_repetition_loops_are_collapsed() -> None:
    assert collapse_repeats(" 5 5 5 5 5 5 5") == " 5 5"
    assert collapse_repeats("We meet at ten. We meet at ten. We meet at ten.") == "We meet at ten."
    assert collapse_repeats(" кандидамидамидамидамидамид") == " кандидамид"


def test_real_repetition_is_kept() -> None:
    assert collapse_repeats("five five") == "five five"
    assert collapse_repeats("one zero zero zero one") == "one zero zero one"
    assert collapse_repeats(" Всем привет. Давайте начнём.") == " Всем привет. Давайте начнём."


def test_loop_has_a_high_compression_ratio() -> None:
    assert compression_ratio("ha " * 60) > 2.4
    assert compression_ratio("Всем привет. Давайте все камеры включим.") < 2.4


def test_known_hallucinations() -> None:
    assert is_known_hallucination(" Продолжение следует...")
    assert is_known_hallucination("Thank you for watching!")
    assert not is_known_hallucination(" Продолжение следует завтра в десять.")


def test_drop_reasons() -> None:
    rules = DecodeRules()
    assert drop_reason(" Hello there.", 0.1, -0.3, rules) is None
    assert drop_reason(" Hello there.", 0.65, -1.5, rules) is DropReason.NO_SPEECH
    assert drop_reason(" Hello there.", 0.65, -0.3, rules) is None  # unsure, but clear text
    assert drop_reason(" Hello there.", 0.95, -0.3, rules) is DropReason.NO_SPEECH
    assert drop_reason(" Thank you for watching!", 0.1, -0.3, rules) is (
        DropReason.KNOWN_HALLUCINATION
    )
    assert drop_reason(" [MUSIC]", 0.1, -0.3, rules) is DropReason.KNOWN_HALLUCINATION
