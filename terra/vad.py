"""webrtcvad framing: speech/non-speech flags for consecutive fixed-size frames. Pure."""

from __future__ import annotations

import numpy as np
import webrtcvad
from numpy.typing import NDArray

from terra.audio import SAMPLE_RATE, Samples, to_pcm16


class FrameVad:
    """Classifies audio in frames of 10, 20 or 30 ms, carrying the remainder between calls.

    One instance per participant: webrtcvad keeps a little state between frames, and the
    remainder of a fragment that does not fill a frame belongs to the next one.
    """

    def __init__(self, aggressiveness: int, frame_ms: int) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)
        self.frame_samples = SAMPLE_RATE * frame_ms // 1000
        self._remainder = np.zeros(0, dtype=np.float32)

    def reset(self) -> None:
        """Forget the carried remainder (after a gap in the timeline)."""
        self._remainder = np.zeros(0, dtype=np.float32)

    def frames(self, samples: Samples) -> tuple[Samples, NDArray[np.bool_]]:
        """Return the whole frames now available (flattened) and one speech flag per frame."""
        if self._remainder.size:
            samples = np.concatenate((self._remainder, samples))
        n_frames = samples.size // self.frame_samples
        usable = n_frames * self.frame_samples
        self._remainder = samples[usable:].copy()
        audio = samples[:usable]
        pcm = to_pcm16(audio)
        step = self.frame_samples * 2
        flags = np.fromiter(
            (
                self._vad.is_speech(pcm[i * step : (i + 1) * step], SAMPLE_RATE)
                for i in range(n_frames)
            ),
            dtype=np.bool_,
            count=n_frames,
        )
        return audio, flags
