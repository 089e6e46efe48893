"""Every Prometheus metric kiln exports, defined in one place.

Labels are model and version (plus outcome/phase where they apply): never
anything per request. Units are in the names.

Nothing here runs on the request path. ModelStats (server/stats.py) takes each
measurement once, for the ModelStatistics RPC and for the histogram buckets;
KilnCollector reads those, the schedulers' queue depth / in-flight counts and
the repository's model states when Prometheus scrapes. Each KilnServer has its
own CollectorRegistry (process, platform and GC collectors included), so two
servers in one process (tests) never mix their series.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.stats import BATCH_SIZE_BUCKETS, DEFAULT_LATENCY_BUCKETS, Buckets, UnroutedRequests

log = logging.getLogger("kiln.metrics")

LATENCY_BUCKETS_ENV = "KILN_LATENCY_BUCKETS"

# Every family name kiln itself exports (prometheus_client's process_/python_ families come on top).
FAMILIES = {
    "kiln_request_duration_seconds": "histogram",
    "kiln_queue_duration_seconds": "histogram",
    "kiln_compute_duration_seconds": "histogram",
    "kiln_batch_size": "histogram",
    "kiln_requests_total": "counter",
    "kiln_inferences_total": "counter",
    "kiln_executions_total": "counter",
    "kiln_instance_replacements_total": "counter",
    "kiln_queue_depth": "gauge",
    "kiln_queue_capacity": "gauge",
    "kiln_inflight_requests": "gauge",
    "kiln_model_ready": "gauge",
    "kiln_gpu_utilization_ratio": "gauge",
    "kiln_gpu_memory_used_bytes": "gauge",
    "kiln_gpu_memory_total_bytes": "gauge",
    "kiln_gpu_power_watts": "gauge",
}


# Outcomes a loaded version's requests commonly end with, exported at 0 from the start: rate() over a
# series that appears with its first error would miss that error (Prometheus cannot see the jump from 0).
PRESET_OUTCOMES = ("success", "invalid_argument", "unavailable", "deadline_exceeded", "cancelled", "internal")


def parse_buckets(text: str, source: str = "--latency-buckets") -> tuple[float, ...]:
    """'0.001,0.01,0.1' -> (0.001, 0.01, 0.1): positive seconds, sorted, duplicates dropped."""
    try:
        buckets = tuple(sorted({float(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise ValueError(f"{source} must be comma-separated seconds, got '{text}'") from None
    if not buckets:
        raise ValueError(f"{source} must name at least one bucket, got '{text}'")
    if buckets[0] <= 0 or buckets[-1] == float("inf") or any(b != b for b in buckets):
        raise ValueError(f"{source} must be positive, finite seconds (+Inf is implied), got '{text}'")
    return buckets


def latency_buckets(flag: str | None = None) -> tuple[float, ...]:
    """Latency bucket bounds: the --latency-buckets flag, else KILN_LATENCY_BUCKETS, else the defaults
    (50 us .. 10 s)."""
    if flag:
        return parse_buckets(flag)
    raw = os.environ.get(LATENCY_BUCKETS_ENV, "").strip()
    if raw:
        return parse_buckets(raw, LATENCY_BUCKETS_ENV)
    return DEFAULT_LATENCY_BUCKETS


def _hist(buckets: Buckets) -> list[tuple[str, int]]:
    return buckets.cumulative()


class KilnCollector(Collector):
    """kiln_* families of one server, built from its repository at scrape time."""

    def __init__(self, repository, unrouted: UnroutedRequests | None = None) -> None:
        self.repository = repository
        self.unrouted = unrouted
        self._seen: dict[str, set[str]] = {}  # model -> versions exported as loaded once (0 after unload)

    def describe(self) -> Iterable[Metric]:
        return []  # families are dynamic; nothing to check at register time

    def collect(self) -> Iterable[Metric]:
        from server.repository import ModelState  # late: repository imports stats, which this module imports

        labels = ["model", "version"]
        request = HistogramMetricFamily(
            "kiln_request_duration_seconds",
            "Time from request arrival to response, successful requests (as ModelStatistics success).",
            labels=labels)
        queue = HistogramMetricFamily(
            "kiln_queue_duration_seconds", "Time a successful request waited in the batcher queue.", labels=labels)
        compute = HistogramMetricFamily(
            "kiln_compute_duration_seconds",
            "Time per batch execution, by phase: input (gather), infer (runtime), output (scatter).",
            labels=labels + ["phase"])
        batch = HistogramMetricFamily("kiln_batch_size", "Rows per batch execution.", labels=labels)
        requests = CounterMetricFamily(
            "kiln_requests", "Requests by outcome: success or the lower-case gRPC status name. "
            "Requests that never reached a model version have version=\"\" (and model=\"\" if unknown).",
            labels=labels + ["outcome"])
        inferences = CounterMetricFamily("kiln_inferences", "Rows inferred (sum of batch sizes).", labels=labels)
        executions = CounterMetricFamily("kiln_executions", "Batches executed.", labels=labels)
        replacements = CounterMetricFamily(
            "kiln_instance_replacements", "Instances abandoned and replaced after an execution ran past the "
            "model's execution timeout (config parameter execution_timeout_microseconds).", labels=labels)
        depth = GaugeMetricFamily("kiln_queue_depth", "Requests waiting in the batcher queue.", labels=labels)
        capacity = GaugeMetricFamily(
            "kiln_queue_capacity", "Most requests the batcher queue holds (sum of max_queue_size over priority "
            "levels); 0 when unbounded.", labels=labels)
        inflight = GaugeMetricFamily(
            "kiln_inflight_requests", "Requests accepted by the batcher and not yet answered.", labels=labels)
        ready = GaugeMetricFamily(
            "kiln_model_ready", "1 when the model version serves requests; 0 when loading, unloaded or failed "
            "(version=\"\" for a model with no loaded version).", labels=labels)

        repo = self.repository
        expected = set(getattr(repo, "expected_at_start", ()))
        for name, entry in list(repo.models.items()):
            versions = list(entry.versions.values())
            seen = self._seen.setdefault(name, set())
            current = set()
            for version in versions:
                v = version.version_str
                current.add(v)
                seen.add(v)
                lv = [name, v]
                ready.add_metric(lv, 1.0 if version.state is ModelState.READY else 0.0)
                scheduler = version.scheduler
                depth.add_metric(lv, scheduler.queue_depth)
                capacity.add_metric(lv, queue_capacity(version.config))
                inflight.add_metric(lv, scheduler.inflight)
                replacements.add_metric(lv, getattr(scheduler, "instance_replacements", 0))
                snap = version.stats.snapshot()
                outcomes = dict.fromkeys(PRESET_OUTCOMES, 0)
                outcomes.update(snap.failures)
                outcomes["success"] = snap.success.count
                for outcome, count in outcomes.items():
                    requests.add_metric(lv + [outcome], count)
                inferences.add_metric(lv, snap.inference_count)
                executions.add_metric(lv, snap.execution_count)
                h = snap.histograms
                if h is None:
                    continue
                request.add_metric(lv, _hist(h.request), snap.success.ns / 1e9)
                queue.add_metric(lv, _hist(h.queue), snap.queue.ns / 1e9)
                for phase, buckets in (("input", h.compute_input), ("infer", h.compute_infer),
                                       ("output", h.compute_output)):
                    compute.add_metric(lv + [phase], _hist(buckets), snap.phases[phase].ns / 1e9)
                batch.add_metric(lv, _hist(h.batch_size), float(snap.inference_count))
            for v in sorted(seen - current):
                ready.add_metric([name, v], 0.0)  # unloaded
            if not versions and not seen:
                never_asked = entry.state is ModelState.UNAVAILABLE and entry.reason == "not loaded"
                if name in expected or not never_asked:
                    ready.add_metric([name, ""], 0.0)  # loading, or failed to load
        if self.unrouted is not None:
            for (model, outcome), count in sorted(self.unrouted.snapshot().items()):
                requests.add_metric([model, "", outcome], count)
        return [request, queue, compute, batch, requests, inferences, executions, replacements, depth, capacity, inflight, ready]


def queue_capacity(config) -> int:
    """Sum of max_queue_size over the priority levels; 0 if any level (or the model) has an unbounded queue."""
    batching = getattr(config, "dynamic_batching", None)
    if batching is None:
        return 0
    levels = range(1, max(batching.priority_levels, 1) + 1)
    sizes = [batching.policy_for(level).max_queue_size for level in levels]
    return 0 if not all(sizes) else sum(sizes)


class GpuCollector(Collector):
    """kiln_gpu_* per device via NVML (nvidia-ml-py, the `gpu` extra), read at scrape time."""

    def __init__(self, nvml, count: int) -> None:
        self.nvml = nvml
        self.count = count

    @classmethod
    def create(cls) -> "GpuCollector | None":
        """A collector, or None where there is no NVML library or no GPU (logged once, never an error)."""
        if os.environ.get("KILN_GPU_METRICS", "1").lower() in ("0", "false", "no"):
            return None
        try:
            import pynvml  # the nvidia-ml-py package; lazily, only here
        except ImportError:
            log.info("GPU metrics off: nvidia-ml-py is not installed (pip install 'kiln-serve[gpu]')")
            return None
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            log.info("GPU metrics off: NVML unavailable (%s)", exc)
            return None
        if count == 0:
            return None
        log.info("GPU metrics on for %d device(s)", count)
        return cls(pynvml, count)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        nvml = self.nvml
        util = GaugeMetricFamily("kiln_gpu_utilization_ratio", "GPU busy fraction over the last sample period (0..1).",
                                 labels=["gpu"])
        used = GaugeMetricFamily("kiln_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("kiln_gpu_memory_total_bytes", "GPU memory installed.", labels=["gpu"])
        power = GaugeMetricFamily("kiln_gpu_power_watts", "GPU power draw.", labels=["gpu"])
        for index in range(self.count):
            label = [str(index)]
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(label, float(memory.used))
                total.add_metric(label, float(memory.total))
                util.add_metric(label, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                power.add_metric(label, nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
            except Exception as exc:  # one failing query must not break the scrape
                log.debug("GPU %d metrics failed: %s", index, exc)
        return [util, used, total, power]


def build_registry(repository, unrouted: UnroutedRequests | None = None, gpu: bool = True) -> CollectorRegistry:
    """A registry with kiln's families, GPU gauges where a GPU exists, and process/platform/GC metrics."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(KilnCollector(repository, unrouted))
    if gpu:
        collector = GpuCollector.create()
        if collector is not None:
            registry.register(collector)
    return registry


__all__ = [
    "BATCH_SIZE_BUCKETS", "DEFAULT_LATENCY_BUCKETS", "FAMILIES", "GpuCollector", "KilnCollector",
    "build_registry", "latency_buckets", "parse_buckets",
]
