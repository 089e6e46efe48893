"""Fuzzing ModelInfer against a live server (hypothesis): random names, datatypes, shapes, contents and
parameters, and random bytes on the wire. Whatever arrives, the answer is a proper status (never UNKNOWN,
never INTERNAL: a malformed request is the client's fault), the server never crashes, and a good request
succeeds afterwards."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RunningServer
from server.app import ServerSettings
from server.datatypes import DATATYPES
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc
from test_reliability_inputs import add_sub_request, build_repository

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a request may carry a 'timeout' parameter of 1 us
}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

names = st.sampled_from(["add_sub", "vec_fp32", "vec_bytes"]) | st.text(max_size=12)
tensor_names = st.sampled_from(["a", "b", "x", "sum", "y"]) | st.text(max_size=6)
datatypes = st.sampled_from(list(DATATYPES) + ["", "FP128", "fp32", "STRING"])
dims = st.integers(-3, 5) | st.sampled_from([0, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)])
shapes = st.lists(dims, max_size=4)
int64s = st.integers(-(2**63), 2**63 - 1)


@st.composite
def parameters(draw, message_parameters):
    for key in draw(st.lists(st.sampled_from(["priority", "timeout", "sequence_id"]) | st.text(max_size=8),
                             max_size=3)):
        kind = draw(st.sampled_from(["bool_param", "int64_param", "string_param", "double_param", "uint64_param"]))
        value = {
            "bool_param": st.booleans(), "int64_param": int64s, "string_param": st.text(max_size=8),
            "double_param": st.floats(allow_nan=True), "uint64_param": st.integers(0, 2**64 - 1),
        }[kind]
        setattr(message_parameters[key], kind, draw(value))


@st.composite
def infer_requests(draw) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=draw(names), model_version=draw(st.sampled_from(["", "1", "2"])
                                                                               | st.text(max_size=6)))
    request.id = draw(st.text(max_size=8))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(tensor_names), datatype=draw(datatypes), shape=draw(shapes))
        if raw:
            request.raw_input_contents.append(draw(st.binary(max_size=48)))
        else:
            field = draw(st.sampled_from(["fp32_contents", "int_contents", "bytes_contents", "bool_contents",
                                          "int64_contents", "uint64_contents", "fp64_contents"]))
            element = {
                "fp32_contents": st.floats(width=32), "fp64_contents": st.floats(), "int_contents": st.integers(-(2**31), 2**31 - 1),
                "bytes_contents": st.binary(max_size=6), "bool_contents": st.booleans(), "int64_contents": int64s,
                "uint64_contents": st.integers(0, 2**64 - 1),
            }[field]
            getattr(tensor.contents, field).extend(draw(st.lists(element, max_size=10)))
        draw(parameters(tensor.parameters))
    if raw and draw(st.booleans()):  # sometimes a count that does not match the inputs
        request.raw_input_contents.append(draw(st.binary(max_size=8)))
    for name in draw(st.lists(tensor_names, max_size=2)):
        request.outputs.add(name=name)
    draw(parameters(request.parameters))
    return request


@pytest.fixture(scope="module")
def server(module_tmp):
    repo = build_repository(module_tmp / "fuzz_repo")
    running = RunningServer(ServerSettings(model_repository=repo, grpc_port=0, metrics_port=None, grace_period_s=2))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.url) as channel:
        yield channel


def good_request_succeeds(channel) -> None:
    a = np.ones((1, 4), np.float32)
    response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(add_sub_request(a.tobytes(), a.tobytes()), timeout=10)
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [2.0] * 4


def call_status(call, payload) -> grpc.StatusCode:
    try:
        call(payload, timeout=10)
    except grpc.RpcError as error:
        assert error.code() in ALLOWED, (error.code(), error.details(), payload)
        assert error.details(), "an error without a message"
        return error.code()
    return grpc.StatusCode.OK


def test_fuzz_infer_requests(channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    @FUZZ
    @given(request=infer_requests())
    def check(request):
        call_status(stub.ModelInfer, request)

    check()
    good_request_succeeds(channel)


def test_fuzz_stream_requests(channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    @settings(FUZZ, max_examples=40)
    @given(requests=st.lists(infer_requests(), min_size=1, max_size=4))
    def check(requests):
        responses = list(stub.ModelStreamInfer(iter(requests), timeout=10))
        assert len(responses) == len(requests)
        for response in responses:
            if response.error_message:
                assert not response.error_message.startswith(("[INTERNAL]", "[UNKNOWN]")), response.error_message

    check()
    good_request_succeeds(channel)


def test_fuzz_raw_bytes(channel):
    """Bytes on the wire that may or may not parse as a ModelInferRequest."""
    raw_call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    valid = add_sub_request(np.ones((1, 4), np.float32).tobytes(), np.ones((1, 4), np.float32).tobytes())
    prefix = valid.SerializeToString()

    @settings(FUZZ, max_examples=100)
    @given(data=st.binary(max_size=200) | st.binary(max_size=40).map(lambda junk: prefix[: len(junk) * 3] + junk))
    def check(data):
        call_status(raw_call, data)

    check()
    good_request_succeeds(channel)
