"""Compare runtimes in-process, side by side in one run: ONNX Runtime CPU vs AOTInductor CPU vs eager PyTorch.

    python loadtests/runtime_compare.py [--work-dir DIR] [--batch-sizes 1 16] [--seconds 3]
                                        [--models resnet18 transformer] [--json out.json] [--markdown]

Models come from the zoo through the real tools (`kiln export`, `kiln compile --target aoti`),
built once into --work-dir (reused when already there). ONNX Runtime and AOTInductor run through
kiln's own serving runtimes (server.runtime.create_runtime: the code a served request executes,
numpy in and out); eager PyTorch runs the module under torch.inference_mode on torch tensors.
Rounds are interleaved (each runtime runs a slice in turn, repeatedly) so that load drifting on a
shared machine hits all of them alike; the table reports median and p90 latency per call and
rows/s. Not a test: it prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

SEQ_LEN = 128


def build(work: Path, models: list[str]) -> Path:
    from export.make_zoo import ZOO
    from server.cli import main as kiln

    repo = work / "repo"
    for name in models:
        if not (repo / name / "1" / "model.onnx").is_file():
            argv = ZOO[name].export_argv(str(repo)) + ["--parity-batch-sizes", "1", "16"]
            if kiln(argv) != 0:
                raise SystemExit(f"export of {name} failed")
        if not (repo / f"{name}_aoti" / "1" / "model.pt2").is_file():
            if kiln(["compile", name, "--target", "aoti", "--device", "cpu", "--model-repository", str(repo)]) != 0:
                raise SystemExit(f"aoti compile of {name} failed")
    return repo


def feeds_for(config_path: Path, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs of the model's declared types: float inputs normal, integer ones token ids below
    1000 (masks all ones), each variable dim SEQ_LEN long."""
    from server.config import read_config_file
    from server.datatypes import NUMPY_DTYPES, config_type_to_datatype
    from server.protocol import model_config_pb2 as mc

    feeds = {}
    for tensor in read_config_file(config_path).input:
        shape = (batch, *(SEQ_LEN if d == -1 else d for d in tensor.dims))
        dtype = NUMPY_DTYPES[config_type_to_datatype(mc.DataType.Name(tensor.data_type))]
        if np.issubdtype(dtype, np.floating):
            feeds[tensor.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in tensor.name:
            feeds[tensor.name] = np.ones(shape, dtype)
        else:
            feeds[tensor.name] = rng.integers(0, 1000, shape).astype(dtype)
    return feeds


def runners(repo: Path, name: str, threads: int):
    import torch

    from export.make_zoo import ZOO
    from export.spec import load_factory
    from server.config import read_config_file, to_model_config
    from server.runtime import create_runtime

    out = {}
    for label, model, filename, platform_name in (
        ("onnxruntime-cpu", name, "model.onnx", "onnxruntime_onnx"),
        ("aoti-cpu", f"{name}_aoti", "model.pt2", "torch_aoti"),
    ):
        proto = read_config_file(repo / model / "config.pbtxt")
        proto.ClearField("parameters")
        if threads:  # the same thread count for every runtime
            proto.parameters["intra_op_thread_count"].string_value = str(threads)
            proto.parameters["inter_op_thread_count"].string_value = "1"
        runtime = create_runtime(repo / model / "1" / filename, to_model_config(proto, platform_name))
        names = [o.name for o in proto.output]
        out[label] = (lambda feeds, rt=runtime, names=names: rt.infer(feeds, names))
    module = load_factory(ZOO[name].factory)().eval()

    def eager(feeds, module=module):
        with torch.inference_mode():
            return module(*(torch.from_numpy(v) for v in feeds.values()))

    out["pytorch-eager"] = eager
    return out


def measure(fns: dict, feeds: dict, seconds: float) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn(feeds)
    deadline = time.perf_counter() + seconds * len(fns)
    while time.perf_counter() < deadline or min(len(v) for v in times.values()) < 10:
        for label, fn in fns.items():
            slice_end = time.perf_counter() + 0.25
            while True:
                t0 = time.perf_counter()
                fn(feeds)
                times[label].append(time.perf_counter() - t0)
                if time.perf_counter() >= slice_end:
                    break
    return times


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/kiln-runtime-compare"))
    from export.make_zoo import ZOO

    ap.add_argument("--models", nargs="+", default=["resnet18", "transformer"], choices=sorted(ZOO), metavar="MODEL",
                    help=f"zoo models (default: resnet18 transformer; any of {', '.join(sorted(ZOO))})")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per runtime and case")
    ap.add_argument("--threads", type=int, default=1,
                    help="compute threads for every runtime (OMP_NUM_THREADS, torch, ORT intra-op); 0: library defaults. "
                    "Default 1: on a small shared machine, oversubscribed OpenMP spin-waits dominate otherwise")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads OpenMP (AOTI kernels use it)

    import onnxruntime
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    repo = build(args.work_dir, args.models)
    rng = np.random.default_rng(0)
    rows = []
    for name in args.models:
        fns = runners(repo, name, args.threads)
        for batch in args.batch_sizes:
            feeds = feeds_for(repo / name / "config.pbtxt", batch, rng)
            times = measure(fns, feeds, args.seconds)
            base = statistics.median(times["pytorch-eager"])
            for label, ts in times.items():
                med = statistics.median(ts)
                p90 = sorted(ts)[int(0.9 * (len(ts) - 1))]
                rows.append({"model": name, "batch": batch, "runtime": label, "median_ms": med * 1e3,
                             "p90_ms": p90 * 1e3, "rows_per_s": batch / med, "vs_eager": base / med, "calls": len(ts)})
                print(f"{name:12s} b={batch:<3d} {label:16s} median {med * 1e3:8.2f} ms  p90 {p90 * 1e3:8.2f} ms  "
                      f"{batch / med:9.1f} rows/s  x{base / med:.2f} vs eager  ({len(ts)} calls)", flush=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"), "machine": _cpu_model(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "threads": args.threads or "library defaults", "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if args.markdown:
        print("\n| model | batch | runtime | median ms | p90 ms | rows/s | speed-up vs eager |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['batch']} | {r['runtime']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                  f"{r['rows_per_s']:.1f} | {r['vs_eager']:.2f}x |")
        print(f"\n{meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
