"""One combination's live text: the hypothesis, the commit and the trim. Pure.

Each progress pass decodes the combination's *uncommitted* audio (with the committed text as
Whisper's previous-text prompt) and its words come back timed inside that audio. The words
this pass and the one before it both said, in the same order from the start (the longest
common prefix, compared without case and punctuation, long words by similarity), are
committed as the newer pass wrote them: their text is kept and their audio is trimmed
away, so the next pass decodes only what follows the last of them. That is
whisper_streaming's LocalAgreement-2 (its ``HypothesisBuffer``), applied at every word
with the audio trimmed at every commit: a pass decodes about two fragments of audio
however long the combination grows. After ``close``, a final decodes the whole of a short
combination (at most ``final_whole_max_s``) and only the uncommitted tail of a longer one.
"""

from __future__ import annotations

import difflib
import unicodedata
from dataclasses import dataclass

from terra.audio import SAMPLE_RATE
from terra.recognizer.options import AgreementOptions
from terra.recognizer.types import Recognition

# A pass that starts by saying again the last committed words (the cut left a bit of the
# last one, or the prompt made Whisper repeat it) has them dropped: up to this many words.
MAX_REPEAT_WORDS = 5
# ... but only when its first word starts this close to the cut.
REPEAT_WINDOW_S = 1.0
# Two passes spell a long rare word differently more often than they hear another word
# ("Константубольсмана" / "Константубульсмана" on long/ru_60s.wav): words of at least
# this many letters agree when this similar (difflib's ratio); shorter ones must be equal.
FUZZY_MIN_LETTERS = 6
FUZZY_RATIO = 0.8


@dataclass(frozen=True, slots=True)
class TimedWord:
    """A word of a pass, timed in samples from the combination's first sample."""

    start: int
    end: int
    text: str  # as Whisper wrote it, with its leading space

    @property
    def key(self) -> str:
        return normalized(self.text)


def normalized(word: str) -> str:
    """A word as passes are compared: case-folded, punctuation and spaces dropped."""
    return "".join(c for c in word.casefold() if not unicodedata.category(c).startswith(("P", "Z")))


def same_word(a: str, b: str) -> bool:
    """Whether two passes said the same word (``normalized`` forms, see FUZZY_RATIO)."""
    if a == b:
        return True
    if min(len(a), len(b)) < FUZZY_MIN_LETTERS:
        return False
    return difflib.SequenceMatcher(None, a, b).ratio() >= FUZZY_RATIO


def _join(committed: str, tail: str) -> str:
    if not committed.strip():
        return tail
    if not tail.strip():
        return committed
    return committed.rstrip() + " " + tail.lstrip()


class Agreement:
    """The hypothesis, commit and trim of one combination (one per open combination).

    ``committed_samples`` is where the uncommitted audio starts; a pass is made over the audio
    from there and given back with that offset (``settle``): one made before a later commit
    (or after ``close``) is stale, and commits nothing."""

    def __init__(self, options: AgreementOptions) -> None:
        self.options = options
        self.committed_samples = 0
        self.committed: list[TimedWord] = []
        self.committed_text = ""
        self.hypothesis: list[TimedWord] = []  # the newest pass's words after the committed
        self.tail_text = ""  # the newest pass's text after the committed (words or not)
        self.closed = False
        self.final_from = 0  # where the final decodes from (set by ``close``)

    @property
    def text(self) -> str:
        """The newest text: what is committed, then what the newest pass said after it."""
        return _join(self.committed_text, self.tail_text)

    def prompt(self) -> str:
        """Whisper's previous-text context for the next pass: the last committed words."""
        limit = self.options.prompt_max_words
        return "".join(w.text for w in self.committed[-limit:]) if limit > 0 else ""

    def settle(self, offset: int, audio_samples: int, recognition: Recognition) -> bool:
        """Take a pass over ``audio_samples`` of audio from ``offset``: remember its text and
        commit what it agrees on with the previous pass. False (and nothing taken) when the
        pass is stale: made from another offset than the present commit point."""
        if offset != self.committed_samples:
            return False
        words = self._words(offset, recognition)
        if not words:  # nothing timed (no speech, a collapsed loop): the text only
            self.tail_text = recognition.text
            self.hypothesis = []
            return True
        count = self._agreed(words, offset + audio_samples) if not self.closed else 0
        self.hypothesis = words[count:]
        self.tail_text = "".join(w.text for w in self.hypothesis)
        if count:
            self._commit(words[:count])
        return True

    def close(self, length: int) -> int:
        """The combination closed at ``length`` samples: where its final decodes from (0, the
        whole of it, when it is at most ``final_whole_max_s`` long; else the commit point).
        No later pass may commit (the text would come twice)."""
        self.closed = True
        whole = length <= self.options.final_whole_max_s * SAMPLE_RATE
        self.final_from = 0 if whole else self.committed_samples
        return self.final_from

    def final_prompt(self) -> str:
        """The final's previous-text context: the committed words before where it starts."""
        return self.prompt() if self.final_from else ""

    def final_text(self, decoded: str) -> str:
        """The final: the committed text (unless the final decoded the whole combination),
        then what the final decoded."""
        return _join(self.committed_text, decoded) if self.final_from else decoded

    @property
    def uncommitted_s(self) -> float:
        """How much audio the newest hypothesis covers past the commit point (seconds)."""
        if not self.hypothesis:
            return 0.0
        return (self.hypothesis[-1].end - self.committed_samples) / SAMPLE_RATE

    # -- internals -------------------------------------------------------------------------
    def _words(self, offset: int, recognition: Recognition) -> list[TimedWord]:
        words = [
            TimedWord(
                offset + round(w.start_s * SAMPLE_RATE),
                offset + round(w.end_s * SAMPLE_RATE),
                w.text,
            )
            for segment in recognition.segments
            for w in segment.words
            if normalized(w.text)
        ]
        return self._without_repeat(words)

    def _without_repeat(self, words: list[TimedWord]) -> list[TimedWord]:
        """Drop a repeat of the last committed words at the start of a pass (n-gram match)."""
        if not self.committed or not words:
            return words
        if words[0].start - self.committed_samples > REPEAT_WINDOW_S * SAMPLE_RATE:
            return words
        longest = min(len(self.committed), len(words), MAX_REPEAT_WORDS)
        for n in range(longest, 0, -1):
            said = [w.key for w in self.committed[-n:]]
            if [w.key for w in words[:n]] == said:
                return words[n:]
        return words

    def _agreed(self, words: list[TimedWord], edge: int) -> int:
        """How many leading words to commit: those the previous pass said too, ending at least
        ``edge_guard_s`` before the edge; past ``force_after_s`` of uncommitted audio with
        no agreement, those of this pass ending ``force_guard_s`` before the edge."""
        options = self.options
        if not options.commit:
            return 0
        guard = round(options.edge_guard_s * SAMPLE_RATE)
        count = 0
        for new, old in zip(words, self.hypothesis):
            if not same_word(new.key, old.key) or new.end > edge - guard:
                break
            count += 1
        if count == 0 and edge - self.committed_samples > options.force_after_s * SAMPLE_RATE:
            force_guard = round(options.force_guard_s * SAMPLE_RATE)
            while count < len(words) and words[count].end <= edge - force_guard:
                count += 1
        return count

    def _commit(self, words: list[TimedWord]) -> None:
        """Keep ``words`` and trim the audio after the last of them: halfway to the next word
        when there is a gap (word times from alignment are approximate)."""
        last = words[-1].end
        cut = last
        if self.hypothesis:
            following = self.hypothesis[0].start
            cut = min(last, following) + max(0, following - last) // 2
        self.committed_samples = max(self.committed_samples, cut)
        self.committed.extend(words)
        self.committed_text += "".join(w.text for w in words)
