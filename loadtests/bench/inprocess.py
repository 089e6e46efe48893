"""`kiln bench --in-process`: the runtime alone, no server, no gRPC: the ceiling.

Loads the model as `kiln serve` would (config.pbtxt's platform and runtime
parameters, server.runtime.create_runtime) and calls runtime.infer in a loop
from one thread per instance (instance_group.count, or --threads), per batch size.
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from loadtests.bench import report as rp
from loadtests.bench.progress import ProgressBar
from loadtests.bench.runner import BenchError
from loadtests.inputs import input_shape
from server.client import random_input
from server.config import MODEL_FILENAMES, ConfigError, read_config_file, resolve_platform
from server.protocol import model_config_pb2 as mc
from server.repository import VERSION_PATTERN, to_model_config_for_loading
from server.runtime import create_runtime


def locate_model(path: Path) -> tuple[Path, mc.ModelConfig, str]:
    """(model file, config proto, platform) for a model directory of a repository, or a bare model file."""
    path = Path(path)
    if path.is_file():
        proto = mc.ModelConfig()
        config_path = path.parent.parent / "config.pbtxt"
        if config_path.is_file() and VERSION_PATTERN.match(path.parent.name):
            proto = read_config_file(config_path)
        return path, proto, resolve_platform(proto, [path.name])
    if not path.is_dir():
        raise BenchError(f"'{path}' is neither a model directory nor a model file")
    config_path = path / "config.pbtxt"
    proto = read_config_file(config_path) if config_path.is_file() else mc.ModelConfig()
    versions = sorted((int(p.name) for p in path.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)), reverse=True)
    if not versions:
        raise BenchError(f"'{path}' has no version directory (e.g. {path}/1/model.onnx)")
    files = [f.name for f in (path / str(versions[0])).iterdir()]
    platform = resolve_platform(proto, files)
    filename = proto.default_model_filename or MODEL_FILENAMES[platform]
    model_file = path / str(versions[0]) / filename
    if not model_file.is_file():
        raise BenchError(f"'{model_file}' does not exist")
    return model_file, proto, platform


def run_in_process(
    model: Path,
    batch_sizes: list[int],
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    threads: int = 0,
    shapes: dict[str, list[int]] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    progress: bool | None = None,
) -> dict:
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise BenchError("--batch-sizes needs positive integers")
    if not 0 < duration_s <= 600:
        raise BenchError("--duration must be in (0, 600] seconds")
    try:
        model_file, proto, platform = locate_model(Path(model))
        config = to_model_config_for_loading(proto, platform)
    except ConfigError as exc:
        raise BenchError(str(exc)) from None
    runtime = create_runtime(model_file, config)
    threads = threads or max(1, config.instance_group.count)
    rng = np.random.default_rng(0)
    output_names = [o.name for o in runtime.outputs]
    report: dict = {
        "tool": "kiln bench --in-process",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "machine": rp.machine_info(),
        "config": {
            "model": str(model), "model_file": str(model_file), "platform": platform, "threads": threads,
            "parameters": dict(config.parameters), "duration_s": duration_s, "warmup_s": warmup_s,
        },
        "batches": [],
    }
    bar = ProgressBar(len(batch_sizes), warmup_s + duration_s, err, enabled=progress)
    print(f"kiln bench --in-process: {model_file} ({platform}), {threads} thread(s), {duration_s:g}s per batch size", file=out)
    print(f"{'batch':>6} {'calls':>8} {'items/s':>12} {'calls/s':>10} {'p50 ms':>9} {'p99 ms':>9}", file=out, flush=True)
    try:
        for index, batch in enumerate(batch_sizes):
            inputs = {}
            for tensor in runtime.inputs:
                shape = input_shape(list(tensor.shape), batch, (shapes or {}).get(tensor.name))
                inputs[tensor.name] = random_input(tensor.datatype, shape, rng)
            start = time.monotonic()
            measure_start = start + warmup_s
            measure_end = measure_start + duration_s
            bar.step(index, f"b={batch}", start)
            latencies: list[list[float]] = [[] for _ in range(threads)]

            def loop(slot: int) -> None:
                while True:
                    t0 = time.monotonic()
                    if t0 >= measure_end:
                        return
                    runtime.infer(inputs, output_names)
                    if t0 >= measure_start:
                        latencies[slot].append(time.monotonic() - t0)

            workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
            for w in workers:
                w.start()
            while any(w.is_alive() for w in workers):
                bar.update(sum(len(x) for x in latencies))
                time.sleep(0.2)
            for w in workers:
                w.join()
            bar.clear()
            all_lat = np.concatenate([np.asarray(x) for x in latencies])
            calls = int(all_lat.size)
            lat = rp.latency_summary(all_lat)
            row = {
                "batch_size": batch, "calls": calls,
                "items_per_s": calls * batch / duration_s, "calls_per_s": calls / duration_s,
                "latency_ms": lat,
            }
            report["batches"].append(row)
            print(f"{batch:>6} {calls:>8} {row['items_per_s']:>12.1f} {row['calls_per_s']:>10.1f} "
                  f"{lat['p50'] or 0:>9.3f} {lat['p99'] or 0:>9.3f}", file=out, flush=True)
    finally:
        bar.clear()
        runtime.close()
    return report
