"""AOTInductor packages (model.pt2, built by `kiln compile --target aoti`): CPU, and CUDA where available.

torch is imported when a torch_aoti model loads (never at server start). The
compiled C++ runs with the GIL released (the package loader's ``run``; note that
``AOTICompiledModel.__call__`` holds it), so instance threads execute in parallel;
``num_runners`` = instance_group count lets that many run at once.

IO: names, datatypes and shapes come from ``model.pt2.json`` (written by
`kiln compile`) or, without it, from the config; inputs are passed positionally
in that order. numpy -> torch with ``torch.from_numpy`` (no copy on CPU), and
outputs go back with ``Tensor.numpy()`` (no copy on CPU).
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from server.model_types import ModelConfig
from server.runtime.base import (
    RuntimeExecutionError,
    RuntimeLoadError,
    TensorInfo,
    execution_errors,
    worker_cpu_share,
)

log = logging.getLogger("kiln.runtime.torch_aoti")

SIDECAR_SUFFIX = ".json"  # model.pt2 -> model.pt2.json
_SUPPORTED = {"BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}

# The data plane hands over read-only views of request buffers; the runtime never writes to its
# inputs, so torch's warning about non-writable arrays is noise (and would fire per request).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def _infos_from_config(config: ModelConfig) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    lead = (-1,) if config.batching else ()
    return (
        tuple(TensorInfo(t.name, t.datatype, lead + t.dims) for t in config.inputs),
        tuple(TensorInfo(t.name, t.datatype, lead + t.dims) for t in config.outputs),
    )


class _DirectRunner:
    """Runs the package's compiled library through its C ABI with ctypes, which releases the GIL.

    torch 2.13's Python bindings (AOTICompiledModel.__call__ -> loader.boxed_run, and
    loader.run) hold the GIL for the whole call, so instance threads would serialise.
    The .pt2 is a zip holding ``<model>/data/aotinductor/<model>/*.so`` (weights embedded
    by default) and, for CUDA, kernel binaries beside it. We extract it, create a model
    container (AOTInductorModelContainerCreateWithDevice) and call
    AOTInductorModelContainerRun with tensor handles made by torch._C._aoti. Packages
    with weights outside the .so are left to torch's loader.
    """

    def __init__(self, lib, handle, tmpdir, num_outputs: int, torch_mod) -> None:
        self._lib = lib
        self._handle = handle
        self._tmpdir = tmpdir
        self._num_outputs = num_outputs
        self._torch = torch_mod

    @classmethod
    def create(cls, model_file: Path, device: str, device_index: int, num_models: int) -> "_DirectRunner | None":
        import ctypes
        import tempfile
        import zipfile

        import torch

        if not hasattr(torch._C, "_aoti") or not hasattr(torch._C._aoti, "unsafe_alloc_void_ptrs_from_tensors"):
            return None
        tmp = tempfile.TemporaryDirectory(prefix="kiln-aoti-")
        try:
            with zipfile.ZipFile(model_file) as zf:
                names = zf.namelist()
                libs = [n for n in names if n.endswith(".so") and "/data/aotinductor/" in n]
                weights = [n for n in names if "/data/weights/" in n or "/data/constants/" in n]
                if len(libs) != 1 or weights:
                    return None
                zf.extractall(tmp.name, [n for n in names if "/data/aotinductor/" in n])
            so_path = Path(tmp.name) / libs[0]
            lib = ctypes.CDLL(str(so_path))
            for fn in ("AOTInductorModelContainerCreateWithDevice", "AOTInductorModelContainerRun",
                       "AOTInductorModelContainerGetNumOutputs", "AOTInductorModelContainerDelete"):
                getattr(lib, fn).restype = ctypes.c_int32
            handle = ctypes.c_void_p()
            device_str = f"cuda:{device_index}" if device == "cuda" else "cpu"
            rc = lib.AOTInductorModelContainerCreateWithDevice(
                ctypes.byref(handle), ctypes.c_size_t(num_models), ctypes.c_char_p(device_str.encode()),
                ctypes.c_char_p(str(so_path.parent).encode() if device == "cuda" else None),
            )
            if rc != 0 or not handle.value:
                return None
            n_out = ctypes.c_size_t()
            if lib.AOTInductorModelContainerGetNumOutputs(handle, ctypes.byref(n_out)) != 0:
                lib.AOTInductorModelContainerDelete(handle)
                return None
            return cls(lib, handle, tmp, n_out.value, torch)
        except Exception as exc:  # anything unexpected in the package layout: use torch's loader
            log.warning("cannot run %s directly (%s); using torch's loader", model_file, exc)
            tmp.cleanup()
            return None

    def run(self, tensors: list) -> list:
        import ctypes

        aoti = self._torch._C._aoti
        capsules = aoti.unsafe_alloc_void_ptrs_from_tensors(tensors)  # new handles; Run steals them
        ins = (ctypes.c_void_p * len(capsules))(*[_capsule_pointer(c) for c in capsules])
        outs = (ctypes.c_void_p * self._num_outputs)()
        # ctypes drops the GIL for the duration of the foreign call
        rc = self._lib.AOTInductorModelContainerRun(
            self._handle, ins, ctypes.c_size_t(len(capsules)), outs, ctypes.c_size_t(self._num_outputs), None, None
        )
        if rc != 0:
            raise RuntimeExecutionError(f"AOTInductorModelContainerRun failed (code {rc}); see the log for details")
        return aoti.alloc_tensors_by_stealing_from_void_ptrs([_capsule_new(p) for p in outs])

    def close(self) -> None:
        if self._handle is not None:
            self._lib.AOTInductorModelContainerDelete(self._handle)
            self._handle = None
        self._tmpdir.cleanup()


@functools.lru_cache(maxsize=1)
def _capsule_api():
    import ctypes

    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return get_name, get_pointer, new


def _capsule_pointer(capsule) -> int:
    get_name, get_pointer, _ = _capsule_api()
    return get_pointer(capsule, get_name(capsule))


def _capsule_new(pointer) -> object:
    return _capsule_api()[2](pointer, None, None)


def _flat(result) -> list:
    return list(result) if isinstance(result, (tuple, list)) else [result]


class TorchAotiRuntime:
    def __init__(self, model_file: Path, config: ModelConfig) -> None:
        try:
            import torch
            from torch._inductor.package import load_package
        except ImportError as exc:
            raise RuntimeLoadError(f"backend torch_aoti needs PyTorch: pip install 'kiln-serve[torch]' ({exc})") from exc
        self._torch = torch
        if share := worker_cpu_share():  # in `--workers N`: this worker's cores, not the machine's
            torch.set_num_threads(share)
        sidecar_path = model_file.with_name(model_file.name + SIDECAR_SUFFIX)
        sidecar: dict = {}
        if sidecar_path.is_file():
            try:
                sidecar = json.loads(sidecar_path.read_text())
                self.inputs = tuple(TensorInfo(t["name"], t["datatype"], tuple(t["shape"])) for t in sidecar["inputs"])
                self.outputs = tuple(TensorInfo(t["name"], t["datatype"], tuple(t["shape"])) for t in sidecar["outputs"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise RuntimeLoadError(f"{sidecar_path.name} is unreadable: {exc}") from exc
        else:
            if not config.inputs or not config.outputs:
                raise RuntimeLoadError(
                    f"{model_file.name} has no {sidecar_path.name} and the config declares no inputs/outputs; "
                    "declare them in config.pbtxt (in forward() order) or rebuild with `kiln compile --target aoti`"
                )
            self.inputs, self.outputs = _infos_from_config(config)
        bad = [t.name for t in (*self.inputs, *self.outputs) if t.datatype not in _SUPPORTED]
        if bad:
            raise RuntimeLoadError(f"torch_aoti cannot carry tensors {bad} (datatypes {sorted(_SUPPORTED)} only)")

        built_for = sidecar.get("device", "")
        kind = config.instance_group.kind
        cuda = torch.cuda.is_available()
        if kind == "KIND_GPU" or (kind == "KIND_AUTO" and built_for == "cuda"):
            if not cuda:
                raise RuntimeLoadError(
                    "this torch_aoti model needs a CUDA device (instance_group KIND_GPU or a package compiled for "
                    "cuda) and PyTorch sees none; recompile with `kiln compile NAME --target aoti --device cpu`"
                )
            device = "cuda"
        else:
            device = "cpu"
        if built_for and built_for != device:
            raise RuntimeLoadError(
                f"{model_file.name} was compiled for {built_for} but this model runs on {device} "
                f"(instance_group {kind}); recompile with `kiln compile NAME --target aoti --device {device}`"
            )
        gpu = config.instance_group.gpus[0] if (device == "cuda" and config.instance_group.gpus) else -1
        self.device = torch.device("cuda", max(gpu, 0)) if device == "cuda" else torch.device("cpu")
        try:
            self._model = load_package(
                str(model_file), num_runners=max(1, config.instance_group.count), device_index=gpu
            )
        except Exception as exc:
            raise RuntimeLoadError(f"cannot load AOTInductor package {model_file.name}: {type(exc).__name__}: {exc}") from exc
        try:
            meta = self._model.get_metadata()
        except Exception:  # metadata is informative only
            meta = {}
        if meta.get("AOTI_DEVICE_KEY") and meta["AOTI_DEVICE_KEY"] != device:
            raise RuntimeLoadError(
                f"{model_file.name} was compiled for {meta['AOTI_DEVICE_KEY']} but this model runs on {device}"
            )
        self._input_names = [t.name for t in self.inputs]
        self._direct: _DirectRunner | None = None
        self._run = lambda args: _flat(self._model(*args))  # holds the GIL (boxed_run)
        if config.parameters.get("aoti_release_gil", "true").lower() not in ("0", "false", "no"):
            self._direct = _DirectRunner.create(model_file, device, max(gpu, 0), max(1, config.instance_group.count))
            if self._direct is not None and self._self_check():
                self._run = self._direct.run
                self._model = None  # the container of _DirectRunner holds the weights now
            elif self._direct is not None:
                self._direct.close()
                self._direct = None
        if self._direct is None:
            log.warning("%s: running through AOTICompiledModel, which holds the GIL during execution", model_file)
        self._input_names = [t.name for t in self.inputs]
        self._output_names = [t.name for t in self.outputs]
        log.info("loaded %s on %s (%d runner(s), GIL released: %s)", model_file, self.device,
                 max(1, config.instance_group.count), self._direct is not None)

    def _example(self) -> list:
        """Zeros of the declared shapes with every -1 dim as 1 (zeros are valid ids/masks too)."""
        torch = self._torch
        from server.datatypes import NUMPY_DTYPES

        tensors = []
        for t in self.inputs:
            shape = tuple(1 if d < 0 else d for d in t.shape)
            tensors.append(torch.from_numpy(np.zeros(shape, NUMPY_DTYPES[t.datatype])).to(self.device))
        return tensors

    def _self_check(self) -> bool:
        """The direct (GIL-releasing) path must give exactly what torch's own loader gives."""
        torch = self._torch
        try:
            with torch.inference_mode():
                expected = _flat(self._model(*self._example()))
                got = self._direct.run(self._example())
            ok = len(got) == len(expected) and all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, expected))
        except Exception as exc:  # any failure: keep torch's loader
            log.warning("direct AOTInductor runner failed its self-check (%s); falling back", exc)
            return False
        if not ok:
            log.warning("direct AOTInductor runner disagrees with torch's loader; falling back")
        return ok

    def infer(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        with execution_errors():
            args = []
            for name in self._input_names:
                arr = inputs[name]
                if not arr.flags.c_contiguous:
                    arr = np.ascontiguousarray(arr)
                tensor = torch.from_numpy(arr)
                if self.device.type != "cpu":
                    tensor = tensor.to(self.device, non_blocking=False)
                args.append(tensor)
            with torch.inference_mode():
                outs = self._run(args)
            if len(outs) != len(self._output_names):
                raise RuntimeExecutionError(
                    f"the package returned {len(outs)} outputs, expected {len(self._output_names)} {self._output_names}"
                )
            by_name = dict(zip(self._output_names, outs))
            names = list(output_names) or self._output_names
            return {n: by_name[n].detach().cpu().numpy() for n in names}

    def close(self) -> None:
        self._model = None
        if self._direct is not None:
            self._direct.close()
            self._direct = None
