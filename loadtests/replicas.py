"""kiln replicas on this machine behind a real L7 gRPC balancer (nginx) or client-side round robin.

    python -m loadtests.replicas                     # 1, 2, 3 replicas behind nginx; mlp; c = 16, 64
    python -m loadtests.replicas --replicas 1,3 --rounds 2 --concurrency 32
    python -m loadtests.replicas --drain             # SIGTERM one of 3 replicas under load: failures?

Throughput mode: per round and per replica count, start N `kiln serve` processes on loopback ports
(explicit mode, only --model loaded) and nginx (deploy/nginx/nginx.conf rendered with those ports),
run `kiln bench` closed loop through nginx, and count each replica's requests from its own
ModelStatistics. Rounds alternate the order of N so a drift of the machine's load hits every N
alike. On a 2-core machine the replicas, nginx and the load generator share the same two cores:
more replicas cannot add cores, the figures show the balancer's cost and the spread.

Drain mode: three replicas, steady clients through nginx and through a client-side round-robin
channel (both retrying UNAVAILABLE), SIGTERM to one replica mid-load; reports every failure.
The integration test tests/test_replicas.py runs the same pieces.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from loadtests.bench import report as rp  # noqa: E402
from loadtests.bench.runner import BenchConfig, run_bench  # noqa: E402
from loadtests.ports import free_port  # noqa: E402
from loadtests import serve_process  # noqa: E402
from loadtests.readiness import wait_ready  # noqa: E402
from loadtests.serve_process import serve_command  # noqa: E402
from server.client import connect  # noqa: E402
from server.protocol import grpc_service_pb2 as pb  # noqa: E402
from server.protocol import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

NGINX_CONF = REPO_ROOT / "deploy" / "nginx" / "nginx.conf"
READY_TIMEOUT_S = 60
EXIT_TIMEOUT_S = 60


def render_nginx_config(listen_port: int, upstream_ports: list[int], inflight_limit: int | None = None) -> str:
    """deploy/nginx/nginx.conf with its listen port, upstream servers and (given) in-flight cap replaced."""
    text = NGINX_CONF.read_text()
    text, listens = re.subn(r"listen 127\.0\.0\.1:\d+", f"listen 127.0.0.1:{listen_port}", text)
    server_line = re.compile(r"^(\s*)server 127\.0\.0\.1:\d+( [^;]*)?;\n", re.MULTILINE)
    first = server_line.search(text)
    if listens != 1 or first is None:
        raise ValueError(f"{NGINX_CONF} has no single `listen 127.0.0.1:PORT` or no upstream server line")
    if inflight_limit is not None:
        text, caps = re.subn(r"limit_conn kiln_inflight \d+;", f"limit_conn kiln_inflight {inflight_limit};", text)
        if caps != 1:
            raise ValueError(f"{NGINX_CONF} has no single `limit_conn kiln_inflight N;` line")
    indent, options = first.group(1), first.group(2) or ""
    servers = "".join(f"{indent}server 127.0.0.1:{port}{options};\n" for port in upstream_ports)
    text = server_line.sub("", text)
    return text[: first.start()] + servers + text[first.start():]


class Nginx:
    """nginx in the foreground with a rendered config and its own prefix directory."""

    def __init__(self, listen_port: int, upstream_ports: list[int], workdir: Path, inflight_limit: int | None = None) -> None:
        self.port = listen_port
        self.url = f"127.0.0.1:{listen_port}"
        self.prefix = workdir / f"nginx-{listen_port}"
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(render_nginx_config(listen_port, upstream_ports, inflight_limit))
        self.log_path = self.prefix / "nginx.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [nginx_binary(), "-p", str(self.prefix), "-c", str(self.conf), "-g", "daemon off;"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        wait_listening(self.port, self.process, self.log_path)

    def stop(self) -> None:
        serve_process.stop(self.process, EXIT_TIMEOUT_S, signal.SIGQUIT)  # SIGQUIT: finish the calls in flight
        self._log.close()


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx)")
    return path


def nginx_test(conf: Path, prefix: Path) -> subprocess.CompletedProcess:
    """`nginx -t`: the configuration parses and every directive is valid."""
    prefix.mkdir(parents=True, exist_ok=True)
    return subprocess.run([nginx_binary(), "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True, text=True)


def wait_listening(port: int, process: subprocess.Popen, log_path: Path) -> None:
    import socket

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening within {READY_TIMEOUT_S} s")


@dataclasses.dataclass
class Replica:
    """One `kiln serve` process on its own gRPC and metrics ports."""

    port: int
    metrics_port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def success_count(self, model: str) -> int:
        """Successful requests of `model` this replica served (its own ModelStatistics)."""
        with grpc.insecure_channel(self.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
        return sum(s.inference_stats.success.count for s in stats.model_stats)

    def terminate(self) -> int:
        """SIGTERM (graceful drain) and the exit code."""
        return serve_process.stop(self.process, EXIT_TIMEOUT_S)


def start_replicas(count: int, repository: Path, model: str, workdir: Path, grace_s: float = 30.0,
                   extra_args: tuple[str, ...] = ()) -> list[Replica]:
    """`count` kiln processes serving `model` from `repository`, started together, returned once all are ready."""
    replicas = []
    for _ in range(count):
        port, metrics_port = free_port(), free_port()
        log_path = workdir / f"replica-{port}.log"
        command = serve_command(repository, port, metrics_port, "--model-control-mode", "explicit", "--load-model", model,
                                "--grace-period", str(grace_s), "--log-level", "WARNING", *extra_args)
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        replicas.append(Replica(port, metrics_port, process, log_path))
    try:  # started together, waited for in turn: their start-ups overlap
        for replica in replicas:
            wait_ready(replica.url, replica.process, model=model, timeout=READY_TIMEOUT_S, log_path=replica.log_path)
    except BaseException:
        stop_replicas(replicas)
        raise
    return replicas


def stop_replicas(replicas: list[Replica]) -> list[int | None]:
    """SIGTERM every replica still running, then wait: their exit codes (None: was already gone)."""
    return serve_process.stop_all([r.process for r in replicas], EXIT_TIMEOUT_S)


def round_robin_target(replicas: list[Replica]) -> str:
    """A gRPC target naming every replica: the client's round_robin policy spreads calls over them."""
    return "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)


def mlp_request(model: str, rows: int, seed: int) -> tuple[pb.ModelInferRequest, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request, x


class SteadyLoad:
    """Client threads sending one request after another through a retrying connection, recording
    every outcome; what a well-behaved production client does (retries UNAVAILABLE, has a deadline)."""

    def __init__(self, target: str, model: str, threads: int, round_robin: bool = False, retries: int = 4,
                 pause_s: float = 0.002, timeout_s: float = 30.0) -> None:
        self.target, self.model, self.round_robin, self.retries = target, model, round_robin, retries
        self.pause_s, self.timeout_s = pause_s, timeout_s
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 10)

    def count(self) -> int:
        with self._lock:
            return self.ok + len(self.failures)

    def _run(self, seed: int) -> None:
        connection = connect(self.target, retries=self.retries, round_robin=self.round_robin)
        request, x = mlp_request(self.model, 1 + seed % 3, seed)
        try:
            while not self._stop.is_set():
                try:
                    response = connection.call("ModelInfer", request, self.timeout_s)
                    outcome = None if len(response.raw_output_contents) == 1 else "no output"
                except grpc.RpcError as exc:
                    outcome = f"{exc.code().name}: {exc.details()}"
                with self._lock:
                    if outcome is None:
                        self.ok += 1
                    else:
                        self.failures.append(outcome)
                time.sleep(self.pause_s)
        finally:
            connection.close()


def throughput_rounds(args, workdir: Path) -> list[dict]:
    results = []
    for round_ in range(args.rounds):
        order = args.replicas if round_ % 2 == 0 else args.replicas[::-1]
        for count in order:
            replicas = start_replicas(count, args.model_repository, args.model, workdir)
            nginx = None
            try:
                nginx = Nginx(free_port(), [r.port for r in replicas], workdir)
                # one replica is also measured without the balancer: what nginx itself costs
                routes = [("nginx", nginx.url)] + ([("direct", replicas[0].url)] if count == 1 else [])
                for concurrency in args.concurrency:
                    for via, url in routes:
                        before = [r.success_count(args.model) for r in replicas]
                        cfg = BenchConfig(url=url, model=args.model, concurrency=[concurrency],
                                          duration_s=args.duration, warmup_s=args.warmup, processes=args.processes,
                                          connections=args.connections, server_stats=False)
                        (step,) = run_bench(cfg, out=io.StringIO(), progress=False)["steps"]
                        # counted from the replicas' own statistics: warm-up calls included
                        per_replica = [r.success_count(args.model) - b for r, b in zip(replicas, before)]
                        step.update(replicas=count, via=via, round=round_, per_replica=per_replica)
                        results.append(step)
                        lat = step["latency_ms"]
                        print(f"round {round_} replicas {count} via {via} c={concurrency}: "
                              f"{step['throughput_rps']:.0f} req/s, p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
                              f"errors {step['error_count']}, requests per replica {per_replica}", flush=True)
            finally:
                if nginx is not None:
                    nginx.stop()
                stop_replicas(replicas)
    return results


def print_summary(results: list[dict], args) -> None:
    print("\n| replicas | via | c | req/s (mean) | per round | p50 ms | p99 ms | requests per replica (last round) |")
    print("|---|---|---|---|---|---|---|---|")
    for concurrency in args.concurrency:
        for count in args.replicas:
            for via in ("direct", "nginx"):
                steps = [s for s in results
                         if s["replicas"] == count and s["via"] == via and s["concurrency"] == concurrency]
                if not steps:
                    continue
                rps = [s["throughput_rps"] for s in steps]
                p50 = np.mean([s["latency_ms"]["p50"] for s in steps])
                p99 = np.mean([s["latency_ms"]["p99"] for s in steps])
                print(f"| {count} | {via} | {concurrency} | {np.mean(rps):.0f} | {' / '.join(f'{r:.0f}' for r in rps)} | "
                      f"{p50:.2f} | {p99:.2f} | {steps[-1]['per_replica']} |")


def drain_scenario(args, workdir: Path) -> int:
    replicas = start_replicas(3, args.model_repository, args.model, workdir)
    nginx = Nginx(free_port(), [r.port for r in replicas], workdir)
    try:
        with SteadyLoad(nginx.url, args.model, threads=4) as via_nginx, \
                SteadyLoad(round_robin_target(replicas), args.model, threads=4, round_robin=True) as via_client:
            time.sleep(args.duration / 2)
            before = [r.success_count(args.model) for r in replicas]
            started = time.monotonic()
            code = replicas[0].terminate()
            print(f"replica {replicas[0].url}: SIGTERM -> exit code {code} after {time.monotonic() - started:.2f} s")
            time.sleep(args.duration / 2)
        after = [r.success_count(args.model) for r in replicas[1:]]
        print(f"requests per surviving replica after the signal: {[a - b for a, b in zip(after, before[1:])]}")
        for name, load in (("nginx", via_nginx), ("client round_robin", via_client)):
            print(f"{name}: {load.ok} ok, {len(load.failures)} failed {sorted(set(load.failures))[:3]}")
        return 0 if code == 0 and not via_nginx.failures and not via_client.failures else 1
    finally:
        nginx.stop()
        stop_replicas(replicas)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp")
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repo")
    p.add_argument("--replicas", default="1,2,3", help="comma-separated replica counts (default: 1,2,3)")
    p.add_argument("--concurrency", default="16,64", help="closed-loop concurrencies (default: 16,64)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (drain: whole run)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--processes", type=int, default=2, help="client processes (default: 2)")
    p.add_argument("--connections", type=int, default=8, help="client connections to nginx in all (default: 8)")
    p.add_argument("--drain", action="store_true", help="run the drain scenario instead of the throughput rounds")
    args = p.parse_args(argv)
    args.replicas = [int(n) for n in args.replicas.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    machine = rp.machine_info()
    print(f"machine: nproc {machine['nproc']}, load {machine['loadavg']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kiln-replicas-") as tmp:
        if args.drain:
            return drain_scenario(args, Path(tmp))
        print(f"replicas {args.replicas} behind nginx, {args.model}, c={args.concurrency}, {args.processes} client "
              f"processes, {args.connections} connections, {args.rounds} rounds", flush=True)
        print_summary(throughput_rounds(args, Path(tmp)), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
