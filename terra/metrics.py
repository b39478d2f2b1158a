"""Prometheus metrics, one registry per application (no module-level collectors)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TEXT_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 31)) + (4.0, 5.0, 7.5, 10.0, 20.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    fragments: Counter
    fragment_audio_seconds: Counter
    duplicate_fragments: Counter
    spooled_fragments: Counter
    queue_depth: Gauge
    batch_size: Histogram
    batch_seconds: Histogram
    request_latency: Histogram
    audio_seconds: Counter
    dropped_requests: Counter
    resent_requests: Counter
    finals: Counter
    text_latency: Histogram
    active_participants: Gauge
    saturated: Gauge

    def render(self) -> bytes:
        return generate_latest(self.registry)


def create_metrics() -> Metrics:
    registry = CollectorRegistry()
    return Metrics(
        registry=registry,
        requests=Counter(
            "terra_http_requests", "HTTP requests", ["route", "status"], registry=registry
        ),
        request_seconds=Histogram(
            "terra_http_request_seconds",
            "HTTP request time",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        fragments=Counter("terra_fragments", "Audio fragments accepted", registry=registry),
        fragment_audio_seconds=Counter(
            "terra_fragment_audio_seconds", "Seconds of audio accepted", registry=registry
        ),
        duplicate_fragments=Counter(
            "terra_duplicate_fragments",
            "Fragments whose post_id was already seen",
            registry=registry,
        ),
        spooled_fragments=Counter(
            "terra_spooled_fragments", "Fragments written to the spool", registry=registry
        ),
        saturated=Gauge(
            "terra_saturated",
            "1 when the box should take no new conferences (finals wait, or participants full)",
            registry=registry,
        ),
        queue_depth=Gauge(
            "terra_recognizer_queue_depth",
            "Requests waiting for the recognizer",
            registry=registry,
        ),
        batch_size=Histogram(
            "terra_recognizer_batch_size",
            "Requests per recognizer call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
            registry=registry,
        ),
        batch_seconds=Histogram(
            "terra_recognizer_batch_seconds",
            "Time of one recognizer call",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        request_latency=Histogram(
            "terra_recognizer_latency_seconds",
            "Queue wait plus recognition, per request",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        audio_seconds=Counter(
            "terra_recognizer_audio_seconds", "Seconds of audio recognized", registry=registry
        ),
        dropped_requests=Counter(
            "terra_recognizer_dropped",
            "Requests not run (superseded or queue full)",
            ["reason"],
            registry=registry,
        ),
        resent_requests=Counter(
            "terra_recognizer_resent",
            "Requests sent again because their recognizer replica died (backend ray)",
            registry=registry,
        ),
        finals=Counter("terra_finals", "Final TextElems produced", registry=registry),
        text_latency=Histogram(
            "terra_text_latency_seconds",
            "progress: fragment arrival to text covering it; final: VAD close to final text",
            ["kind"],
            buckets=TEXT_BUCKETS,
            registry=registry,
        ),
        active_participants=Gauge(
            "terra_active_participants", "Participants with a live session", registry=registry
        ),
    )
