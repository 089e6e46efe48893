"""`kiln export`: PyTorch module -> checked, parity-tested ONNX model in a model repository.

Steps (each prints a progress line):

1. import MODULE:FACTORY, build the module, load --state-dict, eval(), run it once on examples
2. torch.export with every -1 dim dynamic (torch.export.Dim.DYNAMIC; the tracer finds which
   axes are equal), and a check that no declared-dynamic axis got specialised
3. ONNX conversion (dynamo exporter, chosen opset), readable axis names, metadata stripped
4. simplification: onnxsim when installed, else the exporter's own onnxscript optimizer
5. optional FP16 conversion (export.fp16), onnx.checker (full check)
6. parity: PyTorch vs onnxruntime on random inputs at batch sizes 1, 7 and max, and
   several lengths of every other dynamic axis; max abs / max rel error per output
7. config.pbtxt + export.json written, and the model installed atomically
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.repo_io import config_text, staged_model
from export.spec import (
    BATCH_AXIS_NAME,
    DEFAULT_PARITY_BATCH_SIZES,
    DEFAULT_TOLERANCES,
    EXACT_TOLERANCE,
    ExportError,
    ExportRecipe,
    TensorSpec,
    load_factory,
    trace_sizes,
)

EXPORT_JSON = "export.json"
_MAX_SINGLE_FILE_BYTES = 2**31 - 1


def progress(msg: str, prefix: str = "kiln export") -> None:
    print(f"[{prefix}] {msg}", flush=True)


# ---- building the module and its inputs ------------------------------------------------------


def torch_dtype(datatype: str):
    import torch

    return {
        "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8, "INT16": torch.int16,
        "INT32": torch.int32, "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32,
        "FP64": torch.float64, "UINT16": torch.uint16, "UINT32": torch.uint32, "UINT64": torch.uint64,
    }[datatype]


def build_module(recipe: ExportRecipe):
    """Import and call the factory, load the state dict, switch to eval mode."""
    import torch

    factory = load_factory(recipe.factory, recipe.python_path)
    try:
        module = factory()
    except Exception as exc:
        raise ExportError(f"factory {recipe.factory!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"factory {recipe.factory!r} returned a {type(module).__name__}, not a torch.nn.Module")
    if recipe.state_dict:
        path = Path(recipe.state_dict)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ExportError(f"cannot load state dict {path} (torch.load weights_only=True): {exc}") from exc
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        try:
            module.load_state_dict(state, strict=True)
        except Exception as exc:
            raise ExportError(f"state dict {path} does not fit the module: {exc}") from exc
    return module.eval()


def concrete_shape(spec: TensorSpec, axis_names: Mapping[tuple[str, int], str], sizes: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(sizes[axis_names[(spec.name, i)]] if d == -1 else d for i, d in enumerate(spec.dims))


def random_tensor(spec: TensorSpec, shape: Sequence[int], gen, value_range: Sequence[float] | None = None):
    import torch

    dtype = torch_dtype(spec.datatype)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=gen).bool()
    if dtype.is_floating_point:
        if value_range:
            lo, hi = value_range
            return (torch.rand(tuple(shape), generator=gen, dtype=torch.float32) * (hi - lo) + lo).to(dtype)
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(dtype)
    lo, hi = (int(value_range[0]), int(value_range[1])) if value_range else (0, 2)
    return torch.randint(lo, max(hi, lo + 1), tuple(shape), generator=gen, dtype=torch.int64).to(dtype)


def make_inputs(recipe: ExportRecipe, sizes: Mapping[str, int], seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    names = recipe.axis_name_map()
    return {
        s.name: random_tensor(s, concrete_shape(s, names, sizes), gen, recipe.value_ranges.get(s.name))
        for s in recipe.specs()
    }


def flatten_outputs(out) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        flat = []
        for o in out:
            flat.extend(flatten_outputs(o))
        return flat
    if isinstance(out, Mapping):
        return flatten_outputs(list(out.values()))
    raise ExportError(f"the model returned a {type(out).__name__}; outputs must be tensors (or tuples/dicts of them)")


def run_eager(module, inputs: Mapping[str, Any]) -> list:
    import torch

    with torch.inference_mode():
        return flatten_outputs(module(*inputs.values()))


# ---- torch.export ----------------------------------------------------------------------------


def dynamic_shapes_for(recipe: ExportRecipe) -> tuple:
    import torch

    return tuple({i: torch.export.Dim.DYNAMIC for i, d in enumerate(s.dims) if d == -1} or None for s in recipe.specs())


_SPECIALISED = re.compile(r"L\['([^']+)'\]\.size\(\)\[(\d+)\].{0,200}?specialized it to be a constant \((\d+)\)", re.S)


def _specialised_axes(module, recipe: ExportRecipe, message: str) -> list[str]:
    """torch.export's 'marked dynamic but specialized' errors, in the user's input names."""
    import inspect

    try:
        params = [p for p in inspect.signature(module.forward).parameters]
    except (TypeError, ValueError):
        params = []
    specs = recipe.specs()
    out = []
    for arg, axis, value in _SPECIALISED.findall(message):
        name = specs[params.index(arg)].name if arg in params and params.index(arg) < len(specs) else arg
        out.append(
            f"input {name!r} axis {axis} is declared dynamic (-1) but the model fixes it to {value}; "
            "declare that size instead of -1, or make the model shape-generic"
        )
    return out


def torch_export(module, recipe: ExportRecipe, example: Mapping[str, Any]):
    """torch.export.export with every declared -1 axis dynamic; checks none got specialised."""
    import torch

    args = tuple(example.values())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes_for(recipe), strict=False)
    except Exception as exc:
        specialised = _specialised_axes(module, recipe, str(exc))
        if specialised:
            raise ExportError("; ".join(specialised)) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(
            f"torch.export could not trace {recipe.factory!r}: {type(exc).__name__}: {first}\n"
            "  (data-dependent Python control flow, unsupported ops or non-tensor inputs cannot be exported; "
            "see https://pytorch.org/docs/stable/export.html)"
        ) from exc
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_inputs = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    by_name = {n.name: n for n in placeholders}
    for spec, arg_name in zip(recipe.specs(), user_inputs):
        val = by_name[arg_name].meta.get("val")
        if val is None:
            continue
        for axis, d in enumerate(spec.dims):
            if d == -1 and not isinstance(val.shape[axis], torch.SymInt):
                raise ExportError(
                    f"input {spec.name!r} axis {axis} is declared dynamic (-1) but the model fixes it to "
                    f"{int(val.shape[axis])}; declare that size instead of -1, or make the model shape-generic"
                )
    return program


# ---- ONNX ------------------------------------------------------------------------------------


def _strip_metadata(model) -> None:
    from export.onnx_export import _strip_metadata as strip

    strip(model)


def _rename_dims(model, recipe: ExportRecipe) -> None:
    """Give the exporter's symbols (s0, s23, ...) the axis names: 'batch', 'dim1', or --dynamic-axis-names."""
    axis_names = recipe.axis_name_map()
    mapping: dict[str, str] = {}
    for vi, spec in zip(model.graph.input, recipe.specs()):
        for axis, d in enumerate(spec.dims):
            dim = vi.type.tensor_type.shape.dim[axis]
            if d == -1 and dim.dim_param and dim.dim_param not in mapping:
                mapping[dim.dim_param] = axis_names[(spec.name, axis)]
    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True)) + r")\b")

    def fix(vis) -> None:
        for vi in vis:
            if not vi.type.HasField("tensor_type"):
                continue
            for dim in vi.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = pattern.sub(lambda m: mapping[m.group(0)], dim.dim_param)

    fix(model.graph.input)
    fix(model.graph.output)
    fix(model.graph.value_info)


def to_onnx(program, example: Mapping[str, Any], recipe: ExportRecipe, output_names: Sequence[str]):
    import torch

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program, tuple(example.values()), input_names=[s["name"] for s in recipe.inputs],
                output_names=list(output_names), opset_version=recipe.opset, dynamo=True,
                external_data=False, verbose=False, optimize=True,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"ONNX conversion failed (opset {recipe.opset}): {type(exc).__name__}: {first}") from exc
    model = onnx_program.model_proto
    _strip_metadata(model)
    _rename_dims(model, recipe)
    return model


def simplify(model):
    """onnxsim when it is installed; otherwise the exporter already ran onnxscript's optimizer."""
    try:
        import onnxsim  # type: ignore[import-not-found]
    except ImportError:
        return model, "onnxsim not installed; kept the exporter's onnxscript optimization (constant folding, dead code)"
    simplified, ok = onnxsim.simplify(model)
    if not ok:
        return model, "onnxsim could not validate its result; kept the unsimplified model"
    return simplified, "onnxsim"


def onnx_tensors(model) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(name, v2 datatype, shape with -1 for symbolic dims) for the graph inputs and outputs."""
    import onnx

    from server.datatypes import numpy_to_datatype

    def info(vi):
        elem = vi.type.tensor_type.elem_type
        try:
            datatype = numpy_to_datatype(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)))
        except (KeyError, ValueError, TypeError):
            datatype = None
        if datatype is None or datatype == "BYTES":
            raise ExportError(f"tensor {vi.name!r} has ONNX type {onnx.TensorProto.DataType.Name(elem)}, "
                              "which kiln cannot serve")
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        return vi.name, datatype, shape

    return [info(v) for v in model.graph.input], [info(v) for v in model.graph.output]


# ---- parity ----------------------------------------------------------------------------------


@dataclass
class ParityRow:
    batch: int
    lengths: dict[str, int]
    output: str
    max_abs: float
    max_rel: float
    ok: bool


def tolerance_for(datatype: str, atol: float | None, rtol: float | None) -> tuple[float, float]:
    base = DEFAULT_TOLERANCES.get(datatype, EXACT_TOLERANCE)
    return (base[0] if atol is None else atol, base[1] if rtol is None else rtol)


def compare(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> tuple[float, float, bool]:
    if ref.shape != got.shape:
        return float("inf"), float("inf"), False
    if ref.size == 0:
        return 0.0, 0.0, True
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    if not (np.isfinite(r) == np.isfinite(g)).all():
        return float("inf"), float("inf"), False
    finite = np.isfinite(r)
    diff = np.abs(r - g)[finite] if finite.any() else np.zeros(1)
    scale = np.abs(r)[finite] if finite.any() else np.ones(1)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(scale, 1e-12)).max()) if diff.size else 0.0
    ok = bool((diff <= atol + rtol * scale).all()) and bool((r[~finite] == g[~finite]).all())
    return max_abs, max_rel, ok


def parity_grid(recipe: ExportRecipe, batch_sizes: Sequence[int]) -> list[dict[str, int]]:
    """Concrete sizes for every axis name: batch sizes x lengths of the other dynamic axes."""
    names = sorted(set(recipe.axis_name_map().values()))
    others = [n for n in names if n != BATCH_AXIS_NAME]
    batches = list(batch_sizes) if BATCH_AXIS_NAME in names else [None]
    lengths = list(recipe.parity_lengths) if others else [None]
    grid = []
    for b in batches:
        for n in lengths:
            sizes = {o: n for o in others}
            if b is not None:
                sizes[BATCH_AXIS_NAME] = b
            grid.append(sizes)
    return grid


def check_parity(
    reference: Callable[[dict[str, Any]], list],
    candidate: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
    recipe: ExportRecipe,
    output_names: Sequence[str],
    output_types: Sequence[str],
    *,
    batch_sizes: Sequence[int],
    atol: float | None = None,
    rtol: float | None = None,
    label: str = "onnxruntime",
    prefix: str = "kiln export",
    cast_inputs: Callable[[str, np.ndarray], np.ndarray] | None = None,
    seed: int = 1,
) -> list[ParityRow]:
    """Run reference (torch) and candidate on the same random inputs over the grid; raise ExportError on a miss."""
    rows: list[ParityRow] = []
    failures: list[str] = []
    for i, sizes in enumerate(parity_grid(recipe, batch_sizes)):
        feeds_t = make_inputs(recipe, sizes, seed + i)
        refs = [to_numpy(r) for r in reference(feeds_t)]
        feeds = {k: v.numpy() for k, v in feeds_t.items()}
        if cast_inputs is not None:
            feeds = {k: cast_inputs(k, v) for k, v in feeds.items()}
        try:
            gots = candidate(feeds)
        except Exception as exc:
            raise ExportError(f"{label} failed at sizes {sizes}: {type(exc).__name__}: {exc}") from exc
        where = ", ".join(f"{k}={v}" for k, v in sorted(sizes.items(), key=lambda kv: kv[0] != BATCH_AXIS_NAME))
        for name, dtype, ref, got in zip(output_names, output_types, refs, gots, strict=True):
            a, r = tolerance_for(dtype, atol, rtol)
            max_abs, max_rel, ok = compare(ref, np.asarray(got), a, r)
            rows.append(ParityRow(sizes.get(BATCH_AXIS_NAME, 0), sizes, name, max_abs, max_rel, ok))
            status = "ok" if ok else "FAIL"
            shape_note = "" if ref.shape == np.shape(got) else f" shape {list(np.shape(got))} vs torch {list(ref.shape)}"
            progress(f"  parity {label} [{where}] {name}: max abs {max_abs:.3e} max rel {max_rel:.3e} "
                     f"(atol {a:g} rtol {r:g}) {status}{shape_note}", prefix)
            if not ok:
                failures.append(f"output {name!r} at [{where}]: max abs {max_abs:.3e}, max rel {max_rel:.3e}"
                                f" > atol {a:g} + rtol {r:g}{shape_note}")
    if failures:
        raise ExportError(
            f"parity check failed: {label} does not match PyTorch\n  " + "\n  ".join(failures[:8])
            + "\n  (a non-deterministic model (dropout/randomness in forward), a wrong --output declaration or an "
            "unsupported op; loosen with --atol/--rtol only if the error is expected)"
        )
    return rows


def to_numpy(value) -> np.ndarray:
    """A torch tensor (any device) or array -> numpy array."""
    if isinstance(value, np.ndarray):
        return value
    import torch

    t = value.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def ort_candidate(path: Path, output_names: Sequence[str]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return lambda feeds: sess.run(list(output_names), feeds)


# ---- the command ----------------------------------------------------------------------------


@dataclass
class ExportOptions:
    recipe: ExportRecipe
    name: str
    repository: Path
    version: int = 1
    simplify: bool = True
    atol: float | None = None
    rtol: float | None = None
    parity_batch_sizes: tuple[int, ...] | None = None
    queue_delay_us: int = 500


def run_export(opts: ExportOptions) -> Path:
    """Export, check and install; returns the model dir. Raises ExportError with a user-facing message."""
    import onnx
    import torch

    recipe = opts.recipe
    t0 = time.perf_counter()
    specs = recipe.specs()
    batching = recipe.max_batch_size > 0
    if batching:
        not_batched = [s.name for s in specs if s.dims[0] != -1]
        if not_batched:
            raise ExportError(
                f"inputs {not_batched} have no leading -1 batch dim; give every input a leading -1, "
                "or pass --max-batch-size 0 for a model without a batch dim"
            )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ExportError(f"duplicate input names: {names}")

    progress(f"building {recipe.factory}")
    torch.manual_seed(0)
    module = build_module(recipe)
    n_params = sum(p.numel() for p in module.parameters())
    progress(f"  {type(module).__name__}: {n_params / 1e6:.2f}M parameters")
    sizes = trace_sizes(specs, recipe.axis_name_map())
    example = make_inputs(recipe, sizes, seed=0)
    try:
        eager = run_eager(module, example)
    except ExportError:
        raise
    except Exception as exc:
        shapes = ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in example.items())
        raise ExportError(f"the model fails on example inputs ({shapes}): {type(exc).__name__}: {exc}") from exc
    output_names = list(recipe.outputs) or (["output"] if len(eager) == 1 else [f"output_{i}" for i in range(len(eager))])
    if len(output_names) != len(eager):
        raise ExportError(f"the model returns {len(eager)} output(s) but --output names {len(output_names)}: {output_names}")
    recipe.outputs = output_names

    progress(f"torch.export (dynamic axes: {', '.join(f'{k[0]}[{k[1]}]={v}' for k, v in recipe.axis_name_map().items()) or 'none'})")
    program = torch_export(module, recipe, example)
    progress(f"converting to ONNX (opset {recipe.opset})")
    model = to_onnx(program, example, recipe, output_names)
    if opts.simplify:
        model, how = simplify(model)
        progress(f"simplify: {how}")
    if recipe.fp16:
        from export.fp16 import convert_to_fp16

        progress("converting to FP16 (initializers, constants, casts, float IO)")
        model = convert_to_fp16(model)
    inputs_info, outputs_info = onnx_tensors(model)
    if batching:
        for tname, _, shape in outputs_info:
            dims = model.graph.output[[o[0] for o in outputs_info].index(tname)].type.tensor_type.shape.dim
            if not dims or dims[0].dim_param != BATCH_AXIS_NAME:
                raise ExportError(
                    f"output {tname!r} {shape} does not have the batch dim first; "
                    "the server batches along dim 0 of every tensor (or pass --max-batch-size 0)"
                )
    if model.ByteSize() > _MAX_SINGLE_FILE_BYTES:
        raise ExportError("the model exceeds 2 GiB; a single-file ONNX model cannot hold it")

    repo = opts.repository
    model_dir: Path
    with staged_model(repo, opts.name) as stage:
        vdir = stage / str(opts.version)
        vdir.mkdir()
        path = vdir / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=False)
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:
            raise ExportError(f"onnx.checker rejected the model: {exc}") from exc
        progress(f"onnx.checker ok ({path.stat().st_size / 1e6:.2f} MB)")
        batch_sizes = opts.parity_batch_sizes or tuple(
            sorted({*DEFAULT_PARITY_BATCH_SIZES, recipe.max_batch_size} - {0}) if batching else (1,)
        )
        if batching:
            batch_sizes = tuple(b for b in batch_sizes if b <= recipe.max_batch_size) or (1,)
        progress(f"parity: PyTorch vs onnxruntime CPU at batch sizes {list(batch_sizes)}"
                 + (f", lengths {recipe.parity_lengths}" if any(k != BATCH_AXIS_NAME for k in sizes) else ""))
        out_types = [o[1] for o in outputs_info]
        in_types = {i[0]: i[1] for i in inputs_info}

        def cast(name: str, arr: np.ndarray) -> np.ndarray:
            return arr.astype(np.float16) if in_types.get(name) == "FP16" and arr.dtype != np.float16 else arr

        check_parity(
            lambda feeds: run_eager(module, feeds), ort_candidate(path, output_names), recipe, output_names,
            out_types, batch_sizes=batch_sizes, atol=opts.atol, rtol=opts.rtol, cast_inputs=cast,
        )
        (stage / "config.pbtxt").write_text(
            config_text(opts.name, inputs_info, outputs_info, max_batch_size=recipe.max_batch_size,
                        queue_delay_us=opts.queue_delay_us)
        )
        (vdir / EXPORT_JSON).write_text(json.dumps(recipe.to_json(), indent=2) + "\n")
        model_dir = repo / opts.name
    progress(f"wrote {model_dir}/{opts.version}/model.onnx and {model_dir}/config.pbtxt in {time.perf_counter() - t0:.1f}s")
    return model_dir
