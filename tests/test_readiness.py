"""loadtests/readiness.py: the load tools wait for a real server to be ready on every worker, and say
why when it never is."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from conftest import REPO_ROOT, stop_process
from loadtests.ports import free_port
from loadtests.readiness import wait_ready
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc
from server.workers import WORKER_METADATA


def _serve(tmp_path, *args: str) -> tuple[subprocess.Popen, str, object]:
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--grpc-port", str(port),
                                 "--metrics-port", "-1", "--grace-period", "1", *args],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    return proc, f"127.0.0.1:{port}", log_path


def test_returns_once_the_model_is_ready_on_every_worker(tmp_path):
    proc, url, log_path = _serve(tmp_path, "--model-repository", str(REPO_ROOT / "model_repo"), "--workers", "2")
    try:
        wait_ready(url, proc, model="mlp", workers=2, timeout=120, log_path=log_path)
        answered = set()
        for _ in range(20):  # fresh connections are spread over the workers that listen
            with grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                assert stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=5).ready
                _, call = stub.ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=5)
                answered.add(dict(call.trailing_metadata())[WORKER_METADATA])
        assert answered == {"0", "1"}
    finally:
        stop_process(proc)


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    proc, url, log_path = _serve(tmp_path, "--model-repository", str(tmp_path / "no-such-repository"))
    try:
        with pytest.raises(RuntimeError, match=r"exited with [1-9](.|\n)*no-such-repository"):
            wait_ready(url, proc, timeout=60, log_path=log_path)
    finally:
        stop_process(proc)


def test_a_server_that_never_answers_times_out(tmp_path):
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(RuntimeError, match=r"mlp not ready on 1 worker\(s\) after 1 s"):
            wait_ready(f"127.0.0.1:{free_port()}", silent, model="mlp", timeout=1)
    finally:
        stop_process(silent)
