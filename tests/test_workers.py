"""`kiln serve --workers 2`: a real supervisor and two worker processes on one port.

Requests over several connections land on both workers; ModelStatistics and /metrics add up
over the workers; explicit load/unload reaches every worker; a killed worker is restarted (and
catches up with the loaded models); SIGTERM drains both and exits 0. Plus the pure merge functions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtests.ports import free_port
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc
from server.workers import LOCAL_METADATA, WORKER_METADATA, WORKER_PID_METADATA, merge_metrics, merge_statistics
from test_cli import kiln_env

LOCAL = ((LOCAL_METADATA, "1"),)
CONNECTIONS = 12  # both workers get at least one of 12 connections, but for a 2 * 2^-12 chance
REQUESTS_PER_CONNECTION = 5
TIMEOUT_S = 30


class Connection:
    """One channel on its own TCP connection (so the kernel may hand it to either worker)."""

    def __init__(self, url: str, number: int) -> None:
        self.channel = grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1), ("kiln.test", number)])
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def worker(self) -> tuple[int, int]:
        """(index, pid) of the worker this connection landed on."""
        _, call = self.stub.ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=TIMEOUT_S, wait_for_ready=True)
        trailers = dict(call.trailing_metadata())
        return int(trailers[WORKER_METADATA]), int(trailers[WORKER_PID_METADATA])

    def close(self) -> None:
        self.channel.close()


def infer_request(model: str = "mlp", rows: int = 1) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 256])
    request.raw_input_contents.append(np.ones((rows, 256), np.float32).tobytes())
    return request


def success_count(stub, model: str = "mlp", local: bool = False) -> int:
    response = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), metadata=LOCAL if local else None,
                                    timeout=TIMEOUT_S)
    return sum(s.inference_stats.success.count for s in response.model_stats)


class Workers:
    def __init__(self, repo, tmp_path, extra_args: tuple[str, ...] = ()) -> None:
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = tmp_path / "workers.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--workers", "2", "--model-repository", str(repo),
             "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
             "--model-control-mode", "explicit", "--load-model", "mlp", "--grace-period", "5", *extra_args],
            env=kiln_env(), stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.connections: list[Connection] = []

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def connect(self, count: int) -> dict[int, list[Connection]]:
        """`count` new connections, grouped by the worker each landed on."""
        by_worker: dict[int, list[Connection]] = {}
        for _ in range(count):
            connection = Connection(self.url, len(self.connections))
            self.connections.append(connection)
            by_worker.setdefault(connection.worker()[0], []).append(connection)
        return by_worker

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            by_worker = self.connect(8)
            if len(by_worker) == 2 and all(
                group[0].stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT_S).ready for group in by_worker.values()
            ):
                return
            time.sleep(0.2)
        raise AssertionError("workers not ready:\n" + self.output())

    def metrics(self) -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=TIMEOUT_S) as answer:
            text = answer.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
        }

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    import shutil

    from conftest import BUNDLED_REPO

    tmp = tmp_path_factory.mktemp("workers")
    repo = tmp / "model_repo"
    for name in ("mlp", "digits"):
        shutil.copytree(BUNDLED_REPO / name, repo / name)
    running = Workers(repo, tmp)
    try:
        running.wait_ready()
        yield running
    finally:
        running.close()


def test_requests_spread_and_statistics_add_up(workers):
    by_worker = workers.connect(CONNECTIONS)
    assert set(by_worker) == {0, 1}, "every connection landed on one worker"
    before = {index: success_count(group[0].stub, local=True) for index, group in by_worker.items()}
    sent = {index: 0 for index in by_worker}
    for index, group in by_worker.items():
        for connection in group:
            for _ in range(REQUESTS_PER_CONNECTION):
                response = connection.stub.ModelInfer(infer_request(), timeout=TIMEOUT_S)
                assert response.model_name == "mlp"
                sent[index] += 1
    total_before = sum(before.values())
    # each worker's own statistics count exactly what went over its connections ...
    for index, group in by_worker.items():
        assert success_count(group[0].stub, local=True) - before[index] == sent[index] > 0
    # ... and ModelStatistics over any connection is the sum over the workers
    for group in by_worker.values():
        for connection in group:
            assert success_count(connection.stub) == total_before + sum(sent.values())
    response = by_worker[0][0].stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"), timeout=TIMEOUT_S)
    (stats,) = response.model_stats
    assert stats.inference_count == total_before + sum(sent.values())
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count

    # /metrics on the supervisor: one merged exposition, totals equal to what was sent
    samples = workers.metrics()
    mlp = (("model", "mlp"), ("version", "1"))
    assert samples[("kiln_requests_total", tuple(sorted(mlp + (("outcome", "success"),))))] == total_before + sum(sent.values())
    assert samples[("kiln_request_duration_seconds_count", mlp)] == total_before + sum(sent.values())
    assert samples[("kiln_inferences_total", mlp)] == stats.inference_count
    assert samples[("kiln_model_ready", mlp)] == 1.0
    assert samples[("kiln_inflight_requests", mlp)] == 0.0
    workers_seen = {dict(labels).get("worker") for (name, labels) in samples if name == "process_cpu_seconds_total"}
    assert workers_seen == {"0", "1"}


def test_each_worker_is_given_its_share_of_the_cores(workers):
    """Runtimes size their thread pools to KILN_CPU_SHARE (tests/test_onnxruntime_options.py): 2 workers halve it."""
    from server.runtime.base import CPU_SHARE_ENV

    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    for index, group in workers.connect(CONNECTIONS).items():
        pid = group[0].worker()[1]
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        assert environ[CPU_SHARE_ENV] == str(expected), f"worker {index}"


def test_explicit_load_and_unload_reach_every_worker(workers):
    by_worker = workers.connect(CONNECTIONS)
    assert set(by_worker) == {0, 1}
    loader, other = by_worker[0][0].stub, by_worker[1][0].stub
    assert not other.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=TIMEOUT_S).ready
    loader.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"), timeout=TIMEOUT_S)
    for connection in workers.connect(CONNECTIONS)[0] + workers.connect(CONNECTIONS)[1]:
        assert connection.stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=TIMEOUT_S).ready
    # an error on every worker is the error (not an OK from some)
    with pytest.raises(grpc.RpcError) as caught:
        loader.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="no_such_model"), timeout=TIMEOUT_S)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    other.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="digits"), timeout=TIMEOUT_S)
    for group in workers.connect(CONNECTIONS).values():
        for connection in group:
            assert not connection.stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=TIMEOUT_S).ready
    # reload it for the restart test: a restarted worker must catch up
    other.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"), timeout=TIMEOUT_S)


def test_killed_worker_is_restarted_with_the_loaded_models(workers):
    by_worker = workers.connect(CONNECTIONS)
    victim_pid = by_worker[1][0].worker()[1]
    os.kill(victim_pid, signal.SIGKILL)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        replaced = [c for c in workers.connect(4).get(1, []) if c.worker()[1] != victim_pid]
        if replaced and replaced[0].stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT_S).ready and \
                replaced[0].stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=TIMEOUT_S).ready:
            break
        time.sleep(0.3)
    else:
        raise AssertionError("worker 1 was not restarted with digits loaded:\n" + workers.output())
    assert "worker 1 (pid %d) exited unexpectedly" % victim_pid in workers.output()
    assert workers.process.poll() is None


def test_every_worker_runs_on_uvloop(workers):
    lines = [line for line in workers.output().splitlines() if "event loop:" in line]
    assert len(lines) >= 2 and all(line.endswith("event loop: uvloop") for line in lines), lines  # 2 workers (+ restarts)


def test_event_loop_choice_reaches_every_worker(bundled_repo, tmp_path):
    running = Workers(bundled_repo, tmp_path, ("--event-loop", "asyncio"))
    try:
        running.wait_ready()
        lines = [line for line in running.output().splitlines() if "event loop:" in line]
        assert len(lines) == 2 and all(line.endswith("event loop: asyncio") for line in lines), lines
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(TIMEOUT_S) == 0, running.output()
    finally:
        running.close()


def test_sigterm_drains_every_worker_and_exits_zero(workers):
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(TIMEOUT_S) == 0, workers.output()
    output = workers.output()
    assert "worker 0 stopped" in output and "worker 1 stopped" in output


# ---- merge functions ---------------------------------------------------------------------------


def _stats(name: str, success: int, batches: dict[int, int], last: int) -> pb.ModelStatisticsResponse:
    response = pb.ModelStatisticsResponse()
    stats = response.model_stats.add(name=name, version="1", last_inference=last, inference_count=success,
                                     execution_count=sum(batches.values()))
    stats.inference_stats.success.count = success
    stats.inference_stats.success.ns = success * 1000
    for size, count in batches.items():
        batch = stats.batch_stats.add(batch_size=size)
        batch.compute_infer.count = count
        batch.compute_infer.ns = count * 10
    return response


def test_merge_statistics_sums_per_model_version_and_batch_size():
    merged = merge_statistics([_stats("a", 3, {1: 3}, 100), _stats("a", 4, {2: 1, 1: 2}, 50), _stats("b", 1, {1: 1}, 7)])
    a, b = merged.model_stats
    assert (a.name, a.inference_count, a.execution_count, a.last_inference) == ("a", 7, 6, 100)
    assert (a.inference_stats.success.count, a.inference_stats.success.ns) == (7, 7000)
    assert [(s.batch_size, s.compute_infer.count, s.compute_infer.ns) for s in a.batch_stats] == [(1, 5, 50), (2, 1, 10)]
    assert (b.name, b.inference_count) == ("b", 1)


def test_merge_metrics_sums_kiln_families_and_labels_process_ones():
    def exposition(requests: int, ready: int, bucket: int) -> str:
        return f"""# HELP kiln_requests_total Requests.
# TYPE kiln_requests_total counter
kiln_requests_total{{model="m",version="1",outcome="success"}} {requests}
# HELP kiln_model_ready Ready.
# TYPE kiln_model_ready gauge
kiln_model_ready{{model="m",version="1"}} {ready}
# HELP kiln_batch_size Rows.
# TYPE kiln_batch_size histogram
kiln_batch_size_bucket{{model="m",version="1",le="1.0"}} {bucket}
kiln_batch_size_bucket{{model="m",version="1",le="+Inf"}} {bucket + 1}
kiln_batch_size_count{{model="m",version="1"}} {bucket + 1}
kiln_batch_size_sum{{model="m",version="1"}} {bucket + 2}
# HELP process_open_fds Open fds.
# TYPE process_open_fds gauge
process_open_fds {requests}
"""

    merged = {m.name: m for m in merge_metrics({"0": exposition(3, 1, 2), "1": exposition(4, 0, 5)})}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in merged.values() for s in m.samples}
    labels = (("model", "m"), ("version", "1"))
    assert values[("kiln_requests_total", tuple(sorted(labels + (("outcome", "success"),))))] == 7
    assert values[("kiln_model_ready", labels)] == 0  # ready only where every worker is
    assert values[("kiln_batch_size_bucket", tuple(sorted(labels + (("le", "1.0"),))))] == 7
    assert values[("kiln_batch_size_bucket", tuple(sorted(labels + (("le", "+Inf"),))))] == 9
    assert values[("kiln_batch_size_count", labels)] == 9
    assert values[("process_open_fds", (("worker", "0"),))] == 3
    assert values[("process_open_fds", (("worker", "1"),))] == 4
    assert merged["kiln_batch_size"].type == "histogram"


def test_workers_must_be_positive(tmp_path):
    result = subprocess.run([sys.executable, "-m", "server", "serve", "--workers", "0", "--model-repository", str(tmp_path)],
                            env=kiln_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--workers must be >= 1" in result.stderr
