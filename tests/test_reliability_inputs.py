"""Bad input against a real server: every malformed request gets the right status and a message
naming what was wrong, and the server keeps serving. Cases already covered by test_inference_protocol.py
(missing/unknown/duplicate inputs, wrong dtype/shape/byte length, BYTES prefixes, oversized messages,
path-like model names) and test_codec.py are not repeated here."""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import RunningServer
from onnx_models import add_sub_model, identity_config, identity_model, write_config
from server.app import ServerSettings
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc

ADD_SUB = """
name: "add_sub"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "a" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "b" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "sum" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "diff" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
PRIORITIES = """
dynamic_batching { priority_levels: 2 default_priority_level: 2
  default_queue_policy { allow_timeout_override: true } }
"""


def build_repository(root: Path) -> Path:
    add_sub_model(root / "add_sub" / "1" / "model.onnx", [4])
    write_config(root / "add_sub", ADD_SUB)
    for name, datatype, extra in (("vec_fp32", "FP32", PRIORITIES), ("vec_bytes", "BYTES", "")):
        identity_model(root / name / "1" / "model.onnx", datatype, [-1])
        write_config(root / name, identity_config(name, datatype, [-1], 8, extra))
    return root


@pytest.fixture(scope="module")
def server(module_tmp):
    repo = build_repository(module_tmp / "inputs_repo")
    running = RunningServer(ServerSettings(model_repository=repo, grpc_port=0, metrics_port=None, grace_period_s=2))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.url)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def fp32(*shape) -> bytes:
    return np.zeros(shape, np.float32).tobytes()


def add_sub_request(a=None, b=None, shape=(1, 4)) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_sub")
    request.inputs.add(name="a", datatype="FP32", shape=list(shape))
    request.inputs.add(name="b", datatype="FP32", shape=list(shape))
    count = math.prod(shape) if all(d >= 0 for d in shape) else 0
    request.raw_input_contents.extend([a if a is not None else fp32(count), b if b is not None else fp32(count)])
    return request


def vec_request(model: str, shape, datatype: str, raw: bytes | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype=datatype, shape=list(shape))
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


def assert_serves(stub) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    response = stub.ModelInfer(add_sub_request(a.tobytes(), a.tobytes(), (2, 4)), timeout=10)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 4), 2 * a)


def expect(stub, request, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    error = info.value
    assert error.code() == code, (error.code(), error.details())
    for fragment in fragments:
        assert fragment in error.details(), (fragment, error.details())
    assert_serves(stub)
    return error.details()


def with_param(request, key: str, kind: str, value) -> pb.ModelInferRequest:
    setattr(request.parameters[key], kind, value)
    return request


def with_outputs(request, *names) -> pb.ModelInferRequest:
    for name in names:
        request.outputs.add(name=name)
    return request


def typed_fp32_on_int_field() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 4]).contents.int_contents.extend([1, 2, 3, 4])
    return request


INVALID = {
    # absurd dims: rejected on the data, never allocated
    "raw FP32 2**40 elements": (lambda: vec_request("vec_fp32", [1, 2**40], "FP32", fp32(4)), ["'x'", "bytes", "got 16"]),
    "raw BYTES 2**40 elements": (
        lambda: vec_request("vec_bytes", [1, 2**40], "BYTES", struct.pack("<I", 1) + b"a"), ["'x'", "element 1"]),
    "typed BYTES 2**40 elements": (lambda: vec_request("vec_bytes", [1, 2**40], "BYTES"), ["'x'", "values"]),
    "dims product overflow": (lambda: vec_request("vec_fp32", [8, 2**62], "FP32", fp32(4)), ["'x'", "too large"]),
    "batch of 0 rows": (lambda: add_sub_request(b"", b"", (0, 4)), ["'a'", "batch size", "at least 1"]),
    "unknown datatype": (lambda: vec_request("vec_fp32", [1, 1], "FP128", fp32(1)), ["'x'", "FP32", "FP128"]),
    "typed values in the wrong field": (typed_fp32_on_int_field, ["'a'", "fp32_contents", "got 0"]),
    "input name with path separator": (
        lambda: pb.ModelInferRequest(model_name="add_sub", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="../a", datatype="FP32", shape=[1, 4])], raw_input_contents=[fp32(4)]), ["'../a'", "add_sub"]),
    "no inputs at all": (lambda: pb.ModelInferRequest(model_name="add_sub"), ["missing input", "'a'", "'b'"]),
    "priority as a string": (
        lambda: with_param(add_sub_request(), "priority", "string_param", "high"), ["'priority'", "integer"]),
    "priority as a bool": (lambda: with_param(add_sub_request(), "priority", "bool_param", True), ["'priority'", "integer"]),
    "negative priority": (lambda: with_param(add_sub_request(), "priority", "int64_param", -1), ["'priority'", ">= 0"]),
    "priority above the levels": (
        lambda: with_param(vec_request("vec_fp32", [1, 1], "FP32", fp32(1)), "priority", "int64_param", 3),
        ["vec_fp32", "priority 3", "[0, 2]"]),
    "priority on a model without levels": (
        lambda: with_param(add_sub_request(), "priority", "uint64_param", 1), ["add_sub", "priority 1", "[0, 0]"]),
    "negative timeout": (lambda: with_param(add_sub_request(), "timeout", "int64_param", -5), ["'timeout'", ">= 0"]),
    "timeout as a double": (lambda: with_param(add_sub_request(), "timeout", "double_param", 1.5), ["'timeout'", "integer"]),
    "output requested twice": (lambda: with_outputs(add_sub_request(), "sum", "sum"), ["'sum'", "more than once"]),
    "output name with path separator": (lambda: with_outputs(add_sub_request(), "../sum"), ["'../sum'", "add_sub"]),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_argument(stub, case):
    build, fragments = INVALID[case]
    started = time.monotonic()
    expect(stub, build(), grpc.StatusCode.INVALID_ARGUMENT, *fragments)
    assert time.monotonic() - started < 5  # no huge allocation, no wait


NOT_FOUND = {
    "empty model name": (pb.ModelInferRequest(model_name=""), ["model name ''"]),
    "version beyond int64": (pb.ModelInferRequest(model_name="add_sub", model_version="9" * 20), ["add_sub", "9" * 20]),
    "version with a separator": (pb.ModelInferRequest(model_name="add_sub", model_version="1/../2"), ["'1/../2'"]),
    "model name with a NUL byte": (pb.ModelInferRequest(model_name="add\x00sub"), ["not valid"]),
}


@pytest.mark.parametrize("case", sorted(NOT_FOUND))
def test_not_found(stub, case):
    request, fragments = NOT_FOUND[case]
    expect(stub, request, grpc.StatusCode.NOT_FOUND, *fragments)


def test_zero_size_non_batch_dim_is_served(stub):
    """A dynamic non-batch dim of size 0 is a valid (empty) tensor where the model allows it."""
    for datatype, model in (("FP32", "vec_fp32"), ("BYTES", "vec_bytes")):
        response = stub.ModelInfer(vec_request(model, [2, 0], datatype, b""), timeout=10)
        assert [list(o.shape) for o in response.outputs] == [[2, 0], [2, 0]]
        assert list(response.raw_output_contents) == [b"", b""]


def test_nan_and_inf_are_served_not_rejected(stub):
    a = np.array([[np.nan, np.inf, -np.inf, 1.0]], np.float32)
    b = np.array([[1.0, 1.0, 1.0, np.nan]], np.float32)
    response = stub.ModelInfer(add_sub_request(a.tobytes(), b.tobytes()), timeout=10)
    total = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(1, 4)
    np.testing.assert_array_equal(total, a + b)  # NaN == NaN positions compared by numpy


def test_unknown_parameters_are_ignored(stub):
    request = add_sub_request()
    request.parameters["no_such_parameter"].string_param = "x" * 1000
    request.parameters["sequence_id"].int64_param = 7
    request.inputs[0].parameters["binary_data_size"].int64_param = 16
    request.outputs.add(name="sum").parameters["classification"].bool_param = False
    response = stub.ModelInfer(request, timeout=10)
    assert [o.name for o in response.outputs] == ["sum"]


def test_bad_input_in_a_stream_keeps_the_stream(stub):
    """Each malformed request of a stream gets its own error; the stream and later requests go on."""
    requests = [add_sub_request(fp32(1, 4), fp32(1, 4)), vec_request("vec_fp32", [1, 2**40], "FP32", fp32(1)),
                add_sub_request(b"", b"", (0, 4)), pb.ModelInferRequest(model_name="../etc"),
                add_sub_request(fp32(1, 4), fp32(1, 4))]
    for i, request in enumerate(requests):
        request.id = str(i)
    responses = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter(requests), timeout=10)}
    assert set(responses) == {"0", "1", "2", "3", "4"}
    assert responses["0"].error_message == responses["4"].error_message == ""
    assert responses["1"].error_message.startswith("[INVALID_ARGUMENT]") and "'x'" in responses["1"].error_message
    assert responses["2"].error_message.startswith("[INVALID_ARGUMENT]") and "batch size" in responses["2"].error_message
    assert responses["3"].error_message.startswith("[NOT_FOUND]") and "'../etc'" in responses["3"].error_message


def test_junk_while_a_streams_answers_are_being_written_is_invalid_argument(server, stub):
    """The reader meets the junk while answers to the good requests before it are still being sent:
    the call must end INVALID_ARGUMENT at once, not hang to its deadline (an abort from the reader
    task raced those writes: GRPC_CALL_ERROR_TOO_MANY_OPERATIONS, then DEADLINE_EXCEEDED)."""
    good = add_sub_request(fp32(1, 4), fp32(1, 4)).SerializeToString()
    with grpc.insecure_channel(server.url) as channel:
        stream_call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        for goods in [1] * 150 + [2, 5, 20, 100]:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                list(stream_call(iter([good] * goods + [b"\xff" * 64]), timeout=5))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            assert time.monotonic() - started < 2
    assert_serves(stub)


def test_unparseable_message_is_rejected_cleanly(server, stub):
    """Bytes that are not a ModelInferRequest at all: a clean error, never a crash."""
    with grpc.insecure_channel(server.url) as channel:
        raw_call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for junk in (b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05abc"):
            with pytest.raises(grpc.RpcError) as info:
                raw_call(junk, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            assert "inference.ModelInferRequest" in info.value.details()
        stream_call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        good = add_sub_request(fp32(1, 4), fp32(1, 4)).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            list(stream_call(iter([good, b"\xff" * 64]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        status = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        with pytest.raises(grpc.RpcError) as info:
            status(b"\xff" * 8, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert_serves(stub)
