"""Handlers of `kiln export` and `kiln compile` (the parsers live in server/cli.py).

server/cli.py imports this module only inside the handlers, so `kiln serve`
never imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from export.spec import (
    DEFAULT_PARITY_LENGTHS,
    ExportError,
    ExportRecipe,
    TensorSpec,
    parse_axis_names,
    parse_value_range,
)


def _fail(command: str, exc: BaseException) -> int:
    print(f"kiln {command}: error: {exc}", file=sys.stderr, flush=True)
    return 1


def export_command(args) -> int:
    try:
        specs = [TensorSpec.parse(t) for t in args.input]
        if not specs:
            raise ExportError("give at least one --input NAME:DTYPE:DIMS")
        axis_names = parse_axis_names(args.dynamic_axis_names or [], specs)
        ranges = {}
        for item in args.value_range or []:
            name, lo, hi = parse_value_range(item)
            if name not in {s.name for s in specs}:
                raise ExportError(f"--value-range {item!r}: no input named {name!r}")
            ranges[name] = [lo, hi]
        if args.max_batch_size < 0:
            raise ExportError("--max-batch-size must be >= 0")
        if args.version < 1:
            raise ExportError("--version must be >= 1")
        recipe = ExportRecipe(
            factory=args.factory,
            inputs=[{"name": s.name, "datatype": s.datatype, "dims": list(s.dims)} for s in specs],
            outputs=list(args.output or []),
            max_batch_size=args.max_batch_size,
            axis_names={f"{k[0]}:{k[1]}": v for k, v in axis_names.items()},
            value_ranges=ranges,
            state_dict=str(Path(args.state_dict).resolve()) if args.state_dict else None,
            python_path=[str(Path.cwd())],
            opset=args.opset,
            fp16=args.fp16,
            parity_lengths=list(args.parity_lengths or DEFAULT_PARITY_LENGTHS),
        )
        from export.exporter import ExportOptions, run_export

        run_export(
            ExportOptions(
                recipe=recipe, name=args.name, repository=Path(args.model_repository), version=args.version,
                simplify=not args.no_simplify, atol=args.atol, rtol=args.rtol,
                parity_batch_sizes=tuple(args.parity_batch_sizes) if args.parity_batch_sizes else None,
            )
        )
    except ExportError as exc:
        return _fail("export", exc)
    except ModuleNotFoundError as exc:
        if exc.name in ("torch", "onnx", "onnxscript"):
            return _fail("export", f"{exc.name} is not installed: pip install 'kiln-serve[export]'")
        raise
    return 0


def compile_command(args) -> int:
    try:
        from export.compiler import CompileOptions, run_compile

        run_compile(
            CompileOptions(
                name=args.name, target=args.target, repository=Path(args.model_repository),
                version=args.version, output_name=args.output_name, fp16=args.fp16, device=args.device,
                dim_ranges=list(args.dynamic_dim or []), workspace_mb=args.workspace_mb,
                atol=args.atol, rtol=args.rtol, parity=not args.no_parity,
            )
        )
    except ExportError as exc:
        return _fail("compile", exc)
    except ModuleNotFoundError as exc:
        if exc.name in ("torch", "onnx"):
            return _fail("compile", f"{exc.name} is not installed: pip install 'kiln-serve[export]'")
        if exc.name in ("tensorrt", "cuda", "cuda.bindings"):
            return _fail("compile", f"{exc.name} is not installed: pip install 'kiln-serve[tensorrt]' on a GPU machine")
        raise
    return 0
