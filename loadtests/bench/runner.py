"""`kiln bench` against a running server: worker processes, steps, server statistics, summaries."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import queue
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TextIO

import grpc
import numpy as np

from loadtests.bench import report as rp
from loadtests.bench.progress import ProgressBar
from loadtests.bench.worker import StepResult, StepSpec, worker_main
from loadtests.inputs import fetch_metadata, make_requests, request_rows
from loadtests.steal import cpu_ticks, steal_share
from server import grpc_experiments
from server.channels import ClientSecurity
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc

MAX_DURATION_S = 600.0


class BenchError(Exception):
    """A bench that cannot run (bad arguments, unreachable server, unknown model)."""


@dataclass
class BenchConfig:
    url: str
    model: str
    version: str = ""
    batch_size: int = 1
    concurrency: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    duration_s: float = 10.0
    warmup_s: float = 1.0
    processes: int = 1
    connections: int = 0  # 0: one per process
    timeout_s: float = 30.0
    max_inflight: int = 1000  # open loop, over all processes
    input_files: dict[str, str] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    seed: int = 0
    server_stats: bool = True
    security: ClientSecurity = field(default_factory=ClientSecurity)  # TLS and token (kept out of the report)
    event_loop: str = "auto"  # the workers' asyncio loop (server/eventloop.py)
    streaming: bool = False  # ModelStreamInfer streams, one request in flight each, instead of unary ModelInfer

    def validate(self) -> None:
        if not self.concurrency and not self.rates:
            raise BenchError("nothing to run: give --concurrency and/or --rate")
        if any(c < 1 for c in self.concurrency):
            raise BenchError("--concurrency values must be >= 1")
        if any(r <= 0 for r in self.rates):
            raise BenchError("--rate values must be > 0")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise BenchError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
        if not 0 <= self.warmup_s <= 60:
            raise BenchError("--warmup must be in [0, 60] seconds")
        if self.processes < 1 or self.batch_size < 1 or self.max_inflight < 1:
            raise BenchError("--processes, --batch-size and --max-inflight must be >= 1")
        if self.connections < 0:
            raise BenchError("--connections must be >= 0")


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def stats_snapshot(stub, model: str, version: str, metadata=()) -> dict | None:
    """ModelStatistics summed over the model's versions; None when the server has no such RPC."""
    try:
        response = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model, version=version), timeout=10, metadata=metadata)
    except grpc.RpcError:
        return None
    totals = dict.fromkeys(
        ["inference_count", "execution_count"]
        + [f"{n}_{k}" for n in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output") for k in ("count", "ns")],
        0,
    )
    for stats in response.model_stats:
        totals["inference_count"] += stats.inference_count
        totals["execution_count"] += stats.execution_count
        for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            duration = getattr(stats.inference_stats, name)
            totals[f"{name}_count"] += duration.count
            totals[f"{name}_ns"] += duration.ns
    return totals


class _Workers:
    """`processes` spawned worker processes, each with its own channels and task queue."""

    def __init__(self, cfg: BenchConfig, requests: list[bytes]) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that already holds gRPC state
        self.count = cfg.processes
        connections = _shares(max(cfg.connections, cfg.processes), cfg.processes)
        self.progress = ctx.Array("q", self.count, lock=False)
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(self.count)]
        self.procs = [
            ctx.Process(
                target=worker_main,
                args=(i, cfg.url, cfg.security, requests, connections[i], self.tasks[i], self.results, self.progress,
                      cfg.event_loop, cfg.streaming),
                name=f"kiln-bench-{i}",
                daemon=True,
            )
            for i in range(self.count)
        ]
        # grpc's iomgr client endpoints cost ~20-30% less client CPU per call (server/grpc_experiments.py)
        with grpc_experiments.added(grpc_experiments.CLIENT_EXPERIMENTS):
            for proc in self.procs:
                proc.start()
        self.connections = connections
        self.grpc_experiments = self.event_loop = ""
        ready = 0
        deadline = time.monotonic() + 60
        while ready < self.count:
            kind, worker, payload = self._get(deadline)
            if kind == "error":
                self.close()
                raise BenchError(f"worker {worker}: {payload}")
            self.grpc_experiments, self.event_loop = payload["grpc_experiments"], payload["event_loop"]
            ready += 1

    def _get(self, deadline: float):
        while True:
            try:
                return self.results.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise BenchError("workers did not answer in time") from None
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    raise BenchError(f"worker process(es) died: {dead}") from None

    def submit(self, specs: list[StepSpec]) -> None:
        for task_queue, spec in zip(self.tasks, specs):
            task_queue.put(spec)

    def collect(self, deadline: float) -> list[StepResult]:
        results: list[StepResult] = []
        while len(results) < self.count:
            kind, worker, payload = self._get(deadline)
            if kind == "error":
                raise BenchError(f"worker {worker}: {payload}")
            results.append(payload)
        return results

    def completed(self) -> int:
        return int(sum(self.progress))

    def close(self) -> None:
        for task_queue in self.tasks:
            try:
                task_queue.put(None)
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def _summarize(cfg: BenchConfig, mode: str, value: float, results: list[StepResult], spec_window: tuple[float, float],
               before: dict | None, after: dict | None, workers: _Workers, stolen: float | None = None) -> dict:
    measure_start, measure_end = spec_window
    duration = measure_end - measure_start
    latencies = np.concatenate([r.latencies_s for r in results]) if results else np.empty(0)
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in results:
        for code, n in r.errors.items():
            errors[code] = errors.get(code, 0) + n
            examples.setdefault(code, r.error_examples.get(code, ""))
    sent = sum(r.sent for r in results)
    ok = sum(r.ok for r in results)
    error_count = sum(errors.values())
    cpu_s = sum(r.cpu_s for r in results)
    wall_s = max((r.wall_s for r in results), default=0.0)
    step: dict = {
        "mode": mode,
        "concurrency": int(value) if mode == "closed" else None,
        "offered_rps": float(value) if mode == "open" else None,
        "batch_size": cfg.batch_size,
        "duration_s": duration,
        "sent": sent,
        "ok": ok,
        "error_count": error_count,
        "errors": dict(sorted(errors.items())),
        "error_examples": dict(sorted(examples.items())),  # the first details seen per status
        "throughput_rps": ok / duration,
        "throughput_items_per_s": ok * cfg.batch_size / duration,
        "latency_ms": rp.latency_summary(latencies),
        "response_bytes": sum(r.response_bytes for r in results),
        "rate_sustained": None,
        "client": {
            "processes": workers.count,
            "connections": sum(workers.connections),
            "cpu_s": cpu_s,
            "cpu_cores": cpu_s / wall_s if wall_s > 0 else None,
            "machine_cpu_share": (cpu_s / wall_s / (rp.machine_info()["nproc"] or 1)) if wall_s > 0 else None,
            "grpc_experiments": workers.grpc_experiments,  # as the workers ran with it
            "event_loop": workers.event_loop,
        },
        "server": rp.server_delta(before, after),
        "steal_share": stolen,  # of the machine's CPU time over the window, taken by the hypervisor (steal.py)
    }
    if mode == "open":
        answered = sum(r.answered_in_window for r in results)
        lags = np.concatenate([r.send_lag_s for r in results if r.send_lag_s is not None] or [np.empty(0)])
        step["open_loop"] = {
            "scheduled": sum(r.scheduled for r in results),
            "sent": sent,
            "unsent": sum(r.unsent for r in results),
            "achieved_rps": answered / duration,
            "sent_rps": sent / duration,
            "inflight_cap_hits": sum(r.inflight_cap_hits for r in results),
            "max_inflight": cfg.max_inflight,
            "send_lag_ms": {
                "p50": float(np.percentile(lags, 50) * 1000) if lags.size else None,
                "p99": float(np.percentile(lags, 99) * 1000) if lags.size else None,
                "max": float(lags.max() * 1000) if lags.size else None,
            },
        }
        step["throughput_rps"] = answered / duration  # open loop: the rate answers actually came back at
        step["throughput_items_per_s"] = answered * cfg.batch_size / duration
        sustained, reason = rp.sustained_verdict(step)
        step["rate_sustained"] = sustained
        step["open_loop"]["sustained"] = sustained
        step["open_loop"]["reason"] = reason
    return step


def run_bench(cfg: BenchConfig, out: TextIO = sys.stdout, err: TextIO = sys.stderr, progress: bool | None = None) -> dict:
    """Run every step of `cfg` against a running server; print the table as it goes; return the report."""
    cfg.validate()
    channel = cfg.security.channel(cfg.url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    call_metadata = cfg.security.metadata

    def snapshot() -> dict | None:
        return stats_snapshot(stub, cfg.model, cfg.version, call_metadata)

    def open_window() -> tuple:
        """What a step's measured window starts from: the machine's CPU ticks and the server's statistics."""
        return cpu_ticks(), snapshot() if cfg.server_stats else None

    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=15)
            metadata = fetch_metadata(stub, cfg.model, cfg.version, metadata=call_metadata)
        except grpc.FutureTimeoutError:
            hint = "TLS handshake failed or server down" if cfg.security.tls else "server down, or a TLS port (--tls-ca)"
            raise BenchError(f"cannot connect to {cfg.url} within 15 s ({hint})") from None
        except grpc.RpcError as exc:
            raise BenchError(f"ModelMetadata({cfg.model}): {exc.code().name}: {exc.details()}") from None
        try:
            requests = make_requests(
                metadata, cfg.batch_size, version=cfg.version, files=cfg.input_files, shapes=cfg.input_shapes, seed=cfg.seed
            )
        except (ValueError, OSError) as exc:
            raise BenchError(str(exc)) from None
        rows = request_rows(metadata, requests[0])  # .npy files set the rows; items/s counts what is sent
        if cfg.input_files and cfg.batch_size not in (1, rows):
            raise BenchError(f"--batch-size {cfg.batch_size} does not match the {rows} row(s) per request of the .npy files")
        cfg = replace(cfg, batch_size=rows)
        payloads = [r.SerializeToString() for r in requests]
        steps_plan = [("closed", float(c)) for c in cfg.concurrency] + [("open", float(r)) for r in cfg.rates]
        report: dict = {
            "tool": "kiln bench",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv,
            "machine": rp.machine_info(),
            "config": asdict(cfg) | {
                "security": cfg.security.describe(),
                "inputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                    for t in requests[0].inputs
                ],
                "request_bytes": len(payloads[0]),
            },
            "steps": [],
        }
        bar = ProgressBar(len(steps_plan), cfg.warmup_s + cfg.duration_s, err, enabled=progress)
        workers = _Workers(cfg, payloads)
        try:
            print(f"kiln bench: {cfg.model} @ {cfg.url}, batch {cfg.batch_size}, {cfg.processes} process(es), "
                  f"{sum(workers.connections)} connection(s){', streaming' if cfg.streaming else ''}, {cfg.warmup_s:g}s warm-up + {cfg.duration_s:g}s per step", file=out)
            print(rp.table_header(), file=out, flush=True)
            for index, (mode, value) in enumerate(steps_plan):
                start_at = time.monotonic() + 0.2
                measure_start = start_at + cfg.warmup_s
                measure_end = measure_start + cfg.duration_s
                users = _shares(int(value), cfg.processes) if mode == "closed" else [0] * cfg.processes
                inflight = _shares(cfg.max_inflight, cfg.processes)
                specs = [
                    StepSpec(mode, users[i], value / cfg.processes if mode == "open" else 0.0, start_at,
                             measure_start, measure_end, cfg.timeout_s, max(1, inflight[i]), cfg.seed * 1000 + index * 64 + i)
                    for i in range(cfg.processes)
                ]
                label = f"c={int(value)}" if mode == "closed" else f"r={value:g}"
                workers.submit(specs)
                bar.step(index, label, start_at)
                opened = None  # (CPU ticks, server statistics) when the measured window opened
                while time.monotonic() < measure_end:
                    now = time.monotonic()
                    if opened is None and now >= measure_start:
                        opened = open_window()
                    bar.update(workers.completed())
                    time.sleep(min(0.2, max(0.0, measure_end - now)))
                ticks_before, before = opened or open_window()
                stolen = steal_share(ticks_before, cpu_ticks())
                after = snapshot() if cfg.server_stats else None
                results = workers.collect(measure_end + cfg.timeout_s + 30)
                step = _summarize(cfg, mode, value, results, (measure_start, measure_end), before, after, workers, stolen)
                report["steps"].append(step)
                bar.clear()
                print(rp.table_row(step), file=out, flush=True)
                for note in rp.step_notes(step):
                    print(note, file=out, flush=True)
        finally:
            bar.clear()
            workers.close()
        return report
    finally:
        channel.close()
