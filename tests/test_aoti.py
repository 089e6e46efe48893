"""`kiln compile --target aoti` and the torch_aoti runtime on CPU.

AOTInductor builds C++ (tens of seconds per model), so the mlp and the transformer
are exported and compiled once for the module; every test shares them. Parity is
end to end: tritonclient -> the real server -> TorchAotiRuntime, vs eager PyTorch.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import tritonclient.grpc as triton  # noqa: E402

from export_cases import CASES, check_served_parity, served_infer  # noqa: E402
from server.cli import main as kiln  # noqa: E402
from server.config import read_config_file, to_model_config  # noqa: E402
from server.runtime import RuntimeLoadError, create_runtime  # noqa: E402


@pytest.fixture(scope="module")
def aoti_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("aoti") / "repo"
    for name in ("mlp", "transformer"):
        assert CASES[name].export(repo, "--parity-batch-sizes", "2") == 0
        assert kiln(["compile", name, "--target", "aoti", "--model-repository", str(repo), "--device", "cpu"]) == 0
    return repo


def test_compile_writes_model_beside_onnx(aoti_repo: Path) -> None:
    assert sorted(p.name for p in aoti_repo.iterdir()) == ["mlp", "mlp_aoti", "transformer", "transformer_aoti"]
    vdir = aoti_repo / "transformer_aoti" / "1"
    assert (vdir / "model.pt2").is_file() and (vdir / "export.json").is_file()
    sidecar = json.loads((vdir / "model.pt2.json").read_text())
    assert sidecar["device"] == "cpu"
    assert [t["name"] for t in sidecar["inputs"]] == ["input_ids", "attention_mask"]
    assert [t["shape"] for t in sidecar["outputs"]] == [[-1, 4], [-1, -1, 64]]
    proto = read_config_file(aoti_repo / "transformer_aoti" / "config.pbtxt")
    assert proto.backend == "torch_aoti" and proto.name == "transformer_aoti" and proto.max_batch_size == 64
    assert not [p for p in aoti_repo.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_served_parity_aoti(aoti_repo: Path, start_server, name: str) -> None:
    server = start_server(aoti_repo)
    seen = check_served_parity(server.url, CASES[name], f"{name}_aoti")
    assert {b for b, _, _ in seen} == {1, 7, 64}


def test_served_onnx_and_aoti_agree(aoti_repo: Path, start_server) -> None:
    """Both models of the same export served side by side give the same answers."""
    server = start_server(aoti_repo)
    client = triton.InferenceServerClient(server.url)
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 1000, (3, 17), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    a = served_infer(client, "transformer", feeds, ["logits", "hidden"])
    b = served_infer(client, "transformer_aoti", feeds, ["logits", "hidden"])
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-4, rtol=1e-3)


def _runtime(repo: Path, name: str, **overrides):
    proto = read_config_file(repo / name / "config.pbtxt")
    for key, value in overrides.items():
        if key == "kind":
            proto.instance_group[0].kind = proto.instance_group[0].Kind.Value(value)
        elif key == "count":
            proto.instance_group[0].count = value
    return create_runtime(repo / name / "1" / "model.pt2", to_model_config(proto, "torch_aoti"))


def test_runtime_io_and_zero_copy_inputs(aoti_repo: Path) -> None:
    runtime = _runtime(aoti_repo, "mlp_aoti")
    try:
        assert [(t.name, t.datatype, t.shape) for t in runtime.inputs] == [("x", "FP32", (-1, 256))]
        x = np.frombuffer(np.ones((4, 256), np.float32).tobytes(), dtype=np.float32).reshape(4, 256)  # read-only
        y = runtime.infer({"x": x}, ["y"])["y"]
        assert y.shape == (4, 10) and y.dtype == np.float32
    finally:
        runtime.close()


def _longest_stall(call) -> tuple[float, float]:
    """(longest gap between a second Python thread's iterations while `call` ran, duration of `call`).

    The second thread wakes every 0.5 ms; it needs the GIL for each iteration, so a call that
    holds the GIL stalls it for the whole call.
    """
    stop = threading.Event()
    stamps: list[float] = []

    def tick() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.0005)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        time.sleep(0.02)
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        time.sleep(0.02)
    finally:
        stop.set()
        ticker.join()
    inside = [t0] + [t for t in stamps if t0 <= t <= t1] + [t1]
    return max(b - a for a, b in zip(inside, inside[1:])), t1 - t0


def test_runtime_releases_gil(aoti_repo: Path) -> None:
    """Another Python thread keeps running while the compiled model computes.

    Contrast: the same package called through AOTICompiledModel.__call__ (boxed_run) holds
    the GIL, so there the ticker stalls for (almost) the whole call.
    """
    from torch._inductor.package import load_package

    runtime = _runtime(aoti_repo, "transformer_aoti")
    holding = load_package(str(aoti_repo / "transformer_aoti" / "1" / "model.pt2"))
    ids = np.random.default_rng(0).integers(0, 1000, (64, 128), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    tensors = [torch.from_numpy(ids), torch.from_numpy(feeds["attention_mask"])]
    try:
        assert runtime._direct is not None, "the GIL-releasing direct runner is not in use"
        runtime.infer(feeds, ["logits"])
        released = [_longest_stall(lambda: runtime.infer(feeds, ["logits"])) for _ in range(3)]
        held = [_longest_stall(lambda: holding(*tensors)) for _ in range(3)]
    finally:
        runtime.close()
    # fraction of the call during which the ticker could not run; best of three against noise
    released_frac = min(stall / took for stall, took in released)
    held_frac = min(stall / took for stall, took in held)
    assert released_frac < 0.5, f"runtime stalls other threads: {released}"
    assert held_frac > released_frac, (released, held)


def test_runtime_wrong_device_is_clear(aoti_repo: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the CPU-only error path is not reachable")
    with pytest.raises(RuntimeLoadError, match="needs a CUDA device"):
        _runtime(aoti_repo, "mlp_aoti", kind="KIND_GPU")


def test_runtime_without_torch_names_the_extra(aoti_repo: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "server.runtime.torch_aoti", raising=False)
    with pytest.raises(RuntimeLoadError, match=r"pip install 'kiln-serve\[torch\]'"):
        _runtime(aoti_repo, "mlp_aoti")


def test_compile_errors(aoti_repo: Path, tmp_path: Path, capsys) -> None:
    assert kiln(["compile", "nope", "--target", "aoti", "--model-repository", str(aoti_repo)]) == 1
    assert "model 'nope' not found" in capsys.readouterr().err
    assert kiln(["compile", "mlp", "--target", "aoti", "--version", "9", "--model-repository", str(aoti_repo)]) == 1
    assert "has no version 9" in capsys.readouterr().err
    # an ONNX model that kiln export did not write has no recipe to rebuild the module from
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(aoti_repo / "mlp", repo / "mlp")
    (repo / "mlp" / "1" / "export.json").unlink()
    assert kiln(["compile", "mlp", "--target", "aoti", "--model-repository", str(repo)]) == 1
    assert "export.json is missing" in capsys.readouterr().err
    assert sorted(p.name for p in repo.iterdir()) == ["mlp"]


def test_runtime_compare_measures_every_runtime_on_the_compiled_models(aoti_repo: Path, tmp_path: Path) -> None:
    """loadtests/runtime_compare.py (the in-process ORT / AOTInductor / eager table of docs/BENCHMARKS.md),
    briefly, on the models this module already built: one row per model, batch and runtime, each from
    real calls, inputs made from each model's config (the transformer's int64 ids and mask included)."""
    from loadtests.runtime_compare import main as runtime_compare

    out = tmp_path / "compare.json"
    args = ["--work-dir", str(aoti_repo.parent), "--models", "mlp", "transformer", "--batch-sizes", "1", "3",
            "--seconds", "0.05", "--threads", "0", "--json", str(out)]
    assert runtime_compare(args) == 0
    rows = json.loads(out.read_text())["rows"]
    expected = {(m, b, r) for m in ("mlp", "transformer") for b in (1, 3)
                for r in ("onnxruntime-cpu", "aoti-cpu", "pytorch-eager")}
    assert {(r["model"], r["batch"], r["runtime"]) for r in rows} == expected
    assert all(r["calls"] >= 10 and r["median_ms"] > 0 for r in rows)
    assert all(r["vs_eager"] == 1.0 for r in rows if r["runtime"] == "pytorch-eager")
    assert all(r["rows_per_s"] == pytest.approx(r["batch"] / (r["median_ms"] / 1e3)) for r in rows)
