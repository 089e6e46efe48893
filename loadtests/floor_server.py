"""The floor: a bare v2 GRPCInferenceService servicer for one ONNX model, nothing else.

    python loadtests/floor_server.py --model model_repo/mlp/1/model.onnx --port 8011

ModelInfer does what any Python gRPC server must do and no more: np.frombuffer the
raw inputs, session.run inline on the event loop, encode raw outputs; ModelStreamInfer
does the same for each message of a stream, in turn. No validation,
no batching, no thread hand-off, no metrics. ServerMetadata, ModelMetadata and
ModelConfig (off the request path) describe it, so that perf_analyzer can measure it
too. Its latency is the cost of Python gRPC plus ONNX Runtime; loadtests/latency_floor.py
measures kiln against it. It runs on the event loop kiln runs on (--event-loop, default
uvloop where installed), so the two compare like with like.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for the generated stubs

from server import eventloop
from server.datatypes import NUMPY_DTYPES, datatype_to_config_type
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc
from server.protocol import model_config_pb2 as mc

# ONNX Runtime type strings -> v2 datatypes (the ones a floor model needs)
_ORT_TO_V2 = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}


class FloorService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model_path: str, name: str, intra_op_threads: int = 1, max_batch_size: int = 64) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads  # 1: as model_repo/mlp/config.pbtxt
        self.session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
        self.name = name
        self.max_batch_size = max_batch_size  # what ModelConfig reports; nothing enforces it
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_types = [_ORT_TO_V2[o.type] for o in self.session.get_outputs()]

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="kiln-floor", version="0")

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    def _tensors(self, kind: str) -> list[tuple[str, str, list[int]]]:
        """(name, v2 datatype, shape) of the session's inputs or outputs; ORT names dynamic dims
        with strings: -1 in v2."""
        tensors = self.session.get_inputs() if kind == "inputs" else self.session.get_outputs()
        return [(t.name, _ORT_TO_V2[t.type], [d if isinstance(d, int) else -1 for d in t.shape]) for t in tensors]

    async def ModelMetadata(self, request, context):
        response = pb.ModelMetadataResponse(name=self.name, versions=["1"], platform="onnxruntime_onnx")
        for kind in ("inputs", "outputs"):
            for name, datatype, shape in self._tensors(kind):
                getattr(response, kind).add(name=name, datatype=datatype, shape=shape)
        return response

    async def ModelConfig(self, request, context):
        """A dynamic first dimension is the batch dimension, as in a Triton config; the floor
        does not batch, it runs whatever batch a request brings."""
        inputs, outputs = self._tensors("inputs"), self._tensors("outputs")
        batched = all(shape and shape[0] == -1 for _, _, shape in inputs + outputs)
        config = mc.ModelConfig(name=self.name, platform="onnxruntime_onnx",
                                max_batch_size=self.max_batch_size if batched else 0)
        for kind, target in ((inputs, config.input), (outputs, config.output)):
            for name, datatype, shape in kind:
                target.add(name=name, data_type=datatype_to_config_type(datatype), dims=shape[1:] if batched else shape)
        return pb.ModelConfigResponse(config=config)

    def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        feeds = {
            tensor.name: np.frombuffer(raw, dtype=NUMPY_DTYPES[tensor.datatype]).reshape(tensor.shape)
            for tensor, raw in zip(request.inputs, request.raw_input_contents)
        }
        results = self.session.run(self.output_names, feeds)
        response = pb.ModelInferResponse(model_name=self.name, model_version="1", id=request.id)
        for name, datatype, array in zip(self.output_names, self.output_types, results):
            response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response

    async def ModelInfer(self, request, context):
        return self._infer(request)

    async def ModelStreamInfer(self, request_iterator, context):
        """One request at a time per stream: what a client with one request in flight per stream needs."""
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=self._infer(request))


async def serve(model: str, name: str, host: str, port: int, intra_op_threads: int, max_batch_size: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(FloorService(model, name, intra_op_threads, max_batch_size), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    print(f"floor server: {model} on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model_repo/mlp/1/model.onnx")
    parser.add_argument("--name", default="mlp", help="model name reported in responses")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--intra-op-threads", type=int, default=1, help="ORT intra-op threads, 0 = ORT's default (default: 1)")
    parser.add_argument("--max-batch-size", type=int, default=64,
                        help="max_batch_size ModelConfig reports for a model with a dynamic batch dimension (default: 64)")
    parser.add_argument("--event-loop", choices=eventloop.CHOICES, default="auto")
    args = parser.parse_args()
    eventloop.run(serve(args.model, args.name, args.host, args.port, args.intra_op_threads, args.max_batch_size),
                  args.event_loop)


if __name__ == "__main__":
    main()
