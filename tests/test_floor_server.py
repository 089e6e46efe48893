"""loadtests/floor_server.py, the reference every served figure's Python gRPC cost is read against:
a real server answering what ONNX Runtime computes, with the ORT threads it is given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from conftest import REPO_ROOT, stop_process
from loadtests.ports import free_port
from loadtests.readiness import wait_ready
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc
from server.protocol import model_config_pb2 as mc

MLP = REPO_ROOT / "model_repo" / "mlp" / "1" / "model.onnx"


def start_floor(tmp_path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log_path = tmp_path / f"floor-{threads}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "loadtests/floor_server.py", "--model", str(MLP), "--name", "mlp",
                                 "--port", str(port), "--intra-op-threads", str(threads)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    url = f"127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=60, log_path=log_path)
    except Exception:
        stop_process(proc)
        raise
    return proc, url


@pytest.fixture
def floor_url(tmp_path):
    proc, url = start_floor(tmp_path, 1)
    yield url
    stop_process(proc)


def unnamed_threads(pid: int) -> int:
    """Threads still called "python": ORT's intra-op pool is among them (grpc names its own)."""
    return sum(1 for task in Path(f"/proc/{pid}/task").iterdir() if (task / "comm").read_text().strip() == "python")


def _request(seed: int, rows: int = 5) -> tuple[pb.ModelInferRequest, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="mlp", id=f"r{seed}")
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 256])
    request.raw_input_contents.append(x.tobytes())
    return request, x


def _assert_computes(response: pb.ModelInferResponse, request: pb.ModelInferRequest, x: np.ndarray) -> None:
    (expected,) = ort.InferenceSession(str(MLP), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert (response.model_name, response.id) == ("mlp", request.id)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("y", "FP32", [len(x), 10])]
    got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(len(x), 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_answers_what_onnxruntime_computes(floor_url):
    request, x = _request(3)
    with grpc.insecure_channel(floor_url) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    _assert_computes(response, request, x)


def test_answers_each_message_of_a_stream_in_turn(floor_url):
    sent = [_request(seed, rows=seed) for seed in (1, 2, 3)]
    with grpc.insecure_channel(floor_url) as channel:
        answers = list(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([r for r, _ in sent]), timeout=10))
    assert len(answers) == 3 and not any(a.error_message for a in answers)
    for answer, (request, x) in zip(answers, sent):
        _assert_computes(answer.infer_response, request, x)


def test_metadata_names_the_batch_dimension_as_dynamic(floor_url):
    with grpc.insecure_channel(floor_url) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name="mlp"), timeout=10)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 256])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 10])]


def test_intra_op_threads_reach_onnxruntime(tmp_path):
    one, _ = start_floor(tmp_path, 1)
    try:
        three, _ = start_floor(tmp_path, 3)
        try:
            assert unnamed_threads(three.pid) - unnamed_threads(one.pid) == 2  # ORT's pool: threads - 1
        finally:
            stop_process(three)
    finally:
        stop_process(one)


def test_answers_the_server_metadata_and_model_config_perf_analyzer_asks_for(floor_url):
    with grpc.insecure_channel(floor_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        server = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
        config = stub.ModelConfig(pb.ModelConfigRequest(name="mlp"), timeout=10).config
    assert server.name == "kiln-floor"
    assert (config.name, config.platform, config.max_batch_size) == ("mlp", "onnxruntime_onnx", 64)
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [("x", "TYPE_FP32", [256])]
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in config.output] == [("y", "TYPE_FP32", [10])]
