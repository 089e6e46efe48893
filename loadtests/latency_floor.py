"""kiln's serving overhead: p50 ModelInfer latency through kiln vs. through the bare floor servicer.

    .venv/bin/python loadtests/latency_floor.py                    # 500 warm-up + 5000 measured requests each
    .venv/bin/python loadtests/latency_floor.py --requests 20000   # longer run
    .venv/bin/python loadtests/latency_floor.py --seconds 30       # measure for a fixed time instead

Starts `kiln serve` on a temporary repository holding only model_repo/mlp (the bundled
config: dynamic batching with no queue delay, one CPU instance, one intra-op thread) and
loadtests/floor_server.py on the same model file, each on a free 127.0.0.1 port. One
synchronous gRPC client, one channel per server, sends the same prebuilt request (mlp,
batch 1, FP32 [1,256], raw contents) alternately: kiln, floor, kiln, floor, ... at
concurrency 1, so both see the same machine noise. Prints p50/p90/p99 of each and the p50
difference against the target; writes loadtests/results/latency_floor.json. Both servers
are stopped with SIGTERM at the end, on errors, on Ctrl-C and when this script gets SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the generated stubs live in the server package

from loadtests.ports import free_port  # noqa: E402
from loadtests.readiness import wait_ready  # noqa: E402
from loadtests.serve_process import serve_command, stop_all  # noqa: E402
from server.protocol import grpc_service_pb2 as pb  # noqa: E402
from server.protocol import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

TARGET_MS = 0.15
MODEL = "mlp"
RESULTS = ROOT / "loadtests" / "results" / "latency_floor.json"


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "grpcio": grpc.__version__}


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "server"], cwd=ROOT,
                               capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return head.strip() + ("+dirty server/" if dirty.strip() else "")


def build_request() -> pb.ModelInferRequest:
    x = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 256])
    request.raw_input_contents.append(x.tobytes())
    return request


def output_array(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(response.outputs[0].shape)


class Servers(contextlib.ExitStack):
    """kiln and the floor as subprocesses; logs go to files in a temporary directory."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(self.enter_context(tempfile.TemporaryDirectory(prefix="kiln-floor-")))
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def start(self) -> None:
        repo = self.tmp / "model_repo"
        shutil.copytree(ROOT / "model_repo" / MODEL, repo / MODEL)
        self.ports = {"kiln": free_port(), "floor": free_port()}
        commands = {
            "kiln": serve_command(repo, self.ports["kiln"], free_port()),
            "floor": [sys.executable, str(ROOT / "loadtests" / "floor_server.py"),
                      "--model", str(repo / MODEL / "1" / "model.onnx"), "--port", str(self.ports["floor"])],
        }
        self.callback(self.stop)
        for name, command in commands.items():
            log = open(self.tmp / f"{name}.log", "wb")
            self.callback(log.close)
            self.procs[name] = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        for name, proc in self.procs.items():
            wait_ready(f"127.0.0.1:{self.ports[name]}", proc, timeout=timeout_s, log_path=self.tmp / f"{name}.log")

    def stop(self) -> None:
        stop_all(self.procs.values(), timeout_s=15)


def percentiles(latencies_ns: list[int]) -> dict[str, float]:
    ms = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "count": len(ms),
    }


def measure(stubs: dict, request, warmup: int, requests: int, seconds: float | None) -> dict[str, list[int]]:
    """Alternate kiln, floor, kiln, floor, ... at concurrency 1; per-request latency in ns."""
    order = list(stubs.items())
    for _ in range(warmup):
        for _, call in order:
            call(request)
    latencies: dict[str, list[int]] = {name: [] for name in stubs}
    clock = time.perf_counter_ns
    end = time.monotonic() + seconds if seconds else None
    count = 0
    while (count < requests) if end is None else (time.monotonic() < end):
        for name, call in order:
            t0 = clock()
            call(request)
            latencies[name].append(clock() - t0)
        count += 1
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=500, help="warm-up requests per server (not recorded)")
    parser.add_argument("--requests", type=int, default=5000, help="measured requests per server")
    parser.add_argument("--seconds", type=float, default=None, help="measure for this long instead of --requests")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    request = build_request()
    with Servers() as servers:
        servers.start()
        channels = {name: grpc.insecure_channel(f"127.0.0.1:{port}") for name, port in servers.ports.items()}
        for channel in channels.values():
            servers.callback(channel.close)
        servers.wait_ready()
        print(f"kiln pid {servers.procs['kiln'].pid} port {servers.ports['kiln']}; "
              f"floor pid {servers.procs['floor'].pid} port {servers.ports['floor']}", flush=True)
        stubs = {name: pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer for name, channel in channels.items()}

        # both must compute the same thing, or the comparison means nothing
        answers = {name: output_array(call(request)) for name, call in stubs.items()}
        if not np.allclose(answers["kiln"], answers["floor"], rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"kiln and the floor disagree: {answers}")

        started = time.monotonic()
        latencies = measure(stubs, request, args.warmup, args.requests, args.seconds)
        elapsed = time.monotonic() - started

    stats = {name: percentiles(values) for name, values in latencies.items()}
    delta = stats["kiln"]["p50_ms"] - stats["floor"]["p50_ms"]
    passed = delta <= TARGET_MS

    print(f"\nModelInfer {MODEL} batch 1, concurrency 1, interleaved, "
          f"{stats['kiln']['count']} requests each ({elapsed:.1f} s)")
    print(f"{'server':<8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
    for name, row in stats.items():
        print(f"{name:<8}{row['p50_ms']:9.3f}{row['p90_ms']:9.3f}{row['p99_ms']:9.3f}{row['mean_ms']:9.3f}")
    print(f"kiln - floor, p50: {delta:+.3f} ms (target <= {TARGET_MS} ms): {'PASS' if passed else 'FAIL'}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "benchmark": "latency_floor",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "git": git_revision(),
        "model": MODEL, "batch": 1, "concurrency": 1,
        "warmup": args.warmup, "elapsed_s": round(elapsed, 2),
        "servers": stats,
        "p50_delta_ms": delta, "target_ms": TARGET_MS, "pass": passed,
    }, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0 if passed else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM and SIGINT alike: unwind, so both servers are stopped


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
