"""The v2 / Triton inference protocol end to end: a real kiln server, driven by tritonclient.

tritonclient (a client nobody here wrote) sends every request it can express; the
project's own stubs send only what it cannot: typed `contents`, malformed requests,
and a look at the raw stream error message.

One repository for the whole module: an identity model per v2 datatype (outputs y, z),
add_sub, a second add_sub used only by the statistics test, and a broken model
(garbage in model.onnx) beside the good ones.
"""

from __future__ import annotations

import math
import queue
import struct
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from conftest import RunningServer
from onnx_models import add_sub_model, identity_config, identity_model, write_config
from server import __version__
from server.app import ServerSettings
from server.codec import TYPED_FIELDS, deserialize_bytes
from server.datatypes import DATATYPES, NUMPY_DTYPES
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc

IDENTITY_DIMS = [3]
ADD_SUB_DIMS = [4]
MAX_BATCH = 8


def identity_name(datatype: str) -> str:
    return f"identity_{datatype.lower()}"


def add_sub_config(name: str) -> str:
    return f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {MAX_BATCH}
input [
  {{ name: "a" data_type: TYPE_FP32 dims: [ 4 ] }},
  {{ name: "b" data_type: TYPE_FP32 dims: [ 4 ] }}
]
output [
  {{ name: "sum" data_type: TYPE_FP32 dims: [ 4 ] }},
  {{ name: "diff" data_type: TYPE_FP32 dims: [ 4 ] }}
]
"""


def build_repository(root: Path) -> Path:
    for datatype in DATATYPES:
        model_dir = root / identity_name(datatype)
        identity_model(model_dir / "1" / "model.onnx", datatype, IDENTITY_DIMS)
        write_config(model_dir, identity_config(identity_name(datatype), datatype, IDENTITY_DIMS, MAX_BATCH))
    for name in ("add_sub", "add_sub_stats"):
        add_sub_model(root / name / "1" / "model.onnx", ADD_SUB_DIMS)
        write_config(root / name, add_sub_config(name))
    broken = root / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"this is not an onnx model \x00\xff\x13" * 7)
    write_config(broken, add_sub_config("broken"))
    return root


def make_server(repo: Path, **overrides) -> RunningServer:
    settings = ServerSettings(model_repository=repo, grpc_port=0, metrics_port=0, grace_period_s=5.0, **overrides)
    return RunningServer(settings)


@pytest.fixture(scope="module")
def repo(module_tmp) -> Path:
    return build_repository(module_tmp / "repo")


@pytest.fixture(scope="module")
def server(repo):
    # Not strict: the broken model must not make the whole server unready for these tests
    # (test_strict_readiness_with_broken_model checks the strict default on its own server).
    running = make_server(repo, strict_readiness=False)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.url)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


# ---- helpers -----------------------------------------------------------------------------------


def sample(datatype: str, rows: int = 2) -> np.ndarray:
    """Values with the type's edge cases, shaped [rows, 3]."""
    count = rows * IDENTITY_DIMS[0]
    if datatype == "BOOL":
        values = [True, False, True, True, False, False]
    elif datatype == "BYTES":
        # UTF-8 text (onnxruntime string tensors hold UTF-8), NUL bytes and an empty string included
        values = [b"", b"hello", b"\x00nul\x00", "ünïcødé €".encode(), b"x" * 300, b"a b\nc"]
        return np.array((values * rows)[:count], dtype=np.object_).reshape(rows, *IDENTITY_DIMS)
    elif datatype.startswith(("INT", "UINT")):
        info = np.iinfo(NUMPY_DTYPES[datatype])
        values = [int(info.min), int(info.max), 0, 1, int(info.max) // 3, int(info.min) // 3 + 7]
    elif datatype == "FP16":
        values = [-0.0, 1.5, 65504.0, 2.0**-24, float("-inf"), float("nan")]
    elif datatype == "FP32":
        values = [-0.0, 3.1415927, 3.4028235e38, 1e-45, float("inf"), float("nan")]
    else:
        values = [-0.0, math.pi, 1.7976931348623157e308, 5e-324, float("-inf"), float("nan")]
    return np.array((values * rows)[:count], dtype=NUMPY_DTYPES[datatype]).reshape(rows, *IDENTITY_DIMS)


def triton_input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def add_sub_inputs(rows: int = 2, seed: int = 0) -> tuple[list[triton.InferInput], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, *ADD_SUB_DIMS)).astype(np.float32)
    b = rng.standard_normal((rows, *ADD_SUB_DIMS)).astype(np.float32)
    return [triton_input("a", a, "FP32"), triton_input("b", b, "FP32")], a, b


def assert_good_infer(client: triton.InferenceServerClient) -> None:
    """The server still answers a well-formed request correctly."""
    inputs, a, b = add_sub_inputs(rows=3, seed=42)
    result = client.infer("add_sub", inputs)
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    np.testing.assert_array_equal(result.as_numpy("diff"), a - b)


def expect_error(client, call, code: str, *fragments: str) -> InferenceServerException:
    """`call()` fails with gRPC status `code` and a message containing each fragment; the server then still serves."""
    with pytest.raises(InferenceServerException) as info:
        call()
    error = info.value
    assert error.status() == f"StatusCode.{code}", (error.status(), error.message())
    for fragment in fragments:
        assert fragment in error.message(), (fragment, error.message())
    assert_good_infer(client)
    return error


def expect_rpc_error(client, call, code: grpc.StatusCode, *fragments: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert error.code() == code, (error.code(), error.details())
    for fragment in fragments:
        assert fragment in error.details(), (fragment, error.details())
    assert_good_infer(client)
    return error


def decode_output(response, name: str) -> np.ndarray:
    index = [o.name for o in response.outputs].index(name)
    output = response.outputs[index]
    shape = tuple(output.shape)
    data = response.raw_output_contents[index]
    if output.datatype == "BYTES":
        return deserialize_bytes(name, data, math.prod(shape)).reshape(shape)
    return np.frombuffer(data, dtype=NUMPY_DTYPES[output.datatype]).reshape(shape)


def typed_request(model: str, datatype: str, array: np.ndarray, name: str = "x") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    field = getattr(tensor.contents, TYPED_FIELDS[datatype])
    if datatype == "BYTES":
        field.extend(list(array.reshape(-1)))
    elif datatype in ("FP16", "FP32", "FP64"):
        field.extend(float(v) for v in array.reshape(-1))
    elif datatype == "BOOL":
        field.extend(bool(v) for v in array.reshape(-1))
    else:
        field.extend(int(v) for v in array.reshape(-1))
    return request


def raw_add_sub_request(a: bytes, b: bytes, shape=(1, 4)) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_sub")
    request.inputs.add(name="a", datatype="FP32", shape=list(shape))
    request.inputs.add(name="b", datatype="FP32", shape=list(shape))
    request.raw_input_contents.extend([a, b])
    return request


# ---- registration -------------------------------------------------------------------------------


def test_only_model_infer_is_registered_with_grpc_core():
    """grpc.aio keeps one pending-call future per registered method and waits on all of them once
    per accepted call, so kiln registers only the per-request RPC; the rest go by name."""
    from grpc_health.v1 import health_pb2_grpc

    from server.service import REGISTERED_METHODS, GenericOnly, InferenceService, add_inference_service

    class RecordingServer:
        def __init__(self):
            self.generic, self.registered = [], {}

        def add_generic_rpc_handlers(self, handlers):
            self.generic.extend(handlers)

        def add_registered_method_handlers(self, service, handlers):
            self.registered[service] = handlers

    recorder = RecordingServer()
    add_inference_service(InferenceService.__new__(InferenceService), recorder)
    assert set(recorder.registered["inference.GRPCInferenceService"]) == set(REGISTERED_METHODS) == {"ModelInfer"}
    assert len(recorder.generic) == 1
    # health (and reflection) go through GenericOnly: their handlers, no registration
    health_pb2_grpc.add_HealthServicer_to_server(health_pb2_grpc.HealthServicer(), GenericOnly(recorder))
    assert len(recorder.generic) == 2 and list(recorder.registered) == ["inference.GRPCInferenceService"]


def test_every_rpc_answers_by_name(server):
    """Each RPC of the service reaches its handler (none is UNIMPLEMENTED), registered or not."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert len(service.methods) == 20
    with grpc.insecure_channel(server.url) as channel:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            request = getattr(pb, method.input_type.name)()
            response_class = getattr(pb, method.output_type.name)
            try:
                if method.client_streaming:
                    call = channel.stream_stream(path, request_serializer=type(request).SerializeToString,
                                                 response_deserializer=response_class.FromString)
                    list(call(iter([request]), timeout=10))
                else:
                    call = channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                               response_deserializer=response_class.FromString)
                    call(request, timeout=10)
            except grpc.RpcError as exc:  # empty requests are often refused, but by kiln, not by grpc
                assert exc.code() != grpc.StatusCode.UNIMPLEMENTED or "Method not found" not in (exc.details() or ""), \
                    (method.name, exc.code(), exc.details())


# ---- health and metadata -----------------------------------------------------------------------


def test_live_and_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    for datatype in DATATYPES:
        assert client.is_model_ready(identity_name(datatype))
        assert client.is_model_ready(identity_name(datatype), "1")
    assert client.is_model_ready("add_sub")
    assert not client.is_model_ready("broken")


def test_strict_readiness_with_broken_model(repo):
    """With the default strict readiness, a model that fails to load at start keeps ServerReady false."""
    strict = make_server(repo)
    try:
        with triton.InferenceServerClient(strict.url) as c:
            assert c.is_server_live()
            assert not c.is_server_ready()
            assert c.is_model_ready("add_sub")
    finally:
        strict.stop()


def test_server_metadata(client):
    metadata = client.get_server_metadata()
    assert metadata.name == "kiln"
    assert metadata.version == __version__ and metadata.version
    assert {"model_repository", "model_configuration", "statistics"} <= set(metadata.extensions)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_model_metadata_identity(client, datatype):
    name = identity_name(datatype)
    metadata = client.get_model_metadata(name)
    assert metadata.name == name
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", datatype, [-1, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("y", datatype, [-1, 3]),
        ("z", datatype, [-1, 3]),
    ]
    assert client.get_model_metadata(name, "1") == metadata


def test_model_metadata_add_sub(client):
    metadata = client.get_model_metadata("add_sub")
    assert {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs} == {
        "a": ("FP32", [-1, 4]),
        "b": ("FP32", [-1, 4]),
    }
    assert {t.name: (t.datatype, list(t.shape)) for t in metadata.outputs} == {
        "sum": ("FP32", [-1, 4]),
        "diff": ("FP32", [-1, 4]),
    }


def test_model_config_as_json(client):
    config = client.get_model_config("add_sub", as_json=True)["config"]
    assert config["name"] == "add_sub"
    assert config["platform"] == "onnxruntime_onnx"
    assert int(config["max_batch_size"]) == MAX_BATCH
    inputs = {t["name"]: (t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]}
    assert inputs == {"a": ("TYPE_FP32", [4]), "b": ("TYPE_FP32", [4])}
    outputs = {t["name"]: (t["data_type"], [int(d) for d in t["dims"]]) for t in config["output"]}
    assert outputs == {"sum": ("TYPE_FP32", [4]), "diff": ("TYPE_FP32", [4])}

    bytes_config = client.get_model_config(identity_name("BYTES"), as_json=True)["config"]
    assert bytes_config["input"][0]["data_type"] == "TYPE_STRING"


# ---- inference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
def test_infer_raw_round_trip(client, datatype):
    name = identity_name(datatype)
    for rows in (1, 2, MAX_BATCH):
        x = sample(datatype, rows)
        result = client.infer(name, [triton_input("x", x, datatype)], request_id=f"{name}-{rows}")
        response = result.get_response()
        assert response.model_name == name and response.model_version == "1"
        assert response.id == f"{name}-{rows}"
        for output in ("y", "z"):
            got = result.as_numpy(output)
            assert got.shape == x.shape
            if datatype == "BYTES":
                assert got.dtype == np.object_
                assert got.tolist() == x.tolist()
            else:
                assert got.dtype == x.dtype
                # bit-exact, NaN and -0.0 included
                assert got.tobytes() == x.tobytes()
        assert {o.datatype for o in response.outputs} == {datatype}


@pytest.mark.parametrize("datatype", DATATYPES)
def test_infer_typed_contents(stub, datatype):
    name = identity_name(datatype)
    x = sample(datatype, 2)
    response = stub.ModelInfer(typed_request(name, datatype, x))
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("y", datatype, [2, 3]),
        ("z", datatype, [2, 3]),
    ]
    for output in ("y", "z"):
        got = decode_output(response, output)
        if datatype == "BYTES":
            assert got.tolist() == x.tolist()
        else:
            assert got.dtype == x.dtype
            assert got.tobytes() == x.tobytes()


def test_typed_out_of_range_rejected(client, stub):
    request = typed_request(identity_name("INT8"), "INT8", np.zeros((1, 3), np.int8))
    request.inputs[0].contents.int_contents[1] = 300
    expect_rpc_error(client, lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'x'", "INT8")


def test_typed_wrong_count_rejected(client, stub):
    request = typed_request(identity_name("BYTES"), "BYTES", sample("BYTES", 2))
    del request.inputs[0].contents.bytes_contents[-1]
    expect_rpc_error(
        client, lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'x'", "bytes_contents"
    )


def test_output_selection(client):
    x = sample("INT32", 2)
    result = client.infer(
        identity_name("INT32"), [triton_input("x", x, "INT32")], outputs=[triton.InferRequestedOutput("z")]
    )
    assert [o.name for o in result.get_response().outputs] == ["z"]
    assert result.as_numpy("y") is None
    np.testing.assert_array_equal(result.as_numpy("z"), x)

    inputs, a, b = add_sub_inputs()
    result = client.infer("add_sub", inputs, outputs=[triton.InferRequestedOutput("diff")])
    assert [o.name for o in result.get_response().outputs] == ["diff"]
    np.testing.assert_array_equal(result.as_numpy("diff"), a - b)


def test_unknown_output_rejected(client):
    inputs, _, _ = add_sub_inputs()
    expect_error(
        client,
        lambda: client.infer("add_sub", inputs, outputs=[triton.InferRequestedOutput("product")]),
        "INVALID_ARGUMENT",
        "'product'",
        "add_sub",
    )


# ---- streaming ---------------------------------------------------------------------------------


def test_stream_error_in_the_middle(server):
    results: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(server.url) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            expected = {}
            for i in range(6):
                if i == 3:
                    bad = triton.InferInput("a", [1, 5], "FP32")
                    bad.set_data_from_numpy(np.zeros((1, 5), np.float32))
                    ok_b = triton.InferInput("b", [1, 4], "FP32")
                    ok_b.set_data_from_numpy(np.zeros((1, 4), np.float32))
                    c.async_stream_infer("add_sub", [bad, ok_b], request_id="bad-3")
                    continue
                inputs, a, b = add_sub_inputs(rows=1 + i % 3, seed=i)
                expected[f"good-{i}"] = (a + b, a - b)
                c.async_stream_infer("add_sub", inputs, request_id=f"good-{i}")
            answers = [results.get(timeout=10) for _ in range(6)]
        finally:
            c.stop_stream()
    errors = [error for result, error in answers if error is not None]
    assert len(errors) == 1
    assert "INVALID_ARGUMENT" in errors[0].message() and "'a'" in errors[0].message()
    got = {result.get_response().id: result for result, error in answers if error is None}
    assert set(got) == set(expected)
    for request_id, (total, diff) in expected.items():
        np.testing.assert_array_equal(got[request_id].as_numpy("sum"), total)
        np.testing.assert_array_equal(got[request_id].as_numpy("diff"), diff)


def test_stream_error_carries_request_id(stub):
    """Our stubs see what tritonclient hides: the error response names the failed request's id."""
    good = raw_add_sub_request(np.ones((1, 4), np.float32).tobytes(), np.ones((1, 4), np.float32).tobytes())
    good.id = "good"
    bad = raw_add_sub_request(b"\x00" * 12, np.ones((1, 4), np.float32).tobytes())
    bad.id = "bad"
    after = raw_add_sub_request(np.ones((1, 4), np.float32).tobytes(), np.zeros((1, 4), np.float32).tobytes())
    after.id = "after"
    responses = list(stub.ModelStreamInfer(iter([good, bad, after]), timeout=10))
    by_id = {r.infer_response.id: r for r in responses}
    assert set(by_id) == {"good", "bad", "after"}
    assert "INVALID_ARGUMENT" in by_id["bad"].error_message and "'a'" in by_id["bad"].error_message
    assert by_id["good"].error_message == "" and by_id["after"].error_message == ""
    np.testing.assert_array_equal(decode_output(by_id["after"].infer_response, "sum"), np.ones((1, 4), np.float32))


# ---- statistics --------------------------------------------------------------------------------


def test_statistics_count_successes_and_failures(client):
    model = "add_sub_stats"
    rows_sent = [1, 3, 8, 2, 5]
    for i, rows in enumerate(rows_sent):
        inputs, _, _ = add_sub_inputs(rows=rows, seed=i)
        client.infer(model, inputs)
    failures = 0
    for bad_rows in (9, 0):  # above max_batch_size, and an empty batch
        a = triton.InferInput("a", [bad_rows, 4], "FP32")
        a.set_data_from_numpy(np.zeros((bad_rows, 4), np.float32))
        b = triton.InferInput("b", [bad_rows, 4], "FP32")
        b.set_data_from_numpy(np.zeros((bad_rows, 4), np.float32))
        with pytest.raises(InferenceServerException):
            client.infer(model, [a, b])
        failures += 1
    inputs, _, _ = add_sub_inputs()
    with pytest.raises(InferenceServerException):
        client.infer(model, inputs[:1])  # missing input b
    failures += 1

    stats = client.get_inference_statistics(model)
    assert len(stats.model_stats) == 1
    entry = stats.model_stats[0]
    assert entry.name == model and entry.version == "1"
    assert entry.inference_stats.success.count == len(rows_sent)
    assert entry.inference_stats.fail.count == failures
    assert entry.inference_count == sum(rows_sent)
    # sent one after another, so no two requests share a batch
    assert entry.execution_count == len(rows_sent)
    assert entry.inference_stats.queue.count == len(rows_sent)
    assert entry.inference_stats.compute_infer.count == len(rows_sent)
    assert sum(b.compute_infer.count for b in entry.batch_stats) == entry.execution_count
    assert {b.batch_size for b in entry.batch_stats} == set(rows_sent)
    assert entry.last_inference > 0

    as_json = client.get_inference_statistics(model, as_json=True)
    assert int(as_json["model_stats"][0]["inference_stats"]["success"]["count"]) == len(rows_sent)


def test_statistics_of_all_models(client):
    names = {s.name for s in client.get_inference_statistics().model_stats}
    assert {identity_name(d) for d in DATATYPES} | {"add_sub", "add_sub_stats"} <= names


# ---- the error table ---------------------------------------------------------------------------


def _fp32(name, shape, dtype=np.float32, datatype="FP32"):
    return triton_input(name, np.zeros(shape, dtype), datatype)


def _wrong_byte_length(client):
    a = _fp32("a", (1, 4))
    a.set_shape([2, 4])  # 16 bytes sent for a [2,4] FP32 tensor (32 bytes)
    b = _fp32("b", (2, 4))
    return client.infer("add_sub", [a, b])


INVALID_INPUTS = {
    "missing input": (lambda c: c.infer("add_sub", [_fp32("a", (1, 4))]), ["'b'", "add_sub"]),
    "unknown input": (
        lambda c: c.infer("add_sub", [_fp32("a", (1, 4)), _fp32("b", (1, 4)), _fp32("c", (1, 4))]),
        ["'c'", "add_sub"],
    ),
    "duplicate input": (
        lambda c: c.infer("add_sub", [_fp32("a", (1, 4)), _fp32("a", (1, 4)), _fp32("b", (1, 4))]),
        ["'a'", "more than once"],
    ),
    "wrong datatype": (
        lambda c: c.infer("add_sub", [_fp32("a", (1, 4), np.float64, "FP64"), _fp32("b", (1, 4))]),
        ["'a'", "FP32", "FP64"],
    ),
    "wrong shape": (
        lambda c: c.infer("add_sub", [_fp32("a", (1, 5)), _fp32("b", (1, 5))]),
        ["'a'", "[-1,4]", "[1,5]"],
    ),
    "wrong rank": (lambda c: c.infer("add_sub", [_fp32("a", (4,)), _fp32("b", (4,))]), ["'a'", "[-1,4]"]),
    "mismatched batch sizes": (
        lambda c: c.infer("add_sub", [_fp32("a", (1, 4)), _fp32("b", (2, 4))]),
        ["'b'", "batch size"],
    ),
    "wrong byte length": (_wrong_byte_length, ["'a'", "32 bytes", "got 16"]),
    "batch above max_batch_size": (
        lambda c: c.infer("add_sub", [_fp32("a", (9, 4)), _fp32("b", (9, 4))]),
        ["'a'", "9", "max_batch_size 8", "add_sub"],
    ),
    "bad timeout parameter": (
        lambda c: c.infer("add_sub", [_fp32("a", (1, 4)), _fp32("b", (1, 4))], parameters={"timeout": "soon"}),
        ["'timeout'", "integer"],
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_INPUTS))
def test_invalid_argument(client, case):
    call, fragments = INVALID_INPUTS[case]
    expect_error(client, lambda: call(client), "INVALID_ARGUMENT", *fragments)


def _good_add_sub(c, model="add_sub", version=""):
    inputs, _, _ = add_sub_inputs()
    return c.infer(model, inputs, model_version=version)


NOT_FOUND = {
    "unknown model": (lambda c: _good_add_sub(c, "no_such_model"), ["'no_such_model'"]),
    "unknown version": (lambda c: _good_add_sub(c, version="7"), ["add_sub", "7"]),
    "bad version string": (lambda c: _good_add_sub(c, version="abc"), ["add_sub", "'abc'"]),
    "negative version": (lambda c: _good_add_sub(c, version="-1"), ["add_sub", "'-1'"]),
    "path traversal": (lambda c: _good_add_sub(c, "../etc"), ["'../etc'"]),
    "path separator": (lambda c: _good_add_sub(c, "add_sub/1"), ["'add_sub/1'"]),
    "metadata of unknown model": (lambda c: c.get_model_metadata("no_such_model"), ["'no_such_model'"]),
    "config of unknown version": (lambda c: c.get_model_config("add_sub", "9"), ["add_sub", "9"]),
    "statistics of unknown model": (lambda c: c.get_inference_statistics("../etc"), ["'../etc'"]),
}


@pytest.mark.parametrize("case", sorted(NOT_FOUND))
def test_not_found(client, case):
    call, fragments = NOT_FOUND[case]
    expect_error(client, lambda: call(client), "NOT_FOUND", *fragments)


def test_broken_model_is_unavailable(client):
    assert not client.is_model_ready("broken")
    assert not client.is_model_ready("broken", "1")
    expect_error(client, lambda: _good_add_sub(client, "broken"), "UNAVAILABLE", "'broken'")
    expect_error(client, lambda: client.get_model_metadata("broken"), "UNAVAILABLE", "'broken'")
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["broken"].state == "UNAVAILABLE"
    assert index["broken"].reason.strip()
    assert index["add_sub"].state == "READY" and index["add_sub"].version == "1"
    assert all(index[identity_name(d)].state == "READY" for d in DATATYPES)


def test_load_unload_refused_in_none_mode(client):
    expect_error(client, lambda: client.load_model("add_sub"), "FAILED_PRECONDITION", "none")
    expect_error(client, lambda: client.unload_model("add_sub"), "FAILED_PRECONDITION", "none")
    assert client.is_model_ready("add_sub")


def test_message_above_max_message_bytes(tmp_path):
    repo = tmp_path / "small_repo"
    add_sub_model(repo / "add_sub" / "1" / "model.onnx", ADD_SUB_DIMS)
    write_config(repo / "add_sub", add_sub_config("add_sub"))
    small = make_server(repo, max_message_bytes=64 * 1024)
    try:
        with triton.InferenceServerClient(small.url) as c:
            big = triton_input("a", np.zeros((8, 4096), np.float32), "FP32")  # 128 KiB
            with pytest.raises(InferenceServerException) as info:
                c.infer("add_sub", [big, _fp32("b", (1, 4))])
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED", info.value.message()
            assert_good_infer(c)
    finally:
        small.stop()


# ---- malformed requests (our stubs) ------------------------------------------------------------


def test_raw_bytes_truncated_length_prefix(client, stub):
    request = pb.ModelInferRequest(model_name=identity_name("BYTES"))
    request.inputs.add(name="x", datatype="BYTES", shape=[1, 3])
    # element 0 complete, element 1 complete, element 2's 4-byte length prefix cut to 2 bytes
    request.raw_input_contents.append(struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + b"\x01\x00")
    expect_rpc_error(
        client, lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'x'", "length prefix"
    )


def test_raw_bytes_length_past_the_end(client, stub):
    request = pb.ModelInferRequest(model_name=identity_name("BYTES"))
    request.inputs.add(name="x", datatype="BYTES", shape=[1, 3])
    two = (struct.pack("<I", 1) + b"a") * 2
    request.raw_input_contents.append(two + struct.pack("<I", 100) + b"short")
    expect_rpc_error(client, lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'x'", "100")


def test_raw_bytes_trailing_garbage(client, stub):
    request = pb.ModelInferRequest(model_name=identity_name("BYTES"))
    request.inputs.add(name="x", datatype="BYTES", shape=[1, 3])
    request.raw_input_contents.append((struct.pack("<I", 1) + b"a") * 3 + b"junk")
    expect_rpc_error(client, lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'x'", "left over")


def test_typed_bytes_round_trip(stub):
    values = np.array([[b"\x00\x00\x00\x00", "日本語".encode(), b""]], dtype=np.object_)
    response = stub.ModelInfer(typed_request(identity_name("BYTES"), "BYTES", values))
    assert decode_output(response, "y").tolist() == values.tolist()
    assert decode_output(response, "z").tolist() == values.tolist()


def test_bytes_not_utf8_rejected_by_onnx_model(client):
    """onnxruntime's string tensors are UTF-8 text: other bytes are a bad input, not garbled output."""
    x = np.array([[b"ok", b"\xff\xfe", b""]], dtype=np.object_)
    expect_error(
        client,
        lambda: client.infer(identity_name("BYTES"), [triton_input("x", x, "BYTES")]),
        "INVALID_ARGUMENT",
        "'x'",
        "UTF-8",
    )


def test_raw_contents_count_mismatch(client, stub):
    request = raw_add_sub_request(b"\x00" * 16, b"\x00" * 16)
    del request.raw_input_contents[-1]
    expect_rpc_error(
        client, lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "add_sub", "raw_input_contents"
    )


def test_raw_byte_length_through_stubs(client, stub):
    request = raw_add_sub_request(b"\x00" * 15, b"\x00" * 16)
    expect_rpc_error(client, lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'a'", "16", "15")


def test_negative_dim_rejected(client, stub):
    request = raw_add_sub_request(b"", b"", shape=(-1, 4))
    expect_rpc_error(client, lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'a'")


def test_concurrent_clients_all_answered(server, client):
    """Many requests at once from several threads: each gets its own rows back."""
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            with triton.InferenceServerClient(server.url) as c:
                for i in range(10):
                    inputs, a, b = add_sub_inputs(rows=1 + (seed + i) % 4, seed=seed * 100 + i)
                    result = c.infer("add_sub", inputs)
                    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
