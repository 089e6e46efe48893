"""Runtimes: one module per backend, chosen by the config's platform."""

from __future__ import annotations

from pathlib import Path

from server.model_types import ModelConfig
from server.runtime.base import Runtime, RuntimeExecutionError, RuntimeLoadError, TensorInfo

__all__ = ["Runtime", "RuntimeExecutionError", "RuntimeLoadError", "TensorInfo", "create_runtime"]


def create_runtime(model_file: Path, config: ModelConfig) -> Runtime:
    """Instantiate the backend for config.platform; imports are lazy so missing extras only hurt their models."""
    if config.platform == "onnxruntime_onnx":
        from server.runtime.onnxruntime import OnnxRuntime

        return OnnxRuntime(model_file, config)
    if config.platform == "tensorrt_plan":
        try:
            from server.runtime.tensorrt import TensorRTRuntime
        except ImportError as exc:
            raise RuntimeLoadError(
                f"platform tensorrt_plan needs TensorRT: pip install 'kiln-serve[tensorrt]' ({exc})"
            ) from exc
        return TensorRTRuntime(model_file, config)
    if config.platform == "torch_aoti":
        try:
            from server.runtime.torch_aoti import TorchAotiRuntime
        except ImportError as exc:
            raise RuntimeLoadError(
                f"backend torch_aoti needs PyTorch: pip install 'kiln-serve[torch]' ({exc})"
            ) from exc
        return TorchAotiRuntime(model_file, config)
    raise RuntimeLoadError(f"no runtime for platform '{config.platform}'")
