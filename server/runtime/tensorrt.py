"""Native TensorRT engines (model.plan, built by `kiln compile --target tensorrt`). GPU only.

Written against the TensorRT 10 Python API (name-based tensors, execute_async_v3)
and cuda-python's runtime bindings; both are imported when a tensorrt_plan
model loads. NOT exercised on the CPU-only development machines: its tests are
@pytest.mark.gpu.

* ``model.plan.json`` (written by kiln compile) records the TensorRT version and the
  GPU the engine was built for; a mismatch fails the load with a message saying how
  to rebuild, since TensorRT engines are not portable across versions or GPU models.
* One execution context and one CUDA stream per instance (instance_group count);
  ``infer`` takes a free context from a queue, so concurrent calls never share one.
* The optimization profile is chosen per call: the first (smallest) profile whose
  min..max range holds every input shape; a context switches profiles when needed.
* Device buffers grow on demand and are reused; host<->device copies are async on the
  instance's stream followed by one synchronize.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from server.model_types import ModelConfig
from server.runtime.base import RuntimeExecutionError, RuntimeLoadError, TensorInfo, execution_errors

log = logging.getLogger("kiln.runtime.tensorrt")

SIDECAR_SUFFIX = ".json"  # model.plan -> model.plan.json


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _check(result, what: str):
    """cuda-python calls return (err, *values); raise on error, return the values."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise RuntimeExecutionError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_identity(device: int = 0) -> dict[str, str]:
    """{'name': 'NVIDIA H100 80GB HBM3', 'compute_capability': '9.0'} of a CUDA device."""
    cudart = _cudart()
    props = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00").strip(), "compute_capability": f"{props.major}.{props.minor}"}


# TensorRT DataType name -> v2 datatype
_TRT_DATATYPES = {
    "FLOAT": "FP32", "HALF": "FP16", "INT8": "INT8", "INT32": "INT32", "INT64": "INT64",
    "BOOL": "BOOL", "UINT8": "UINT8",
}


@dataclass
class _Instance:
    context: Any
    stream: Any
    profile: int = 0
    buffers: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (device ptr, bytes)


class TensorRTRuntime:
    def __init__(self, model_file: Path, config: ModelConfig) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise RuntimeLoadError(f"platform tensorrt_plan needs TensorRT: pip install 'kiln-serve[tensorrt]' ({exc})") from exc
        try:
            cudart = _cudart()
        except ImportError as exc:
            raise RuntimeLoadError(f"platform tensorrt_plan needs cuda-python: pip install 'kiln-serve[tensorrt]' ({exc})") from exc
        self._trt = trt
        self._cudart = cudart
        self.device = config.instance_group.gpus[0] if config.instance_group.gpus else 0
        try:
            _check(cudart.cudaSetDevice(self.device), "cudaSetDevice")
            here = gpu_identity(self.device)
        except RuntimeExecutionError as exc:
            raise RuntimeLoadError(f"no usable CUDA device {self.device}: {exc}") from exc
        self._check_sidecar(model_file, trt.__version__, here)

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(model_file.read_bytes())
        if self.engine is None:
            raise RuntimeLoadError(
                f"TensorRT {trt.__version__} could not deserialize {model_file.name} (built with another TensorRT "
                "version or GPU?); rebuild it with `kiln compile NAME --target tensorrt`"
            )
        inputs, outputs = [], []
        self._np_dtypes: dict[str, np.dtype] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = self.engine.get_tensor_dtype(name)
            datatype = _TRT_DATATYPES.get(dtype.name)
            if datatype is None:
                raise RuntimeLoadError(f"tensor '{name}' has TensorRT type {dtype.name}, which kiln cannot carry")
            self._np_dtypes[name] = np.dtype(trt.nptype(dtype))
            info = TensorInfo(name, datatype, tuple(int(d) for d in self.engine.get_tensor_shape(name)))
            (inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(info)
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        # profiles[k][input] = (min, max) shapes
        self._profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = []
        for k in range(self.engine.num_optimization_profiles):
            prof = {}
            for t in self.inputs:
                lo, _opt, hi = self.engine.get_tensor_profile_shape(t.name, k)
                prof[t.name] = (tuple(lo), tuple(hi))
            self._profiles.append(prof)
        self._instances: queue.SimpleQueue[_Instance] = queue.SimpleQueue()
        self._all: list[_Instance] = []
        self._lock = threading.Lock()
        for _ in range(max(1, config.instance_group.count)):
            context = self.engine.create_execution_context()
            if context is None:
                self.close()
                raise RuntimeLoadError("TensorRT could not create an execution context (out of GPU memory?)")
            stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
            inst = _Instance(context, stream)
            self._all.append(inst)
            self._instances.put(inst)
        log.info("loaded %s: %d profile(s), %d context(s) on GPU %d (%s)", model_file, len(self._profiles),
                 len(self._all), self.device, here["name"])

    @staticmethod
    def _check_sidecar(model_file: Path, trt_version: str, here: dict[str, str]) -> None:
        path = model_file.with_name(model_file.name + SIDECAR_SUFFIX)
        if not path.is_file():
            log.warning("%s has no %s; cannot check the engine's TensorRT version and GPU", model_file, path.name)
            return
        try:
            built = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeLoadError(f"{path.name} is unreadable: {exc}") from exc
        problems = []
        if built.get("tensorrt_version") and built["tensorrt_version"] != trt_version:
            problems.append(f"TensorRT {built['tensorrt_version']} (this machine: {trt_version})")
        if built.get("gpu_name") and built["gpu_name"] != here["name"]:
            problems.append(f"GPU '{built['gpu_name']}' (this machine: '{here['name']}')")
        if built.get("compute_capability") and built["compute_capability"] != here["compute_capability"]:
            problems.append(f"compute capability {built['compute_capability']} (this machine: {here['compute_capability']})")
        if problems:
            raise RuntimeLoadError(
                f"{model_file.name} was built for " + ", ".join(problems)
                + "; TensorRT engines only run where they were built: rebuild with `kiln compile NAME --target tensorrt`"
            )

    def _choose_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        for k, prof in enumerate(self._profiles):
            if all(
                len(shapes[n]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[n], hi))
                for n, (lo, hi) in prof.items()
            ):
                return k
        ranges = "; ".join(
            f"profile {k}: " + ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, hi) in p.items())
            for k, p in enumerate(self._profiles)
        )
        got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise RuntimeExecutionError(f"input shapes {got} fit no optimization profile ({ranges})")

    def _buffer(self, inst: _Instance, name: str, nbytes: int) -> int:
        ptr, size = inst.buffers.get(name, (0, 0))
        if size >= nbytes and ptr:
            return ptr
        if ptr:
            _check(self._cudart.cudaFree(ptr), "cudaFree")
        new = int(_check(self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
        inst.buffers[name] = (new, max(nbytes, 1))
        return new

    def infer(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        inst = self._instances.get()
        try:
            with execution_errors():
                _check(cudart.cudaSetDevice(self.device), "cudaSetDevice")  # the current device is per thread
                arrays = {}
                for t in self.inputs:
                    arr = inputs[t.name]
                    want = self._np_dtypes[t.name]
                    if arr.dtype != want:
                        arr = arr.astype(want)
                    arrays[t.name] = np.ascontiguousarray(arr)
                profile = self._choose_profile({n: a.shape for n, a in arrays.items()})
                ctx = inst.context
                if profile != inst.profile:
                    if not ctx.set_optimization_profile_async(profile, inst.stream):
                        raise RuntimeExecutionError(f"cannot switch to optimization profile {profile}")
                    inst.profile = profile
                for name, arr in arrays.items():
                    if not ctx.set_input_shape(name, arr.shape):
                        raise RuntimeExecutionError(f"TensorRT rejected shape {list(arr.shape)} for input '{name}'")
                    ptr = self._buffer(inst, name, arr.nbytes)
                    ctx.set_tensor_address(name, ptr)
                    _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, inst.stream), "cudaMemcpyAsync")
                results: dict[str, np.ndarray] = {}
                for t in self.outputs:
                    shape = tuple(int(d) for d in ctx.get_tensor_shape(t.name))
                    if any(d < 0 for d in shape):
                        raise RuntimeExecutionError(f"output '{t.name}' shape {list(shape)} is unresolved")
                    out = np.empty(shape, dtype=self._np_dtypes[t.name])
                    ctx.set_tensor_address(t.name, self._buffer(inst, t.name, out.nbytes))
                    results[t.name] = out
                if not ctx.execute_async_v3(inst.stream):
                    raise RuntimeExecutionError("TensorRT execute_async_v3 failed (see the TensorRT log)")
                for name, out in results.items():
                    ptr = inst.buffers[name][0]
                    _check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, inst.stream), "cudaMemcpyAsync")
                _check(cudart.cudaStreamSynchronize(inst.stream), "cudaStreamSynchronize")
                names = list(output_names) or [t.name for t in self.outputs]
                return {n: results[n] for n in names}
        finally:
            self._instances.put(inst)

    def close(self) -> None:
        with self._lock:
            instances, self._all = self._all, []
        for inst in instances:
            for ptr, _ in inst.buffers.values():
                try:
                    self._cudart.cudaFree(ptr)
                except Exception:  # best effort at teardown
                    pass
            try:
                self._cudart.cudaStreamDestroy(inst.stream)
            except Exception:
                pass
            inst.context = None
        self.engine = None
