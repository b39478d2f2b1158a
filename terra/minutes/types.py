"""What a compile produces: the minutes of one conference. Pure data, JSON round-trip."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Speaker:
    participant_id: str
    name: str
    language: str | None


@dataclass(frozen=True, slots=True)
class Phrase:
    """What one participant said, timed in seconds from the conference start."""

    participant_id: str
    start_s: float
    end_s: float
    text: str
    language: str


@dataclass(frozen=True, slots=True)
class Minutes:
    conference_id: str
    start_time: float  # unix seconds of the first spooled sample of anyone
    end_time: float  # unix seconds of the last
    participants: tuple[Speaker, ...]
    phrases: tuple[Phrase, ...]  # ordered by start time
    audio_s: float  # spooled audio of all participants together
    generated_at: float
    model: str = ""

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end_time - self.start_time)

    def speaker(self, participant_id: str) -> Speaker:
        for speaker in self.participants:
            if speaker.participant_id == participant_id:
                return speaker
        return Speaker(participant_id, participant_id, None)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Minutes:
        return cls(
            conference_id=data["conference_id"],
            start_time=float(data["start_time"]),
            end_time=float(data["end_time"]),
            participants=tuple(Speaker(**p) for p in data["participants"]),
            phrases=tuple(Phrase(**p) for p in data["phrases"]),
            audio_s=float(data["audio_s"]),
            generated_at=float(data["generated_at"]),
            model=str(data.get("model", "")),
        )
