"""The supervisor of `kiln serve --workers N`: reserves the port, starts and restarts the workers,
serves their merged /metrics, and forwards signals (the whole design: server/workers.py)."""

from __future__ import annotations

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

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

from server.app import ServerSettings
from server.runtime.base import CPU_SHARE_ENV
from server.workers import PEERS_FILE, PRIVATE_HOST, SETTINGS_FILE, WorkerSpec, merge_metrics

log = logging.getLogger("kiln.workers")

MAX_RESTARTS = 5  # unexpected worker exits tolerated within RESTART_WINDOW_S, over all workers
RESTART_WINDOW_S = 60.0
RESTART_DELAY_S = 1.0
SCRAPE_TIMEOUT_S = 5.0
KILL_AFTER_GRACE_S = 15.0  # SIGKILL a worker this long after its grace period


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
