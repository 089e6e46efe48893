"""Decoding and validating requests, encoding responses: every datatype, raw and typed."""

import struct

import numpy as np
import pytest

from server import codec
from server.datatypes import DATATYPES, NUMPY_DTYPES
from server.errors import KilnError, Status
from server.model_types import ModelConfig, TensorConfig
from server.protocol import grpc_service_pb2 as pb


def make_config(datatype="FP32", dims=(3,), max_batch_size=8, inputs=None) -> ModelConfig:
    return ModelConfig(
        name="m",
        platform="onnxruntime_onnx",
        max_batch_size=max_batch_size,
        inputs=inputs or (TensorConfig("x", datatype, tuple(dims)),),
        outputs=(TensorConfig("y", datatype, tuple(dims)),),
    )


def sample(datatype: str, shape) -> np.ndarray:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([f"v{i}".encode() * (i % 3) for i in range(count)], dtype=object).reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind == "b":
        return (np.arange(count) % 2 == 0).reshape(shape)
    if dtype.kind == "f":
        return (np.arange(count) / 3 - 1).astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    values = np.array([info.min, info.max, 0, 1, 7, 2], dtype=dtype)
    return np.resize(values, count).reshape(shape)


def request_with(datatype: str, array: np.ndarray, raw: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=array.shape)
    if raw:
        data = codec.serialize_bytes(array) if datatype == "BYTES" else array.tobytes()
        request.raw_input_contents.append(data)
    else:
        field = getattr(tensor.contents, codec.TYPED_FIELDS[datatype])
        field.extend(array.reshape(-1).tolist())
    return request


def decode_error(request, config) -> KilnError:
    with pytest.raises(KilnError) as info:
        codec.decode_inputs(request, config)
    return info.value


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips(datatype, raw):
    array = sample(datatype, (2, 3))
    decoded = codec.decode_inputs(request_with(datatype, array, raw), make_config(datatype))["x"]
    assert decoded.shape == (2, 3)
    if datatype == "BYTES":
        assert decoded.tolist() == array.tolist()
    else:
        assert decoded.dtype == NUMPY_DTYPES[datatype]
        np.testing.assert_array_equal(decoded, array)
    response = pb.ModelInferResponse()
    codec.encode_outputs(response, {"y": decoded}, make_config(datatype))
    assert response.outputs[0].datatype == datatype and list(response.outputs[0].shape) == [2, 3]
    if datatype != "BYTES":
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], NUMPY_DTYPES[datatype]).reshape(2, 3), array)


def test_raw_contents_are_not_copied():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    request = request_with("FP32", array, raw=True)
    decoded = codec.decode_inputs(request, make_config())["x"]
    assert not decoded.flags.owndata and not decoded.flags.writeable  # a view over the message's bytes


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.inputs[0].__setattr__("datatype", "FP64"), "input 'x': expected FP32 [-1,3], got FP64 [2,3]"),
        (lambda r: (r.inputs[0].ClearField("shape"), r.inputs[0].shape.extend([2, 4])), "input 'x': expected FP32 [-1,3], got FP32 [2,4]"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 20), "expected 24 bytes of raw contents for FP32 [2,3], got 20"),
        (lambda r: r.inputs[0].__setattr__("name", "w"), "model 'm' has no input 'w'"),
        (lambda r: (r.inputs[0].ClearField("shape"), r.inputs[0].shape.extend([9, 3]), r.raw_input_contents.__setitem__(0, b"\0" * 108)), "batch size 9 exceeds max_batch_size 8"),
        (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[2, 3]), r.raw_input_contents.append(b"\0" * 24)), "input 'x' appears more than once"),
        (lambda r: r.raw_input_contents.append(b""), "2 raw_input_contents"),
    ],
)
def test_bad_inputs_say_what_was_expected_and_what_arrived(mutate, message):
    request = request_with("FP32", sample("FP32", (2, 3)), raw=True)
    mutate(request)
    error = decode_error(request, make_config())
    assert error.status is Status.INVALID_ARGUMENT
    assert message in error.message


def test_missing_input_is_named():
    config = make_config(inputs=(TensorConfig("a", "FP32", (3,)), TensorConfig("b", "FP32", (3,))))
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
    error = decode_error(request, config)
    assert error.status is Status.INVALID_ARGUMENT and "missing input 'b'" in error.message


def test_typed_count_mismatch_and_integer_overflow():
    request = request_with("FP32", sample("FP32", (2, 3)), raw=False)
    request.inputs[0].contents.fp32_contents.append(1.0)
    assert "expected 6 values in contents.fp32_contents" in decode_error(request, make_config()).message
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="INT8", shape=[1, 3]).contents.int_contents.extend([1, 300, 2])
    assert "out of range for INT8" in decode_error(request, make_config("INT8")).message


@pytest.mark.parametrize(
    "data, message",
    [
        (struct.pack("<I", 3) + b"ab", "declares 3 bytes but only 2 remain"),
        (struct.pack("<I", 1) + b"a" + b"\x01", "end inside element 1's length prefix"),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 0) + b"zz", "2 bytes left over"),
    ],
)
def test_malformed_raw_bytes(data, message):
    config = make_config("BYTES", dims=(2,))
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="BYTES", shape=[1, 2])
    request.raw_input_contents.append(data)
    error = decode_error(request, config)
    assert error.status is Status.INVALID_ARGUMENT and message in error.message


def test_model_without_batching_takes_the_full_shape():
    config = make_config(dims=(2, 3), max_batch_size=0)
    array = sample("FP32", (2, 3))
    assert codec.decode_inputs(request_with("FP32", array, raw=True), config)["x"].shape == (2, 3)


def test_parameters_priority_and_timeout():
    request = pb.ModelInferRequest()
    request.parameters["priority"].int64_param = 2
    request.parameters["timeout"].int64_param = 1000
    request.parameters["something_else"].string_param = "ignored"
    assert codec.parse_parameters(request.parameters) == codec.InferParameters(priority=2, timeout_us=1000)
    request.parameters["priority"].string_param = "high"
    with pytest.raises(KilnError, match="parameter 'priority' must be an integer"):
        codec.parse_parameters(request.parameters)
    request.parameters["priority"].int64_param = -1
    with pytest.raises(KilnError, match="must be >= 0"):
        codec.parse_parameters(request.parameters)


def test_output_selection():
    config = ModelConfig("m", "onnxruntime_onnx", 8, (TensorConfig("x", "FP32", (3,)),),
                         (TensorConfig("y", "FP32", (3,)), TensorConfig("z", "FP32", (3,))))
    request = pb.ModelInferRequest()
    assert codec.requested_outputs(request, config) == ["y", "z"]
    request.outputs.add(name="z")
    assert codec.requested_outputs(request, config) == ["z"]
    request.outputs.add(name="nope")
    with pytest.raises(KilnError, match="has no output 'nope'"):
        codec.requested_outputs(request, config)


def test_raw_and_typed_contents_together_are_rejected():
    request = request_with("FP32", sample("FP32", (2, 3)), raw=True)
    request.inputs[0].contents.fp32_contents.extend([0.0] * 6)
    error = decode_error(request, make_config())
    assert error.status is Status.INVALID_ARGUMENT and "use one or the other" in error.message
