"""Export a torch module to a single-file ONNX model and check it.

``export_onnx`` uses the torch.export-based (dynamo) ONNX exporter with a
symbolic batch dimension named ``"batch"`` on every input and output, strips
the exporter's per-node/per-value metadata (stack traces, original node names)
so that the bytes depend only on the weights, saves one self-contained
``model.onnx`` (weights embedded, no external data file), runs
``onnx.checker`` and checks numerical parity against onnxruntime.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

BATCH_DIM_NAME = "batch"
DEFAULT_OPSET = 18
PARITY_BATCH_SIZES: tuple[int, ...] = (1, 7, 64)
PARITY_ATOL_FP32 = 1e-4
# Largest protobuf message ONNX can hold in one file; bigger models would need external data.
_MAX_SINGLE_FILE_BYTES = 2**31 - 1


def _clear(message) -> None:
    message.doc_string = ""
    del message.metadata_props[:]


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop exporter annotations that carry no semantics (source locations, node names)."""

    def strip_graph(graph: onnx.GraphProto) -> None:
        _clear(graph)
        for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
            _clear(value)
        for node in graph.node:
            _clear(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    strip_graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        strip_graph(g)

    _clear(model)
    strip_graph(model.graph)
    for fn in model.functions:
        _clear(fn)
        for node in fn.node:
            _clear(node)


def _check_batch_dim(model: onnx.ModelProto) -> None:
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not dims or dims[0].dim_param != BATCH_DIM_NAME:
            first = dims[0] if dims else None
            raise ValueError(
                f"exported tensor {vi.name!r}: expected a dynamic batch dim {BATCH_DIM_NAME!r}, "
                f"got {first!r}"
            )


def _rows(t: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """A batch of ``n`` rows shaped like ``t`` without its batch dim (random for float)."""
    shape = (n, *t.shape[1:])
    if t.is_floating_point():
        return torch.rand(shape, generator=gen, dtype=t.dtype)
    # Integer inputs (ids): reuse the example's value range.
    hi = int(t.max().item()) + 1 if t.numel() else 1
    return torch.randint(0, max(hi, 1), shape, generator=gen, dtype=t.dtype)


def check_parity(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Mapping[str, torch.Tensor],
    output_names: Sequence[str],
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    atol: float = PARITY_ATOL_FP32,
    seed: int = 0,
) -> float:
    """Compare ``module`` with the ONNX model at ``path`` under onnxruntime.

    Prints the max abs error per batch size; raises ``AssertionError`` above ``atol``.
    Returns the largest error seen.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n in batch_sizes:
        feeds_t = {name: _rows(t, n, gen) for name, t in example_inputs.items()}
        with torch.no_grad():
            ref = module(*feeds_t.values())
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        got = sess.run(list(output_names), {k: v.numpy() for k, v in feeds_t.items()})
        errs = []
        for name, r, g in zip(output_names, refs, got, strict=True):
            r_np = r.detach().numpy()
            if r_np.shape != g.shape:
                raise AssertionError(f"output {name!r} at batch {n}: shape {g.shape}, torch {r_np.shape}")
            errs.append(float(np.max(np.abs(r_np.astype(np.float64) - g.astype(np.float64)))) if g.size else 0.0)
        err = max(errs)
        worst = max(worst, err)
        print(f"  parity batch={n:<3d} max abs err {err:.3e}", flush=True)
        if err > atol:
            raise AssertionError(f"ONNX/torch parity failed at batch {n}: max abs err {err:.3e} > {atol:.0e}")
    return worst


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    output_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    max_batch: int = 1 << 16,
    parity: bool = True,
    atol: float = PARITY_ATOL_FP32,
) -> Path:
    """Export ``module`` to a self-contained ONNX file at ``path``.

    ``example_inputs`` maps input name -> example tensor whose dim 0 is the batch
    dim (use a batch size > 1, e.g. 2, so that torch.export does not specialise it).
    Dim 0 of every input and output becomes the symbolic dim ``"batch"``.
    The forward signature takes the inputs positionally, in the mapping's order.
    """
    path = Path(path)
    module = module.eval()
    names = list(example_inputs)
    args = tuple(example_inputs[n] for n in names)
    for n, t in example_inputs.items():
        if t.dim() == 0 or t.shape[0] < 2:
            raise ValueError(f"example input {n!r}: need a batch dim of size >= 2, got shape {tuple(t.shape)}")

    batch = torch.export.Dim(BATCH_DIM_NAME, min=1, max=max_batch)
    # Keys of dynamic_shapes are the forward() parameter names; pass a tuple to stay positional.
    dynamic_shapes = tuple({0: batch} for _ in names)

    # The exporter logs one warning per missing optional torchvision op; not useful here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            module,
            args,
            input_names=names,
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    _strip_metadata(model)
    _check_batch_dim(model)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != names or got_out != list(output_names):
        raise ValueError(f"exported names {got_in} -> {got_out}, expected {names} -> {list(output_names)}")

    if model.ByteSize() > _MAX_SINGLE_FILE_BYTES:
        raise ValueError("model exceeds 2 GiB; a single-file ONNX model cannot hold it")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    print(f"  wrote {path} ({path.stat().st_size / 1e6:.2f} MB, opset {opset})", flush=True)
    if parity:
        check_parity(module, path, example_inputs, output_names, atol=atol)
    return path
