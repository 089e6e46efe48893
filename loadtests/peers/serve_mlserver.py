"""Serve one ONNX model with MLServer 1.7 (custom onnxruntime runtime, adaptive batching).

    loadtests/peers/.venvs/mlserver/bin/python loadtests/peers/serve_mlserver.py \
        --model model_repo/mlp/1/model.onnx --name mlp --grpc-port 8021

Inputs/outputs are declared from the ONNX file (leading dim = batch), so ModelMetadata
answers as kiln bench needs. --max-batch-size 0 turns adaptive batching off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_ORT_TO_V2 = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}


def tensors(items) -> list[dict]:
    return [{"name": t.name, "datatype": _ORT_TO_V2[t.type], "shape": [-1, *t.shape[1:]]} for t in items]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--name", default="mlp")
    ap.add_argument("--grpc-port", type=int, default=8021)
    ap.add_argument("--http-port", type=int, default=0, help="(default: grpc port + 1000)")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-batch-time", type=float, default=0.0005, help="seconds adaptive batching waits (default: 0.0005)")
    ap.add_argument("--intra-op-threads", type=int, default=1, help="ORT intra-op threads, 0 = ORT's default (default: 1)")
    ap.add_argument("--parallel-workers", type=int, default=0, help="MLServer inference worker processes (default: 0, in the server process)")
    args = ap.parse_args()
    import onnxruntime as ort

    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    folder = Path(tempfile.mkdtemp(prefix="kiln-peer-mlserver-"))
    (folder / args.name).mkdir()
    settings = {
        "grpc_port": args.grpc_port,
        "http_port": args.http_port or args.grpc_port + 1000,
        "metrics_endpoint": None,
        "parallel_workers": args.parallel_workers,
        "load_models_at_startup": True,
        "debug": False,
    }
    model_settings = {
        "name": args.name,
        "implementation": "mlserver_runtime.OnnxModel",
        "inputs": tensors(session.get_inputs()),
        "outputs": tensors(session.get_outputs()),
        "parameters": {"uri": str(args.model.resolve()), "version": "1", "extra": {"intra_op_threads": args.intra_op_threads}},
    }
    if args.max_batch_size > 1:
        model_settings["max_batch_size"] = args.max_batch_size
        model_settings["max_batch_time"] = args.max_batch_time
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / args.name / "model-settings.json").write_text(json.dumps(model_settings))
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    mlserver = Path(sys.executable).with_name("mlserver")
    os.execve(str(mlserver), [str(mlserver), "start", str(folder)], env)


if __name__ == "__main__":
    sys.exit(main())
