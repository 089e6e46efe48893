"""kiln against its peers, same model, same load generators, one server at a time.

    bash loadtests/peers/setup.sh                # once: MLServer and PyTriton venvs, perf_analyzer's libraries
    python -m loadtests.peers.compare            # mlp, c = 1 and 16, kiln bench + perf_analyzer

Servers (each serving <source>/<model>/1/model.onnx, batching on, with the ORT intra-op threads and
max batch size of kiln's config.pbtxt for the model; PyTriton also its instance count):
  kiln      `kiln serve` on a repository with the model and its config.pbtxt (dynamic_batching)
  floor     loadtests/floor_server.py: bare grpc.aio + ORT, no batching (when that file exists)
  mlserver  MLServer 1.7, custom onnxruntime runtime, adaptive batching (parallel_workers 0 and 1)
  pytriton  PyTriton 0.7, onnxruntime session bound with Triton's dynamic batcher
Generators: `kiln bench` closed loop, perf_analyzer from the tritonclient wheel
(--measurement-interval 5000 --stability-percentage 25), and h2load (loadtests/h2load.py, C,
the lightest: it leaves the server the most of the 2 cores). perf_analyzer calls ModelConfig,
which MLServer 1.7 does not implement: its cells say n/a.
--streaming sends kiln bench's and perf_analyzer's requests over ModelStreamInfer streams, one request in
flight per stream; it leaves out h2load (unary calls only) and MLServer, whose ModelStreamInfer is another
API (it answers with ModelInferResponse, not ModelStreamInferResponse) that adaptive batching turns off.
PyTriton also gets kiln's queue delay (or --peer-queue-delay-us); MLServer gets it when it is not 0 (its adaptive batching
merges nothing without a wait; 0.5 ms otherwise). Zoo models: `--model resnet18 --source DIR`
with DIR made by `python -m export.make_zoo --model-repository DIR --only resnet18`.
Targets (issue "Load tests and benchmarks"): mlp c=16 kiln >= 2x PyTriton and >= 4x MLServer;
p50 at c=1 <= half of MLServer's; mlp_wide c=64 kiln >= 1.5x PyTriton.
Output in --out: peers-STAMP.json (every round), .md (the table and verdicts), .png (bars per
server and generator at the judged concurrency; `--replot REPORT.json` judges a recorded one again and
rewrites its checks, .md and .png).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from loadtests.bench import report as rp  # noqa: E402
from loadtests.bench.runner import BenchConfig, run_bench  # noqa: E402
from loadtests import h2load, threadcpu  # noqa: E402
from loadtests.steal import cpu_ticks, steal_share  # noqa: E402
from loadtests.ports import free_port  # noqa: E402
from loadtests.readiness import wait_ready  # noqa: E402
from server import grpc_experiments  # noqa: E402

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"


def cudart_dir() -> Path | None:
    found = sorted(VENVS.glob("cudart/lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    return found[0] if found else None


def server_commands(model: str, model_file: Path, repo: Path, port: int,
                    kiln_flags: Sequence[str] = (), peer_delay_us: int | None = None) -> dict[str, tuple[list[str], dict]]:
    """name -> (argv, extra env) for every server whose installation is present; `kiln_flags` go to
    both kiln commands; `peer_delay_us`, when given, is the peers' queue delay instead of kiln's."""
    servers: dict[str, tuple[list[str], dict]] = {
        "kiln": ([sys.executable, "-m", "server", "serve", "--model-repository", str(repo), "--grpc-port", str(port),
                  "--metrics-port", "-1", "--grace-period", "2", *kiln_flags], {}),
        # two SO_REUSEPORT serving processes: only helps when the load arrives over several connections
        "kiln-w2": ([sys.executable, "-m", "server", "serve", "--model-repository", str(repo), "--grpc-port", str(port),
                     "--metrics-port", str(free_port()), "--grace-period", "2", "--workers", "2", *kiln_flags], {}),
    }
    kiln = kiln_settings(repo / model)
    if peer_delay_us is not None:
        kiln = kiln._replace(delay_us=peer_delay_us)
    threads = ["--intra-op-threads", str(kiln.threads)]
    floor = REPO_ROOT / "loadtests" / "floor_server.py"
    if floor.is_file():
        servers["floor"] = ([sys.executable, str(floor), "--model", str(model_file), "--name", model, "--port", str(port),
                             "--max-batch-size", str(kiln.max_batch_size), *threads], {})
    mls = VENVS / "mlserver" / "bin" / "python"
    if mls.exists():
        delay = ["--max-batch-time", str(kiln.delay_us / 1e6)] if kiln.delay_us else []
        for workers in (0, 1):
            servers[f"mlserver-w{workers}"] = (
                [str(mls), str(HERE / "serve_mlserver.py"), "--model", str(model_file), "--name", model,
                 "--grpc-port", str(port), "--parallel-workers", str(workers),
                 "--max-batch-size", str(kiln.max_batch_size), *delay, *threads], {})
    pyt = VENVS / "pytriton" / "bin" / "python"
    if pyt.exists():
        libdir = sysconfig.get_config_var("LIBDIR") or ""  # the stub needs the libpython the venv was made from
        env = {"LD_LIBRARY_PATH": os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)}
        servers["pytriton"] = ([str(pyt), str(HERE / "serve_pytriton.py"), "--model", str(model_file), "--name", model,
                                "--grpc-port", str(port), "--max-queue-delay-us", str(kiln.delay_us),
                                "--max-batch-size", str(kiln.max_batch_size), "--instances", str(kiln.instances),
                                *threads], env)
    return servers


class KilnSettings(NamedTuple):
    delay_us: int  # dynamic batching's max_queue_delay_microseconds
    threads: int  # ORT intra-op threads, 0 = ORT's default
    max_batch_size: int
    instances: int  # instance_group counts, summed


def kiln_settings(model_dir: Path) -> KilnSettings:
    """What kiln's config.pbtxt sets for batching, ORT threads and instances: the peers get the same
    (MLServer has no instances in one process, the floor neither instances nor batching)."""
    from server.config import read_config_file

    config = read_config_file(model_dir / "config.pbtxt")
    threads = config.parameters["intra_op_thread_count"].string_value if "intra_op_thread_count" in config.parameters else "0"
    instances = sum(max(group.count, 1) for group in config.instance_group) or 1  # as server/config.py counts
    return KilnSettings(config.dynamic_batching.max_queue_delay_microseconds, int(threads), config.max_batch_size,
                        instances)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc/<pid>/stat."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = threadcpu.stat_fields(stat.read_text())[:3]
        except (OSError, ValueError):
            continue  # gone while listing
        if int(group) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_ended(proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        proc.poll()  # reap the leader, or it stays a zombie member of its group
        if not group_members(proc.pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the server's process group, then wait for every member, not only the leader:
    PyTriton's tritonserver or MLServer's workers left running would take CPU from the next server.
    The group's id is the leader's pid (started with start_new_session)."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
        _signal_group(proc.pid, sig)
        if _group_ended(proc, wait_s):
            break
    proc.wait(10)


def streaming_servers(names: list[str]) -> tuple[list[str], list[str]]:
    """(the servers --streaming measures, those it leaves out): MLServer's ModelStreamInfer answers with
    ModelInferResponse, which v2 clients cannot read, and adaptive batching turns its predict_stream off."""
    left_out = [n for n in names if n.startswith("mlserver")]
    return [n for n in names if n not in left_out], left_out


def perf_analyzer(model: str, url: str, concurrency: int, interval_ms: int, out_dir: Path, streaming: bool = False) -> dict:
    exe = Path(sys.executable).with_name("perf_analyzer")
    if not exe.exists():
        return {"error": "perf_analyzer not found (tritonclient wheel)"}
    env = grpc_experiments.operators_environment()  # perf_analyzer's grpc with its own defaults
    lib = cudart_dir()
    if lib is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p)
    csv_path = out_dir / f"pa-{model}-{concurrency}-{time.monotonic_ns()}.csv"
    argv = [str(exe), "-m", model, "-u", url, "-i", "grpc", "--concurrency-range", str(concurrency),
            "--measurement-interval", str(interval_ms), "--stability-percentage", "25", "--max-trials", "6", "-f", str(csv_path)]
    if streaming:
        argv.append("--streaming")
    ticks_before = cpu_ticks()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    stolen = steal_share(ticks_before, cpu_ticks())
    if proc.returncode != 0 or not csv_path.exists():
        lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
        return {"error": (lines[-1] if lines else f"exit {proc.returncode}")[:200]}
    with open(csv_path, newline="") as f:
        row = next(csv.DictReader(f))
    return {
        "throughput_rps": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000, "p90_ms": float(row["p90 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
        "command": "perf_analyzer " + " ".join(argv[1:]),
        "steal_share": stolen,  # over all of perf_analyzer's trials
    }


def run_h2load(url: str, model: str, concurrency: list[int], args, workdir: Path) -> dict:
    workload = h2load.prepare(url, model, workdir)
    steps = {}
    for c in concurrency:
        step = steps[str(c)] = h2load.run_closed_loop(workload, c, args.duration, args.connections, args.warmup)
        print(f"h2load c={c}: {step['throughput_rps']:.0f} req/s, p50 {step['latency_ms']['p50']:.2f} ms, "
              f"{step['errors']} errors, {rp.percent(step['steal_share'])}% of the CPU stolen", flush=True)
    return steps


def measure_round(cmd: list[str], env: dict, url: str, concurrency: list[int], args, log_path: Path,
                  workdir: Path) -> dict:
    """Start one server, measure it with each generator in turn, stop it: one round's results."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, start_new_session=True)
    this: dict = {"bench": {}, "perf_analyzer": {}, "h2load": {}, "loadavg": os.getloadavg()[0]}
    try:
        workers = int(cmd[cmd.index("--workers") + 1]) if "--workers" in cmd else 1
        wait_ready(url, proc, model=args.model, workers=workers, log_path=log_path)
        cfg = BenchConfig(url=url, model=args.model, concurrency=concurrency, duration_s=args.duration,
                          warmup_s=args.warmup, connections=args.connections, processes=args.processes,
                          streaming=args.streaming)
        for step in run_bench(cfg, progress=False)["steps"]:
            this["bench"][str(step["concurrency"])] = step
        if not args.no_perf_analyzer:
            for c in concurrency:
                this["perf_analyzer"][str(c)] = perf_analyzer(args.model, url, c, args.measurement_interval, args.out,
                                                              args.streaming)
                print(f"perf_analyzer c={c}: {this['perf_analyzer'][str(c)]}", flush=True)
        if not args.no_h2load and not args.streaming and h2load.h2load_path():
            this["h2load"] = run_h2load(url, args.model, concurrency, args, workdir)
    except Exception as exc:  # one broken peer must not lose the others' numbers
        this["error"] = f"{type(exc).__name__}: {exc} (log: {log_path})"
        print(f"{log_path.stem}: {this['error']}", flush=True)
    finally:
        stop(proc)
    return this


def round_steal(this: dict) -> float:
    """The most CPU the hypervisor took during any one measurement of a round (0.0 where none was read)."""
    measurements = [m for generator in ("bench", "perf_analyzer", "h2load") for m in this.get(generator, {}).values()]
    return max([m.get("steal_share") or 0.0 for m in measurements if isinstance(m, dict)], default=0.0)


def measure_undisturbed(measure: Callable[[int], dict], retries: int) -> tuple[dict, list[dict]]:
    """Call measure(attempt) until a round in which the hypervisor took less than STEAL_MARK of the
    CPU, or retries + 1 times: (the round kept, the disturbed rounds it replaced)."""
    disturbed = []
    for attempt in range(retries + 1):
        this = measure(attempt)
        stolen = round_steal(this)
        if stolen < STEAL_MARK or attempt == retries:
            return this, disturbed
        print(f"the hypervisor took {stolen:.0%} of the CPU during this round: measuring it again", flush=True)
        disturbed.append(this)
    raise ValueError("retries must be >= 0")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp", help="model of --source to serve everywhere (default: mlp)")
    ap.add_argument("--source", type=Path, default=REPO_ROOT / "model_repo",
                    help="repository the model comes from (default: model_repo)")
    ap.add_argument("--servers", default="", help="comma-separated subset (default: every installed one)")
    ap.add_argument("--kiln-flags", default="", metavar="FLAGS",
                    help="more `kiln serve` flags for kiln and kiln-w2, e.g. '--runtime-nice 10' (default: none)")
    ap.add_argument("--peer-queue-delay-us", type=int, default=None, metavar="US",
                    help="PyTriton's and MLServer's queue delay instead of kiln's (e.g. each at its own best)")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--duration", type=float, default=5.0, help="kiln bench and h2load seconds per step (default: 5)")
    ap.add_argument("--connections", type=int, default=1,
                    help="kiln bench gRPC / h2load HTTP/2 connections, the same for every server (default: 1)")
    ap.add_argument("--processes", type=int, default=1,
                    help="kiln bench client processes, the same for every server (default: 1)")
    ap.add_argument("--streaming", action="store_true",
                    help="kiln bench and perf_analyzer over ModelStreamInfer streams; no h2load, no MLServer (see above)")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--measurement-interval", type=int, default=5000, help="perf_analyzer ms (default: 5000)")
    ap.add_argument("--no-perf-analyzer", action="store_true")
    ap.add_argument("--no-h2load", action="store_true", help="skip h2load (also skipped when it is not installed)")
    ap.add_argument("--steal-retries", type=int, default=2, metavar="N",
                    help=f"measure a server's round again (up to N times) when the hypervisor took >= {STEAL_MARK * 100:.0f}%% of "
                         "the CPU during any of its steps; the disturbed rounds stay in the JSON (default: 2)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all servers, order reversed every other round (default: 2)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "loadtests" / "results")
    ap.add_argument("--replot", type=Path, metavar="REPORT.json",
                    help="measure nothing: judge a recorded report's rounds again with this version's rules, "
                         "and rewrite its checks, REPORT.md and REPORT.png")
    args = ap.parse_args(argv)
    if args.replot:
        publish(json.loads(args.replot.read_text()), args.replot)
        return 0
    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    source = args.source / args.model
    model_file = source / "1" / "model.onnx"
    report: dict = {
        "tool": "loadtests/peers/compare.py", "argv": sys.argv, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": rp.machine_info(), "model": args.model, "concurrency": concurrency, "streaming": args.streaming,
        "servers": {},
    }
    # kiln sets its grpc experiments itself when it starts (server/grpc_experiments.py); the peers
    # get the operator's environment, not the one importing kiln here gave this process
    server_env = grpc_experiments.operators_environment()
    with tempfile.TemporaryDirectory(prefix="kiln-peers-") as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(source, repo / args.model)
        port = free_port()
        servers = server_commands(args.model, model_file, repo, port, shlex.split(args.kiln_flags),
                                  args.peer_queue_delay_us)
        wanted = [s for s in args.servers.split(",") if s] or list(servers)
        for name in [n for n in wanted if n not in servers]:
            print(f"{name}: not installed (bash loadtests/peers/setup.sh)", flush=True)
        wanted = [n for n in wanted if n in servers]
        if args.streaming:
            wanted, left_out = streaming_servers(wanted)
            for name in left_out:
                print(f"{name}: left out with --streaming (its ModelStreamInfer is not the v2 one)", flush=True)
        for rnd in range(args.rounds):
            order = wanted if rnd % 2 == 0 else list(reversed(wanted))  # alternate, so drift favours no server
            for name in order:
                cmd, extra_env = servers[name]
                entry = report["servers"].setdefault(name, {"command": " ".join(cmd), "rounds": []})

                def measure(attempt: int) -> dict:
                    log_path = args.out / f"peers-{stamp}-{name}-{rnd + 1}{'.' + str(attempt) if attempt else ''}.log"
                    print(f"=== round {rnd + 1}/{args.rounds}: {name} (load {os.getloadavg()[0]:.1f})", flush=True)
                    return measure_round(cmd, dict(server_env, **extra_env), f"127.0.0.1:{port}", concurrency, args,
                                         log_path, Path(tmp))

                kept, disturbed = measure_undisturbed(measure, args.steal_retries)
                entry["rounds"].append(kept)
                if disturbed:
                    entry.setdefault("disturbed_rounds", []).extend(disturbed)
    report["machine"]["loadavg_end"] = os.getloadavg()
    publish(report, args.out / f"peers-{stamp}.json")
    return 0


def publish(report: dict, path: Path) -> None:
    """Judge the report's rounds, write it (JSON at path, .md and .png beside it) and print the table."""
    report["checks"] = [check for kiln in ("kiln", "kiln-w2") if kiln in report["servers"] for check in checks(report, kiln)]
    path.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    path.with_suffix(".md").write_text(text + "\n")
    plot(report, path.with_suffix(".png"))
    print()
    print(text)
    print(f"\nreport: {path}")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# a kiln bench or h2load step in which more than this share of the calls failed measured a broken server
# (e.g. one that crashed mid-step), not its speed: it is left out of the means and ratios, and named
FAILED_CALLS_MARK = 0.01


def failed_calls(step: dict) -> tuple[int, int]:
    """(failed, all) calls of a kiln bench step (error_count) or an h2load step (errors)."""
    failed = step["error_count"] if "error_count" in step else step["errors"]
    return failed, step["ok"] + failed


def _broken(step: dict | None) -> bool:
    if not step:
        return False
    failed, calls = failed_calls(step)
    return failed > FAILED_CALLS_MARK * calls if calls else True


def summary(report: dict, server: str, c: int) -> dict | None:
    """Means over rounds, for one server and c: kiln bench's throughput and percentiles, perf_analyzer's, h2load's.
    The per-round lists keep one entry per round (None where that generator failed, did not run, or measured a
    broken server), so round i of one server is paired with round i of another even when one side failed."""
    rounds = report["servers"].get(server, {}).get("rounds", [])
    measured = [r["bench"].get(str(c)) for r in rounds]
    if not any(measured):
        return None
    steps = [None if _broken(s) else s for s in measured]
    pas = [r["perf_analyzer"].get(str(c)) for r in rounds]
    pas_ok = [p if p and "error" not in p else None for p in pas]
    h2_measured = [r.get("h2load", {}).get(str(c)) or None for r in rounds]
    h2s = [None if _broken(h) else h for h in h2_measured]

    def per_round(results: list, pick: Callable[[dict], float | None]) -> list:
        return [pick(x) if x else None for x in results]

    def mean(results: list, pick: Callable[[dict], float | None]) -> float | None:
        return _mean(per_round(results, pick))

    def broken_rounds(results: list) -> list[int]:
        return [i + 1 for i, x in enumerate(results) if _broken(x)]

    return {
        "throughput_rps": mean(steps, lambda s: s["throughput_rps"]),
        "rounds_rps": per_round(steps, lambda s: s["throughput_rps"]),
        "rounds_steal": per_round(steps, lambda s: s.get("steal_share")),
        "rounds_broken": broken_rounds(measured),
        "p50_ms": mean(steps, lambda s: s["latency_ms"]["p50"]),
        "p99_ms": mean(steps, lambda s: s["latency_ms"]["p99"]),
        "avg_batch": mean(steps, lambda s: (s["server"] or {}).get("avg_batch")),
        "pa_rps": mean(pas_ok, lambda p: p["throughput_rps"]),
        "pa_rounds_rps": per_round(pas_ok, lambda p: p["throughput_rps"]),
        "pa_rounds_steal": per_round(pas_ok, lambda p: p.get("steal_share")),
        "pa_p50_ms": mean(pas_ok, lambda p: p["p50_ms"]),
        "pa_error": next((p["error"] for p in pas if p and "error" in p), None),
        "pa_rounds_failed": [i + 1 for i, p in enumerate(pas) if p and "error" in p],
        "h2_rps": mean(h2s, lambda h: h["throughput_rps"]),
        "h2_rounds_rps": per_round(h2s, lambda h: h["throughput_rps"]),
        "h2_rounds_steal": per_round(h2s, lambda h: h.get("steal_share")),
        "h2_rounds_broken": broken_rounds(h2_measured),
        "h2_p50_ms": mean(h2s, lambda h: h["latency_ms"]["p50"]),
        "h2_errors": sum(h["errors"] for h in h2s if h),
    }


def broken_steps(report: dict, server: str, c: int) -> list[str]:
    """One line per kiln bench or h2load step of `server` at c whose calls failed (FAILED_CALLS_MARK)."""
    out = []
    for i, r in enumerate(report["servers"].get(server, {}).get("rounds", []), 1):
        for generator, step in (("kiln bench", r["bench"].get(str(c))), ("h2load", r.get("h2load", {}).get(str(c)))):
            if _broken(step):
                failed, calls = failed_calls(step)
                statuses = step.get("errors") if isinstance(step.get("errors"), dict) else None
                out.append(f"{server}, round {i}, {generator} c={c}: {failed} of {calls} calls failed"
                           f"{f' {statuses}' if statuses else ''}: left out of the means and ratios")
    return out


# the throughput targets: model -> (concurrency, [(peer prefix, factor)])
THROUGHPUT_TARGETS = {"mlp": (16, [("pytriton", 2.0), ("mlserver", 4.0)]), "mlp_wide": (64, [("pytriton", 1.5)])}
# the models whose c=1 p50 the issue compares with MLServer's (at most half of it)
P50_TARGET_MODELS = ("mlp",)


class GeneratorKeys(NamedTuple):
    """summary() keys of one load generator's figures."""
    rps: str  # mean throughput
    rounds: str  # per-round throughputs
    p50: str  # mean p50
    steal: str  # per-round steal
    broken: str | None  # rounds whose calls failed (perf_analyzer's failures are its errors instead)


GENERATORS = {"kiln bench": GeneratorKeys("throughput_rps", "rounds_rps", "p50_ms", "rounds_steal", "rounds_broken"),
              "perf_analyzer": GeneratorKeys("pa_rps", "pa_rounds_rps", "pa_p50_ms", "pa_rounds_steal", None),
              "h2load": GeneratorKeys("h2_rps", "h2_rounds_rps", "h2_p50_ms", "h2_rounds_steal", "h2_rounds_broken")}
# a round in which the hypervisor took at least this share of the machine's CPU time (steal.py)
# from either side's measurement is marked: its ratio says more about the neighbours than the servers
STEAL_MARK = 0.05
STEAL_NOTE = (f"*: the hypervisor took >= {STEAL_MARK:.0%} of the machine's CPU time while one side of that round "
              "was measured (steal, /proc/stat)")


def round_ratios(kiln: dict, other: dict, rounds_key: str, steal_key: str) -> str:
    """'2.10x, 0.35x*': kiln's throughput over the peer's, round by round; * marks a round with steal.
    summary() keeps one entry per round in both lists, so index i is round i on either side."""
    out = []
    for i, (a, b) in enumerate(zip(kiln[rounds_key], other[rounds_key])):
        if a is not None and b:
            stolen = max(kiln[steal_key][i] or 0.0, other[steal_key][i] or 0.0)
            out.append(f"{a / b:.2f}x{'*' if stolen >= STEAL_MARK else ''}")
    return ", ".join(out)


def checks(report: dict, kiln: str = "kiln") -> list[dict]:
    """The issue's targets for `kiln` (or a variant such as kiln-w2), with every generator that measured both sides."""
    out = []
    c, targets = THROUGHPUT_TARGETS.get(report["model"], (16, []))
    kiln_c, kiln1 = summary(report, kiln, c), summary(report, kiln, 1)
    mlservers = [s for s in report["servers"] if s.startswith("mlserver") and report["model"] in P50_TARGET_MODELS]
    peers = [(name, factor) for prefix, factor in targets for name in report["servers"] if name.startswith(prefix)]
    for generator, keys in GENERATORS.items():
        for peer, factor in peers:
            other = summary(report, peer, c)
            if not (kiln_c and other and other[keys.rps]):
                continue
            if kiln_c[keys.rps]:
                ratio = kiln_c[keys.rps] / other[keys.rps]
                measured = f"{ratio:.2f}x (rounds: {round_ratios(kiln_c, other, keys.rounds, keys.steal)})"
                met = ratio >= factor
            elif keys.broken and kiln_c[keys.broken]:
                measured, met = "no round of kiln's without failed calls", False
            else:
                continue
            out.append({"target": f"c={c} throughput ({generator}) {kiln} >= {factor:g}x {peer}",
                        **_with_broken_rounds(measured, met, kiln_c, other, kiln, peer, keys)})
        for peer in mlservers:
            other = summary(report, peer, 1)
            if kiln1 and other and kiln1[keys.p50] and other[keys.p50]:
                share = kiln1[keys.p50] / other[keys.p50]
                measured = f"{share * 100:.0f}% ({kiln1[keys.p50]:.2f} vs {other[keys.p50]:.2f} ms)"
                out.append({"target": f"c=1 p50 ({generator}) {kiln} <= 50% of {peer}",
                            **_with_broken_rounds(measured, share <= 0.5, kiln1, other, kiln, peer, keys)})
    return out


def _with_broken_rounds(measured: str, met: bool, kiln_row: dict, peer_row: dict, kiln: str, peer: str,
                        keys: GeneratorKeys) -> dict:
    """A verdict that names the rounds left out because calls failed; kiln failing calls fails the target."""
    kiln_broken = kiln_row[keys.broken] if keys.broken else []
    peer_broken = peer_row[keys.broken] if keys.broken else []
    if peer_broken:
        measured += f"; {peer}'s round(s) {', '.join(map(str, peer_broken))} left out: its calls failed"
    if kiln_broken:
        measured += f"; {kiln}'s calls failed in round(s) {', '.join(map(str, kiln_broken))}"
    return {"measured": measured, "pass": met and not kiln_broken}


def markdown(report: dict) -> str:
    cs = report["concurrency"]
    head = (["server"] + [f"c={c} req/s" for c in cs] + [f"c={c} p50 / p99 ms" for c in cs]
            + [f"perf_analyzer c={c} req/s (p50 ms)" for c in cs] + [f"h2load c={c} req/s (p50 ms)" for c in cs]
            + [f"avg batch c={cs[-1]}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if report.get("streaming"):
        lines.insert(0, "kiln bench and perf_analyzer over ModelStreamInfer streams, one request in flight per stream.\n")
    errors = []
    for name in report["servers"]:
        rows = [summary(report, name, c) for c in cs]
        errors += [line for c in cs for line in broken_steps(report, name, c)]
        if not any(rows):
            lines.append(f"| {name} | failed |")
            continue
        cells = [name]
        cells += [f"{r['throughput_rps']:.0f}" if r and r["throughput_rps"] is not None else "-" for r in rows]
        cells += [f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}" if r and r["p50_ms"] is not None else "-" for r in rows]
        for c, r in zip(cs, rows):
            if r and r["pa_rps"] is not None:
                cells.append(f"{r['pa_rps']:.0f} ({r['pa_p50_ms']:.2f})")
                if r["pa_rounds_failed"]:
                    errors.append(f"perf_analyzer c={c}, {name}: failed in round(s) "
                                  f"{', '.join(map(str, r['pa_rounds_failed']))} (the first: {r['pa_error']})")
            else:
                cells.append("n/a" if r and r["pa_error"] else "-")
                if r and r["pa_error"]:
                    errors.append(f"perf_analyzer n/a, {name}: {r['pa_error']}")
        cells += [f"{r['h2_rps']:.0f} ({r['h2_p50_ms']:.2f})" if r and r["h2_rps"] is not None else "-" for r in rows]
        errors += [f"{name}: h2load saw {r['h2_errors']} failed calls at c={c}" for c, r in zip(cs, rows) if r and r["h2_errors"]]
        last = rows[-1]
        cells.append(f"{last['avg_batch']:.1f}" if last and last["avg_batch"] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {'PASS' if c['pass'] else 'FAIL'}: {c['target']}: {c['measured']}" for c in report["checks"]]
    if any("*" in c["measured"] for c in report["checks"]):
        lines += ["", STEAL_NOTE]
    if errors:
        lines.append("")
        lines += [f"- {e}" for e in sorted(set(errors))]
    return "\n".join(lines)


def plotted_concurrency(report: dict) -> int:
    """The concurrency the targets judge (THROUGHPUT_TARGETS), where it was measured; else the last one."""
    judged = THROUGHPUT_TARGETS.get(report["model"], (None, []))[0]
    return judged if judged in report["concurrency"] else report["concurrency"][-1]


def plot_data(report: dict, c: int) -> dict[str, dict[str, float]]:
    """generator -> server -> mean req/s at concurrency c, where measured."""
    out: dict[str, dict[str, float]] = {}
    for generator, keys in GENERATORS.items():
        for name in report["servers"]:
            row = summary(report, name, c)
            if row and row[keys.rps]:
                out.setdefault(generator, {})[name] = row[keys.rps]
    return out


def plot(report: dict, path: Path) -> None:
    """Grouped bars: each server's throughput at the judged concurrency, one bar per load generator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = plotted_concurrency(report)
    data = plot_data(report, c)
    servers = list(report["servers"])
    width = 0.8 / max(len(data), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(servers)), 4.5), dpi=110)
    for i, (generator, by_server) in enumerate(data.items()):
        placed = [(k, by_server[name]) for k, name in enumerate(servers) if name in by_server]
        offset = (i - (len(data) - 1) / 2) * width
        bars = ax.bar([k + offset for k, _ in placed], [rps for _, rps in placed], width, label=generator)
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(range(len(servers)), servers, fontsize=8)
    ax.set_ylabel("requests/s (batch-1 requests)")
    ax.set_title(f"{report['model']}, concurrency {c}{', streaming' if report.get('streaming') else ''}: "
                 f"{report['machine']['nproc']} x {report['machine']['cpu_model']}, {report['date'][:10]}", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
