"""LocalAgreement: the text two consecutive passes agree on. Pure.

The agreed text tokens are fed back as the decoder prefix of the next pass over the same
(grown) audio, so only the new tail is generated. Two cuts keep the decoder from starting
over: timestamp tokens are left out (CTranslate2 applies Whisper's timestamp rules from the
first generated token), and the prefix ends on a word boundary, one whole word short of
the agreement (a prefix ending mid-word, "кон|", makes Whisper restart the sentence).
"""

from __future__ import annotations

from collections.abc import Callable


def text_tokens(tokens: tuple[int, ...], timestamp_begin: int) -> tuple[int, ...]:
    return tuple(t for t in tokens if t < timestamp_begin)


def agreed_prefix(
    previous: tuple[int, ...],
    current: tuple[int, ...],
    timestamp_begin: int,
    starts_word: Callable[[int], bool],
    held_back_words: int = 1,
) -> tuple[int, ...]:
    """The common text prefix of two hypotheses, cut at a word start, less a few words."""
    a = text_tokens(previous, timestamp_begin)
    b = text_tokens(current, timestamp_begin)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    # Word starts at or before the end of the agreement; a cut there ends on a whole word.
    boundaries = [k for k in range(1, min(n, len(b) - 1) + 1) if starts_word(b[k])]
    if n == len(b) == len(a) and n:
        boundaries.append(n)  # both passes agree to the end
    if len(boundaries) <= held_back_words:
        return ()
    return b[: boundaries[-1 - held_back_words]]
