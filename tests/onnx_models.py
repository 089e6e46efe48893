"""Tiny ONNX models written by the tests themselves (identity and arithmetic, one per datatype), and a slow one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.datatypes import DATATYPES, datatype_to_config_type

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}
assert set(ONNX_TYPES) == set(DATATYPES)


def _save(graph, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def identity_model(path: Path, datatype: str, dims: list, batch: bool = True) -> None:
    """y = x (and a second output z = x) for one datatype; dims exclude the batch dim."""
    shape = (["batch"] if batch else []) + [d if d != -1 else f"d{i}" for i, d in enumerate(dims)]
    onnx_type = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["x"], ["z"])],
        "identity",
        [helper.make_tensor_value_info("x", onnx_type, shape)],
        [helper.make_tensor_value_info("y", onnx_type, shape), helper.make_tensor_value_info("z", onnx_type, shape)],
    )
    _save(graph, path)


def add_sub_model(path: Path, dims: list[int]) -> None:
    """Two FP32 inputs a, b; outputs sum = a + b and diff = a - b (the classic Triton example)."""
    shape = ["batch"] + dims
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Sub", ["a", "b"], ["diff"])],
        "add_sub",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("sum", "diff")],
    )
    _save(graph, path)


def scale_model(path: Path, factor: float, dims: list[int]) -> None:
    """y = x * factor: versions with different factors show which version answered."""
    shape = ["batch"] + dims
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[helper.make_tensor("k", TensorProto.FLOAT, [], [factor])],
    )
    _save(graph, path)


def slow_identity_model(path: Path, dims: list[int], depth: int) -> None:
    """y = x @ I @ I ... (depth MatMuls with the identity over the last dim): real compute, exact output."""
    shape = ["batch"] + dims
    nodes, previous = [], "x"
    for i in range(depth):
        out = "y" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [previous, "w"], [out]))
        previous = out
    graph = helper.make_graph(
        nodes, "slow_identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(np.eye(dims[-1], dtype=np.float32), "w")],
    )
    _save(graph, path)


def write_config(model_dir: Path, text: str) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text)


def identity_config(name: str, datatype: str, dims: list[int], max_batch_size: int = 8, extra: str = "") -> str:
    config_type = datatype_to_config_type(datatype)
    dims_text = ", ".join(str(d) for d in dims)
    return f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [ {{ name: "x" data_type: {config_type} dims: [ {dims_text} ] }} ]
output [
  {{ name: "y" data_type: {config_type} dims: [ {dims_text} ] }},
  {{ name: "z" data_type: {config_type} dims: [ {dims_text} ] }}
]
{extra}
"""


def scale_config(name: str, extra: str = "", max_batch_size: int = 8, width: int = 4) -> str:
    """Config of a scale_model with dims [width]."""
    return f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {width} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {width} ] }} ]
{extra}
"""
