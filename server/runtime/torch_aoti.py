"""AOTInductor packages (model.pt2, built by `kiln compile --target aoti`): CPU, and CUDA where available.

torch is imported when a torch_aoti model loads (never at server start). The
package's compiled C++ runs with the GIL released, so instance threads execute
in parallel; ``num_runners`` = instance_group count lets that many run at once.

IO: names, datatypes and shapes come from ``model.pt2.json`` (written by
`kiln compile`) or, without it, from the config; inputs are passed positionally
in that order. numpy -> torch with ``torch.from_numpy`` (no copy on CPU), and
outputs go back with ``Tensor.numpy()`` (no copy on CPU).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from server.model_types import ModelConfig
from server.runtime.base import RuntimeExecutionError, RuntimeLoadError, TensorInfo

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


class TorchAotiRuntime:
    def __init__(self, model_file: Path, config: ModelConfig) -> None:
        try:
            import torch
            from torch._inductor.package import load_package
        except ImportError as exc:
            raise RuntimeLoadError(f"backend torch_aoti needs PyTorch: pip install 'kiln-serve[torch]' ({exc})") from exc
        self._torch = torch
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
        self._output_names = [t.name for t in self.outputs]
        log.info("loaded %s on %s (%d runner(s))", model_file, self.device, max(1, config.instance_group.count))

    def infer(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        try:
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
                result = self._model(*args)
            outs = list(result) if isinstance(result, (tuple, list)) else [result]
            if len(outs) != len(self._output_names):
                raise RuntimeExecutionError(
                    f"the package returned {len(outs)} outputs, expected {len(self._output_names)} {self._output_names}"
                )
            by_name = dict(zip(self._output_names, outs))
            names = list(output_names) or self._output_names
            return {n: by_name[n].detach().cpu().numpy() for n in names}
        except RuntimeExecutionError:
            raise
        except KeyError as exc:
            raise RuntimeExecutionError(f"unknown tensor {exc}") from exc
        except Exception as exc:
            raise RuntimeExecutionError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._model = None
