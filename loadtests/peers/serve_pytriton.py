"""Serve one ONNX model with PyTriton 0.7: Triton's server (bundled in the wheel) + a Python
binding that runs an onnxruntime session, with Triton's dynamic batcher in front.

    LD_LIBRARY_PATH=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))') \
    loadtests/peers/.venvs/pytriton/bin/python loadtests/peers/serve_pytriton.py \
        --model model_repo/mlp/1/model.onnx --name mlp --grpc-port 8031

The statistics endpoint is left unprotected (PyTriton 0.7 token-protects it by default),
so `kiln bench` and perf_analyzer can read ModelStatistics as they do from kiln.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--name", default="mlp")
    ap.add_argument("--grpc-port", type=int, default=8031)
    ap.add_argument("--http-port", type=int, default=0, help="(default: grpc port + 1000)")
    ap.add_argument("--metrics-port", type=int, default=0, help="(default: grpc port + 2000)")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-queue-delay-us", type=int, default=0, help="dynamic batcher delay (default: 0, as kiln's mlp)")
    ap.add_argument("--intra-op-threads", type=int, default=1, help="ORT intra-op threads, 0 = ORT's default (default: 1)")
    ap.add_argument("--instances", type=int, default=1, help="model instances (default: 1)")
    args = ap.parse_args()

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.intra_op_threads  # compare.py passes what kiln's config.pbtxt says
    session = ort.InferenceSession(str(args.model), sess_options=options, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]

    def make_infer():
        @batch
        def infer(**inputs):
            results = session.run(output_names, {name: inputs[name] for name in input_names})
            return dict(zip(output_names, results))

        return infer

    # PyTriton runs one model instance per callable; they share the session, as kiln's instances do
    infer_funcs = [make_infer() for _ in range(max(args.instances, 1))]

    config = TritonConfig(
        grpc_port=args.grpc_port,
        http_port=args.http_port or args.grpc_port + 1000,
        metrics_port=args.metrics_port or args.grpc_port + 2000,
        grpc_address="127.0.0.1",
        http_address="127.0.0.1",
    )
    security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])
    batcher = DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us) if args.max_batch_size > 1 else None
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer_funcs,
            inputs=[Tensor(name=t.name, dtype=_ORT_TO_NUMPY[t.type], shape=tuple(t.shape[1:])) for t in session.get_inputs()],
            outputs=[Tensor(name=t.name, dtype=_ORT_TO_NUMPY[t.type], shape=tuple(t.shape[1:])) for t in session.get_outputs()],
            config=ModelConfig(max_batch_size=max(args.max_batch_size, 1), batcher=batcher),
            strict=False,
        )
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print(f"pytriton: {args.model} as '{args.name}' on 127.0.0.1:{args.grpc_port}", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
