"""Faults inside a model, on a real server: a runtime that raises, one that hangs past the model's
execution timeout, one that returns wrong shapes. The affected requests fail INTERNAL naming the
model; other models and later requests are unaffected; metrics count the failures and the
replaced instances.

The faults are injected by wrapping a loaded version's runtime.infer (ONNX-free Python code),
as test_repository.py does: no hook in the server.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from onnx_models import scale_model, write_config
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc

TIMEOUT_US = 300_000


def config(name: str, extra: str = "") -> str:
    return f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
dynamic_batching {{ }}
{extra}
"""


class Fault:
    """Replaces runtime.infer of a loaded version; `mode` picks the fault for the next calls."""

    def __init__(self, version) -> None:
        self.real = version.runtime.infer
        version.runtime.infer = self
        self.mode = "none"
        self.unblock = threading.Event()
        self.hung = threading.Event()
        self.returned_late = threading.Event()

    def __call__(self, inputs, output_names):
        mode = self.mode
        if mode == "raise":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if mode == "hang":
            self.mode = "none"  # only this call hangs
            self.hung.set()
            self.unblock.wait(60)
            outputs = self.real(inputs, output_names)
            self.returned_late.set()
            return outputs
        outputs = self.real(inputs, output_names)
        if mode == "wide":
            return {"y": np.zeros((inputs["x"].shape[0], 5), np.float32)}
        if mode == "rows":
            return {"y": outputs["y"][:-1]}
        if mode == "missing":
            return {}
        return outputs


@pytest.fixture
def served(tmp_path, start_server):
    repo = tmp_path / "repo"
    timeout = f'parameters {{ key: "execution_timeout_microseconds" value {{ string_value: "{TIMEOUT_US}" }} }}'
    for name, extra in (("faulty", timeout), ("healthy", "")):
        scale_model(repo / name / "1" / "model.onnx", 2.0, [4])
        write_config(repo / name, config(name, extra))
    server = start_server(repo)
    fault = Fault(server.repository.get("faulty"))
    channel = grpc.insecure_channel(server.url)
    yield server, pb_grpc.GRPCInferenceServiceStub(channel), fault
    fault.unblock.set()
    channel.close()


def request(model: str, rows: int = 2, value: float = 1.0) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    req.raw_input_contents.append(np.full((rows, 4), value, np.float32).tobytes())
    return req


def assert_served(stub, model: str, value: float = 3.0) -> None:
    response = stub.ModelInfer(request(model, value=value), timeout=5)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32), [2 * value] * 8)


def expect_internal(stub, model: str, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request(model), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL, (info.value.code(), info.value.details())
    for fragment in (f"'{model}'",) + fragments:
        assert fragment in info.value.details(), (fragment, info.value.details())
    return info.value.details()


def scrape(server) -> dict:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def metric(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize(
    "mode, fragments",
    [
        ("raise", ["RuntimeError", "illegal memory access"]),
        ("wide", ["output 'y'", "[2, 5]", "[-1,4]"]),
        ("rows", ["output 'y'", "1 rows", "2 rows"]),
        ("missing", ["no output 'y'"]),
    ],
)
def test_runtime_fault_fails_internal_and_is_isolated(served, mode, fragments):
    server, stub, fault = served
    fault.mode = mode
    for _ in range(3):
        expect_internal(stub, "faulty", *fragments)
        assert_served(stub, "healthy")  # other models unaffected, meanwhile
    fault.mode = "none"
    assert_served(stub, "faulty")  # later requests unaffected
    samples = scrape(server)
    assert metric(samples, "kiln_requests_total", model="faulty", version="1", outcome="internal") == 3
    assert metric(samples, "kiln_requests_total", model="faulty", version="1", outcome="success") == 1
    assert metric(samples, "kiln_requests_total", model="healthy", version="1", outcome="internal") == 0
    assert metric(samples, "kiln_instance_replacements_total", model="faulty", version="1") == 0


def test_hung_execution_times_out_and_its_instance_is_replaced(served):
    server, stub, fault = served
    version = server.repository.get("faulty")
    scheduler = version.scheduler
    fault.mode = "hang"
    started = time.monotonic()
    hung = stub.ModelInfer.future(request("faulty", value=5.0), timeout=10)
    assert fault.hung.wait(5)
    queued = stub.ModelInfer.future(request("faulty", value=6.0), timeout=10)  # waits behind the hung call
    with pytest.raises(grpc.RpcError) as info:
        hung.result()
    failed_after = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.INTERNAL, info.value
    for fragment in ("'faulty'", "exceeded the execution timeout of 300 ms", "replaced"):
        assert fragment in info.value.details(), info.value.details()
    assert TIMEOUT_US / 1e6 - 0.05 <= failed_after < TIMEOUT_US / 1e6 + 2.0
    # the request queued behind it runs on the replacement instance, while the old thread is still stuck
    np.testing.assert_array_equal(np.frombuffer(queued.result().raw_output_contents[0], np.float32), [12.0] * 8)
    assert not fault.returned_late.is_set()
    assert scheduler.instance_replacements == 1
    assert scheduler._pool.thread_count == 1  # the instance count is kept (the stuck thread not counted)
    for value in (1.0, 2.0):
        assert_served(stub, "faulty", value)
    assert_served(stub, "healthy")
    samples = scrape(server)
    assert metric(samples, "kiln_instance_replacements_total", model="faulty", version="1") == 1
    assert metric(samples, "kiln_requests_total", model="faulty", version="1", outcome="internal") == 1
    assert metric(samples, "kiln_instance_replacements_total", model="healthy", version="1") == 0
    executions = version.stats.execution_count
    fault.unblock.set()  # the stuck call finally returns: its result is discarded, its thread retires
    assert fault.returned_late.wait(5)
    deadline = time.monotonic() + 5
    while scheduler._pool._threads - {t for t in scheduler._pool._threads if t.is_alive()} or \
            len(scheduler._pool._threads) != 1:
        assert time.monotonic() < deadline, "the abandoned thread never retired"
        time.sleep(0.01)
    assert version.stats.execution_count == executions
    assert_served(stub, "faulty", 4.0)
    assert scheduler.queue_depth == 0 and scheduler.inflight == 0


def test_fast_executions_are_not_affected_by_the_timeout(served):
    """The watchdog fires only on a hung batch: a burst of normal requests never trips it."""
    server, stub, fault = served
    futures = [stub.ModelInfer.future(request("faulty", rows=1 + i % 8, value=float(i)), timeout=10) for i in range(64)]
    for i, future in enumerate(futures):
        out = np.frombuffer(future.result().raw_output_contents[0], np.float32)
        assert out.tolist() == [2.0 * i] * (4 * (1 + i % 8))
    assert server.repository.get("faulty").scheduler.instance_replacements == 0
