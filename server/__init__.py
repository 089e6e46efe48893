"""kiln: a production inference server speaking the KServe v2 / Triton gRPC protocol."""

__version__ = "0.1.0"
