"""The served share: a model's throughput through kiln as a share of its runtime's own throughput
in-process at the same batch size, and where the rest of the server's time goes.

    python -m loadtests.served_share --model-repository /tmp/wide --model mlp_wide --concurrency 64 --connections 16 --workers 2
    python -m loadtests.served_share --model-repository /tmp/gpu --model resnet50_aoti --generator bench --processes 6   # GPU

Each round: h2load (or `kiln bench`: --generator bench; bench-stream, over ModelStreamInfer
streams) keeps --concurrency calls in flight for --duration s (batch-1 requests unless
--request-batch), ModelStatistics says how many rows the server put in each execution, and
then the runtime alone runs at that batch size in this process (the loop of
`kiln bench --in-process`, the server idle meanwhile), so both see the same machine.
The share is served items/s over in-process items/s; the median round is the figure. Last, the
same load runs once more against a server started under py-spy (loadtests/pyspy_profile.py),
which splits its busy time into the runtime, (de)serialization, batch copies, statistics, kiln's
Python, asyncio/grpc.aio and the C under the event loop. JSON (--json) keeps every round;
--markdown prints the tables. loadtests/gpu_share.sh runs it for the GPU target.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from loadtests import h2load, pyspy_profile, threadcpu  # noqa: E402
from loadtests.batching_sweep import ceiling, start_server  # noqa: E402
from loadtests.bench import report as rp  # noqa: E402
from loadtests.bench.inprocess import locate_model  # noqa: E402
from loadtests.bench.runner import BenchConfig, run_bench, stats_snapshot  # noqa: E402
from loadtests.ports import free_port  # noqa: E402


def _stub(url: str):
    import grpc

    from server.protocol import grpc_service_pb2_grpc as pb_grpc

    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(url))


class ClosedLoop:
    """--concurrency calls in flight on the served model, from h2load or from `kiln bench`'s workers
    (where h2load is missing, e.g. a GPU machine's image); each run is a `kiln bench`-shaped step."""

    def __init__(self, args, url: str, workdir: Path) -> None:
        self.args, self.url = args, url
        self.workload = (h2load.prepare(url, args.model, workdir, batch_size=args.request_batch)
                         if args.generator == "h2load" else None)

    def warm_up(self) -> None:
        if self.workload is not None:  # kiln bench warms up inside run()
            h2load.run_closed_loop(self.workload, self.args.concurrency, self.args.warmup, self.args.connections, warmup_s=0)

    def run(self, duration_s: float) -> dict:
        a = self.args
        if self.workload is not None:
            return h2load.as_bench_step(
                h2load.run_closed_loop(self.workload, a.concurrency, duration_s, a.connections, warmup_s=0))
        config = BenchConfig(url=self.url, model=a.model, batch_size=a.request_batch, concurrency=[a.concurrency],
                             duration_s=duration_s, warmup_s=a.warmup, processes=a.processes,
                             connections=a.connections, server_stats=False, streaming=a.generator == "bench-stream")
        with open(os.devnull, "w") as sink:
            return run_bench(config, out=sink, progress=False)["steps"][0]


def served_step(load: ClosedLoop, stub, pid: int, args) -> dict:
    """One closed-loop step: items/s, the rows per execution the server formed, its CPU by role."""
    load.warm_up()
    before, cpu_before, started = stats_snapshot(stub, args.model, ""), threadcpu.sample(pid), time.monotonic()
    step = load.run(args.duration)
    cpu = threadcpu.cpu_split(cpu_before, threadcpu.sample(pid), time.monotonic() - started)
    server = rp.server_delta(before, stats_snapshot(stub, args.model, ""))
    if step["error_count"] or not server or not server["execution_count"]:
        raise SystemExit(f"served_share: {step['error_count']} errors, {server and server['execution_count']} "
                         "executions: the served step did not run cleanly")
    return {
        "items_per_s": step["throughput_rps"] * args.request_batch,
        "avg_batch": server["avg_batch"],
        "latency_ms": step["latency_ms"],
        "client_cpu_cores": step["client"]["cpu_cores"],
        "server_cpu_cores": cpu,
        "server_split_us": {k: server[k] for k in ("queue_us", "compute_input_us", "compute_infer_us", "compute_output_us")},
    }


def _server_child(pyspy_pid: int) -> int:
    """The kiln process py-spy started."""
    children = Path(f"/proc/{pyspy_pid}/task/{pyspy_pid}/children").read_text().split()
    if not children:
        raise SystemExit("served_share: py-spy started no server")
    return int(children[0])


PROFILE_ATTEMPTS = 2


def profile(args, workdir: Path) -> dict:
    """The same load against a server run under py-spy: where its threads are busy. A profile
    without a single serving sample (py-spy lost the process) is taken once more, then fails
    with py-spy's own words."""
    for attempt in range(1, PROFILE_ATTEMPTS + 1):
        log = workdir / f"profiled-server-{attempt}.log"
        result = _profile_once(args, workdir, log)
        if result["serving_samples"]:
            return {**result, "attempts": attempt}
    tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-8:])
    raise SystemExit(f"served_share: py-spy recorded no serving sample in {PROFILE_ATTEMPTS} attempts; "
                     f"its output and the server's:\n{tail}")


def _profile_once(args, workdir: Path, log: Path) -> dict:
    raw = workdir / "profile.raw"
    raw.unlink(missing_ok=True)
    port = free_port()
    proc = start_server(args.model_repository, port, log, args.workers,
                        wrap=lambda cmd: pyspy_profile.command_under_pyspy(cmd, raw, args.profile_rate))
    try:
        server_pid = _server_child(proc.pid)
        load = ClosedLoop(args, f"127.0.0.1:{port}", workdir)
        load.warm_up()
        cpu_before, started = threadcpu.sample(server_pid), time.monotonic()
        step = load.run(args.profile_duration)
        cpu = threadcpu.cpu_split(cpu_before, threadcpu.sample(server_pid), time.monotonic() - started)
    finally:
        try:
            os.kill(_server_child(proc.pid), signal.SIGTERM)  # py-spy writes its file once the server has exited
        except (SystemExit, OSError):
            proc.terminate()
        proc.wait(60)
    summary = pyspy_profile.summarize(pyspy_profile.parse_raw(raw.read_text() if raw.exists() else ""),
                                      args.profile_rate)
    return {
        "rate_hz": args.profile_rate, "seconds": args.profile_duration,
        "items_per_s_while_profiled": step["throughput_rps"] * args.request_batch,
        "server_cpu_cores": cpu,
        **summary,
    }


def measure(args) -> dict:
    model_dir = args.model_repository / args.model
    _, proto, platform = locate_model(model_dir)
    max_batch = proto.max_batch_size or 1
    rounds = []
    with tempfile.TemporaryDirectory(prefix="kiln-share-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        proc = start_server(args.model_repository, port, workdir / "server.log", args.workers)
        try:
            url = f"127.0.0.1:{port}"
            load, stub = ClosedLoop(args, url, workdir), _stub(url)
            for r in range(args.rounds):
                served = served_step(load, stub, proc.pid, args)
                batch = min(max(1, round(served["avg_batch"])), max_batch)
                alone = ceiling(model_dir, args.inprocess_duration, batch)["items_per_s"]
                rounds.append({**served, "inprocess_batch": batch, "inprocess_items_per_s": alone,
                               "share": served["items_per_s"] / alone})
                print(f"[{r + 1}/{args.rounds}] served {served['items_per_s']:.0f} items/s, {served['avg_batch']:.1f} rows "
                      f"per execution; in-process at batch {batch}: {alone:.0f} items/s; share {rounds[-1]['share']:.1%}",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
        prof = profile(args, workdir) if args.profile_duration > 0 else None
    return {
        "tool": "loadtests.served_share",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "machine": rp.machine_info(),
        "config": {"model": args.model, "platform": platform, "max_batch_size": proto.max_batch_size,
                   "concurrency": args.concurrency, "connections": args.connections, "workers": args.workers,
                   "request_batch": args.request_batch, "duration_s": args.duration, "generator": args.generator},
        "rounds": rounds,
        "median_share": statistics.median(r["share"] for r in rounds),
        "profile": prof,
    }


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"{cfg['model']} ({cfg['platform']}), concurrency {cfg['concurrency']} over {cfg['connections']} "
             f"connection(s), {cfg['workers']} worker(s), batch-{cfg['request_batch']} requests, {cfg['generator']}:", "",
             "| round | served items/s | rows per execution | in-process items/s (batch) | share | server CPU: loop / instances / other |",
             "|---|---:|---:|---:|---:|---|"]
    for i, r in enumerate(report["rounds"], 1):
        cpu = r["server_cpu_cores"]
        lines.append(f"| {i} | {r['items_per_s']:.0f} | {r['avg_batch']:.1f} | {r['inprocess_items_per_s']:.0f} "
                     f"({r['inprocess_batch']}) | {r['share']:.1%} | "
                     + " / ".join(f"{cpu[k]:.2f}" for k in threadcpu.ROLES) + " |")
    lines += ["", f"Median share: **{report['median_share']:.1%}**."]
    prof = report["profile"]
    if prof:
        lines += ["", f"Where the server's threads were busy (py-spy at {prof['rate_hz']} Hz, {prof['seconds']:g} s of load "
                      f"and its warm-up; {prof['items_per_s_while_profiled']:.0f} items/s while profiled):", "",
                  pyspy_profile.markdown(prof)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", type=Path, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--connections", type=int, default=16, help="HTTP/2 connections the calls are spread over")
    ap.add_argument("--generator", choices=("h2load", "bench", "bench-stream"), default="h2load",
                    help="h2load (C, least client CPU) or kiln bench (Python; no system tool needed), "
                         "bench-stream: kiln bench over ModelStreamInfer streams")
    ap.add_argument("--processes", type=int, default=1, help="kiln bench's client processes")
    ap.add_argument("--workers", type=int, default=1, help="kiln serve --workers")
    ap.add_argument("--request-batch", type=int, default=1, help="rows per request (default: 1)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per served step")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--inprocess-duration", type=float, default=3.0, help="seconds of the in-process run per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile-duration", type=float, default=5.0, help="seconds of load under py-spy (0: no profile)")
    ap.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = ap.parse_args(argv)
    args.model_repository = args.model_repository.resolve()
    if args.generator == "h2load" and h2load.h2load_path() is None:
        raise SystemExit("served_share: h2load not found (apt-get install nghttp2-client)")
    if args.concurrency % min(args.connections, args.concurrency):
        raise SystemExit("served_share: --concurrency must be a multiple of --connections")
    report = measure(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report) if args.markdown else f"median share {report['median_share']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
