"""Prometheus metrics, one registry per application (no module-level collectors)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

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
    model_seconds: Counter
    request_latency: Histogram
    audio_seconds: Counter
    dropped_requests: Counter
    resent_requests: Counter
    finals: Counter
    overload_finals: Counter
    unrecognized_finals: Counter
    text_latency: Histogram
    active_participants: Gauge
    saturated: Gauge

    def render(self) -> bytes:
        return generate_latest(self.registry)


def create_metrics() -> Metrics:
    registry = CollectorRegistry()
    # Each collector is registered in this application's registry, none in the global one.
    counter = partial(Counter, registry=registry)
    gauge = partial(Gauge, registry=registry)
    histogram = partial(Histogram, registry=registry)
    return Metrics(
        registry=registry,
        requests=counter("terra_http_requests", "HTTP requests", ["route", "status"]),
        request_seconds=histogram(
            "terra_http_request_seconds", "HTTP request time", ["route"], buckets=LATENCY_BUCKETS
        ),
        fragments=counter("terra_fragments", "Audio fragments accepted"),
        fragment_audio_seconds=counter("terra_fragment_audio_seconds", "Seconds of audio accepted"),
        duplicate_fragments=counter(
            "terra_duplicate_fragments", "Fragments whose post_id was already seen"
        ),
        spooled_fragments=counter("terra_spooled_fragments", "Fragments written to the spool"),
        saturated=gauge(
            "terra_saturated",
            "1 when the box should take no new conferences (finals wait, or participants full)",
        ),
        queue_depth=gauge("terra_recognizer_queue_depth", "Requests waiting for the recognizer"),
        batch_size=histogram(
            "terra_recognizer_batch_size",
            "Requests per recognizer call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
        ),
        batch_seconds=histogram(
            "terra_recognizer_batch_seconds", "Time of one recognizer call", buckets=LATENCY_BUCKETS
        ),
        model_seconds=counter(
            "terra_recognizer_model_seconds",
            "Seconds of model calls, shared among the kinds of request each call served "
            "(where the recognizer's time goes: finals or progress)",
            ["priority"],
        ),
        request_latency=histogram(
            "terra_recognizer_latency_seconds",
            "Queue wait plus recognition, per request",
            ["priority"],
            buckets=LATENCY_BUCKETS,
        ),
        audio_seconds=counter("terra_recognizer_audio_seconds", "Seconds of audio recognized"),
        dropped_requests=counter(
            "terra_recognizer_dropped", "Requests not run (superseded or queue full)", ["reason"]
        ),
        resent_requests=counter(
            "terra_recognizer_resent",
            "Requests sent again because the cluster could not take them (backend ray)",
        ),
        finals=counter("terra_finals", "Final TextElems produced"),
        overload_finals=counter(
            "terra_overload_finals",
            "Finals asked for past recognizer.overload_finals_s (decoded with the overload beam)",
        ),
        unrecognized_finals=counter(
            "terra_unrecognized_finals",
            "Finals settled from the progress text, without a model call, past "
            "recognizer.max_owed_final_s",
        ),
        text_latency=histogram(
            "terra_text_latency_seconds",
            "progress: fragment arrival to text covering it; final: VAD close to final text",
            ["kind"],
            buckets=TEXT_BUCKETS,
        ),
        active_participants=gauge("terra_active_participants", "Participants with a live session"),
    )
