"""terra: self-hosted real-time conference transcription and minutes."""

__version__ = "0.1.0"
