"""Soak: N minutes of high load on `kiln serve`, the server's RSS sampled; memory must not grow.

Closed-loop load from client processes (every request answered before the next one of its
slot is sent) on a copy of a model (default model_repo/mlp, queue unbounded). RSS of the server
process is sampled every --sample-secs. Growth = (median RSS of the last minute) / (median RSS
of the minute after warm-up) - 1; the check is growth < 5% and zero failed requests.

    .venv/bin/python -m loadtests.soak --minutes 10 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from loadtests.checks import conclude  # noqa: E402
from loadtests.overload import KilnProcess, make_request, run_load  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="load duration (default: 10)")
    parser.add_argument("--warmup-minutes", type=float, default=1.0, help="excluded from the baseline (default: 1)")
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "model_repo" / "mlp")
    parser.add_argument("--width", type=int, default=256, help="input width of the model's FP32 input x")
    parser.add_argument("--rows", type=int, default=1, help="rows per request; varied 1..rows when > 1 (default: 1)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default: 64)")
    parser.add_argument("--processes", type=int, default=2, help="client processes (default: 2)")
    parser.add_argument("--sample-secs", type=float, default=5.0, help="RSS sampling period (default: 5)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    server = KilnProcess(args.model_dir, 0)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - started, proc.memory_info().rss))
            stop.wait(args.sample_secs)

    sampler = threading.Thread(target=sample, daemon=True)
    duration = args.minutes * 60
    request = make_request(args.model_dir.name, args.width, args.rows)
    rows_total = []
    try:
        proc = psutil.Process(server.replica.process.pid)
        sampler.start()
        with mp.get_context("spawn").Pool(args.processes) as pool:
            chunk = 30.0  # load in chunks, so progress shows
            while (elapsed := time.monotonic() - started) < duration:
                step = min(chunk, duration - elapsed)
                rows = run_load(pool, "closed", server.url, request, args.concurrency, step, args.processes)
                rows_total.extend(rows)
                ok = sum(1 for _, _, code in rows if code == "OK")
                print(f"{time.monotonic() - started:6.0f} s  {ok / step:7.0f} req/s  failures "
                      f"{len(rows) - ok}  RSS {samples[-1][1] / 2**20:.1f} MiB", flush=True)
    finally:  # the server is stopped however the load ended
        stop.set()
        if sampler.is_alive():
            sampler.join()
        exit_code = server.stop()

    t = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples], dtype=float)
    warm = args.warmup_minutes * 60
    baseline = float(np.median(rss[(t >= warm) & (t < warm + 60)])) if np.any((t >= warm) & (t < warm + 60)) else rss[0]
    final = float(np.median(rss[t >= t.max() - 60]))
    growth = final / baseline - 1
    ok = sum(1 for _, _, code in rows_total if code == "OK")
    failures = len(rows_total) - ok
    latencies = np.array([lat for _, lat, code in rows_total if code == "OK"])
    report = {
        "cores": os.cpu_count(), "minutes": args.minutes, "concurrency": args.concurrency, "rows": args.rows,
        "requests": len(rows_total), "failures": failures, "req_per_s": round(ok / duration, 1),
        "p50_ms": float(np.percentile(latencies, 50) * 1000), "p99_ms": float(np.percentile(latencies, 99) * 1000),
        "rss_start_mib": rss[0] / 2**20, "rss_baseline_mib": baseline / 2**20, "rss_final_mib": final / 2**20,
        "rss_max_mib": rss.max() / 2**20, "growth_after_warmup": growth, "server_exit_code": exit_code,
        "rss_samples": [[round(a, 1), int(b)] for a, b in samples],
    }
    checks = [(f"RSS growth after warm-up {growth * 100:+.2f}% < 5%", growth < 0.05),
              (f"{failures} failed requests of {len(rows_total)}", failures == 0),
              (f"server exited {exit_code} on SIGTERM", exit_code == 0)]
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples"}, indent=1))
    return conclude(report, checks, args.json)


if __name__ == "__main__":
    sys.exit(main())
