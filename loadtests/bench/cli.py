"""Arguments of `kiln bench` (also `python -m loadtests.bench`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server import eventloop
from server.channels import ClientSecurity, add_security_flags

DESCRIPTION = """\
Load generator for any model of a running v2 gRPC server (kiln, Triton, ...).
Reads the model's metadata and sends random valid inputs (or .npy files) with
--batch-size rows per request, spread over --processes client processes and
--connections channels (grpc.aio).

  closed loop:  --concurrency 1,4,16,64   N requests in flight, each sent when the last answered
  streaming:    --streaming               the same load over ModelStreamInfer: N streams for N in flight
  open loop:    --rate 500,1000           Poisson arrivals at a fixed rate; latency counts from the
                                          scheduled send time; says when the rate was not sustained
  ceiling:      --in-process MODEL_DIR_OR_FILE --batch-sizes 1,8,64
                                          the runtime alone (no server), items/s per batch size

Per step: p50/p90/p99/p99.9 latency, throughput, errors by gRPC status, the
client's own CPU use, the server's queue/compute split and average batch
from ModelStatistics deltas, and the share of the machine's CPU time a shared VM's
hypervisor took meanwhile (steal%: a step with much steal measured the neighbours).
Output: a table, --json PATH, --plot PATH (PNG).
A server with TLS or bearer tokens: --tls-ca (or --tls), --tls-cert/--tls-key, --token-file,
as for `kiln infer`.
"""


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got '{text}'")
    return values


def build_parser(prog: str = "kiln bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model name on the server (not with --in-process)")
    p.add_argument("--url", default="127.0.0.1:8001", help="server address HOST:PORT (default: 127.0.0.1:8001)")
    add_security_flags(p)
    p.add_argument("--model-version", default="", help="model version (default: latest ready)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per request (default: 1)")
    p.add_argument("--concurrency", type=_ints, default=None, metavar="N,N,...", help="closed-loop steps: requests in flight")
    p.add_argument("--rate", type=_floats, default=None, metavar="R,R,...", help="open-loop steps: offered requests/s (Poisson)")
    p.add_argument("--duration", type=float, default=10.0, metavar="SECONDS", help="measured seconds per step, at most 600 (default: 10)")
    p.add_argument("--warmup", type=float, default=1.0, metavar="SECONDS", help="unmeasured seconds before each step (default: 1)")
    p.add_argument("--processes", type=int, default=1, help="client processes (default: 1)")
    p.add_argument("--connections", type=int, default=0, help="gRPC channels in all, spread over the processes (default: one per process)")
    p.add_argument("--event-loop", choices=eventloop.CHOICES, default="auto",
                   help="the client processes' event loop (default auto: uvloop where installed)")
    p.add_argument("--streaming", action="store_true",
                   help="send on ModelStreamInfer streams, one request in flight per stream, instead of unary ModelInfer")
    p.add_argument("--max-inflight", type=int, default=1000, help="open loop: most outstanding requests over all processes (default: 1000)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per-request deadline (default: 30)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="input tensor from a .npy file (repeatable); its rows set the batch size")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D,D", help="non-batch dims of an input with dynamic dims (repeatable)")
    p.add_argument("--no-server-stats", action="store_true", help="do not read ModelStatistics (servers without that RPC)")
    p.add_argument("--seed", type=int, default=0, help="seed of random inputs and arrivals (default: 0)")
    p.add_argument("--in-process", type=Path, default=None, metavar="MODEL_DIR_OR_FILE", help="measure the runtime alone, no server")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8, 64], metavar="B,B,...", help="--in-process batch sizes (default: 1,8,64)")
    p.add_argument("--threads", type=int, default=0, help="--in-process calling threads (default: the config's instance count)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the full report as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH", help="write a PNG plot (latency percentiles vs throughput)")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    return p


def main(argv: list[str] | None = None, prog: str = "kiln bench") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    from loadtests.bench import report as rp
    from loadtests.bench.runner import BenchConfig, BenchError, run_bench
    from loadtests.inputs import parse_assignments, parse_dims

    progress = False if args.no_progress else None
    try:
        security = ClientSecurity.from_args(args)
    except (OSError, ValueError) as exc:  # unreadable TLS or token files
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        shapes = {name: parse_dims(dims) for name, dims in parse_assignments(args.shape, "--shape").items()}
        if args.in_process is not None:
            from loadtests.bench.inprocess import run_in_process

            report = run_in_process(
                args.in_process, args.batch_sizes, duration_s=args.duration, warmup_s=args.warmup,
                threads=args.threads, shapes=shapes, progress=progress,
            )
            if args.plot:
                rp.write_in_process_plot(report, args.plot)
        else:
            if not args.model:
                parser.error("name a model (or use --in-process MODEL_DIR_OR_FILE)")
            cfg = BenchConfig(
                url=args.url, model=args.model, version=args.model_version, batch_size=args.batch_size,
                concurrency=args.concurrency or ([] if args.rate else [1, 4, 16, 64]), rates=args.rate or [],
                duration_s=args.duration, warmup_s=args.warmup, processes=args.processes,
                connections=args.connections, timeout_s=args.timeout, max_inflight=args.max_inflight,
                input_files=parse_assignments(args.input, "--input"), input_shapes=shapes, seed=args.seed,
                server_stats=not args.no_server_stats, security=security,
                event_loop=args.event_loop, streaming=args.streaming,
            )
            report = run_bench(cfg, progress=progress)
            if args.plot:
                rp.write_plot(report, args.plot)
    except (BenchError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        rp.write_json(report, args.json)
        print(f"report: {args.json}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0  # an unsustained offered rate is a finding (flagged in the table and the JSON), not a failure


if __name__ == "__main__":
    sys.exit(main())
