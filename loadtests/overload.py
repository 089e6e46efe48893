"""Overload: what a bounded queue buys when clients send several times what the model can serve.

Starts `kiln serve` on a copy of a model (default model_repo/mlp) with a bounded queue
(dynamic_batching max_queue_size), then, each step measured from the client side:

  1. idle      one request at a time: idle p50
  2. capacity  closed loop, many requests in flight: the throughput the server sustains (C)
  3. 80%       open loop at 0.8 x C: p99 of the (all accepted) requests
  4. overload  open loop at each FACTOR x C: accepted requests' p99, refusals (UNAVAILABLE
               "queue is full") and how fast they come back, anything else (must be none)
  5. recovery  one second after the overload stops: p50 of one request at a time

Checks (exit 1 when one fails): overload p99 of accepted <= 2 x p99 at 80%; recovery p50
within 20% of idle p50; no request failed with anything but an overload refusal (queue full,
nginx's in-flight cap, grpc-core's backlog limit).

    .venv/bin/python -m loadtests.overload --duration 10 --factors 3,5 --json overload.json

Client processes share the machine with the server: on a small machine they take CPU from it,
which the figures include (the report prints the core count).

--via-nginx LIMIT puts Debian's nginx (deploy/nginx/nginx.conf, one upstream) between the
clients and kiln with `limit_conn` LIMIT: admission control in C, so the excess is refused
("too many calls in flight", UNAVAILABLE) before it reaches the Python gRPC layer. Those
refusals count like queue-full ones. --max-pending-calls N starts kiln with that grpc-core
backlog limit (its refusals, a bare CANCELLED, count too).

    .venv/bin/python -m loadtests.overload --duration 10 --factors 3 --via-nginx 48

--generator h2load: a Python client cannot offer several times kiln's capacity on the cores it
shares with kiln (it falls behind its own schedule, and the lag shows as latency). h2load (C,
loadtests/h2load.py) then sends the load: the capacity step is its closed loop, and each open-loop
step is h2load at the step's rate minus --probe-rate plus a Python probe sending the rest as Poisson
arrivals. The probe's calls go through the same server at the same moment as h2load's, and give
the step's latencies and status codes (h2load cannot read grpc-status); h2load's own counts give
the offered and accepted totals.

    .venv/bin/python -m loadtests.overload --duration 10 --factors 3 --via-nginx 32 --generator h2load
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from loadtests import h2load  # noqa: E402
from loadtests.checks import conclude  # noqa: E402
from loadtests.ports import free_port  # noqa: E402
from loadtests.replicas import Nginx, start_replicas  # noqa: E402
from server.protocol import grpc_service_pb2 as pb  # noqa: E402

CALL = "/inference.GRPCInferenceService/ModelInfer"


def make_request(model: str, width: int, rows: int = 1, seed: int = 0) -> bytes:
    x = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, width])
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


REFUSALS = ("queue is full", "too many calls in flight")  # kiln's queue bound, nginx's limit_conn


def refusal_reason(code: grpc.StatusCode, details: str) -> str | None:
    """Who turned a call away at once for overload, or None. grpc-core's backlog limit (--max-pending-calls,
    and its own default of 1000/3000) answers a bare CANCELLED (no shutdown happens during the steps)."""
    for text in REFUSALS:
        if text in details:
            return text
    if code == grpc.StatusCode.CANCELLED and details == "CANCELLED":
        return "grpc-core backlog"
    return None


def with_queue_limit(config: str, max_queue_size: int) -> str:
    policy = f"default_queue_policy {{ max_queue_size: {max_queue_size} }}"
    if "dynamic_batching {" in config:
        return config.replace("dynamic_batching {", f"dynamic_batching {{ {policy}", 1)
    return config + f"\ndynamic_batching {{ {policy} }}\n"


class KilnProcess:
    """`kiln serve` on a temporary repository with one model, its queue bounded."""

    def __init__(self, source: Path, max_queue_size: int, extra_args: list[str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kiln-overload-"))
        repo = self.dir / "repo"
        shutil.copytree(source, repo / source.name)
        config = repo / source.name / "config.pbtxt"
        if max_queue_size:
            config.write_text(with_queue_limit(config.read_text(), max_queue_size))
        (self.replica,) = start_replicas(1, repo, source.name, self.dir, extra_args=tuple(extra_args or ()))
        self.port = self.replica.port
        self.url = self.replica.url

    def stop(self) -> int:
        code = self.replica.terminate()
        shutil.rmtree(self.dir, ignore_errors=True)
        return code


# ---- load generation (client processes, one asyncio loop each) ----------------------------------


async def _open_loop(url: str, request: bytes, rate: float, duration: float, start_at: float, seed: int):
    """Poisson arrivals at `rate`/s from start_at for `duration` s; (sent offset, latency, code) each."""
    rng = np.random.default_rng(seed)
    channels = [grpc.aio.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1), ("x", i)])
                for i in range(4)]
    calls = [c.unary_unary(CALL) for c in channels]
    results: list[tuple[float, float, str]] = []
    tasks = set()

    async def one(call, sent: float) -> None:
        try:
            await call(request, timeout=30)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            reason = refusal_reason(exc.code(), details)
            code = exc.code().name + (f":refused:{reason}" if reason else f":{details[:60]}")
        results.append((sent - start_at, time.monotonic() - sent, code))

    when = start_at
    end = start_at + duration
    i = 0
    while True:
        when += rng.exponential(1.0 / rate)
        if when >= end:
            break
        delay = when - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(calls[i % len(calls)], time.monotonic()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    await asyncio.gather(*list(tasks))
    for c in channels:
        await c.close()
    return results


async def _closed_loop(url: str, request: bytes, concurrency: int, duration: float, start_at: float):
    channels = [grpc.aio.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1), ("x", i)])
                for i in range(4)]
    calls = [c.unary_unary(CALL) for c in channels]
    results: list[tuple[float, float, str]] = []
    end = start_at + duration

    async def user(k: int) -> None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        while (sent := time.monotonic()) < end:
            try:
                await calls[k % len(calls)](request, timeout=30)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            results.append((sent - start_at, time.monotonic() - sent, code))

    await asyncio.gather(*(user(k) for k in range(concurrency)))
    for c in channels:
        await c.close()
    return results


def _client(args) -> list[tuple[float, float, str]]:
    kind, url, request, value, duration, start_at, seed = args
    if kind == "open":
        return asyncio.run(_open_loop(url, request, value, duration, start_at, seed))
    return asyncio.run(_closed_loop(url, request, int(value), duration, start_at))


def run_load(pool, kind: str, url: str, request: bytes, value: float, duration: float, processes: int):
    """value: total rate (open) or total in-flight requests (closed), split over the processes."""
    start_at = time.monotonic() + 0.3
    parts = [(kind, url, request, value / processes, duration, start_at, seed) for seed in range(processes)]
    rows = [row for part in pool.map(_client, parts) for row in part]
    return rows


def sequential(url: str, request: bytes, duration: float) -> np.ndarray:
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(CALL)
        latencies = []
        end = time.monotonic() + duration
        while time.monotonic() < end:
            sent = time.monotonic()
            call(request, timeout=10)
            latencies.append(time.monotonic() - sent)
    return np.array(latencies)


def pct(values, q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if len(values) else None


def summarize(rows, duration: float) -> dict:
    ok = [lat for _, lat, code in rows if code == "OK"]
    full = [lat for _, lat, code in rows if ":refused:" in code]
    other = sorted({code for _, _, code in rows if code != "OK" and ":refused:" not in code})
    by_reason = dict(collections.Counter(code.split(":refused:", 1)[1] for _, _, code in rows if ":refused:" in code))
    return {
        "sent": len(rows), "offered_per_s": round(len(rows) / duration, 1), "accepted": len(ok),
        "accepted_per_s": round(len(ok) / duration, 1), "refused": len(full), "refused_by": by_reason,
        "other_failures": len(rows) - len(ok) - len(full), "other_codes": other,
        "p50_ms": pct(ok, 50), "p99_ms": pct(ok, 99), "refusal_p99_ms": pct(full, 99),
    }


class H2loadLoad:
    """The steps' load from h2load, with a Python probe measuring what each call went through."""

    def __init__(self, pool, url: str, model: str, request: bytes, probe_rate: float, connections: int) -> None:
        self.pool, self.url, self.request, self.probe_rate, self.connections = pool, url, request, probe_rate, connections
        self.workdir = Path(tempfile.mkdtemp(prefix="kiln-overload-h2load-"))
        self.workload = h2load.prepare(url, model, self.workdir)

    def capacity(self, concurrency: int, duration: float) -> dict:
        step = h2load.run_closed_loop(self.workload, concurrency, duration, self.connections, warmup_s=0)
        return {"sent": step["done"], "accepted": step["ok"], "accepted_per_s": round(step["ok"] / duration, 1),
                "other_failures": step["errors"], "p50_ms": step["latency_ms"]["p50"], "p99_ms": step["latency_ms"]["p99"],
                "h2load": step}

    def open_loop(self, rate: float, duration: float) -> dict:
        """h2load at rate - probe_rate and the probe at probe_rate, at the same time; the probe's summary,
        with h2load's totals beside it."""
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            running = executor.submit(h2load.run_fixed_rate, self.workload, rate - self.probe_rate, duration)
            probe = summarize(run_load(self.pool, "open", self.url, self.request, self.probe_rate, duration, 1), duration)
            background = running.result()  # h2load's failure is the step's failure
        probe["h2load"] = background
        probe["offered_per_s"] = round((background["done"] + probe["sent"]) / duration, 1)
        probe["accepted_per_s"] = round((background["ok"] + probe["accepted"]) / duration, 1)
        return probe

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "model_repo" / "mlp",
                        help="model directory to serve (default: model_repo/mlp)")
    parser.add_argument("--width", type=int, default=256, help="input width of the model's FP32 input x (default: 256)")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (default: 1)")
    parser.add_argument("--max-queue-size", type=int, default=32, help="the queue bound (default: 32)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per step (default: 10)")
    parser.add_argument("--factors", default="3", help="overload factors x capacity, comma-separated (default: 3)")
    parser.add_argument("--processes", type=int, default=2, help="client processes (default: 2)")
    parser.add_argument("--concurrency", type=int, default=128, help="in-flight requests for the capacity step (default: 128)")
    parser.add_argument("--max-pending-calls", type=int, default=0, metavar="N",
                        help="kiln serve --max-pending-calls N: grpc-core refuses the backlog beyond N (default: off)")
    parser.add_argument("--via-nginx", type=int, default=0, metavar="LIMIT",
                        help="send through nginx with at most LIMIT calls in flight (default: direct)")
    parser.add_argument("--generator", choices=("python", "h2load"), default="python",
                        help="who sends the load: Python client processes, or h2load plus a Python probe (default: python)")
    parser.add_argument("--probe-rate", type=float, default=200.0,
                        help="with h2load: the probe's share of each open-loop step, calls/s (default: 200)")
    parser.add_argument("--connections", type=int, default=8,
                        help="with h2load: its connections in the capacity step (default: 8)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    pending = ["--max-pending-calls", str(args.max_pending_calls)] if args.max_pending_calls else []
    server = KilnProcess(args.model_dir, args.max_queue_size, pending)
    nginx = None
    if args.via_nginx:
        nginx = Nginx(free_port(), [server.port], server.dir, inflight_limit=args.via_nginx)
        server.url = nginx.url  # every step below goes through the balancer
    request = make_request(args.model_dir.name, args.width, args.rows)
    report: dict = {"cores": os.cpu_count(), "rows": args.rows, "max_queue_size": args.max_queue_size, "duration_s": args.duration,
                    "model": args.model_dir.name, "nginx_inflight_limit": args.via_nginx, "steps": {}}
    report["generator"] = args.generator if args.generator == "python" else f"h2load + probe {args.probe_rate:g}/s"
    ctx = mp.get_context("spawn")
    load = None
    try:
        with ctx.Pool(args.processes) as pool:
            if args.generator == "h2load":
                load = H2loadLoad(pool, server.url, args.model_dir.name, request, args.probe_rate, args.connections)

            def closed_loop(concurrency: int) -> dict:
                if load is not None:
                    return load.capacity(concurrency, args.duration)
                rows = run_load(pool, "closed", server.url, request, concurrency, args.duration, args.processes)
                return summarize(rows, args.duration)

            def open_loop(rate: float) -> dict:
                if load is not None:
                    return load.open_loop(rate, args.duration)
                return summarize(run_load(pool, "open", server.url, request, rate, args.duration, args.processes),
                                 args.duration)

            sequential(server.url, request, 1.0)  # warm-up
            idle = sequential(server.url, request, 3.0)
            report["idle_p50_ms"] = pct(idle, 50)
            print(f"idle p50 {report['idle_p50_ms']:.3f} ms", flush=True)
            cap = closed_loop(args.concurrency)
            capacity = cap["accepted_per_s"]
            report["steps"]["capacity"] = cap
            print(f"capacity {capacity:.0f} req/s (closed loop, {args.concurrency} in flight): {cap}", flush=True)
            base = open_loop(0.8 * capacity)
            report["steps"]["load_80pct"] = base
            print(f"80% load: {base}", flush=True)
            verdicts = []
            for factor in [float(f) for f in args.factors.split(",")]:
                over = open_loop(factor * capacity)
                stopped = time.monotonic()
                time.sleep(max(0.0, 1.0 - (time.monotonic() - stopped)))
                after = sequential(server.url, request, 2.0)
                over["recovery_p50_ms"] = pct(after, 50)
                report["steps"][f"overload_{factor:g}x"] = over
                print(f"{factor:g}x load: {over}", flush=True)
                verdicts.append((f"{factor:g}x: accepted p99 {over['p99_ms']:.2f} ms <= 2 x {base['p99_ms']:.2f} ms",
                                 over["p99_ms"] is not None and over["p99_ms"] <= 2 * base["p99_ms"]))
                verdicts.append((f"{factor:g}x: recovery p50 {over['recovery_p50_ms']:.3f} ms within 20% of idle "
                                 f"{report['idle_p50_ms']:.3f} ms",
                                 abs(over["recovery_p50_ms"] - report["idle_p50_ms"]) <= 0.2 * report["idle_p50_ms"]))
                verdicts.append((f"{factor:g}x: no failure but refusals ({over['other_codes']})",
                                 over["other_failures"] == 0))
    finally:
        if load is not None:
            load.close()
        if nginx is not None:
            nginx.stop()
        report["server_exit_code"] = server.stop()
    verdicts.append((f"server exited {report['server_exit_code']} on SIGTERM", report["server_exit_code"] == 0))
    return conclude(report, verdicts, args.json)


if __name__ == "__main__":
    sys.exit(main())
