"""Tensors <-> protobuf: decode and validate a ModelInferRequest, encode a response.

Raw contents are wrapped with np.frombuffer (no copy); typed contents are
converted once. Every rejection names the tensor, what was expected and what arrived.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from server.datatypes import NUMPY_DTYPES
from server.errors import invalid_argument
from server.model_types import ModelConfig, TensorConfig, dims_match

# v2 datatype -> the InferTensorContents field that carries it when typed
TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": "fp32_contents",  # the protocol has no fp16 field; FP16 values travel as fp32
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# Request parameters kiln acts on; anything else a v2 client may send is accepted and ignored.
_SHARED_MEMORY_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


@dataclass(frozen=True)
class InferParameters:
    priority: int = 0
    timeout_us: int | None = None


_NO_PARAMETERS = InferParameters()


def _shape_text(datatype: str, shape: Iterable[int]) -> str:
    return f"{datatype} [{','.join(str(d) for d in shape)}]"


def expected_shape(config: ModelConfig, tensor: TensorConfig) -> tuple[int, ...]:
    return ((-1,) if config.batching else ()) + tensor.dims


def decode_inputs(request, config: ModelConfig, bytes_as_text: bool = False) -> dict[str, np.ndarray]:
    """Validate the request's inputs against the config and return them as arrays.

    bytes_as_text: the runtime holds BYTES as text (onnxruntime), so BYTES elements
    must be UTF-8 and are handed over as str; anything else is this request's bad input.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid_argument(
            f"model '{config.name}': {len(request.inputs)} inputs but {len(raw)} raw_input_contents; "
            "send raw contents for every input or for none"
        )
    arrays: dict[str, np.ndarray] = {}
    batch_rows: int | None = None
    batching = config.batching
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        spec = config.input(name)
        if spec is None:
            raise invalid_argument(
                f"model '{config.name}' has no input '{name}'; expected {[t.name for t in config.inputs]}"
            )
        if name in arrays:
            raise invalid_argument(f"input '{name}' appears more than once")
        if tensor.parameters:  # most requests carry none: skip the lookups
            for key in _SHARED_MEMORY_KEYS:
                if key in tensor.parameters:
                    raise invalid_argument(f"input '{name}': shared memory inputs are not supported")
        shape = tuple(tensor.shape)
        _check_type_and_shape(config, spec, tensor.datatype, shape)
        if raw:
            if tensor.HasField("contents"):
                raise invalid_argument(
                    f"input '{name}' has typed contents but the request also carries raw_input_contents; "
                    "use one or the other"
                )
            array = _from_raw(spec, shape, raw[index])
        else:
            array = _from_typed(spec, shape, tensor)
        if batching:
            if batch_rows is None:
                batch_rows = shape[0]
            elif shape[0] != batch_rows:
                raise invalid_argument(
                    f"input '{name}' has batch size {shape[0]} but other inputs have {batch_rows}"
                )
        if bytes_as_text and spec.datatype == "BYTES":
            array = _as_text(spec.name, array)
        arrays[name] = array
    if len(arrays) < len(config.inputs):
        missing = [t.name for t in config.inputs if t.name not in arrays and not t.optional]
        if missing:
            raise invalid_argument(f"model '{config.name}': missing input {', '.join(repr(m) for m in missing)}")
    return arrays


def _check_type_and_shape(config: ModelConfig, spec: TensorConfig, datatype: str, shape: tuple[int, ...]) -> None:
    expected = expected_shape(config, spec)
    if not (datatype == spec.datatype and len(shape) == len(expected) and dims_match(expected, shape)):
        raise invalid_argument(
            f"input '{spec.name}': expected {_shape_text(spec.datatype, expected)}, "
            f"got {_shape_text(datatype, shape)}"
        )
    if config.batching:
        if shape[0] < 1:
            raise invalid_argument(f"input '{spec.name}': batch size must be at least 1, got {shape[0]}")
        if shape[0] > config.max_batch_size:
            raise invalid_argument(
                f"input '{spec.name}': batch size {shape[0]} exceeds max_batch_size {config.max_batch_size} "
                f"of model '{config.name}'"
            )


def _element_count(name: str, shape: tuple[int, ...]) -> int:
    count = math.prod(shape)
    if count > 1 << 40:
        raise invalid_argument(f"input '{name}': shape {list(shape)} is too large")
    return count


def _from_raw(spec: TensorConfig, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    count = _element_count(spec.name, shape)
    if spec.datatype == "BYTES":
        return deserialize_bytes(spec.name, data, count).reshape(shape)
    dtype = NUMPY_DTYPES[spec.datatype]
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise invalid_argument(
            f"input '{spec.name}': expected {expected} bytes of raw contents for "
            f"{_shape_text(spec.datatype, shape)}, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _from_typed(spec: TensorConfig, shape: tuple[int, ...], tensor) -> np.ndarray:
    count = _element_count(spec.name, shape)
    values = getattr(tensor.contents, TYPED_FIELDS[spec.datatype])
    if len(values) != count:
        raise invalid_argument(
            f"input '{spec.name}': expected {count} values in contents.{TYPED_FIELDS[spec.datatype]} "
            f"for {_shape_text(spec.datatype, shape)}, got {len(values)}"
        )
    if spec.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    dtype = NUMPY_DTYPES[spec.datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        source = np.array(values, dtype=np.int64 if dtype != np.uint64 else np.uint64)
        if count and (source.min() < info.min or source.max() > info.max):
            raise invalid_argument(f"input '{spec.name}': values out of range for {spec.datatype}")
        return source.astype(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


def _as_text(name: str, array: np.ndarray) -> np.ndarray:
    flat = array.reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for i, item in enumerate(flat):
        try:
            out[i] = item.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise invalid_argument(
                f"input '{name}': BYTES element {i} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                "this model's runtime holds strings as UTF-8 text"
            ) from None
    return out.reshape(array.shape)


def deserialize_bytes(name: str, data: bytes, count: int) -> np.ndarray:
    """The v2 raw BYTES layout: each element is a 4-byte little-endian length, then the bytes."""
    # elements are collected first: a declared count far beyond what the data holds (shape [2**40])
    # fails on the data, never by allocating `count` slots up front
    items: list[bytes] = []
    offset = 0
    view = memoryview(data)
    for i in range(count):
        if offset + 4 > len(data):
            raise invalid_argument(f"input '{name}': raw BYTES contents end inside element {i}'s length prefix")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise invalid_argument(
                f"input '{name}': raw BYTES element {i} declares {length} bytes but only {len(data) - offset} remain"
            )
        items.append(bytes(view[offset:offset + length]))
        offset += length
    if offset != len(data):
        raise invalid_argument(
            f"input '{name}': {len(data) - offset} bytes left over after {count} BYTES elements"
        )
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def serialize_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        value = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(value)))
        parts.append(value)
    return b"".join(parts)


def parse_parameters(parameters: Mapping) -> InferParameters:
    """The request-level parameters that change scheduling: priority and timeout (microseconds)."""
    if not parameters:
        return _NO_PARAMETERS
    priority = 0
    timeout_us = None
    if "priority" in parameters:
        priority = _non_negative_int(parameters["priority"], "priority")
    if "timeout" in parameters:
        timeout_us = _non_negative_int(parameters["timeout"], "timeout")
    return InferParameters(priority=priority, timeout_us=timeout_us)


def _non_negative_int(parameter, name: str) -> int:
    choice = parameter.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise invalid_argument(f"parameter '{name}' must be an integer, got {choice or 'nothing'}")
    value = getattr(parameter, choice)
    if value < 0:
        raise invalid_argument(f"parameter '{name}' must be >= 0, got {value}")
    return value


def encode_outputs(response, outputs: Mapping[str, np.ndarray], config: ModelConfig) -> None:
    """Append outputs as raw_output_contents (one copy: array -> bytes)."""
    for name, array in outputs.items():
        spec = config.output(name)
        datatype = spec.datatype if spec is not None else "BYTES"
        entry = response.outputs.add(name=name, datatype=datatype)
        entry.shape.extend(array.shape)
        if datatype == "BYTES":
            response.raw_output_contents.append(serialize_bytes(array))
        else:
            wanted = NUMPY_DTYPES[datatype]
            if array.dtype != wanted:
                array = array.astype(wanted)
            response.raw_output_contents.append(array.tobytes())


def requested_outputs(request, config: ModelConfig) -> list[str]:
    """Names of the outputs to return: those asked for, or all of them."""
    if not request.outputs:
        return list(config.output_names)
    names = []
    for output in request.outputs:
        if config.output(output.name) is None:
            raise invalid_argument(
                f"model '{config.name}' has no output '{output.name}'; expected {[o.name for o in config.outputs]}"
            )
        if "shared_memory_region" in output.parameters:
            raise invalid_argument(f"output '{output.name}': shared memory outputs are not supported")
        if output.name in names:
            raise invalid_argument(f"output '{output.name}' is requested more than once")
        names.append(output.name)
    return names
