"""`kiln serve --workers N` (and `--event-loop L`, `--runtime-nice K`) for several N, L and K,
same load, same run, rounds in alternating order.

    python -m loadtests.workers_compare                       # workers 1,2,3; mlp; c = 16, 64
    python -m loadtests.workers_compare --workers 1,2 --rounds 4 --processes 2 --connections 16
    python -m loadtests.workers_compare --workers 1,2 --event-loops asyncio,uvloop --generator h2load
    python -m loadtests.workers_compare --workers 2 --runtime-nices 0,10 --model mlp_wide --model-repository DIR

Each round starts one server per (N, L, K) (explicit mode, only --model loaded), waits until every
worker is ready, runs `kiln bench` (or h2load) closed loop per concurrency with --processes client
processes and --connections TCP connections (SO_REUSEPORT spreads connections, not requests, over
the workers), reads the server's CPU from its merged /metrics (process_cpu_seconds_total, summed
over the workers), then stops it with SIGTERM. Rounds alternate the order of the variants (then
reversed ...), so a drift of the machine's load hits every one alike. Prints per-round and mean
tables; --json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from loadtests import h2load  # noqa: E402
from loadtests.bench import report as rp  # noqa: E402
from loadtests.bench.runner import BenchConfig, run_bench  # noqa: E402
from loadtests.ports import free_port  # noqa: E402
from loadtests import serve_process  # noqa: E402
from loadtests.serve_process import serve_command  # noqa: E402


def server_cpu_s(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "process_cpu_seconds"
               for s in f.samples if s.name == "process_cpu_seconds_total")


def measure(url: str, concurrency: int, args, workdir: Path) -> dict:
    """One closed-loop step by the chosen generator, as a `kiln bench` step's fields."""
    if args.generator == "h2load":
        workload = h2load.prepare(url, args.model, workdir)
        return h2load.as_bench_step(
            h2load.run_closed_loop(workload, concurrency, args.duration, args.connections, warmup_s=args.warmup))
    cfg = BenchConfig(url=url, model=args.model, concurrency=[concurrency], duration_s=args.duration,
                      warmup_s=args.warmup, processes=args.processes, connections=args.connections)
    (step,) = run_bench(cfg, out=io.StringIO(), progress=False)["steps"]
    return step


def run_one(workers: int, event_loop: str, nice: int, args, out_dir: Path) -> list[dict]:
    port, metrics_port = free_port(), free_port()
    url = f"127.0.0.1:{port}"
    log_path = out_dir / f"serve-w{workers}-{event_loop}-n{nice}-{port}.log"
    cmd = serve_command(args.model_repository, port, metrics_port, "--workers", str(workers),
                        "--model-control-mode", "explicit", "--load-model", args.model, "--log-level", "WARNING",
                        "--event-loop", event_loop, "--runtime-nice", str(nice))
    with tempfile.TemporaryDirectory(prefix="kiln-workers-") as workdir:
        proc = serve_process.start(cmd, log_path, url, model=args.model, workers=workers, timeout=60)
        steps = []
        try:
            for concurrency in args.concurrency:
                cpu_before, t0 = server_cpu_s(metrics_port), time.monotonic()
                step = measure(url, concurrency, args, Path(workdir))
                cpu_after, t1 = server_cpu_s(metrics_port), time.monotonic()
                step.update(workers=workers, event_loop=event_loop, runtime_nice=nice,
                            server_cpu_cores=(cpu_after - cpu_before) / (t1 - t0))
                steps.append(step)
        finally:
            code = serve_process.stop(proc, 60)
            if code != 0:
                print(f"  workers {workers}, {event_loop}, nice {nice}: server exit code {code} (log {log_path})", file=sys.stderr)
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp")
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repo")
    p.add_argument("--workers", default="1,2,3", help="comma-separated worker counts (default: 1,2,3)")
    p.add_argument("--event-loops", default="auto", help="comma-separated --event-loop values (default: auto)")
    p.add_argument("--runtime-nices", default="0", help="comma-separated --runtime-nice values (default: 0)")
    p.add_argument("--generator", choices=("kiln-bench", "h2load"), default="kiln-bench")
    p.add_argument("--concurrency", default="16,64", help="closed-loop concurrencies (default: 16,64)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--processes", type=int, default=2, help="client processes (default: 2)")
    p.add_argument("--connections", type=int, default=8, help="client connections in all (default: 8)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    variants = [(int(w), loop, int(n)) for w in args.workers.split(",") for loop in args.event_loops.split(",")
                for n in args.runtime_nices.split(",")]
    out_dir = REPO_ROOT / "loadtests" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now()
    machine = rp.machine_info()
    clients = f"{args.processes} client processes, " if args.generator == "kiln-bench" else ""
    print(f"(workers, event loop, runtime nice) {variants}, {args.model}, c={args.concurrency}, {args.generator}, "
          f"{clients}{args.connections} connections, {args.rounds} rounds; "
          f"machine nproc {machine['nproc']}, "
          f"load {machine['loadavg']}", flush=True)
    results: list[dict] = []
    for round_ in range(args.rounds):
        order = variants if round_ % 2 == 0 else variants[::-1]
        for workers, event_loop, nice in order:
            for step in run_one(workers, event_loop, nice, args, out_dir):
                step["round"] = round_
                results.append(step)
                lat = step["latency_ms"]
                print(f"round {round_} workers {workers} {event_loop} nice {nice} c={step['concurrency']}: {step['throughput_rps']:.0f} req/s, "
                      f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, errors {step['error_count']}, "
                      f"server {step['server_cpu_cores']:.2f} cores, client {step['client']['cpu_cores']:.2f} cores, "
                      f"avg batch {((step.get('server') or {}).get('avg_batch') or 0):.2f}", flush=True)
    print("\n| workers | event loop | runtime nice | c | req/s (mean) | per round | p50 ms | p99 ms | server cores "
          "| client cores |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for concurrency in args.concurrency:
        for variant in variants:
            rows = [r for r in results if (r["workers"], r["event_loop"], r["runtime_nice"], r["concurrency"]) == (*variant, concurrency)]
            mean = lambda f: sum(f(r) for r in rows) / len(rows)  # noqa: E731
            print(f"| {variant[0]} | {variant[1]} | {variant[2]} | {concurrency} | {mean(lambda r: r['throughput_rps']):.0f} | "
                  f"{' / '.join('%.0f' % r['throughput_rps'] for r in rows)} | "
                  f"{mean(lambda r: r['latency_ms']['p50']):.2f} | {mean(lambda r: r['latency_ms']['p99']):.2f} | "
                  f"{mean(lambda r: r['server_cpu_cores']):.2f} | {mean(lambda r: r['client']['cpu_cores']):.2f} |")
    path = args.json or out_dir / f"workers-{started:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"started": started.isoformat(), "machine": machine, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "steps": results}, indent=1))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
