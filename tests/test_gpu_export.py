"""GPU paths of export/compile/serve: ORT CUDA and TensorRT execution providers, native TensorRT
engines, AOTInductor on CUDA. Every test is @pytest.mark.gpu and skips cleanly without a GPU
(or without the library it needs); they are meant for a lent GPU machine:

    .venv/bin/python -m pytest tests/test_gpu_export.py -m gpu -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from export_cases import CASES, check_served_parity  # noqa: E402
from server.cli import main as kiln  # noqa: E402

pytestmark = pytest.mark.gpu


def _ort_has(provider: str) -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return provider in ort.get_available_providers()


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to PyTorch")


@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory) -> Path:
    if not (torch.cuda.is_available() or _ort_has("CUDAExecutionProvider")):
        pytest.skip("no GPU")
    repo = tmp_path_factory.mktemp("gpu") / "repo"
    for name in ("mlp", "transformer"):
        assert CASES[name].export(repo, "--parity-batch-sizes", "2") == 0
    return repo


def _variant(repo: Path, src: str, dst: str, extra_config: str) -> None:
    """A copy of model `src` named `dst` with config lines appended (same model file)."""
    shutil.copytree(repo / src, repo / dst)
    text = (repo / dst / "config.pbtxt").read_text().replace(f'name: "{src}"', f'name: "{dst}"')
    (repo / dst / "config.pbtxt").write_text(text + extra_config)


def test_ort_cuda_provider_served(gpu_repo: Path, tmp_path: Path, start_server) -> None:
    if not _ort_has("CUDAExecutionProvider"):
        pytest.skip("onnxruntime has no CUDAExecutionProvider (pip install 'kiln-serve[gpu]')")
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("mlp", "transformer"):
        shutil.copytree(gpu_repo / name, tmp_path / "src" / name)
        _variant(tmp_path / "src", name, f"{name}_cuda", "instance_group [ { count: 1 kind: KIND_GPU } ]\n")
        shutil.move(tmp_path / "src" / f"{name}_cuda", repo / f"{name}_cuda")
    server = start_server(repo)
    for name in ("mlp", "transformer"):
        check_served_parity(server.url, CASES[name], f"{name}_cuda", atol=1e-3, rtol=1e-3)


def test_ort_tensorrt_provider_served(gpu_repo: Path, tmp_path: Path, start_server) -> None:
    if not _ort_has("TensorrtExecutionProvider"):
        pytest.skip("onnxruntime has no TensorrtExecutionProvider")
    repo = tmp_path / "repo"
    shutil.copytree(gpu_repo / "mlp", repo / "mlp")
    _variant(repo, "mlp", "mlp_ort_trt",
             "instance_group [ { count: 1 kind: KIND_GPU } ]\n"
             'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" } ] } }\n')
    shutil.rmtree(repo / "mlp")
    server = start_server(repo)
    check_served_parity(server.url, CASES["mlp"], "mlp_ort_trt", atol=1e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def trt_repo(gpu_repo: Path) -> Path:
    pytest.importorskip("tensorrt")
    _need_cuda()
    assert kiln(["compile", "mlp", "--target", "tensorrt", "--model-repository", str(gpu_repo)]) == 0
    assert kiln(["compile", "transformer", "--target", "tensorrt", "--model-repository", str(gpu_repo),
                 "--dynamic-dim", "sequence=1:32:64", "--fp16", "--output-name", "transformer_trt16",
                 "--atol", "5e-2", "--rtol", "5e-2"]) == 0
    return gpu_repo


def test_tensorrt_engine_served(trt_repo: Path, start_server) -> None:
    sidecar = json.loads((trt_repo / "mlp_trt" / "1" / "model.plan.json").read_text())
    assert sidecar["tensorrt_version"] and sidecar["gpu_name"] and len(sidecar["profiles"]) == 2
    server = start_server(trt_repo)
    check_served_parity(server.url, CASES["mlp"], "mlp_trt", atol=1e-3, rtol=1e-3)
    check_served_parity(server.url, CASES["transformer"], "transformer_trt16", atol=5e-2, rtol=5e-2)


def test_tensorrt_mismatched_engine_rejected(trt_repo: Path, tmp_path: Path) -> None:
    from server.config import read_config_file, to_model_config
    from server.runtime import RuntimeLoadError, create_runtime

    model = tmp_path / "mlp_trt"
    shutil.copytree(trt_repo / "mlp_trt", model)
    meta_path = model / "1" / "model.plan.json"
    meta = json.loads(meta_path.read_text())
    meta["tensorrt_version"] = "0.0.1"
    meta_path.write_text(json.dumps(meta))
    config = to_model_config(read_config_file(model / "config.pbtxt"), "tensorrt_plan")
    with pytest.raises(RuntimeLoadError, match=r"built for TensorRT 0\.0\.1 .*rebuild with `kiln compile"):
        create_runtime(model / "1" / "model.plan", config)


def test_aoti_cuda_served(gpu_repo: Path, start_server) -> None:
    _need_cuda()
    for name in ("mlp", "transformer"):
        assert kiln(["compile", name, "--target", "aoti", "--device", "cuda", "--output-name", f"{name}_aoti_cuda",
                     "--model-repository", str(gpu_repo)]) == 0
    server = start_server(gpu_repo)
    for name in ("mlp", "transformer"):
        check_served_parity(server.url, CASES[name], f"{name}_aoti_cuda", atol=1e-3, rtol=1e-3)
