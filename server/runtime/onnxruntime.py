"""ONNX Runtime backend: CPU now; CUDA and TensorRT execution providers when asked for and present."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from server.model_types import ModelConfig
from server.runtime.base import RuntimeExecutionError, RuntimeLoadError, TensorInfo, worker_cpu_share
from server.threadpriority import call_on_lowered_thread, runtime_nice

log = logging.getLogger("kiln.runtime.onnxruntime")

# ONNX Runtime's tensor type strings -> v2 datatypes
_ORT_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_GRAPH_LEVELS = {-1: "ORT_DISABLE_ALL", 0: "ORT_ENABLE_BASIC", 1: "ORT_ENABLE_EXTENDED", 2: "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class OrtOptions:
    """Session options read from config parameters (Triton's ORT backend keys)."""

    intra_op_threads: int = 0  # 0: ORT's default (one per core), or the worker's share of the cores
    inter_op_threads: int = 0
    parallel_execution: bool = False
    # ORT's intra-op threads spin while waiting for work; on few cores that spinning takes CPU
    # from the event loop. "allow_spinning" "0" makes them sleep instead.
    allow_spinning: bool = True
    graph_level: int = 2  # -1 disable, 0 basic, 1 extended, 2 all
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    device_id: int = 0
    trt_fp16: bool = False
    trt_cache_dir: str = ""

    @classmethod
    def from_config(cls, config: ModelConfig) -> "OrtOptions":
        params = config.parameters

        def int_param(key: str, default: int) -> int:
            raw = params.get(key)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise RuntimeLoadError(f"parameter '{key}' must be an integer, got '{raw}'") from None

        level = int_param("graph_optimization_level", 2)
        if level not in _GRAPH_LEVELS:
            raise RuntimeLoadError(f"parameter 'graph_optimization_level' must be one of {sorted(_GRAPH_LEVELS)}")
        return cls(
            intra_op_threads=int_param("intra_op_thread_count", 0),
            inter_op_threads=int_param("inter_op_thread_count", 0),
            parallel_execution=int_param("execution_mode", 0) == 1,
            allow_spinning=int_param("allow_spinning", 1) != 0,
            graph_level=level,
            providers=_providers_for(config),
            device_id=config.instance_group.gpus[0] if config.instance_group.gpus else 0,
            trt_fp16=params.get("trt_fp16", "").lower() in ("1", "true"),
            trt_cache_dir=params.get("trt_engine_cache_path", ""),
        )


def _providers_for(config: ModelConfig) -> tuple[str, ...]:
    kind = config.instance_group.kind
    if kind == "KIND_CPU":
        return ("CPUExecutionProvider",)
    wanted: list[str] = []
    if "tensorrt" in config.gpu_accelerators:
        wanted.append("TensorrtExecutionProvider")
    if kind in ("KIND_GPU", "KIND_AUTO"):
        wanted.append("CUDAExecutionProvider")
    wanted.append("CPUExecutionProvider")
    return tuple(wanted)


class OnnxRuntime:
    """One InferenceSession per model version; ORT sessions are thread-safe for run()."""

    bytes_as_text = True  # ORT string tensors hold UTF-8 text

    def __init__(self, model_file: Path, config: ModelConfig) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
            raise RuntimeLoadError("onnxruntime is not installed: pip install kiln-serve") from exc
        options = OrtOptions.from_config(config)
        self.options = options
        session_options = ort.SessionOptions()
        # unset in config.pbtxt: ORT's default (one thread per core), or this worker's share of the cores
        session_options.intra_op_num_threads = options.intra_op_threads or worker_cpu_share()
        if not options.allow_spinning:
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session_options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if options.parallel_execution else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        session_options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _GRAPH_LEVELS[options.graph_level]
        )
        providers = self._available_providers(ort, options, config)
        try:
            # ORT starts its intra-op threads here: they inherit the creating thread's priority
            self._session = call_on_lowered_thread(
                runtime_nice(), ort.InferenceSession, str(model_file), session_options, providers)
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise RuntimeLoadError(f"onnxruntime cannot load {model_file.name}: {exc}") from exc
        self.inputs = tuple(_tensor_info(i) for i in self._session.get_inputs())
        self.outputs = tuple(_tensor_info(o) for o in self._session.get_outputs())
        self._run_options = ort.RunOptions()
        log.info("loaded %s with providers %s", model_file, self._session.get_providers())

    @staticmethod
    def _available_providers(ort, options: OrtOptions, config: ModelConfig) -> list:
        available = set(ort.get_available_providers())
        providers: list = []
        for name in options.providers:
            if name not in available:
                if config.instance_group.kind == "KIND_GPU" and name == "CUDAExecutionProvider":
                    raise RuntimeLoadError(
                        "instance_group kind KIND_GPU needs onnxruntime's CUDA provider: "
                        "pip install 'kiln-serve[gpu]' on a machine with a GPU"
                    )
                continue
            if name == "CUDAExecutionProvider":
                providers.append((name, {"device_id": options.device_id}))
            elif name == "TensorrtExecutionProvider":
                trt = {"device_id": options.device_id, "trt_fp16_enable": options.trt_fp16}
                if options.trt_cache_dir:
                    trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=options.trt_cache_dir)
                providers.append((name, trt))
            else:
                providers.append(name)
        return providers

    def infer(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        names = list(output_names) or [o.name for o in self.outputs]
        feeds = {name: _ort_input(name, array) for name, array in inputs.items()}
        try:
            results = self._session.run(names, feeds, self._run_options)
        except Exception as exc:
            raise RuntimeExecutionError(str(exc)) from exc
        return dict(zip(names, results))

    def close(self) -> None:
        self._session = None


def _ort_input(name: str, array: np.ndarray) -> np.ndarray:
    """ORT's Python API turns a bytes element into its repr (str(b"a") == "b'a'"): string tensors
    must hold str. The codec already converts (bytes_as_text); this guards direct callers."""
    if array.dtype != object or all(isinstance(item, str) for item in array.reshape(-1)):
        return array
    try:
        return np.vectorize(lambda item: item if isinstance(item, str) else bytes(item).decode("utf-8"), otypes=[object])(array)
    except UnicodeDecodeError as exc:
        raise RuntimeExecutionError(f"input '{name}': BYTES element is not UTF-8 text ({exc.reason})") from exc


def _tensor_info(node) -> TensorInfo:
    datatype = _ORT_DATATYPES.get(node.type)
    if datatype is None:
        raise RuntimeLoadError(f"tensor '{node.name}' has type {node.type}, which the v2 protocol cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or ()))
    return TensorInfo(name=node.name, datatype=datatype, shape=shape)
