"""The client side of `kiln infer` and `kiln models`, over the project's own generated stubs."""

from __future__ import annotations

import json
import sys

import grpc
import numpy as np

from server.channels import ClientSecurity
from server.codec import serialize_bytes
from server.datatypes import NUMPY_DTYPES, numpy_to_datatype
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc


class Connection:
    """A stub plus the call metadata (bearer token) every call carries."""

    def __init__(self, channel: grpc.Channel, metadata=()) -> None:
        self.channel = channel
        self.stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.metadata = tuple(metadata)

    def call(self, method: str, request, timeout: float):
        return getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()


MAX_ATTEMPTS = 5  # gRPC caps a retry policy's maxAttempts at 5


def service_config(retries: int = 0, round_robin: bool = False) -> str:
    """gRPC service config for talking to replicas.

    round_robin: spread calls over every address the target resolves to (e.g.
    "ipv4:10.0.0.1:8001,10.0.0.2:8001" or a headless Service's DNS name) instead of pinning to one,
    and skip a replica whose health service "" is not SERVING (loading, or draining after SIGTERM).
    retries: retry a call answered UNAVAILABLE (a draining or full replica, a balancer that lost
    its upstream) with back-off; inference has no side effects, so a retry is safe. CANCELLED is
    retried too: a call that reaches a server in the instant its port closes is answered
    CANCELLED, not UNAVAILABLE (grpc/grpc#41785). A cancel by the caller itself is never retried.
    """
    if not 0 <= retries < MAX_ATTEMPTS:
        raise ValueError(f"retries must be in [0, {MAX_ATTEMPTS - 1}], got {retries}")
    config: dict = {}
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": ""}
    if retries:
        config["methodConfig"] = [{
            "name": [{"service": "inference.GRPCInferenceService"}],
            "retryPolicy": {
                "maxAttempts": retries + 1,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }]
    return json.dumps(config)


def connect(url: str, security: ClientSecurity = ClientSecurity(), retries: int = 0, round_robin: bool = False) -> Connection:
    """A connection to a kiln server: plaintext, or TLS as `security` says (mutual with a client certificate)."""
    options = [("grpc.service_config", service_config(retries, round_robin)), ("grpc.enable_retries", 1)]
    return Connection(security.channel(url, options), security.metadata)


def _connect(args, command: str) -> Connection | None:
    """None (after saying why on stderr) when the TLS or token files are unusable."""
    try:
        security = ClientSecurity.from_args(args)
    except (OSError, ValueError) as exc:
        print(f"kiln {command}: {exc}", file=sys.stderr)
        return None
    return connect(args.url, security, args.retries, args.round_robin)


def random_input(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """Valid random values of a v2 datatype."""
    if datatype == "BYTES":
        return np.array([b"kiln"] * int(np.prod(shape)), dtype=object).reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, 10, shape).astype(dtype)


def build_request(model: str, arrays: dict[str, np.ndarray], version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in arrays.items():
        datatype = numpy_to_datatype(array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        raw = serialize_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
        request.raw_input_contents.append(raw)
    return request


def response_arrays(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    from server.codec import deserialize_bytes

    arrays = {}
    for output, raw in zip(response.outputs, response.raw_output_contents):
        shape = tuple(output.shape)
        if output.datatype == "BYTES":
            arrays[output.name] = deserialize_bytes(output.name, raw, int(np.prod(shape))).reshape(shape)
        else:
            arrays[output.name] = np.frombuffer(raw, dtype=NUMPY_DTYPES[output.datatype]).reshape(shape)
    return arrays


def infer_command(args) -> int:
    connection = _connect(args, "infer")
    if connection is None:
        return 2
    try:
        meta = connection.call(
            "ModelMetadata", pb.ModelMetadataRequest(name=args.model, version=args.model_version), args.timeout
        )
        files = dict(item.split("=", 1) for item in args.input)
        rng = np.random.default_rng()
        arrays = {}
        for tensor in meta.inputs:
            if tensor.name in files:
                arrays[tensor.name] = np.load(files.pop(tensor.name), allow_pickle=False)
            else:
                shape = [args.batch_size if (i == 0 and d == -1) else (d if d > 0 else 1) for i, d in enumerate(tensor.shape)]
                arrays[tensor.name] = random_input(tensor.datatype, shape, rng)
        if files:
            print(f"kiln infer: model '{args.model}' has no input(s) {sorted(files)}", file=sys.stderr)
            return 2
        response = connection.call("ModelInfer", build_request(args.model, arrays, args.model_version), args.timeout)
    except grpc.RpcError as exc:
        print(f"kiln infer: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"model {response.model_name} version {response.model_version}")
    with np.printoptions(precision=5, suppress=True, threshold=64):
        for name, array in response_arrays(response).items():
            print(f"{name} {array.dtype} {list(array.shape)}:\n{array}")
    return 0


def models_command(args) -> int:
    connection = _connect(args, "models")
    if connection is None:
        return 2
    try:
        index = connection.call("RepositoryIndex", pb.RepositoryIndexRequest(), 10)
    except grpc.RpcError as exc:
        print(f"kiln models: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    rows = [("MODEL", "VERSION", "STATE", "REASON")] + [(m.name, m.version or "-", m.state, m.reason) for m in index.models]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + ("  " + row[3] if row[3] else ""))
    return 0
