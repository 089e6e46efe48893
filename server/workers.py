"""`kiln serve --workers N`: N serving processes on one gRPC port (SO_REUSEPORT), one supervisor.

One kiln process runs one asyncio event loop, and on a small model that loop (the Python gRPC
layer) is what caps throughput, not the runtime. N workers use N cores:

- The **supervisor** (the `kiln serve` process) reserves the gRPC port (a bound, never listening
  SO_REUSEPORT socket: resolves port 0, keeps other programs off it), starts N workers with
  `python -m server.workers`, owns the public /metrics port, forwards SIGTERM/SIGINT to every
  worker, and restarts a worker that dies unexpectedly (at most MAX_RESTARTS within
  RESTART_WINDOW_S, else it stops all and exits 1). It exits 0 when every worker drained and
  exited 0.
- Each **worker** is a full KilnServer: the same repository, its own batcher per model, bound to
  the shared port with SO_REUSEPORT (the kernel spreads *connections* over the workers: one
  client connection always lands on one worker) plus a private loopback port on the same grpc.aio
  server, reported to the supervisor and shared with its siblings in `peers.json`.
- A call with the metadata `kiln-local: 1` is answered by the receiving worker alone. Without it:
  ModelStatistics sums every worker's statistics; RepositoryModelLoad/Unload are applied locally
  and forwarded to every sibling (OK only when all succeeded, else the first error). Health,
  readiness, RepositoryIndex, metadata and inference are answered by the receiving worker.
- /metrics on the supervisor scrapes each worker's own loopback endpoint and merges: kiln_*
  counters, histograms and gauges summed per label set, except kiln_model_ready (the minimum:
  1 only where every worker is ready) and kiln_gpu_* (one device seen by all: the maximum);
  process_* and python_* series keep one series per worker (label `worker`).

With the default `--workers 1` none of this runs: `kiln serve` is one process as before.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import pickle
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterable

import grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from server import eventloop
from server.app import KilnServer, ServerSettings
from server.auth import read_token_file
from server.errors import KilnError, Status
from server.logs import configure_logging
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc
from server.repository import ControlMode
from server.runtime.base import CPU_SHARE_ENV
from server.service import InferenceService, grpc_errors

log = logging.getLogger("kiln.workers")

LOCAL_METADATA = "kiln-local"  # "1": the receiving worker answers for itself only
WORKER_METADATA = "kiln-worker"  # trailing metadata of ServerMetadata: the answering worker's index
WORKER_PID_METADATA = "kiln-worker-pid"
PRIVATE_HOST = "127.0.0.1"
PEERS_FILE = "peers.json"
SETTINGS_FILE = "settings.pickle"
MAX_RESTARTS = 5  # unexpected worker exits tolerated within RESTART_WINDOW_S, over all workers
RESTART_WINDOW_S = 60.0
RESTART_DELAY_S = 1.0
STATS_TIMEOUT_S = 10.0
SCRAPE_TIMEOUT_S = 5.0
KILL_AFTER_GRACE_S = 15.0  # supervisor: SIGKILL a worker this long after its grace period

# metadata never forwarded to a sibling (transport headers; the local flag is set anew)
_NOT_FORWARDED = ("user-agent", "content-type", "te", "grpc-", ":", LOCAL_METADATA)


# ---- merging (pure functions) ---------------------------------------------------------------------


def _add_durations(target, source) -> None:
    """target += source for every StatisticDuration field of two messages of one type."""
    for fd in source.DESCRIPTOR.fields:
        if fd.message_type is not None and fd.message_type.name == "StatisticDuration":
            a, b = getattr(target, fd.name), getattr(source, fd.name)
            a.count += b.count
            a.ns += b.ns


def _add_model_stats(target: pb.ModelStatistics, source: pb.ModelStatistics) -> None:
    target.last_inference = max(target.last_inference, source.last_inference)
    target.inference_count += source.inference_count
    target.execution_count += source.execution_count
    _add_durations(target.inference_stats, source.inference_stats)
    batches = {b.batch_size: b for b in target.batch_stats}
    for batch in source.batch_stats:
        if batch.batch_size in batches:
            _add_durations(batches[batch.batch_size], batch)
        else:
            added = pb.InferBatchStatistics()
            added.CopyFrom(batch)
            batches[batch.batch_size] = added
    ordered = [batches[size] for size in sorted(batches)]
    copies = [pb.InferBatchStatistics() for _ in ordered]
    for copy, batch in zip(copies, ordered):
        copy.CopyFrom(batch)
    del target.batch_stats[:]
    target.batch_stats.extend(copies)
    for key, value in source.response_stats.items():
        _add_durations(target.response_stats[key], value)


def merge_statistics(responses: Iterable[pb.ModelStatisticsResponse]) -> pb.ModelStatisticsResponse:
    """One ModelStatisticsResponse summing several workers' per (model, version); first-seen order."""
    merged = pb.ModelStatisticsResponse()
    seen: dict[tuple[str, str], pb.ModelStatistics] = {}
    for response in responses:
        for stats in response.model_stats:
            key = (stats.name, stats.version)
            if key in seen:
                _add_model_stats(seen[key], stats)
            else:
                target = merged.model_stats.add()
                target.CopyFrom(stats)
                seen[key] = target
    return merged


def merge_metrics(texts: dict[str, str]) -> list[Metric]:
    """Merge Prometheus text expositions of several workers (worker label -> text), as the module
    docstring says: kiln_* summed (kiln_model_ready min, absent counting as 0; kiln_gpu_* max),
    other families one series per worker with a `worker` label."""
    families: dict[str, Metric] = {}
    # family -> series key (labels without le) -> (sample name, labels) -> [values]
    values: dict[str, dict[tuple, dict[tuple, list[float]]]] = {}
    for worker, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = family.name.startswith("kiln_")
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            series_map = values[family.name]
            for sample in family.samples:
                labels = dict(sample.labels)
                if not merged:
                    labels["worker"] = worker
                labels_key = tuple(sorted(labels.items()))
                series_key = tuple(item for item in labels_key if item[0] != "le")
                series_map.setdefault(series_key, {}).setdefault((sample.name, labels_key), []).append(sample.value)
    workers = len(texts)
    out = []
    for name, metric in families.items():
        for series in values[name].values():
            for (sample_name, labels_key), vals in series.items():
                if name == "kiln_model_ready":
                    value = min(vals) if len(vals) == workers else 0.0
                elif name.startswith("kiln_gpu_"):
                    value = max(vals)
                elif sample_name.endswith("_created"):
                    value = min(vals)
                else:
                    value = sum(vals)
                metric.add_sample(sample_name, dict(labels_key), value)
        out.append(metric)
    return out


# ---- worker side ----------------------------------------------------------------------------------


def _is_local(context) -> bool:
    return any(key == LOCAL_METADATA and value == "1" for key, value in (context.invocation_metadata() or ()))


def _forwarded_metadata(context) -> tuple[tuple[str, str], ...]:
    """The caller's metadata (credentials included) plus the local flag, for a call to a sibling."""
    kept = tuple(
        (key, value) for key, value in (context.invocation_metadata() or ())
        if not key.startswith(_NOT_FORWARDED)
    )
    return kept + ((LOCAL_METADATA, "1"),)


class Siblings:
    """The other workers' private addresses (from the supervisor's peers.json) and channels to them."""

    def __init__(self, run_dir: Path, index: int) -> None:
        self.path = Path(run_dir) / PEERS_FILE
        self.index = index
        self._peers: dict[int, str] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def peers(self) -> dict[int, str]:
        """index -> private address of every other worker that has reported. Read anew on every call
        (a few hundred bytes, read only by statistics and load/unload calls): file timestamps are too
        coarse to tell two quick rewrites apart."""
        try:
            rows = json.loads(self.path.read_text())
        except FileNotFoundError:
            rows = []
        except (OSError, ValueError):  # never half-written (os.replace), but keep the last good list
            return self._peers
        self._peers = {int(r["index"]): r["address"] for r in rows if int(r["index"]) != self.index}
        for address in set(self._channels) - set(self._peers.values()):
            channel = self._channels.pop(address)
            task = asyncio.ensure_future(channel.close())
            task.add_done_callback(lambda t: t.exception())
        return self._peers

    def stub(self, address: str) -> pb_grpc.GRPCInferenceServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return pb_grpc.GRPCInferenceServiceStub(channel)

    async def call(self, method: str, request, context, timeout: float | None) -> dict[int, object]:
        """Call `method` on every sibling with the local flag; index -> response or exception."""
        peers = self.peers()
        if not peers:
            return {}
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = remaining if timeout is None else min(timeout, remaining)
        metadata = _forwarded_metadata(context)
        calls = [getattr(self.stub(address), method)(request, metadata=metadata, timeout=timeout)
                 for address in peers.values()]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return dict(zip(peers, results))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _sibling_error(index: int, exc: BaseException) -> KilnError:
    if isinstance(exc, grpc.aio.AioRpcError):
        status = Status.__members__.get(exc.code().name, Status.INTERNAL)
        return KilnError(status, f"worker {index}: {exc.details()}")
    return KilnError(Status.INTERNAL, f"worker {index}: {exc}")


class WorkerInferenceService(InferenceService):
    """InferenceService of one worker: statistics and explicit load/unload span all workers."""

    def __init__(self, dataplane, index: int, siblings: Siblings) -> None:
        super().__init__(dataplane)
        self.index = index
        self.siblings = siblings

    @grpc_errors
    async def ServerMetadata(self, request, context):
        context.set_trailing_metadata(((WORKER_METADATA, str(self.index)), (WORKER_PID_METADATA, str(os.getpid()))))
        return await InferenceService.ServerMetadata.__wrapped__(self, request, context)

    @grpc_errors
    async def ModelStatistics(self, request, context):
        local = await InferenceService.ModelStatistics.__wrapped__(self, request, context)
        if _is_local(context):
            return local
        answers = await self.siblings.call("ModelStatistics", request, context, STATS_TIMEOUT_S)
        responses = [local]
        for index, answer in sorted(answers.items()):
            if isinstance(answer, BaseException):  # restarting, or the model is not loaded there
                log.debug("statistics of worker %d left out: %s", index, answer)
            else:
                responses.append(answer)
        return merge_statistics(responses)

    @grpc_errors
    async def RepositoryModelLoad(self, request, context):
        return await self._on_all(InferenceService.RepositoryModelLoad.__wrapped__, "RepositoryModelLoad",
                                  "load", request, context)

    @grpc_errors
    async def RepositoryModelUnload(self, request, context):
        return await self._on_all(InferenceService.RepositoryModelUnload.__wrapped__, "RepositoryModelUnload",
                                  "unload", request, context)

    async def _on_all(self, local_method, name: str, action: str, request, context):
        """Apply locally and on every sibling at once; OK only if all succeeded, else the first error
        (this worker's first, then the siblings' in index order)."""
        if _is_local(context):
            return await local_method(self, request, context)
        self._require_explicit(action)
        local, answers = await asyncio.gather(
            local_method(self, request, context),
            self.siblings.call(name, request, context, None),
            return_exceptions=True,
        )
        if isinstance(local, BaseException):
            raise local
        if isinstance(answers, BaseException):
            raise answers
        for index, answer in sorted(answers.items()):
            if isinstance(answer, BaseException):
                raise _sibling_error(index, answer)
        return local


@dataclasses.dataclass
class WorkerSpec:
    """What the supervisor hands every worker (pickled into the run directory)."""

    settings: ServerSettings
    log_format: str = "plain"
    log_level: str = "INFO"


def worker_settings(settings: ServerSettings) -> ServerSettings:
    metrics = settings.allow_metrics and settings.metrics_port is not None
    return dataclasses.replace(
        settings,
        reuse_port=True,
        private_host=PRIVATE_HOST,
        metrics_host=PRIVATE_HOST,
        metrics_port=0 if metrics else None,  # the supervisor serves the public /metrics
    )


class _WorkerLogFilter(logging.Filter):
    """Say which worker logs: a `worker` field in JSON lines, a "[worker i]" prefix in plain ones."""

    def __init__(self, index: int, plain: bool) -> None:
        super().__init__()
        self.index = index
        self.plain = plain

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_kiln_worker", False):
            return True
        record._kiln_worker = True
        if self.plain:
            record.msg = f"[worker {self.index}] {record.msg}"
        else:
            record.fields = {**(getattr(record, "fields", None) or {}), "worker": self.index}
        return True


def _own_metadata(settings: ServerSettings) -> tuple[tuple[str, str], ...]:
    """Metadata of a worker's own call to a sibling: the local flag, and a token of ours when tokens are on."""
    metadata: tuple[tuple[str, str], ...] = ((LOCAL_METADATA, "1"),)
    for path in (settings.auth_token_file, settings.admin_token_file):
        if path is not None:
            token = read_token_file(path)[0].decode()
            return metadata + (("authorization", f"Bearer {token}"),)
    return metadata


async def _sync_loaded_models(server: KilnServer, siblings: Siblings, index: int) -> None:
    """A restarted worker in explicit mode loads what its siblings serve (loads it missed)."""
    names: set[str] = set()
    metadata = _own_metadata(server.settings)
    for address in siblings.peers().values():
        try:
            answer = await siblings.stub(address).RepositoryIndex(
                pb.RepositoryIndexRequest(ready=True), metadata=metadata, timeout=STATS_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot read the repository index of %s: %s", address, exc.details())
            continue
        names.update(model.name for model in answer.models)
    for name in sorted(names):
        entry = server.repository.models.get(name)
        if entry is None or entry.latest_ready() is None:
            log.info("loading '%s' as the other workers serve it", name)
            try:
                await server.repository.load(name)
            except KilnError as exc:
                log.error("model '%s' failed to load: %s", name, exc.message)


async def _run_worker(spec: WorkerSpec, run_dir: Path, index: int, report_fd: int, restarted: bool) -> None:
    siblings = Siblings(run_dir, index)
    server = KilnServer(worker_settings(spec.settings),
                        service_factory=lambda dataplane: WorkerInferenceService(dataplane, index, siblings))
    loop = asyncio.get_running_loop()
    await server.start(load_models=False)
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, server.stop_soon)

    def supervisor_gone() -> None:  # stdin is a pipe from the supervisor: EOF means it is gone
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            log.warning("supervisor gone: stopping")
            server.stop_soon()

    loop.add_reader(0, supervisor_gone)
    report = {
        "index": index, "pid": os.getpid(), "address": f"{PRIVATE_HOST}:{server.private_grpc_port}",
        "metrics_port": server.metrics_port,
    }
    os.write(report_fd, (json.dumps(report) + "\n").encode())  # the fd stays open: its EOF tells our exit
    await server.repository.start()
    if restarted and server.repository.control_mode is ControlMode.EXPLICIT:
        await _sync_loaded_models(server, siblings, index)
    server.health.notify()
    log.info("server ready: %s", server.dataplane.ready())
    try:
        await server.wait_closed()
    finally:
        await siblings.close()


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.workers", description="one worker of `kiln serve --workers N`")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    parser.add_argument("--restarted", action="store_true")
    args = parser.parse_args(argv)
    spec: WorkerSpec = pickle.loads((args.run_dir / SETTINGS_FILE).read_bytes())
    configure_logging(spec.log_format, spec.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerLogFilter(args.index, spec.log_format != "json"))
    eventloop.run(_run_worker(spec, args.run_dir, args.index, args.report_fd, args.restarted), spec.settings.event_loop)
    return 0


# ---- supervisor side ------------------------------------------------------------------------------


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (never listening) SO_REUSEPORT socket on host:port: resolves port 0 and keeps
    programs that do not set SO_REUSEPORT off the port while workers come and go."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    family, kind, proto, _, address = socket.getaddrinfo(
        bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@dataclasses.dataclass
class _Worker:
    index: int
    process: subprocess.Popen | None = None
    report_fd: int | None = None
    buffer: bytes = b""
    info: dict | None = None  # the worker's report, once it arrived
    exited: bool = True


class WorkerMetricsCollector(Collector):
    """The supervisor's /metrics: every worker's endpoint scraped and merged (merge_metrics)."""

    def __init__(self, supervisor: "Supervisor") -> None:
        self.supervisor = supervisor
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="kiln-scrape")

    def describe(self):
        return []

    @staticmethod
    def _scrape(port: int) -> str | None:
        try:
            with urllib.request.urlopen(f"http://{PRIVATE_HOST}:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as answer:
                return answer.read().decode()
        except OSError as exc:
            log.warning("scrape of a worker's metrics (port %d) failed: %s", port, exc)
            return None

    def collect(self):
        ports = self.supervisor.metrics_ports()
        texts = dict(zip(ports, self._pool.map(self._scrape, ports.values())))
        return merge_metrics({str(index): text for index, text in texts.items() if text is not None})


class Supervisor:
    def __init__(self, settings: ServerSettings, workers: int, log_format: str = "plain", log_level: str = "INFO") -> None:
        self.settings = settings
        self.count = workers
        self.log_format = log_format
        self.log_level = log_level
        self.workers = [_Worker(i) for i in range(workers)]
        # each worker's runtimes size their thread pools to this, not to the whole machine
        self.cpu_share = max(1, len(os.sched_getaffinity(0)) // workers)
        self.run_dir: Path | None = None
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.failed = False
        self.started = False  # every worker reported once
        self._restarts: collections.deque[float] = collections.deque()
        self._pending_restarts: dict[int, float] = {}  # index -> monotonic time to restart at
        self._signals: list[int] = []
        self._lock = threading.Lock()
        self._metrics_http = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None

    # ---- what the metrics thread reads

    def metrics_ports(self) -> dict[int, int]:
        with self._lock:
            return {w.index: w.info["metrics_port"] for w in self.workers
                    if not w.exited and w.info and w.info.get("metrics_port")}

    # ---- lifecycle

    def run(self) -> int:
        settings = self.settings
        try:
            reserved = reserve_port(settings.host, settings.grpc_port)
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", settings.host, settings.grpc_port, exc)
            return 1
        self.run_dir = Path(tempfile.mkdtemp(prefix="kiln-workers-"))
        wake_r, wake_w = socket.socketpair()
        previous = {}
        try:
            self.grpc_port = reserved.getsockname()[1]
            spec = WorkerSpec(dataclasses.replace(settings, grpc_port=self.grpc_port), self.log_format, self.log_level)
            (self.run_dir / SETTINGS_FILE).write_bytes(pickle.dumps(spec))
            self._write_peers()
            if settings.metrics_port is not None and settings.allow_metrics:
                registry = CollectorRegistry(auto_describe=False)
                registry.register(WorkerMetricsCollector(self))
                metrics_host = settings.metrics_host or settings.host
                try:
                    self._metrics_http, _ = start_http_server(settings.metrics_port, addr=metrics_host, registry=registry)
                except OSError as exc:
                    log.error("cannot serve metrics on %s:%s: %s", metrics_host, settings.metrics_port, exc)
                    return 1
                self.metrics_port = self._metrics_http.server_port
            wake_r.setblocking(False)
            wake_w.setblocking(False)
            signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, lambda s, _f: self._signals.append(s))
            self.selector.register(wake_r, selectors.EVENT_READ, None)
            log.info("kiln: %d workers on %s:%s (metrics on port %s)", self.count, settings.host, self.grpc_port,
                     self.metrics_port)
            for worker in self.workers:
                self._spawn(worker, restarted=False)
            self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(-1)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            wake_r.close()
            wake_w.close()
            for worker in self.workers:
                self._kill(worker)
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
            reserved.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return 1 if self.failed else 0

    def _loop(self, wake_r: socket.socket) -> None:
        kill_at: float | None = None
        while any(not w.exited for w in self.workers) or (self._pending_restarts and not self.stopping):
            now = time.monotonic()
            deadlines = list(self._pending_restarts.values()) + ([kill_at] if kill_at is not None else [])
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    try:
                        wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                else:
                    self._read_report(key.data)
            if self._signals and not self.stopping:
                log.info("signal %s: stopping %d workers", signal.Signals(self._signals[0]).name, self.count)
                self.stop()
            if self.stopping:
                self._pending_restarts.clear()
                if kill_at is None:
                    kill_at = time.monotonic() + self.settings.grace_period_s + KILL_AFTER_GRACE_S
                elif time.monotonic() >= kill_at:
                    for worker in self.workers:
                        if not worker.exited:
                            log.error("worker %d still running after its grace period: killing it", worker.index)
                            self.failed = True
                            worker.process.kill()
                    kill_at = time.monotonic() + 5.0
            now = time.monotonic()
            for index, at in list(self._pending_restarts.items()):
                if at <= now:
                    del self._pending_restarts[index]
                    self._spawn(self.workers[index], restarted=True)

    def stop(self, failed: bool = False) -> None:
        self.stopping = True
        self.failed = self.failed or failed
        for worker in self.workers:
            if not worker.exited:
                try:
                    worker.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _spawn(self, worker: _Worker, restarted: bool) -> None:
        report_r, report_w = os.pipe()
        command = [sys.executable, "-m", "server.workers", "--run-dir", str(self.run_dir),
                   "--index", str(worker.index), "--report-fd", str(report_w)]
        if restarted:
            command.append("--restarted")
        try:
            process = subprocess.Popen(command, pass_fds=(report_w,), stdin=subprocess.PIPE,
                                       env=dict(os.environ, **{CPU_SHARE_ENV: str(self.cpu_share)}))
        finally:
            os.close(report_w)
        with self._lock:
            worker.process, worker.report_fd, worker.buffer, worker.info, worker.exited = process, report_r, b"", None, False
        self.selector.register(report_r, selectors.EVENT_READ, worker)
        log.info("worker %d started (pid %d)", worker.index, process.pid)

    def _read_report(self, worker: _Worker) -> None:
        data = os.read(worker.report_fd, 4096)
        if data:
            worker.buffer += data
            while b"\n" in worker.buffer:
                line, worker.buffer = worker.buffer.split(b"\n", 1)
                with self._lock:
                    worker.info = json.loads(line)
                self._write_peers()
                if not self.started and all(w.info for w in self.workers):
                    self.started = True
                    log.info("all %d workers listening on %s:%s", self.count, self.settings.host, self.grpc_port)
            return
        # EOF: the worker exited
        self.selector.unregister(worker.report_fd)
        os.close(worker.report_fd)
        code = worker.process.wait()
        reported = worker.info is not None
        with self._lock:
            worker.exited, worker.report_fd, worker.info = True, None, None
        self._write_peers()
        if self.stopping:
            if code != 0:
                log.error("worker %d exited with code %s", worker.index, code)
                self.failed = True
            else:
                log.info("worker %d stopped", worker.index)
            return
        log.error("worker %d (pid %d) exited unexpectedly with code %s", worker.index, worker.process.pid, code)
        now = time.monotonic()
        while self._restarts and self._restarts[0] < now - RESTART_WINDOW_S:
            self._restarts.popleft()
        if not self.started and not reported:
            log.error("a worker failed to start: stopping")
            self.stop(failed=True)
        elif len(self._restarts) >= MAX_RESTARTS:
            log.error("%d worker restarts within %.0f s: stopping", MAX_RESTARTS, RESTART_WINDOW_S)
            self.stop(failed=True)
        else:
            self._restarts.append(now)
            self._pending_restarts[worker.index] = now + RESTART_DELAY_S
            log.info("restarting worker %d in %.0f s", worker.index, RESTART_DELAY_S)

    def _write_peers(self) -> None:
        with self._lock:
            rows = [dict(w.info) for w in self.workers if w.info and not w.exited]
        temp = self.run_dir / (PEERS_FILE + ".tmp")
        temp.write_text(json.dumps(rows))
        os.replace(temp, self.run_dir / PEERS_FILE)

    def _kill(self, worker: _Worker) -> None:
        """Last resort at exit (supervisor error): no worker outlives its supervisor."""
        if worker.process is not None and worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()
        if worker.report_fd is not None:
            try:
                self.selector.unregister(worker.report_fd)
            except KeyError:
                pass
            os.close(worker.report_fd)
            worker.report_fd = None


def run_supervisor(settings: ServerSettings, workers: int, log_format: str = "plain", log_level: str = "INFO") -> int:
    """`kiln serve --workers N` (N > 1): run until SIGINT/SIGTERM; 0 when every worker drained cleanly."""
    return Supervisor(settings, workers, log_format, log_level).run()


if __name__ == "__main__":
    sys.exit(worker_main())
