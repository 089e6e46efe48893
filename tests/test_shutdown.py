"""Graceful shutdown of a real `kiln serve` process under load: SIGTERM -> health NOT_SERVING at once,
new requests UNAVAILABLE, every request accepted before the signal completes, exit code 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtests.ports import free_port
from onnx_models import slow_identity_model, write_config
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc
from test_cli import Serve

WIDTH = 256
DEPTH = 60  # MatMuls per execution: a few ms of real compute per batch, so work is in flight at the signal


def slow_repo(root: Path) -> Path:
    slow_identity_model(root / "slow" / "1" / "model.onnx", [WIDTH], DEPTH)
    write_config(root / "slow", f"""
name: "slow"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
""")
    return root


def test_sigterm_under_load_loses_no_accepted_request(tmp_path):
    repo = slow_repo(tmp_path / "repo")
    port = free_port()
    serve = Serve(["--model-repository", str(repo), "--grpc-port", str(port), "--metrics-port", "-1",
                   "--grace-period", "20"], tmp_path, port)
    records: list[tuple[float, float, object, str]] = []  # (sent, done, code or None, details)
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(serve.url) as own:
            stub = pb_grpc.GRPCInferenceServiceStub(own)
            while not stop.is_set():
                x = rng.standard_normal((1 + seed % 4, WIDTH)).astype(np.float32)
                request = pb.ModelInferRequest(model_name="slow")
                request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
                request.raw_input_contents.append(x.tobytes())
                sent = time.monotonic()
                details = ""
                try:
                    response = stub.ModelInfer(request, timeout=30)
                    y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(x.shape)
                    outcome = None if np.array_equal(y, x) else "wrong output"
                except grpc.RpcError as error:
                    outcome, details = error.code(), error.details() or ""
                    if outcome == grpc.StatusCode.UNAVAILABLE:
                        time.sleep(0.02)  # refused: the server is going away
                with lock:
                    records.append((sent, time.monotonic(), outcome, details))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    try:
        serve.wait_ready()
        channel = grpc.insecure_channel(serve.url)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        signalled = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)
        statuses = []
        try:
            for response in watch:  # the open watch sees NOT_SERVING at once
                statuses.append((time.monotonic() - signalled, response.status))
                if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
        except grpc.RpcError:
            pass
        watch.cancel()
        # a probe's Check answers NOT_SERVING while the accepted requests drain (or the port is already closed)
        try:
            probe = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
        except grpc.RpcError as error:
            probe = error.code()
        returncode = serve.process.wait(25)
        stop.set()
        for thread in threads:
            thread.join(30)
        channel.close()

        assert returncode == 0, serve.output()
        assert statuses and statuses[-1][1] == health_pb2.HealthCheckResponse.NOT_SERVING, statuses
        assert statuses[-1][0] < 1.0, statuses
        # (or the port is closing/closed: the call is cancelled or refused by gRPC itself)
        assert probe in (health_pb2.HealthCheckResponse.NOT_SERVING, grpc.StatusCode.UNAVAILABLE,
                         grpc.StatusCode.CANCELLED), probe
        before = [r for r in records if r[0] < signalled]
        assert len([r for r in before if r[2] is None]) > 20, "too little load before the signal"
        in_flight = [r for r in before if r[1] > signalled and r[2] is None]
        assert in_flight, "no accepted request was in flight at the signal"
        # Every request sent before the signal was served correctly, or refused UNAVAILABLE by kiln ("shutting
        # down": it reached the server after the signal). Nothing accepted is lost.
        lost = [(s - signalled, d - signalled, c, m) for s, d, c, m in before
                if c is not None and not (c == grpc.StatusCode.UNAVAILABLE and "shutting down" in m)]
        assert not lost, f"{len(lost)} of {len(before)} requests sent before SIGTERM failed: {lost[:5]}"
        # Requests sent after it: refused UNAVAILABLE while the server drains; once the port closes, a call
        # that reaches it in that instant is cancelled by gRPC itself (never one kiln had accepted).
        after = [r for r in records if r[0] >= signalled]
        assert {r[2] for r in after} <= {None, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, after[:5]
        # kiln refused while its port still answered, and closed the port only after the drain: no call
        # was cancelled before the last accepted request had its answer (50 ms: client threads' timestamps)
        assert any(c == grpc.StatusCode.UNAVAILABLE and "shutting down" in m for _, _, c, m in records), after[:5]
        last_answer = max(d for _, d, c, _ in records if c is None)
        cancelled = [r for r in after if r[2] == grpc.StatusCode.CANCELLED]
        assert all(d > last_answer - 0.05 for _, d, _, _ in cancelled), (last_answer - signalled, cancelled[:5])
        assert "shutting down" in serve.output() and "stopped" in serve.output()
    finally:
        stop.set()
        serve.close()
