"""`kiln compile`: turn an exported model into a compiled one beside it.

* ``--target aoti``: rebuild the PyTorch module from the version's export.json,
  torch.export it with the same dynamic axes, and package it with AOTInductor
  (``torch._inductor.aoti_compile_and_package``) into ``NAME_aoti/<v>/model.pt2``
  plus ``model.pt2.json`` (IO names/types/shapes, device, torch version) and a
  config with ``backend: "torch_aoti"``. Parity: the loaded package vs eager PyTorch.
* ``--target tensorrt``: build a native engine from ``model.onnx`` with one or two
  optimization profiles (batch 1..8 for small batches, and 1..max_batch_size with
  opt = the largest preferred batch size or max_batch_size; other dynamic axes from
  --dynamic-dim), optional FP16, a persistent timing cache, and ``model.plan.json``
  recording the TensorRT version and the GPU it was built for (the runtime refuses a
  mismatched engine). Parity: the engine (through the serving runtime) vs onnxruntime CPU.
  Needs a GPU and the tensorrt extra; it is imported only here.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.exporter import (
    EXPORT_JSON,
    build_module,
    check_parity,
    flatten_outputs,
    make_inputs,
    ort_candidate,
    progress,
    run_eager,
    torch_export,
)
from export.repo_io import staged_model
from export.spec import BATCH_AXIS_NAME, DEFAULT_PARITY_BATCH_SIZES, ExportError, ExportRecipe, trace_sizes

AOTI_SIDECAR = "model.pt2.json"
TRT_SIDECAR = "model.plan.json"
SMALL_BATCH_PROFILE_MAX = 8
DEFAULT_DIM_RANGE = (1, 32, 128)


@dataclass
class CompileOptions:
    name: str
    target: str  # aoti | tensorrt
    repository: Path
    version: int | None = None
    output_name: str | None = None
    fp16: bool = False
    device: str = "auto"  # aoti: auto | cpu | cuda
    dim_ranges: list[str] = field(default_factory=list)  # tensorrt: NAME=MIN:OPT:MAX
    workspace_mb: int = 2048
    atol: float | None = None
    rtol: float | None = None
    parity: bool = True
    timing_cache: Path | None = None


def _log(msg: str) -> None:
    progress(msg, "kiln compile")


def _source(opts: CompileOptions):
    """(source model dir, version, config protobuf) of the model to compile."""
    from server.config import CONFIG_FILENAME, ConfigError, read_config_file

    src = opts.repository / opts.name
    if not (src / CONFIG_FILENAME).is_file():
        raise ExportError(f"model {opts.name!r} not found: no {src / CONFIG_FILENAME} (export it first with `kiln export`)")
    try:
        proto = read_config_file(src / CONFIG_FILENAME)
    except ConfigError as exc:
        raise ExportError(str(exc)) from exc
    versions = sorted(int(p.name) for p in src.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ExportError(f"model {opts.name!r} has no version directory")
    version = opts.version if opts.version is not None else versions[-1]
    if version not in versions:
        raise ExportError(f"model {opts.name!r} has no version {version} (found {versions})")
    return src, version, proto


def _tensor_infos(proto, fp16: bool = False) -> tuple[list[dict], list[dict]]:
    from server.datatypes import config_type_to_datatype
    from server.protocol import model_config_pb2 as mc

    lead = [-1] if proto.max_batch_size > 0 else []

    def info(t):
        dt = config_type_to_datatype(mc.DataType.Name(t.data_type))
        if fp16 and dt == "FP32":
            dt = "FP16"
        return {"name": t.name, "datatype": dt, "shape": lead + list(t.dims)}

    return [info(t) for t in proto.input], [info(t) for t in proto.output]


def _new_config(proto, name: str, *, platform: str | None, backend: str | None, kind: str | None, fp16_io: bool) -> str:
    from google.protobuf import text_format

    from server.protocol import model_config_pb2 as mc

    cfg = mc.ModelConfig()
    cfg.CopyFrom(proto)
    cfg.name = name
    cfg.platform = platform or ""
    cfg.backend = backend or ""
    cfg.default_model_filename = ""
    cfg.ClearField("optimization")
    if kind:
        del cfg.instance_group[:]
        cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.Kind.Value(kind))
    if fp16_io:
        for t in list(cfg.input) + list(cfg.output):
            if t.data_type == mc.TYPE_FP32:
                t.data_type = mc.TYPE_FP16
    # Parameters of the ONNX Runtime backend mean nothing to the compiled runtimes.
    for key in [k for k in cfg.parameters if k.endswith("thread_count") or k.startswith("trt_")]:
        del cfg.parameters[key]
    return text_format.MessageToString(cfg)


def _parity_batches(max_batch_size: int) -> tuple[int, ...]:
    if max_batch_size <= 0:
        return (1,)
    return tuple(sorted({b for b in (*DEFAULT_PARITY_BATCH_SIZES, max_batch_size) if b <= max_batch_size}))


def run_compile(opts: CompileOptions) -> Path:
    if opts.target == "aoti":
        return compile_aoti(opts)
    if opts.target == "tensorrt":
        return compile_tensorrt(opts)
    raise ExportError(f"unknown target {opts.target!r}; expected aoti or tensorrt")


# ---- AOTInductor -----------------------------------------------------------------------------


def compile_aoti(opts: CompileOptions) -> Path:
    import torch

    t0 = time.perf_counter()
    src, version, proto = _source(opts)
    recipe_path = src / str(version) / EXPORT_JSON
    if not recipe_path.is_file():
        raise ExportError(
            f"{recipe_path} is missing: --target aoti rebuilds the PyTorch module from the export.json that "
            "`kiln export` writes; re-export the model with `kiln export`"
        )
    recipe = ExportRecipe.from_json(json.loads(recipe_path.read_text()))
    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: this machine has no CUDA device visible to PyTorch")
    out_name = opts.output_name or f"{opts.name}_aoti"
    _log(f"{opts.name} v{version} -> {out_name} (AOTInductor, {device}{', fp16' if opts.fp16 else ''})")

    _log(f"rebuilding {recipe.factory}")
    reference = build_module(recipe)
    module = copy.deepcopy(reference)
    if opts.fp16:
        module = module.half()
    module = module.to(device)
    sizes = trace_sizes(recipe.specs(), recipe.axis_name_map())

    def prepare(feeds: dict) -> dict:
        out = {}
        for k, v in feeds.items():
            if opts.fp16 and v.dtype == torch.float32:
                v = v.half()
            out[k] = v.to(device)
        return out

    example = prepare(make_inputs(recipe, sizes, seed=0))
    _log("torch.export")
    program = torch_export(module, recipe, example)
    in_infos, out_infos = _tensor_infos(proto, fp16=opts.fp16)

    with staged_model(opts.repository, out_name) as stage:
        vdir = stage / str(version)
        vdir.mkdir()
        pt2 = vdir / "model.pt2"
        _log("AOTInductor compile + package (C++ build; tens of seconds)")
        t1 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(pt2), inductor_configs={"aot_inductor.precompile_headers": False}
                )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ExportError(f"AOTInductor compilation failed: {type(exc).__name__}: {first}") from exc
        _log(f"  packaged {pt2.stat().st_size / 1e6:.2f} MB in {time.perf_counter() - t1:.1f}s")
        sidecar = {
            "inputs": in_infos,
            "outputs": out_infos,
            "device": device,
            "fp16": opts.fp16,
            "torch_version": torch.__version__,
            "source": {"model": opts.name, "version": version, "factory": recipe.factory},
        }
        (vdir / AOTI_SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        (vdir / EXPORT_JSON).write_text(recipe_path.read_text())
        if opts.parity:
            compiled = torch._inductor.aoti_load_package(str(pt2))
            out_names = [o["name"] for o in out_infos]

            def candidate(feeds: dict[str, np.ndarray]) -> list:
                tensors = prepare({k: torch.from_numpy(v) for k, v in feeds.items()})
                with torch.inference_mode():
                    outs = flatten_outputs(compiled(*[tensors[i["name"]] for i in in_infos]))
                return [o.detach().cpu().numpy() for o in outs]

            _log(f"parity: PyTorch eager (fp32, cpu) vs AOTInductor ({device})")
            check_parity(
                lambda feeds: run_eager(reference, feeds), candidate, recipe, out_names,
                [o["datatype"] for o in out_infos], batch_sizes=_parity_batches(proto.max_batch_size),
                atol=opts.atol, rtol=opts.rtol, label="aoti", prefix="kiln compile",
            )
        kind = "KIND_GPU" if device == "cuda" else "KIND_CPU"
        (stage / "config.pbtxt").write_text(
            _new_config(proto, out_name, platform=None, backend="torch_aoti", kind=kind, fp16_io=opts.fp16)
        )
    final = opts.repository / out_name
    _log(f"wrote {final}/{version}/model.pt2 and {final}/config.pbtxt in {time.perf_counter() - t0:.1f}s")
    return final


# ---- TensorRT --------------------------------------------------------------------------------


def parse_dim_ranges(items: list[str]) -> dict[str, tuple[int, int, int]]:
    out = {}
    for item in items:
        name, sep, rng = item.partition("=")
        try:
            lo, opt, hi = (int(x) for x in rng.split(":"))
        except ValueError:
            raise ExportError(f"--dynamic-dim {item!r}: expected NAME=MIN:OPT:MAX, e.g. sequence=1:64:128") from None
        if not sep or not name or not 1 <= lo <= opt <= hi:
            raise ExportError(f"--dynamic-dim {item!r}: expected NAME=MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
        out[name] = (lo, opt, hi)
    return out


def trt_profiles(onnx_inputs, max_batch_size: int, preferred: list[int], dim_ranges: dict[str, tuple[int, int, int]]):
    """Optimization profiles as [{input: (min, opt, max) shapes}], smallest max batch first.

    ``onnx_inputs`` is [(name, [dim or dim_param str])].
    """
    batch_ranges: list[tuple[int, int, int]]
    if max_batch_size > 0:
        opt = max([p for p in preferred if p <= max_batch_size] or [max_batch_size])
        batch_ranges = []
        if max_batch_size > SMALL_BATCH_PROFILE_MAX:
            batch_ranges.append((1, 1, SMALL_BATCH_PROFILE_MAX))
        batch_ranges.append((1, opt, max_batch_size))
    else:
        batch_ranges = [(1, 1, 1)]
    unknown = set(dim_ranges)
    profiles = []
    for b_lo, b_opt, b_hi in batch_ranges:
        prof = {}
        for name, dims in onnx_inputs:
            lo, opt, hi = [], [], []
            for axis, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    lo.append(d), opt.append(d), hi.append(d)
                elif axis == 0 and max_batch_size > 0:
                    lo.append(b_lo), opt.append(b_opt), hi.append(b_hi)
                else:
                    key = d if isinstance(d, str) and d else f"{name}:{axis}"
                    unknown.discard(key)
                    r = dim_ranges.get(key, DEFAULT_DIM_RANGE)
                    lo.append(r[0]), opt.append(r[1]), hi.append(r[2])
            prof[name] = (tuple(lo), tuple(opt), tuple(hi))
        profiles.append(prof)
    if unknown:
        raise ExportError(f"--dynamic-dim names {sorted(unknown)} match no dynamic axis of the ONNX inputs")
    return profiles


def default_timing_cache(trt_version: str, gpu: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kiln"
    safe = "".join(c if c.isalnum() else "_" for c in gpu)
    return base / f"trt-{trt_version}-{safe}.timing-cache"


def compile_tensorrt(opts: CompileOptions) -> Path:
    """Build a TensorRT engine from model.onnx. GPU only; written against TensorRT 10's Python API."""
    import onnx
    import tensorrt as trt

    from server.runtime.tensorrt import TensorRTRuntime, gpu_identity

    t0 = time.perf_counter()
    src, version, proto = _source(opts)
    onnx_path = src / str(version) / "model.onnx"
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path} is missing: --target tensorrt builds from the ONNX model")
    out_name = opts.output_name or f"{opts.name}_trt"
    gpu = gpu_identity(proto.instance_group[0].gpus[0] if proto.instance_group and proto.instance_group[0].gpus else 0)
    _log(f"{opts.name} v{version} -> {out_name} (TensorRT {trt.__version__} on {gpu['name']} sm_{gpu['compute_capability']}"
         f"{', fp16' if opts.fp16 else ''})")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    _log(f"parsing {onnx_path}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError("TensorRT's ONNX parser rejected the model:\n  " + "\n  ".join(errors[:10]))

    model = onnx.load(str(onnx_path), load_external_data=False)
    onnx_inputs = [
        (vi.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "") for d in vi.type.tensor_type.shape.dim])
        for vi in model.graph.input
    ]
    preferred = list(proto.dynamic_batching.preferred_batch_size) if proto.HasField("dynamic_batching") else []
    profiles = trt_profiles(onnx_inputs, proto.max_batch_size, preferred, parse_dim_ranges(opts.dim_ranges))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    if opts.fp16:
        if not builder.platform_has_fast_fp16:
            _log("  warning: this GPU has no fast FP16; building FP16 anyway")
        config.set_flag(trt.BuilderFlag.FP16)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
        _log("  profile " + "; ".join(f"{n} min {list(lo)} opt {list(o)} max {list(h)}" for n, (lo, o, h) in prof.items()))

    cache_path = opts.timing_cache or default_timing_cache(trt.__version__, gpu["name"])
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    _log(f"building engine (timing cache {cache_path}{', warm' if cache_bytes else ', cold'}; minutes for large models)")
    t1 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log lines above)")
    _log(f"  engine built in {time.perf_counter() - t1:.1f}s ({serialized.nbytes / 1e6:.1f} MB)")
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    except OSError as exc:
        _log(f"  warning: could not save the timing cache: {exc}")

    in_infos, out_infos = _tensor_infos(proto)
    with staged_model(opts.repository, out_name) as stage:
        vdir = stage / str(version)
        vdir.mkdir()
        plan = vdir / "model.plan"
        plan.write_bytes(bytes(memoryview(serialized)))
        (vdir / TRT_SIDECAR).write_text(json.dumps({
            "tensorrt_version": trt.__version__,
            "gpu_name": gpu["name"],
            "compute_capability": gpu["compute_capability"],
            "fp16": opts.fp16,
            "profiles": [{n: [list(s) for s in v] for n, v in prof.items()} for prof in profiles],
            "source": {"model": opts.name, "version": version, "onnx": "model.onnx"},
        }, indent=2) + "\n")
        cfg_text = _new_config(proto, out_name, platform="tensorrt_plan", backend=None, kind="KIND_GPU", fp16_io=False)
        (stage / "config.pbtxt").write_text(cfg_text)
        if opts.parity:
            from server.config import parse_config_text, to_model_config

            runtime = TensorRTRuntime(plan, to_model_config(parse_config_text(cfg_text), "tensorrt_plan"))
            try:
                longest = max((d for prof in profiles for (_, _, hi) in prof.values() for d in hi[1:]), default=1)
                recipe = _recipe_for(src, version, proto, longest)
                out_names = [o["name"] for o in out_infos]
                reference_sess = ort_candidate(onnx_path, out_names)
                max_batch = max(max(h[0] for (_, _, h) in prof.values()) for prof in profiles)
                # the reference is ORT CPU on the same inputs (torch tensors from make_inputs -> numpy)
                _log("parity: onnxruntime CPU vs TensorRT")
                check_parity(
                    lambda feeds: reference_sess({k: v.numpy() for k, v in feeds.items()}),
                    lambda feeds: [runtime.infer(feeds, out_names)[n] for n in out_names],
                    recipe, out_names,
                    ["FP16" if opts.fp16 and o["datatype"] == "FP32" else o["datatype"] for o in out_infos],
                    batch_sizes=_parity_batches(min(proto.max_batch_size, max_batch) if proto.max_batch_size else 0),
                    atol=opts.atol, rtol=opts.rtol, label="tensorrt", prefix="kiln compile",
                )
            finally:
                runtime.close()
    final = opts.repository / out_name
    _log(f"wrote {final}/{version}/model.plan and {final}/config.pbtxt in {time.perf_counter() - t0:.1f}s")
    return final


def _recipe_for(src: Path, version: int, proto, longest: int = DEFAULT_DIM_RANGE[2]) -> ExportRecipe:
    """The export recipe (for value ranges and axis names), or one made from the config."""
    path = src / str(version) / EXPORT_JSON
    if path.is_file():
        recipe = ExportRecipe.from_json(json.loads(path.read_text()))
        # parity lengths must stay inside the TensorRT profiles
        recipe.parity_lengths = [n for n in recipe.parity_lengths if n <= longest] or [1]
        return recipe
    in_infos, out_infos = _tensor_infos(proto)
    axis_names = {}
    for t in in_infos:
        for axis, d in enumerate(t["shape"]):
            if d == -1:
                axis_names[f"{t['name']}:{axis}"] = BATCH_AXIS_NAME if axis == 0 and proto.max_batch_size else f"dim{axis}"
    return ExportRecipe(
        factory="", inputs=[{"name": t["name"], "datatype": t["datatype"], "dims": t["shape"]} for t in in_infos],
        outputs=[o["name"] for o in out_infos], max_batch_size=proto.max_batch_size, axis_names=axis_names,
    )
