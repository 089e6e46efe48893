"""Runtimes: one module per backend, chosen by the config's platform."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from server.model_types import ModelConfig
from server.runtime.base import Runtime, RuntimeExecutionError, RuntimeLoadError, TensorInfo

__all__ = ["BACKENDS", "Backend", "Runtime", "RuntimeExecutionError", "RuntimeLoadError", "TensorInfo", "create_runtime"]


@dataclass(frozen=True)
class Backend:
    module: str  # imported on first use, so a missing optional library only fails its own models
    class_name: str
    model_filename: str  # what a version directory holds
    package: str  # what to install when the backend's library is missing


# platform (as named in config.pbtxt) -> its backend
BACKENDS: dict[str, Backend] = {
    "onnxruntime_onnx": Backend("server.runtime.onnxruntime", "OnnxRuntime", "model.onnx", "kiln-serve"),
    "tensorrt_plan": Backend("server.runtime.tensorrt", "TensorRTRuntime", "model.plan", "kiln-serve[tensorrt]"),
    "torch_aoti": Backend("server.runtime.torch_aoti", "TorchAotiRuntime", "model.pt2", "kiln-serve[torch]"),
}


def create_runtime(model_file: Path, config: ModelConfig) -> Runtime:
    """Instantiate the backend for config.platform."""
    backend = BACKENDS.get(config.platform)
    if backend is None:
        raise RuntimeLoadError(f"no runtime for platform '{config.platform}'")
    try:
        module = importlib.import_module(backend.module)
    except ImportError as exc:
        raise RuntimeLoadError(
            f"platform {config.platform} needs a library that is not installed: pip install '{backend.package}' ({exc})"
        ) from exc
    return getattr(module, backend.class_name)(model_file, config)
