"""kiln: a production inference server speaking the KServe v2 / Triton gRPC protocol."""

from server import grpc_experiments as _grpc_experiments

_grpc_experiments.apply()  # before any module imports grpc: it reads them once, when it loads

__version__ = "0.1.0"
