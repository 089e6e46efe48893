"""Runtimes: one module per backend, chosen by the config's platform."""

from __future__ import annotations

import importlib
from pathlib import Path

from server.model_types import ModelConfig
from server.runtime.base import Runtime, RuntimeExecutionError, RuntimeLoadError, TensorInfo

__all__ = ["Runtime", "RuntimeExecutionError", "RuntimeLoadError", "TensorInfo", "create_runtime"]

# platform -> (module, class, what to install when the backend's library is missing).
# Modules are imported on first use, so a missing optional library only fails its own models.
BACKENDS: dict[str, tuple[str, str, str]] = {
    "onnxruntime_onnx": ("server.runtime.onnxruntime", "OnnxRuntime", "kiln-serve"),
    "tensorrt_plan": ("server.runtime.tensorrt", "TensorRTRuntime", "kiln-serve[tensorrt]"),
    "torch_aoti": ("server.runtime.torch_aoti", "TorchAotiRuntime", "kiln-serve[torch]"),
}


def create_runtime(model_file: Path, config: ModelConfig) -> Runtime:
    """Instantiate the backend for config.platform."""
    backend = BACKENDS.get(config.platform)
    if backend is None:
        raise RuntimeLoadError(f"no runtime for platform '{config.platform}'")
    module_name, class_name, package = backend
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeLoadError(
            f"platform {config.platform} needs a library that is not installed: pip install '{package}' ({exc})"
        ) from exc
    return getattr(module, class_name)(model_file, config)
