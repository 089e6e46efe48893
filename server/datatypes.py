"""The v2 protocol's tensor datatypes and their numpy and config equivalents."""

from __future__ import annotations

import numpy as np

# v2 datatype name -> numpy dtype. BYTES tensors are numpy object arrays of bytes.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

DATATYPES: tuple[str, ...] = tuple(NUMPY_DTYPES)


def numpy_to_datatype(dtype: np.dtype) -> str:
    """The v2 datatype name of a numpy dtype (str/bytes/object arrays are BYTES)."""
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    for name, candidate in NUMPY_DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"numpy dtype {dtype} has no v2 datatype")


def config_type_to_datatype(config_type: str) -> str:
    """'TYPE_FP32' -> 'FP32'; Triton's TYPE_STRING is the protocol's BYTES."""
    name = config_type.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def datatype_to_config_type(datatype: str) -> str:
    """'FP32' -> 'TYPE_FP32'; BYTES is TYPE_STRING in a model config."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
