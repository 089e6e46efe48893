"""Every Prometheus metric kiln exports, defined in one place.

Labels are model and version (plus outcome/phase where they apply): never
anything per request. Units are in the names.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR  # noqa: F401  (registered on REGISTRY)
from prometheus_client import REGISTRY

# Inference latencies span tens of microseconds (a tiny model on CPU) to seconds.
DEFAULT_LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def latency_buckets() -> tuple[float, ...]:
    """Buckets from KILN_LATENCY_BUCKETS (comma-separated seconds) or the defaults."""
    raw = os.environ.get("KILN_LATENCY_BUCKETS", "").strip()
    if not raw:
        return DEFAULT_LATENCY_BUCKETS
    try:
        buckets = tuple(sorted(float(b) for b in raw.split(",") if b.strip()))
    except ValueError:
        raise ValueError(f"KILN_LATENCY_BUCKETS must be comma-separated seconds, got '{raw}'") from None
    if not buckets or buckets[0] <= 0:
        raise ValueError(f"KILN_LATENCY_BUCKETS must be positive seconds, got '{raw}'")
    return buckets


class Metrics:
    """The metric families; one instance per process, on the default registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        labels = ("model", "version")
        buckets = latency_buckets()
        self.request_duration = Histogram(
            "kiln_request_duration_seconds", "Time from request arrival to response.", labels,
            buckets=buckets, registry=registry,
        )
        self.queue_duration = Histogram(
            "kiln_queue_duration_seconds", "Time a request waited in the batcher.", labels,
            buckets=buckets, registry=registry,
        )
        self.compute_duration = Histogram(
            "kiln_compute_duration_seconds", "Compute time per execution, by phase (input, infer, output).",
            labels + ("phase",), buckets=buckets, registry=registry,
        )
        self.batch_size = Histogram(
            "kiln_batch_size", "Rows per execution.", labels, buckets=BATCH_SIZE_BUCKETS, registry=registry,
        )
        self.requests = Counter(
            "kiln_requests", "Requests by outcome (success or the lower-case gRPC status name).",
            labels + ("outcome",), registry=registry,
        )
        self.inferences = Counter("kiln_inferences", "Rows inferred.", labels, registry=registry)
        self.executions = Counter("kiln_executions", "Batches executed.", labels, registry=registry)
        self.queue_depth = Gauge("kiln_queue_depth", "Requests waiting in the batcher.", labels, registry=registry)
        self.inflight = Gauge(
            "kiln_inflight_requests", "Requests accepted and not yet answered.", labels, registry=registry,
        )
        self.model_ready = Gauge("kiln_model_ready", "1 when the model version is ready.", labels, registry=registry)


_metrics: Metrics | None = None


def get_metrics() -> Metrics:
    """The process-wide metric families (created on first use)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics
