"""What Prometheus metrics cost: mlp throughput with metrics on vs off, same run, interleaved rounds.

    .venv/bin/python loadtests/metrics_overhead.py                       # 6 rounds x 10 s per server
    .venv/bin/python loadtests/metrics_overhead.py --rounds 10 --seconds 15 --concurrency 64

Starts two `kiln serve` processes on a temporary repository holding only model_repo/mlp: one
with metrics (the default; its /metrics is scraped every --scrape-interval seconds during its
rounds, as Prometheus would), one with `--allow-metrics false` (no endpoint, ModelStats keeps
only the ModelStatistics counters). A separate load process drives one server at a time with
--concurrency closed-loop ModelInfer calls (grpc.aio, one prebuilt batch-1 request); rounds
alternate the order (on/off, off/on, ...) so both see the same drift. Reports per server the
median throughput and the server's CPU time per request (utime+stime from /proc), and the
overhead of metrics in both; writes loadtests/results/metrics_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests import threadcpu  # noqa: E402
from loadtests.ports import free_port  # noqa: E402
from loadtests.readiness import wait_ready  # noqa: E402
from loadtests import serve_process  # noqa: E402
from loadtests.serve_process import serve_command  # noqa: E402
from server.protocol import grpc_service_pb2 as pb  # noqa: E402
from server.protocol import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

RESULTS = ROOT / "loadtests" / "results" / "metrics_overhead.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = threadcpu.stat_fields(Path(f"/proc/{pid}/stat").read_text())
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def request_bytes() -> bytes:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 256])
    request.raw_input_contents.append(np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32).tobytes())
    return request.SerializeToString()


def load_process(url: str, concurrency: int, warmup_s: float, seconds: float, out) -> None:
    """Closed loop: `concurrency` workers each send the next request when the last one answered."""

    async def run() -> tuple[int, int]:
        request = pb.ModelInferRequest.FromString(request_bytes())
        async with grpc.aio.insecure_channel(url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            counting = False
            done = errors = 0
            stop = time.monotonic() + warmup_s + seconds

            async def worker():
                nonlocal done, errors
                while time.monotonic() < stop:
                    try:
                        await stub.ModelInfer(request)
                        if counting:
                            done += 1
                    except grpc.aio.AioRpcError:
                        errors += 1

            tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
            await asyncio.sleep(warmup_s)
            counting = True
            await asyncio.gather(*tasks)
            return done, errors

    out.send(asyncio.run(run()))


class Server:
    def __init__(self, name: str, repo: Path, metrics: bool) -> None:
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port() if metrics else -1
        self.url = f"127.0.0.1:{self.port}"
        command = serve_command(repo, self.port, self.metrics_port,
                                "--allow-metrics", "true" if metrics else "false", "--log-level", "WARNING")
        self.command = " ".join(command[1:])
        self.proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_ready(self.url, self.proc, timeout=timeout)

    def stop(self) -> None:
        serve_process.stop(self.proc, timeout_s=15)


def measure(server: Server, args) -> dict:
    """One round against one server: throughput and server CPU seconds per request."""
    stop_scraping = threading.Event()
    scrapes = 0

    def scraper():
        nonlocal scrapes
        while not stop_scraping.wait(args.scrape_interval):
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read()
            scrapes += 1

    receive, send = mp.Pipe(duplex=False)
    loader = mp.Process(target=load_process, args=(server.url, args.concurrency, args.warmup, args.seconds, send))
    loader.start()
    time.sleep(args.warmup)
    cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
    thread = None
    if server.metrics_port > 0 and args.scrape_interval > 0:
        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
    done, errors = receive.recv()
    cpu1, t1 = cpu_seconds(server.proc.pid), time.monotonic()
    stop_scraping.set()
    if thread is not None:
        thread.join()
    loader.join()
    if errors:
        raise RuntimeError(f"{errors} failed requests against the {server.name} server")
    return {"rps": done / args.seconds, "requests": done, "cpu_us_per_request": 1e6 * (cpu1 - cpu0) / max(done, 1),
            "scrapes": scrapes, "wall_s": t1 - t0}


def micro(n: int = 200_000) -> dict:
    """The request-path cost in isolation: ModelStats.record_success + record_execution (batch of 1)
    with histograms on vs off, and the CPU time of one scrape of a server with one model."""
    from prometheus_client import generate_latest

    from server import stats
    from server.batching import ExecutionRecord, RequestTimings
    from server.metrics import build_registry

    timings = RequestTimings(20_000, 1_000, 60_000, 2_000)
    record = ExecutionRecord(1, 1, 1_000, 60_000, 2_000)
    instances = {}
    for key, on in (("on", True), ("off", False)):
        stats.configure(metrics=on)
        instances[key] = stats.ModelStats("mlp", "1")
    stats.configure()
    per_request = {"on": float("inf"), "off": float("inf")}
    chunk = 10_000
    for _ in range(max(n // chunk, 1)):  # interleaved chunks, the fastest of each: robust on a busy machine
        for key, model_stats in instances.items():
            start = time.perf_counter_ns()
            for i in range(chunk):
                model_stats.record_execution(record)
                model_stats.record_success(timings, 100_000 + i)
            per_request[key] = min(per_request[key], (time.perf_counter_ns() - start) / chunk)
    model_stats = instances["on"]

    class _Version:  # one loaded version, as the collector sees it
        version_str, config = "1", None
        scheduler = type("S", (), {"queue_depth": 0, "inflight": 0})()

    from server.repository import ModelEntry, ModelState

    version = _Version()
    version.state = ModelState.READY
    version.stats = model_stats
    repo = type("R", (), {"models": {"mlp": ModelEntry(name="mlp", versions={1: version})}, "expected_at_start": ()})()
    registry = build_registry(repo, gpu=False)
    scrape_ms = float("inf")
    for _ in range(20):
        start = time.process_time()
        for _ in range(10):
            generate_latest(registry)
        scrape_ms = min(scrape_ms, (time.process_time() - start) / 10 * 1e3)
    return {"record_ns_per_request_on": per_request["on"], "record_ns_per_request_off": per_request["off"],
            "scrape_cpu_ms": scrape_ms}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per server per round")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="scrape the metrics server this often (0: never)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    direct = micro()
    print(f"request path: {direct['record_ns_per_request_on']:.0f} ns/request with metrics, "
          f"{direct['record_ns_per_request_off']:.0f} ns without; one scrape: {direct['scrape_cpu_ms']:.2f} ms CPU", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="kiln-metrics-overhead-"))
    shutil.copytree(ROOT / "model_repo" / "mlp", workdir / "mlp")
    servers = {"on": Server("metrics on", workdir, True), "off": Server("metrics off", workdir, False)}
    results: dict[str, list[dict]] = {"on": [], "off": []}
    try:
        for server in servers.values():
            server.wait_ready()
        for r in range(args.rounds):
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            for key in order:
                results[key].append(measure(servers[key], args))
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(
                f"{k}: {results[k][-1]['rps']:.0f} req/s, {results[k][-1]['cpu_us_per_request']:.1f} us CPU/req"
                for k in ("on", "off")), flush=True)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {}
    for key, rounds in results.items():
        summary[key] = {
            "rps_median": statistics.median(r["rps"] for r in rounds),
            "cpu_us_per_request_median": statistics.median(r["cpu_us_per_request"] for r in rounds),
        }
    throughput_cost = 1 - summary["on"]["rps_median"] / summary["off"]["rps_median"]
    cpu_cost = summary["on"]["cpu_us_per_request_median"] / summary["off"]["cpu_us_per_request_median"] - 1
    paired = [1 - on["rps"] / off["rps"] for on, off in zip(results["on"], results["off"])]
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "command": "loadtests/metrics_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(args) | {"output": str(args.output)},
        "servers": {k: s.command for k, s in servers.items()},
        "rounds": results,
        "summary": summary,
        "throughput_cost": throughput_cost,
        "throughput_cost_paired_median": statistics.median(paired),
        "cpu_per_request_cost": cpu_cost,
        "direct": direct,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"metrics on : {summary['on']['rps_median']:.0f} req/s, {summary['on']['cpu_us_per_request_median']:.1f} us server CPU/request")
    print(f"metrics off: {summary['off']['rps_median']:.0f} req/s, {summary['off']['cpu_us_per_request_median']:.1f} us server CPU/request")
    print(f"cost of metrics: throughput {100 * throughput_cost:+.2f}% (paired rounds median {100 * statistics.median(paired):+.2f}%), "
          f"server CPU per request {100 * cpu_cost:+.2f}%")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
