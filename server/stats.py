"""Per model-version statistics: one set of measurements feeds both
the ModelStatistics RPC and the Prometheus metrics.

Each measurement is taken once, on the request path, under one lock: the
Duration counters the RPC reports, and (when metrics are on) the histogram
bucket counts. server/metrics.py turns these into Prometheus families at
scrape time, so the request path never touches prometheus_client.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field

from server.batching import ExecutionRecord, RequestTimings
from server.errors import Status

access_log = logging.getLogger("kiln.access")

# Inference latencies span tens of microseconds (a tiny model on CPU) to seconds.
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class StatsSettings:
    """Process-wide recording switches, set by KilnServer at start (see configure)."""

    metrics: bool = True  # keep histogram buckets for Prometheus
    latency_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS  # upper bounds in seconds, +Inf implied
    access_log: bool = False  # one log line per request


SETTINGS = StatsSettings()


def configure(
    metrics: bool = True, latency_buckets: tuple[float, ...] | None = None, access_log: bool = False
) -> None:
    """Set what model versions loaded from now on record (versions already loaded keep theirs)."""
    SETTINGS.metrics = metrics
    SETTINGS.latency_buckets = tuple(latency_buckets) if latency_buckets else DEFAULT_LATENCY_BUCKETS
    SETTINGS.access_log = access_log


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class Buckets:
    """Histogram bucket counts (non-cumulative; the last slot is +Inf) over fixed upper bounds.

    Bounds are in seconds for latencies; observations come in nanoseconds and are compared
    against bounds converted once to nanoseconds. Not thread-safe: the owner holds its lock.
    """

    __slots__ = ("bounds", "_limits", "counts")

    def __init__(self, bounds: tuple[float, ...], scale: float = 1e9) -> None:
        self.bounds = bounds
        self._limits = [b * scale for b in bounds]
        self.counts = [0] * (len(bounds) + 1)

    def observe(self, value: float) -> None:
        # le semantics: a value equal to a bound belongs to that bound's bucket
        self.counts[bisect_left(self._limits, value)] += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out = []
        total = 0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            out.append((_float_str(bound), total))
        total += self.counts[-1]
        out.append(("+Inf", total))
        return out


def _float_str(value: float) -> str:
    # as prometheus_client writes `le` labels: floats always with a decimal point
    return repr(float(value))


class ModelStats:
    """Counters of one model version, updated from the event loop and the instance threads."""

    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self._lock = threading.Lock()
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchDurations] = {}
        self.failures: dict[Status, int] = {}
        # Prometheus histograms (None: metrics off for this version; nothing is recorded beyond the RPC's counters)
        self.histograms: VersionHistograms | None = (
            VersionHistograms(SETTINGS.latency_buckets) if SETTINGS.metrics else None
        )
        self._access = SETTINGS.access_log

    def record_success(self, timings: RequestTimings, total_ns: int) -> None:
        with self._lock:
            self.success.add(total_ns)
            self.queue.add(timings.queue_ns)
            self.compute_input.add(timings.compute_input_ns)
            self.compute_infer.add(timings.compute_infer_ns)
            self.compute_output.add(timings.compute_output_ns)
            self.last_inference_ms = time.time_ns() // 1_000_000
            h = self.histograms
            if h is not None:
                h.request.observe(total_ns)
                h.queue.observe(timings.queue_ns)
        if self._access:
            log_access(self.model, self.version, Status.OK.outcome, total_ns)

    def record_failure(self, status: Status, total_ns: int) -> None:
        with self._lock:
            self.fail.add(total_ns)
            self.failures[status] = self.failures.get(status, 0) + 1
        if self._access:
            log_access(self.model, self.version, status.outcome, total_ns)

    def record_execution(self, record: ExecutionRecord) -> None:
        with self._lock:
            self.inference_count += record.rows
            self.execution_count += 1
            batch = self.batches.get(record.rows)
            if batch is None:
                batch = self.batches[record.rows] = BatchDurations()
            batch.compute_input.add(record.compute_input_ns)
            batch.compute_infer.add(record.compute_infer_ns)
            batch.compute_output.add(record.compute_output_ns)
            h = self.histograms
            if h is not None:
                h.batch_size.observe(record.rows)
                h.compute_input.observe(record.compute_input_ns)
                h.compute_infer.observe(record.compute_infer_ns)
                h.compute_output.observe(record.compute_output_ns)

    def snapshot(self) -> "StatsSnapshot":
        """A consistent copy for the metrics collector."""
        with self._lock:
            h = self.histograms
            return StatsSnapshot(
                success=Duration(self.success.count, self.success.ns),
                queue=Duration(self.queue.count, self.queue.ns),
                failures={status.outcome: n for status, n in self.failures.items()},
                inference_count=self.inference_count,
                execution_count=self.execution_count,
                phases={
                    phase: Duration(sum(getattr(b, name).count for b in self.batches.values()),
                                    sum(getattr(b, name).ns for b in self.batches.values()))
                    for phase, name in PHASES.items()
                },
                histograms=None if h is None else h.copy(),
            )

    def fill(self, message) -> None:
        """Write these statistics into an inference.ModelStatistics message."""
        with self._lock:
            message.name = self.model
            message.version = self.version
            message.last_inference = self.last_inference_ms
            message.inference_count = self.inference_count
            message.execution_count = self.execution_count
            stats = message.inference_stats
            for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                duration: Duration = getattr(self, name)
                target = getattr(stats, name)
                target.count = duration.count
                target.ns = duration.ns
            for rows in sorted(self.batches):
                batch = self.batches[rows]
                entry = message.batch_stats.add(batch_size=rows)
                for name in ("compute_input", "compute_infer", "compute_output"):
                    duration = getattr(batch, name)
                    getattr(entry, name).count = duration.count
                    getattr(entry, name).ns = duration.ns


PHASES = {"input": "compute_input", "infer": "compute_infer", "output": "compute_output"}


class VersionHistograms:
    """The bucket counts behind kiln_*_duration_seconds and kiln_batch_size of one version."""

    __slots__ = ("request", "queue", "compute_input", "compute_infer", "compute_output", "batch_size")

    def __init__(self, latency_bounds: tuple[float, ...], _empty: bool = False) -> None:
        if _empty:
            return
        self.request = Buckets(latency_bounds)
        self.queue = Buckets(latency_bounds)
        self.compute_input = Buckets(latency_bounds)
        self.compute_infer = Buckets(latency_bounds)
        self.compute_output = Buckets(latency_bounds)
        self.batch_size = Buckets(BATCH_SIZE_BUCKETS, scale=1)

    def copy(self) -> "VersionHistograms":
        other = VersionHistograms((), _empty=True)
        for name in self.__slots__:
            source: Buckets = getattr(self, name)
            target = Buckets.__new__(Buckets)
            target.bounds, target._limits, target.counts = source.bounds, source._limits, list(source.counts)
            setattr(other, name, target)
        return other


@dataclass
class StatsSnapshot:
    success: Duration
    queue: Duration
    failures: dict[str, int]
    inference_count: int
    execution_count: int
    phases: dict[str, Duration]
    histograms: VersionHistograms | None


class UnroutedRequests:
    """Requests that failed before reaching a model version (unknown model, model not ready, bad version).

    Counted by (model, outcome) where model is the requested name only if the repository knows it,
    else "" — so a client sending random names cannot create unbounded label values.
    """

    def __init__(self, known_models) -> None:
        self._known = known_models  # a container of model names (the repository's dict)
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str], int] = {}

    def record(self, model: str, status: Status, total_ns: int = 0) -> None:
        label = model if model in self._known else ""
        key = (label, status.outcome)
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1
        if SETTINGS.access_log:
            log_access(label, "", status.outcome, total_ns)

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.counts)


def log_access(model: str, version: str, outcome: str, total_ns: int) -> None:
    duration_ms = round(total_ns / 1e6, 3)
    access_log.info(
        "model=%s version=%s outcome=%s duration_ms=%s", model or "-", version or "-", outcome, duration_ms,
        extra={"fields": {"model": model, "version": version, "outcome": outcome, "duration_ms": duration_ms}},
    )
