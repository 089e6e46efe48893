"""Valid inference inputs for any model of a running server, from its ModelMetadata.

Shared by the locust user and `kiln bench`: random values of each input's declared
datatype and shape (leading -1 = the batch dim, set to `batch_size`; other -1 dims
from `shapes` or 1), or arrays loaded from .npy files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from server.client import build_request, random_input
from server.datatypes import NUMPY_DTYPES
from server.protocol import grpc_service_pb2 as pb

__all__ = ["parse_assignments", "parse_dims", "input_shape", "make_arrays", "make_requests", "request_rows", "fetch_metadata"]


def parse_assignments(items: list[str] | None, what: str) -> dict[str, str]:
    """['x=a.npy', ...] -> {'x': 'a.npy'}; raises ValueError naming the bad item."""
    result: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{what}: expected NAME=VALUE, got '{item}'")
        result[name] = value
    return result


def parse_dims(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got '{text}'") from None
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"expected positive dims, got '{text}'")
    return dims


def input_shape(declared: list[int], batch_size: int, override: list[int] | None = None) -> list[int]:
    """A concrete shape for a declared v2 shape: leading -1 -> batch_size, other -1 -> 1.

    `override` gives the non-batch dims (or the full shape when it has as many dims as declared).
    """
    declared = list(declared)
    if override is not None:
        if len(override) == len(declared):
            return list(override)
        if declared and declared[0] == -1 and len(override) == len(declared) - 1:
            return [batch_size, *override]
        raise ValueError(f"shape {override} does not fit the declared shape {declared}")
    return [batch_size if (i == 0 and d == -1) else (d if d > 0 else 1) for i, d in enumerate(declared)]


def fetch_metadata(stub, model: str, version: str = "", timeout: float = 10.0, metadata=()) -> pb.ModelMetadataResponse:
    return stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version), timeout=timeout, metadata=metadata)


def make_arrays(
    metadata: pb.ModelMetadataResponse,
    batch_size: int,
    rng: np.random.Generator,
    files: Mapping[str, str | Path] | None = None,
    shapes: Mapping[str, list[int]] | None = None,
) -> dict[str, np.ndarray]:
    """One request's inputs: .npy files where given, random valid values otherwise."""
    files = dict(files or {})
    shapes = dict(shapes or {})
    known = {t.name for t in metadata.inputs}
    unknown = sorted((set(files) | set(shapes)) - known)
    if unknown:
        raise ValueError(f"model '{metadata.name}' has no input(s) {unknown}; its inputs: {sorted(known)}")
    arrays: dict[str, np.ndarray] = {}
    for tensor in metadata.inputs:
        if tensor.name in files:
            array = np.load(files[tensor.name], allow_pickle=False)
            expected = NUMPY_DTYPES.get(tensor.datatype)
            if expected is not None and expected.kind != "O" and array.dtype != expected:
                array = array.astype(expected)
            arrays[tensor.name] = array
    batch_size = _rows_of_files(metadata, arrays) or batch_size  # random inputs match the files' rows
    for tensor in metadata.inputs:
        if tensor.name not in arrays:
            shape = input_shape(list(tensor.shape), batch_size, shapes.get(tensor.name))
            arrays[tensor.name] = random_input(tensor.datatype, shape, rng)
    return {t.name: arrays[t.name] for t in metadata.inputs}


def _batched(tensor) -> bool:
    return len(tensor.shape) > 0 and tensor.shape[0] == -1


def _rows_of_files(metadata: pb.ModelMetadataResponse, loaded: Mapping[str, np.ndarray]) -> int | None:
    """The batch size the loaded arrays of batched inputs agree on (None when there are none)."""
    rows = {
        t.name: loaded[t.name].shape[0] for t in metadata.inputs if _batched(t) and t.name in loaded and loaded[t.name].ndim
    }
    if len(set(rows.values())) > 1:
        raise ValueError(f"the .npy files disagree on the batch size (rows per input: {rows})")
    return next(iter(rows.values()), None)


def request_rows(metadata: pb.ModelMetadataResponse, request: pb.ModelInferRequest) -> int:
    """Items one request carries: its batch dim where the model has one, else 1."""
    sent = {t.name: list(t.shape) for t in request.inputs}
    for tensor in metadata.inputs:
        if _batched(tensor) and sent.get(tensor.name):
            return int(sent[tensor.name][0])
    return 1


def make_requests(
    metadata: pb.ModelMetadataResponse,
    batch_size: int,
    *,
    version: str = "",
    files: Mapping[str, str | Path] | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    variants: int = 8,
    seed: int = 0,
) -> list[pb.ModelInferRequest]:
    """A few distinct valid requests (one when every input comes from a file)."""
    rng = np.random.default_rng(seed)
    all_files = files and len(files) == len(metadata.inputs)
    count = 1 if all_files else max(1, variants)
    return [
        build_request(metadata.name, make_arrays(metadata, batch_size, rng, files, shapes), version)
        for _ in range(count)
    ]
