"""Build the bundled model repository.

    python -m export.make_bundled [--model-repository model_repo] [--mlp-wide]

Writes, each into a temp dir first and then renamed into place (nothing
half-written is ever left in the repository):

* ``mlp/``      x [B,256] -> y [B,10], seeded random weights
* ``digits/``   a small CNN trained on the sklearn 8x8 digits (fails below 95% held-out accuracy)
* ``mlp_wide/`` (with ``--mlp-wide``) x [B,1024] -> y [B,1024], ~100 MB fp32, not committed

Everything is seeded, so running twice produces byte-identical model.onnx files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from export.digits_data import load_digits_split
from export.onnx_export import export_onnx
from export.zoo import build_digits_cnn, build_mlp, build_mlp_wide

MIN_DIGITS_ACCURACY = 0.95

MLP_CONFIG = """\
name: "mlp"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "x" data_type: TYPE_FP32 dims: [ 256 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { }
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""

DIGITS_CONFIG = """\
name: "digits"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { max_queue_delay_microseconds: 500 }
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""

# mlp_wide's delay spans one execution plus the answers' round trip (~20-30 ms on 2 cores): under
# a closed loop, the requests queued while a batch runs then wait for that batch's clients to send
# again, and each worker runs one batch of all its streams instead of two of half as many (ORT does
# ~17% more items/s per core at 32 rows than at 16). Open-loop traffic at moderate rates pays it:
# docs/BENCHMARKS.md, "A longer queue delay for mlp_wide".
MLP_WIDE_CONFIG = """\
name: "mlp_wide"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1024 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1024 ] } ]
dynamic_batching { preferred_batch_size: [ 64 ] max_queue_delay_microseconds: 40000 }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def log(msg: str) -> None:
    print(f"[make_bundled] {msg}", flush=True)


def write_model_dir(repo: Path, name: str, config: str, build: Callable[[Path], None]) -> Path:
    """Build ``repo/name`` in a temp dir (``build`` writes ``<tmp>/1/model.onnx``), then swap it in."""
    repo.mkdir(parents=True, exist_ok=True)
    final = repo / name
    # Temp dirs live beside the repository (same filesystem, so rename is atomic) and
    # outside it, so a polling server never sees a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo.resolve().parent))
    try:
        (tmp / "1").mkdir()
        build(tmp / "1" / "model.onnx")
        (tmp / "config.pbtxt").write_text(config)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=repo.resolve().parent))
            old.rmdir()
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def train_digits_cnn(seed: int = 0, epochs: int = 30, batch_size: int = 32, lr: float = 2e-3) -> tuple[torch.nn.Module, float]:
    """Train the digits CNN deterministically; return (model in eval mode, held-out accuracy)."""
    x_train, y_train, x_test, y_test = load_digits_split()
    model = build_digits_cnn(seed)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 5 == 0 or epoch == epochs:
            log(f"  digits epoch {epoch:2d}/{epochs} train loss {total / len(xt):.4f} ({time.perf_counter() - t0:.1f}s)")
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    return model, float(np.mean(pred == y_test))


def onnx_accuracy(path: Path) -> float:
    import onnxruntime as ort

    _, _, x_test, y_test = load_digits_split()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"image": x_test})
    return float(np.mean(logits.argmax(axis=1) == y_test))


def make_mlp(repo: Path) -> Path:
    log("mlp: building (seed 0) and exporting")
    model = build_mlp(0)
    return write_model_dir(
        repo, "mlp", MLP_CONFIG, lambda p: export_onnx(model, {"x": torch.zeros(2, 256)}, ["y"], p)
    )


def make_digits(repo: Path) -> Path:
    log("digits: training CNN on sklearn digits (seed 0, Adam)")
    model, acc = train_digits_cnn(0)
    log(f"digits: held-out accuracy (torch) {acc:.4f}")
    if acc < MIN_DIGITS_ACCURACY:
        raise SystemExit(f"digits: held-out accuracy {acc:.4f} < {MIN_DIGITS_ACCURACY}")

    def build(p: Path) -> None:
        export_onnx(model, {"image": torch.zeros(2, 1, 8, 8)}, ["logits"], p)
        onnx_acc = onnx_accuracy(p)
        log(f"digits: held-out accuracy (onnxruntime) {onnx_acc:.4f}")
        if onnx_acc < MIN_DIGITS_ACCURACY:
            raise SystemExit(f"digits: ONNX held-out accuracy {onnx_acc:.4f} < {MIN_DIGITS_ACCURACY}")

    return write_model_dir(repo, "digits", DIGITS_CONFIG, build)


def make_mlp_wide(repo: Path) -> Path:
    log("mlp_wide: building (seed 0) and exporting (~100 MB)")
    model = build_mlp_wide(0)
    return write_model_dir(
        repo, "mlp_wide", MLP_WIDE_CONFIG, lambda p: export_onnx(model, {"x": torch.zeros(2, 1024)}, ["y"], p)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.make_bundled", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-repository", default="model_repo", type=Path, help="repository dir (default: model_repo)")
    ap.add_argument("--mlp-wide", action="store_true", help="also build mlp_wide (~100 MB, not committed)")
    args = ap.parse_args(argv)

    # Single-threaded, deterministic kernels: same seed -> same weights -> same bytes.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    repo: Path = args.model_repository
    t0 = time.perf_counter()
    built = [make_mlp(repo), make_digits(repo)]
    if args.mlp_wide:
        built.append(make_mlp_wide(repo))
    for d in built:
        size = (d / "1" / "model.onnx").stat().st_size
        log(f"done: {d}/1/model.onnx {size / 1e6:.2f} MB")
    log(f"finished in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
