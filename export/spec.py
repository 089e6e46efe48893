"""What `kiln export` is asked to build: tensor specs, dynamic axes, value ranges.

No torch import at module level: argument parsing and error messages work
without it, and the dtype tables are looked up lazily.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.datatypes import NUMPY_DTYPES

BATCH_AXIS_NAME = "batch"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_OPSET = 18
DEFAULT_PARITY_BATCH_SIZES = (1, 7)  # plus max_batch_size
DEFAULT_PARITY_LENGTHS = (1, 7, 32)  # sizes tried for every non-batch dynamic axis
# Example size used while tracing a dynamic axis: > 1 (torch.export specialises 0 and 1)
# and unlikely to collide with a static dim.
_TRACE_BATCH = 2
_TRACE_SIZES = (5, 11, 13, 17, 19, 23, 29)

# Parity tolerances per datatype (np.allclose semantics: |got-ref| <= atol + rtol*|ref|).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "FP32": (1e-4, 1e-3),
    "FP64": (1e-7, 1e-6),
    "FP16": (2e-2, 2e-2),
}
EXACT_TOLERANCE = (0.0, 0.0)  # integer and bool outputs


class ExportError(Exception):
    """A user-facing failure of export or compile: the message says what went wrong and what to do."""


@dataclass(frozen=True)
class TensorSpec:
    """One declared input: v2 datatype and full shape (batch dim included, -1 dynamic)."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> "TensorSpec":
        parts = text.split(":")
        if len(parts) != 3 or not parts[0]:
            raise ExportError(f"--input {text!r}: expected NAME:DTYPE:DIMS, e.g. x:FP32:-1,256")
        name, datatype, dims_text = parts
        datatype = datatype.upper()
        if datatype not in NUMPY_DTYPES or datatype == "BYTES":
            allowed = ", ".join(d for d in NUMPY_DTYPES if d != "BYTES")
            raise ExportError(f"--input {text!r}: datatype {datatype!r} is not one of {allowed}")
        try:
            dims = tuple(int(d) for d in dims_text.split(",") if d.strip())
        except ValueError:
            raise ExportError(f"--input {text!r}: DIMS must be comma-separated integers, -1 for dynamic") from None
        if not dims:
            raise ExportError(f"--input {text!r}: DIMS is empty; give the full shape, e.g. -1,256")
        if any(d == 0 or d < -1 for d in dims):
            raise ExportError(f"--input {text!r}: dims must be positive or -1, got {list(dims)}")
        return cls(name, datatype, dims)


def parse_value_range(text: str) -> tuple[str, float, float]:
    """'input_ids:0:1000' -> ('input_ids', 0, 1000): random parity values in [LO, HI)."""
    parts = text.split(":")
    try:
        name, lo, hi = parts[0], float(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        raise ExportError(f"--value-range {text!r}: expected NAME:LO:HI, e.g. input_ids:0:1000") from None
    if len(parts) != 3 or not hi > lo:
        raise ExportError(f"--value-range {text!r}: expected NAME:LO:HI with HI > LO")
    return name, lo, hi


def parse_axis_names(items: list[str], specs: list[TensorSpec]) -> dict[tuple[str, int], str]:
    """Names of dynamic axes: 'INPUT:AXIS=NAME' for one input, 'AXIS=NAME' for that axis of every input.

    Axes with the same name are the same size (one symbol). Defaults: a leading -1 is
    'batch'; any other dynamic axis k is 'dim{k}', shared by every input that has it.
    """
    names: dict[tuple[str, int], str] = {}
    for spec in specs:
        for axis, d in enumerate(spec.dims):
            if d == -1:
                names[(spec.name, axis)] = BATCH_AXIS_NAME if axis == 0 else f"dim{axis}"
    by_input = {s.name: s for s in specs}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, name = part.partition("=")
            if not sep or not name:
                raise ExportError(f"--dynamic-axis-names {part!r}: expected [INPUT:]AXIS=NAME, e.g. 1=sequence")
            target, _, axis_text = key.rpartition(":")
            try:
                axis = int(axis_text)
            except ValueError:
                raise ExportError(f"--dynamic-axis-names {part!r}: AXIS must be an integer") from None
            if target and target not in by_input:
                raise ExportError(f"--dynamic-axis-names {part!r}: no input named {target!r}")
            hits = [k for k in names if k[1] == axis and (not target or k[0] == target)]
            if not hits:
                raise ExportError(f"--dynamic-axis-names {part!r}: axis {axis} is not dynamic (-1) there")
            if axis == 0 and any(by_input[k[0]].dims[0] == -1 for k in hits):
                raise ExportError(f"--dynamic-axis-names {part!r}: axis 0 is the batch dim; it is always 'batch'")
            for k in hits:
                names[k] = name
    return names


@dataclass
class ExportRecipe:
    """How a model was exported; written as export.json beside model.onnx so `kiln compile` can rebuild it."""

    factory: str
    inputs: list[dict[str, Any]]
    outputs: list[str]
    max_batch_size: int
    axis_names: dict[str, str] = field(default_factory=dict)  # "input:axis" -> name
    value_ranges: dict[str, list[float]] = field(default_factory=dict)
    state_dict: str | None = None
    python_path: list[str] = field(default_factory=list)
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    parity_lengths: list[int] = field(default_factory=lambda: list(DEFAULT_PARITY_LENGTHS))

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(i["name"], i["datatype"], tuple(i["dims"])) for i in self.inputs]

    def axis_name_map(self) -> dict[tuple[str, int], str]:
        out = {}
        for key, name in self.axis_names.items():
            inp, _, axis = key.rpartition(":")
            out[(inp, int(axis))] = name
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ExportRecipe":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def load_factory(ref: str, python_path: list[str] | None = None):
    """Import MODULE:FACTORY (FACTORY may be dotted); returns the callable. Errors name what is missing."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ExportError(f"{ref!r}: expected MODULE:FACTORY, e.g. export.zoo.mlp:build_mlp")
    for p in [str(Path.cwd()), *(python_path or [])]:
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ExportError(f"cannot import module {module_name!r} (from {ref!r}): {exc}") from exc
    except Exception as exc:
        raise ExportError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ExportError(
                f"factory {attr!r} not found in module {module_name!r}; callables there: {', '.join(public) or 'none'}"
            ) from None
    if not callable(obj):
        raise ExportError(f"{ref!r} is not callable (it is a {type(obj).__name__})")
    return obj


def trace_sizes(specs: list[TensorSpec], axis_names: dict[tuple[str, int], str]) -> dict[str, int]:
    """One example size per dynamic axis name (same name -> same size)."""
    sizes: dict[str, int] = {}
    for spec in specs:
        for axis, d in enumerate(spec.dims):
            if d == -1:
                name = axis_names[(spec.name, axis)]
                if name == BATCH_AXIS_NAME:
                    sizes[name] = _TRACE_BATCH
                elif name not in sizes:
                    others = sum(1 for n in sizes if n != BATCH_AXIS_NAME)
                    sizes[name] = _TRACE_SIZES[others % len(_TRACE_SIZES)]
    return sizes
