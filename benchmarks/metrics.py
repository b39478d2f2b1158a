"""Reading terra's ``/metrics`` page (Prometheus text): the samples, one value, a histogram's
quantile. Parsed by ``prometheus_client`` (the library that writes the page); light on
purpose, so tests can import it without the benchmarks' own dependencies."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, dict[str, str], float]  # name, labels, value


def parse_metrics(text: str) -> list[Sample]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def metric(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with these labels (0 when there are none)."""
    return sum(
        v for n, lb, v in samples if n == name and all(lb.get(k) == x for k, x in labels.items())
    )


def histogram_quantile(
    samples: list[Sample],
    name: str,
    kind: str,
    q: float,
    label: str = "kind",
) -> float:
    buckets = sorted(
        (float("inf") if lb["le"] == "+Inf" else float(lb["le"]), v)
        for n, lb, v in samples
        if n == f"{name}_bucket" and lb.get(label) == kind
    )
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    total = buckets[-1][1]
    rank = q * total
    previous_le, previous_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return previous_le
            share = (rank - previous_count) / max(count - previous_count, 1e-9)
            return previous_le + (le - previous_le) * share
        previous_le, previous_count = le, count
    return previous_le
