"""ModelInfer load from h2load, nghttp2's HTTP/2 load generator written in C.

    python -m loadtests.h2load mlp --concurrency 1,16 --connections 4 --duration 5

Why a third generator beside `kiln bench` and perf_analyzer: on a 2-core machine the
generator's CPU is taken from the server it measures. `kiln bench` (Python gRPC) needs
~0.5 of a core for 2.7k calls/s; h2load needs ~0.1 for 3-4k, so what it measures is
closest to what the server alone can do.

h2load speaks HTTP/2, not gRPC: every call POSTs the same body (the 5-byte gRPC frame
header and one serialized ModelInferRequest) with gRPC's headers. It cannot read
grpc-status, and a gRPC error is an HTTP 200 answer without a body (trailers only), so
calls that succeeded are counted from the response bytes it received: one successful
answer to this request is measured first, with a real gRPC call, and
ok = DATA bytes / bytes per answer. Latency percentiles come from h2load's per-request
log and include failed calls when there are any (`errors` says how many).

A server with TLS or bearer tokens: --tls-ca (or --tls) and --token-file, as for `kiln bench`.
The probe call goes through gRPC and checks the server's certificate; h2load itself speaks
TLS but checks no certificate and cannot present a client certificate (so no mutual TLS), and
the token reaches it on its command line (the recorded command shows it masked).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from loadtests.bench.report import latency_summary, percent  # noqa: E402
from loadtests.inputs import fetch_metadata, make_requests  # noqa: E402
from loadtests.steal import cpu_ticks, steal_share  # noqa: E402
from server.channels import ClientSecurity, add_security_flags  # noqa: E402
from server.protocol import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
TICK_S = 0.010  # h2load's --rps timer
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")

__all__ = ["Workload", "as_bench_step", "h2load_path", "prepare", "run_closed_loop", "run_fixed_rate"]


def h2load_path() -> str | None:
    return shutil.which("h2load")


def grpc_frame(message: bytes) -> bytes:
    """gRPC's length-prefixed message: uncompressed flag, 4-byte big-endian length, bytes."""
    return b"\0" + struct.pack(">I", len(message)) + message


@dataclass(frozen=True)
class Workload:
    """One request body on disk and the size of one successful answer to it."""

    url: str
    model: str
    body_path: Path
    ok_answer_bytes: int
    scheme: str = "http"  # "https": TLS
    token: str | None = field(default=None, repr=False)  # bearer token sent as a header


def prepare(url: str, model: str, workdir: Path, batch_size: int = 1, seed: int = 0,
            security: ClientSecurity = ClientSecurity()) -> Workload:
    """A valid request for `model` (random values from its metadata), sent once for real."""
    if security.cert is not None:
        raise ValueError("h2load cannot present a client certificate: no mutual TLS (use kiln bench)")
    with security.channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = security.metadata
        request = make_requests(fetch_metadata(stub, model, metadata=metadata), batch_size, variants=1, seed=seed)[0]
        answer = stub.ModelInfer(request, timeout=30, metadata=metadata)
    body_path = workdir / f"{model}-b{batch_size}.grpc"
    body_path.write_bytes(grpc_frame(request.SerializeToString()))
    return Workload(url, model, body_path, len(grpc_frame(answer.SerializeToString())),
                    "https" if security.tls else "http", security.token)


def _headers(workload: Workload) -> list[str]:
    token = [f"authorization: Bearer {workload.token}"] if workload.token else []
    return [arg for header in (*GRPC_HEADERS, *token) for arg in ("-H", header)]


_SUMMARY = {
    "requests": re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                           r"(\d+) errored, (\d+) timeout"),
    "data": re.compile(r"traffic: .*\((\d+)\) data"),
}


def _parse_summary(text: str) -> dict[str, int]:
    found = {key: pattern.search(text) for key, pattern in _SUMMARY.items()}
    missing = [key for key, match in found.items() if match is None]
    if missing:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise RuntimeError(f"h2load printed no {', '.join(missing)} line:\n{tail}")
    _, started, done, *_ = map(int, found["requests"].groups())
    return {"started": started, "done": done, "data_bytes": int(found["data"].group(1))}


def count_ok(data_bytes: int, answer_bytes: int, done: int, started: int) -> int:
    """Successful calls among the `done` ones, from the answer bytes h2load received.

    A call still open when the duration ends may already have received its answer (or part
    of it) without its trailers, so h2load counts its bytes but not the call: up to
    `started - done` answers' worth of bytes may belong to calls that are not done.
    More than that, or a fraction of an answer with no call open, means the answers
    differ in size and ok cannot be counted. (Where calls also failed, ok may be overcounted
    by at most the open calls.)
    """
    whole, leftover = divmod(data_bytes, answer_bytes)
    open_calls = started - done
    if whole > done + open_calls or (leftover and not open_calls):
        raise RuntimeError(f"{data_bytes} response bytes are not a whole number of {answer_bytes}-byte answers "
                           f"for {done} calls ({open_calls} still open): the answers differ in size, "
                           "ok cannot be counted")
    return min(whole, done)


def _read_log(path: Path) -> np.ndarray:
    """Durations in s of the requests h2load logged (columns: start µs, HTTP status or -1, duration µs)."""
    rows = np.loadtxt(path, dtype=np.int64, ndmin=2) if path.stat().st_size else np.zeros((0, 3), np.int64)
    return rows[:, 2] / 1e6


def _run(workload: Workload, argv_tail: list[str], duration_s: float, processes: int = 1,
         stagger_s: float = 0.0) -> dict:
    """`processes` h2load runs of `argv_tail` at once, each started `stagger_s` after the last; their sums."""
    exe = h2load_path()
    if exe is None:
        raise RuntimeError("h2load not found: apt-get install nghttp2-client")
    with tempfile.TemporaryDirectory(prefix="kiln-h2load-") as tmp:
        logs = [Path(tmp) / f"requests-{i}.tsv" for i in range(processes)]
        argvs = [[exe, "-D", f"{round(duration_s * 1000)}ms", *argv_tail, "-d", str(workload.body_path),
                  *_headers(workload), "--log-file", str(log), f"{workload.scheme}://{workload.url}{INFER_PATH}"]
                 for log in logs]
        cpu_before, ticks_before = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_ticks()
        procs = []
        for i, argv in enumerate(argvs):
            if i:
                time.sleep(stagger_s)
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [proc.communicate(timeout=duration_s + 60) for proc in procs]
        cpu_after, stolen = resource.getrusage(resource.RUSAGE_CHILDREN), steal_share(ticks_before, cpu_ticks())
        for proc, (out, err) in zip(procs, outputs):
            if proc.returncode != 0:
                raise RuntimeError(f"h2load exited with {proc.returncode}: {(err or out).strip()[-300:]}")
        counts = [_parse_summary(out) for out, _ in outputs]
        durations = np.concatenate([_read_log(log) for log in logs])
    started, done = sum(c["started"] for c in counts), sum(c["done"] for c in counts)
    ok = count_ok(sum(c["data_bytes"] for c in counts), workload.ok_answer_bytes, done, started)
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    command = "h2load " + " ".join(argvs[0][1:]).replace(str(workload.body_path), workload.body_path.name)
    if workload.token:
        command = command.replace(workload.token, "***")
    return {
        "generator": "h2load",
        "duration_s": duration_s,
        "sent": started,
        "done": done,
        "ok": ok,
        "errors": done - ok,
        "throughput_rps": ok / duration_s,
        "latency_ms": latency_summary(durations),
        "client_cpu_cores": cpu_s / duration_s,
        "steal_share": stolen,  # of the machine's CPU time while h2load ran, taken by the hypervisor
        "command": command if processes == 1 else f"{processes} x ({command}), started {stagger_s * 1000:.1f} ms apart",
    }


def _split(total: int, connections: int, what: str) -> int:
    if total < connections or total % connections:
        raise ValueError(f"{what} {total} must be a multiple of --connections {connections}")
    return total // connections


def run_closed_loop(workload: Workload, concurrency: int, duration_s: float, connections: int = 1,
                    warmup_s: float = 1.0) -> dict:
    """`concurrency` calls in flight over `connections` HTTP/2 connections (at most one per call),
    each sent when the last answered.

    The warm-up is a separate h2load run: h2load's own warm-up still counts its bytes.
    """
    connections = min(connections, concurrency)
    tail = ["-c", str(connections), "-m", str(_split(concurrency, connections, "concurrency"))]
    if warmup_s > 0:
        _run(workload, tail, warmup_s)
    return {"concurrency": concurrency, "connections": connections, **_run(workload, tail, duration_s)}


def run_fixed_rate(workload: Workload, rate: float, duration_s: float, processes: int = 10,
                   max_inflight: int = 1000) -> dict:
    """About `rate` calls/s in all, from `processes` h2load runs of one connection each.

    h2load paces --rps with a 10 ms timer: every tick sends the calls due since the last, so
    one run sends bursts of rate/100. Runs started TICK_S/processes apart tick at different
    moments, which spreads the calls (bursts of rate/(100 x processes), not Poisson). Each run
    sends a whole number of calls/s, so the rate is rounded to a multiple of `processes`.
    Latency counts from the actual send.
    """
    per_process = max(1, round(rate / processes))
    tail = ["-c", "1", "-m", str(max(1, max_inflight // processes)), "--rps", str(per_process)]
    return {"rate": per_process * processes, "processes": processes,
            **_run(workload, tail, duration_s, processes, stagger_s=TICK_S / processes)}


def as_bench_step(step: dict) -> dict:
    """A step with the field names of a `kiln bench` step too, for tools that tabulate both."""
    return {**step, "error_count": step["errors"], "client": {"cpu_cores": step["client_cpu_cores"]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--url", default="127.0.0.1:8001")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--concurrency", default="", help="closed-loop steps, e.g. 1,16,64")
    ap.add_argument("--rate", default="", help="fixed-rate steps in calls/s, e.g. 1000,2000 (10 staggered one-connection runs)")
    ap.add_argument("--connections", type=int, default=1, help="HTTP/2 connections (default: 1)")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--json", type=Path, help="write the steps here")
    add_security_flags(ap)
    args = ap.parse_args(argv)
    if not args.concurrency and not args.rate:
        ap.error("give --concurrency and/or --rate")
    steps = []
    with tempfile.TemporaryDirectory(prefix="kiln-h2load-") as tmp:
        try:
            workload = prepare(args.url, args.model, Path(tmp), args.batch_size, security=ClientSecurity.from_args(args))
        except (OSError, ValueError) as exc:
            print(f"h2load: {exc}", file=sys.stderr)
            return 2
        for c in [int(c) for c in args.concurrency.split(",") if c]:
            steps.append(run_closed_loop(workload, c, args.duration, args.connections, args.warmup))
        for r in [float(r) for r in args.rate.split(",") if r]:
            steps.append(run_fixed_rate(workload, r, args.duration))
    print(f"h2load: {args.model} @ {args.url}, batch {args.batch_size}, {args.connections} connection(s), {args.duration:g} s per step")
    print(f"{'step':>10} {'done':>8} {'ok':>8} {'err':>5} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'cli cpu':>8} {'steal%':>6}")
    for s in steps:
        name = f"c={s['concurrency']}" if "concurrency" in s else f"r={s['rate']}"
        lat = s["latency_ms"]
        cells = [f"{lat[k]:8.2f}" if lat[k] is not None else f"{'-':>8}" for k in ("p50", "p90", "p99")]
        print(f"{name:>10} {s['done']:8d} {s['ok']:8d} {s['errors']:5d} {s['throughput_rps']:9.1f} {' '.join(cells)} "
              f"{s['client_cpu_cores']:8.2f} {percent(s['steal_share']):>6}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "url": args.url, "steps": steps}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
