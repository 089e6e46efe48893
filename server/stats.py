"""Per model-version statistics: one set of measurements feeds both
the ModelStatistics RPC and the Prometheus metrics."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from server.batching import ExecutionRecord, RequestTimings
from server.errors import Status
from server.metrics import get_metrics


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
        metrics = get_metrics()
        labels = (model, version)
        self._request_duration = metrics.request_duration.labels(*labels)
        self._queue_duration = metrics.queue_duration.labels(*labels)
        self._phase = {
            phase: metrics.compute_duration.labels(model, version, phase) for phase in ("input", "infer", "output")
        }
        self._batch_size = metrics.batch_size.labels(*labels)
        self._inferences = metrics.inferences.labels(*labels)
        self._executions = metrics.executions.labels(*labels)
        self._requests = metrics.requests
        self._success_counter = metrics.requests.labels(model, version, Status.OK.outcome)
        self.queue_depth_gauge = metrics.queue_depth.labels(*labels)
        self.inflight_gauge = metrics.inflight.labels(*labels)
        self.ready_gauge = metrics.model_ready.labels(*labels)

    def record_success(self, timings: RequestTimings, total_ns: int) -> None:
        with self._lock:
            self.success.add(total_ns)
            self.queue.add(timings.queue_ns)
            self.compute_input.add(timings.compute_input_ns)
            self.compute_infer.add(timings.compute_infer_ns)
            self.compute_output.add(timings.compute_output_ns)
            self.last_inference_ms = time.time_ns() // 1_000_000
        self._request_duration.observe(total_ns / 1e9)
        self._queue_duration.observe(timings.queue_ns / 1e9)
        self._success_counter.inc()

    def record_failure(self, status: Status, total_ns: int) -> None:
        with self._lock:
            self.fail.add(total_ns)
        self._request_duration.observe(total_ns / 1e9)
        self._requests.labels(self.model, self.version, status.outcome).inc()

    def record_execution(self, record: ExecutionRecord) -> None:
        with self._lock:
            self.inference_count += record.rows
            self.execution_count += 1
            batch = self.batches.setdefault(record.rows, BatchDurations())
            batch.compute_input.add(record.compute_input_ns)
            batch.compute_infer.add(record.compute_infer_ns)
            batch.compute_output.add(record.compute_output_ns)
        self._batch_size.observe(record.rows)
        self._inferences.inc(record.rows)
        self._executions.inc()
        self._phase["input"].observe(record.compute_input_ns / 1e9)
        self._phase["infer"].observe(record.compute_infer_ns / 1e9)
        self._phase["output"].observe(record.compute_output_ns / 1e9)

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
