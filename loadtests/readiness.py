"""Waiting for a server a load tool started: ready on every worker, or an error that shows its log."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc

from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc
from server.workers import WORKER_METADATA  # a peer server sends none: it counts as one worker


def wait_ready(url: str, proc: subprocess.Popen, *, model: str | None = None, workers: int = 1,
               timeout: float = 120.0, log_path: Path | None = None) -> None:
    """Return once `url` answers ready (ModelReady of `model`, else ServerReady) from `workers` distinct
    kiln workers; RuntimeError if `proc` exits first or `timeout` passes.

    Each try opens a fresh connection: with `kiln serve --workers N` one connection lands on one
    worker, and a worker that is up says nothing about one still loading its models."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}{_log_tail(log_path)}")
        worker = _ready_worker(url, model, ask_index=workers > 1)
        if worker is not None:
            seen.add(worker)
            if len(seen) >= workers:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url}: {model or 'server'} not ready on {workers} worker(s) after {timeout:g} s"
                       f"{_log_tail(log_path)}")


def _ready_worker(url: str, model: str | None, ask_index: bool) -> str | None:
    """The index of the worker that answered ready on a new connection ("0" for a single process, or
    when not asked), or None when it is not ready."""
    with grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            if model:
                ready = stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1).ready
            else:
                ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready
            if not ready or not ask_index:
                return "0" if ready else None
            _, call = stub.ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=1)
        except grpc.RpcError:
            return None
    return dict(call.trailing_metadata() or ()).get(WORKER_METADATA, "0")


def _log_tail(log_path: Path | None, chars: int = 2000) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return f"; log {log_path}:\n{log_path.read_text(errors='replace')[-chars:]}"
