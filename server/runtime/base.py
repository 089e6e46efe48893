"""The one small interface every backend implements."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np

from server.model_types import ModelConfig


# Set by `kiln serve --workers N` for each worker: the cores that worker may use (usable cores / N).
# A runtime that would size its thread pool by the machine's cores uses this instead, so N workers
# do not each start a pool as large as the machine.
CPU_SHARE_ENV = "KILN_CPU_SHARE"


def worker_cpu_share() -> int:
    """This worker's share of the cores, or 0 outside `--workers N` (the runtime's own default)."""
    try:
        return max(0, int(os.environ.get(CPU_SHARE_ENV, "0")))
    except ValueError:
        return 0


class RuntimeLoadError(Exception):
    """A model file could not be loaded; the message says why and what to do."""


class RuntimeExecutionError(Exception):
    """The backend failed while executing a batch."""


@contextlib.contextmanager
def execution_errors():
    """Report any failure inside a backend call as RuntimeExecutionError (a missing tensor by name)."""
    try:
        yield
    except RuntimeExecutionError:
        raise
    except KeyError as exc:
        raise RuntimeExecutionError(f"unknown tensor {exc}") from exc
    except Exception as exc:
        raise RuntimeExecutionError(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the model file declares it: full shape, batch dim included, -1 where dynamic."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class Runtime(Protocol):
    """A loaded model version ready to execute batches.

    `infer` is called from instance threads, possibly concurrently (one call per
    instance); it must release the GIL while computing and be thread-safe.
    """

    inputs: Sequence[TensorInfo]
    outputs: Sequence[TensorInfo]
    # Optional: True when BYTES tensors must be UTF-8 text (the codec then rejects other bytes
    # per request with INVALID_ARGUMENT and hands the runtime str elements).
    bytes_as_text: bool

    def infer(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class RuntimeFactory(Protocol):
    def __call__(self, model_file: Path, config: ModelConfig) -> Runtime: ...
