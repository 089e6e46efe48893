"""FP32 -> FP16 conversion of an ONNX model, written with onnx alone (no extra converter needed).

Every float32 tensor in the graph becomes float16: initializers, Constant
values, graph inputs/outputs and value_info, and the ops that name a float
dtype in an attribute (Cast to, ConstantOfShape value, Random*/EyeLike dtype).
Subgraphs (If/Loop/Scan bodies) and local functions are converted too. The
result computes in fp16 end to end and its float IO is FP16.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

_F32 = TensorProto.FLOAT
_F16 = TensorProto.FLOAT16
_DTYPE_ATTR_OPS = {"Cast": "to", "RandomNormal": "dtype", "RandomUniform": "dtype",
                   "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "EyeLike": "dtype",
                   "Bernoulli": "dtype", "CastLike": None}
_FP16_MAX = float(np.finfo(np.float16).max)


def _tensor_to_fp16(t: TensorProto) -> TensorProto:
    if t.data_type != _F32:
        return t
    arr = numpy_helper.to_array(t)
    # Clip so that large finite values (e.g. -1e9 masks) stay finite instead of becoming -inf.
    clipped = np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16)
    new = numpy_helper.from_array(clipped, t.name)
    t.CopyFrom(new)
    return t


def _type_to_fp16(tp: onnx.TypeProto) -> None:
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        if tp.tensor_type.elem_type == _F32:
            tp.tensor_type.elem_type = _F16
    elif which == "sequence_type":
        _type_to_fp16(tp.sequence_type.elem_type)
    elif which == "optional_type":
        _type_to_fp16(tp.optional_type.elem_type)
    elif which == "map_type":
        _type_to_fp16(tp.map_type.value_type)


def _convert_nodes(nodes) -> None:
    for node in nodes:
        attr_name = _DTYPE_ATTR_OPS.get(node.op_type)
        for attr in node.attribute:
            if attr.name == attr_name and attr.type == onnx.AttributeProto.INT and attr.i == _F32:
                attr.i = _F16
            elif attr.type == onnx.AttributeProto.TENSOR:
                _tensor_to_fp16(attr.t)
            elif attr.type == onnx.AttributeProto.TENSORS:
                for t in attr.tensors:
                    _tensor_to_fp16(t)
            elif attr.type == onnx.AttributeProto.GRAPH:
                _convert_graph(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _convert_graph(g)


def _convert_graph(graph: onnx.GraphProto) -> None:
    for init in graph.initializer:
        _tensor_to_fp16(init)
    for sparse in graph.sparse_initializer:
        _tensor_to_fp16(sparse.values)
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        _type_to_fp16(vi.type)
    _convert_nodes(graph.node)


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a float16 copy of ``model`` (inputs and outputs that were FP32 become FP16)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _convert_graph(out.graph)
    for fn in out.functions:
        _convert_nodes(fn.node)
    # Re-run shape inference so intermediate value_info agrees with the new types.
    del out.graph.value_info[:]
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=False)
    except Exception:  # inference is a nicety; the checker and parity run afterwards
        pass
    return out


def float_io_names(model: onnx.ModelProto) -> list[str]:
    return [vi.name for vi in list(model.graph.input) + list(model.graph.output)
            if vi.type.tensor_type.elem_type == _F32]


__all__ = ["convert_to_fp16", "float_io_names"]
