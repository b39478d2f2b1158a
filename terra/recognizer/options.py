"""The engine's two kinds of settings, as faster-whisper keeps ``WhisperModel(...)``'s
arguments apart from its per-call ``TranscriptionOptions``:

- :class:`EngineSettings`, fixed when the model loads: the model, device, compute type,
  threads and workers, and how the engine fits windows to audio (:class:`WindowOptions`);
- :class:`DecodeOptions`, chosen per call (each :class:`RecognitionRequest` carries one):
  beam, hypotheses, task, word timestamps, and the rules every pass shares
  (:class:`DecodeRules`: timestamp tokens, language detection, what the guards drop). A
  progress pass and a final carry different ones (greedy vs beam).

:func:`engine_settings` and :func:`decode_passes` build them from the configuration, in one
place. A request's language and previous-text context are its data, not options: they
differ from one participant or chunk to the next.

Pure: no model, no event loop (front ends without the model import it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from terra.config import Config


@dataclass(frozen=True, slots=True)
class WindowOptions:
    """How the engine fits a window to each request's audio (``recognizer.window``)."""

    # Encoder window lengths; a request takes the smallest that fits its audio plus the margin.
    window_buckets_s: tuple[float, ...] = (5.0, 8.0, 10.0, 20.0, 30.0)
    # Requests whose windows fit in this many seconds share a model call.
    batch_window_s: float = 10.0
    # Previous-text context shorter than this is dropped so the request can share a call.
    min_context_tokens: int = 16
    trailing_margin_s: float = 2.0  # silence after the audio inside the window
    tokens_per_second: float = 12.0  # decoder budget: per audio second, plus tokens_extra
    tokens_extra: int = 10


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Load-time settings: what ``WhisperModel(...)`` takes, and the window fitting."""

    model_path: str  # a folder holding a CTranslate2 Whisper model (or a hub name)
    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 0  # per worker; 0: every core (the workers share them when busy)
    workers: int = 1  # model calls at once (CTranslate2 inter_threads)
    allow_download: bool = False
    window: WindowOptions = field(default_factory=WindowOptions)


@dataclass(frozen=True, slots=True)
class DecodeRules:
    """What every pass shares (``recognizer.decoding``): timestamp tokens, language
    detection, and the guards' thresholds (faster-whisper's ``no_speech_threshold``,
    ``log_prob_threshold``, ``compression_ratio_threshold``)."""

    use_timestamp_tokens: bool = True
    no_speech_threshold: float = 0.6
    no_speech_drop_threshold: float = 0.7
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    language_fallback: str = "ru"
    language_confidence: float = 0.6
    detect_languages: tuple[str, ...] = ("ru", "en", "es", "ar", "tr", "uz")


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """How one request is decoded (faster-whisper's ``TranscriptionOptions``)."""

    beam_size: int = 1
    # Beam hypotheses to return (n-best): the best is the text, the others alternatives.
    num_hypotheses: int = 1
    task: str = "transcribe"  # or "translate" (to English)
    # Align every word with the audio (cross-attention DTW) and fill the segments' words.
    # Costs one more decoder pass over the text.
    word_timestamps: bool = False
    # A pass whose text loops (compression ratio over the rule) is decoded again in the
    # 30 s window. Off for live progress: its text is transient, the loop is collapsed and
    # the retry cost more than the pass (benchmarks.live, 1 continuous talker with the
    # agreement's short passes: client p95 4.2-6.6 s over four runs with it, 1.9 s without).
    retry_loops: bool = True
    rules: DecodeRules = DecodeRules()


@dataclass(frozen=True, slots=True)
class AgreementOptions:
    """How the live agreement (``recognizer/agreement.py``) commits and prompts
    (``recognizer.agreement``)."""

    commit: bool = True  # False: never commit (each pass decodes the whole combination)
    edge_guard_s: float = 1.0  # never commit a word ending this close to the live edge
    # When passes keep disagreeing and this much audio is uncommitted, commit the newest
    # pass's words that end force_guard_s before the edge: a bound on the cost of a pass.
    force_after_s: float = 6.0
    force_guard_s: float = 3.0
    prompt_max_words: int = 40  # the prompt is the last this many committed words
    # A final over a combination this short decodes all of it (beam search over the whole
    # utterance, no cut): commits serve the cost of long ones. Measured on the short clips
    # (benchmarks.stream_accuracy), a final over only the tail after a commit lost words at
    # the cut and made up words in the pause ("Неважно. Слышь, да?").
    final_whole_max_s: float = 10.0


@dataclass(frozen=True, slots=True)
class DecodePasses:
    """The options of each kind of pass terra makes (see :func:`decode_passes`)."""

    progress: DecodeOptions  # live progress: recognizer.progress_beam_size
    final: DecodeOptions  # live finals: recognizer.final_beam_size
    translate: DecodeOptions  # live English captions: the finals' beam, Whisper's translate
    # live finals and captions asked for past recognizer.overload_finals_s of finals waiting:
    # recognizer.overload_final_beam_size
    overload_final: DecodeOptions
    overload_translate: DecodeOptions
    detect: DecodeOptions  # the minutes' language detection: greedy
    minutes: DecodeOptions  # minutes.beam_size, minutes.word_timestamps
    # files.beam_size; each job sets its task, word timestamps and hypotheses
    files: DecodeOptions


def engine_settings(config: Config, model_path: str, workers: int | None = None) -> EngineSettings:
    """The engine's load-time settings: ``model`` and ``recognizer.window``, with
    ``recognizer.workers`` model workers unless ``workers`` is given."""
    model = config.model
    return EngineSettings(
        model_path=model_path,
        device=model.device,
        compute_type=model.compute_type,
        cpu_threads=model.cpu_threads,
        workers=config.recognizer.workers if workers is None else workers,
        allow_download=model.allow_download,
        window=config.recognizer.window,
    )


def decode_passes(config: Config) -> DecodePasses:
    """Each kind of pass's options, from the configuration."""
    base = DecodeOptions(rules=config.recognizer.decoding)
    final = dataclasses.replace(base, beam_size=config.recognizer.final_beam_size)
    overload = dataclasses.replace(base, beam_size=config.recognizer.overload_final_beam_size)
    return DecodePasses(
        # The agreement (recognizer/agreement.py) commits word by word: it needs word times.
        progress=dataclasses.replace(
            base,
            beam_size=config.recognizer.progress_beam_size,
            word_timestamps=config.recognizer.agreement.commit,
            retry_loops=False,
        ),
        final=final,
        translate=dataclasses.replace(final, task="translate"),
        overload_final=overload,
        overload_translate=dataclasses.replace(overload, task="translate"),
        detect=base,
        minutes=dataclasses.replace(
            base,
            beam_size=config.minutes.beam_size,
            word_timestamps=config.minutes.word_timestamps,
        ),
        files=dataclasses.replace(base, beam_size=config.files.beam_size),
    )
