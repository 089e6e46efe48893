"""Overload, deadlines and cancellation end to end, on a real server.

A model's execution is held by a gate (the runtime's infer wrapped in the test, as
test_repository.py does): the queue fills up deterministically, without sleeps or slow models.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from onnx_models import scale_config, scale_model, write_config
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc

QUEUE = 4


def make_repo(root: Path) -> Path:
    models = {
        "held": f"dynamic_batching {{ default_queue_policy {{ max_queue_size: {QUEUE} }} }}",
        "plain": "",
    }
    for name, extra in models.items():
        scale_model(root / name / "1" / "model.onnx", 2.0, [4])
        write_config(root / name, scale_config(name, extra, max_batch_size=1))
    return root


class Gate:
    """Wraps a loaded version's runtime.infer: every execution waits until the gate opens."""

    def __init__(self, version) -> None:
        self.runtime = version.runtime
        self.real = self.runtime.infer
        self.open = threading.Event()
        self.started = threading.Event()
        self.calls = 0
        self.runtime.infer = self

    def __call__(self, inputs, output_names):
        self.calls += 1
        self.started.set()
        assert self.open.wait(30), "gate never opened"
        return self.real(inputs, output_names)

    def release(self) -> None:
        self.open.set()  # later executions pass straight through (and are still counted)


def request(model: str, value: float = 1.0) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.full((1, 4), value, np.float32).tobytes())
    return req


def y_of(response) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32)


def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def served(tmp_path, start_server):
    server = start_server(make_repo(tmp_path / "repo"))
    channel = grpc.insecure_channel(server.url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    held = server.repository.get("held")
    gate = Gate(held)
    yield server, stub, held, gate
    gate.release()
    channel.close()


def execution_count(stub, model: str) -> int:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=5)
    return stats.model_stats[0].execution_count


def test_queue_full_is_unavailable_at_once(served):
    """Beyond max_queue_size, requests are refused UNAVAILABLE ('queue is full') immediately, not after
    the execution they would wait for; the accepted ones are all served once it finishes."""
    server, stub, held, gate = served
    sent_at = time.monotonic()
    done_at: dict[int, float] = {}
    futures = []
    for i in range(24):
        future = stub.ModelInfer.future(request("held", i), timeout=30)
        future.add_done_callback(lambda f, i=i: done_at.__setitem__(i, time.monotonic()))
        futures.append(future)
    assert gate.started.wait(5)
    wait_until(lambda: len(done_at) == 24 - 1 - QUEUE, what="the refusals")
    refused_in = max(done_at.values()) - sent_at
    time.sleep(0.2)  # the held execution is still running: nothing else finishes meanwhile
    assert len(done_at) == 24 - 1 - QUEUE
    assert held.scheduler.queue_depth == QUEUE
    gate.release()
    outcomes = []
    for i, future in enumerate(futures):
        try:
            outcomes.append(("ok", float(y_of(future.result())[0]) == 2.0 * i))
        except grpc.RpcError as error:
            outcomes.append((error.code(), "queue is full" in error.details() and "'held'" in error.details()))
    assert outcomes.count(("ok", True)) == 1 + QUEUE, outcomes
    assert outcomes.count((grpc.StatusCode.UNAVAILABLE, True)) == 24 - 1 - QUEUE, outcomes
    assert refused_in < 1.0, f"refusals took {refused_in:.3f} s"
    assert held.scheduler.queue_depth == 0 and held.scheduler.inflight == 0
    # other models were never affected, and the held one serves again
    assert float(y_of(stub.ModelInfer(request("plain", 3.0), timeout=5))[0]) == 6.0
    assert float(y_of(stub.ModelInfer(request("held", 3.0), timeout=5))[0]) == 6.0


def test_deadline_shorter_than_the_queue_wait_is_never_executed(served):
    server, stub, held, gate = served
    first = stub.ModelInfer.future(request("held", 1.0), timeout=30)
    assert gate.started.wait(5)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request("held", 2.0), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0
    wait_until(lambda: held.scheduler.queue_depth == 0, what="the expired request to leave the queue")
    gate.release()
    assert float(y_of(first.result())[0]) == 2.0
    assert float(y_of(stub.ModelInfer(request("held", 4.0), timeout=5))[0]) == 8.0
    assert gate.calls == 2  # the held one and the last one: the expired request never reached the runtime
    assert execution_count(stub, "held") == 2  # the held one and the last one


def test_cancelled_unary_call_frees_its_slot(served):
    server, stub, held, gate = served
    first = stub.ModelInfer.future(request("held", 1.0), timeout=30)
    assert gate.started.wait(5)
    queued = [stub.ModelInfer.future(request("held", 5.0), timeout=30) for _ in range(QUEUE)]
    wait_until(lambda: held.scheduler.queue_depth == QUEUE, what="the queue to fill")
    with pytest.raises(grpc.RpcError) as info:  # full
        stub.ModelInfer(request("held"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    for future in queued:
        future.cancel()
    wait_until(lambda: held.scheduler.queue_depth == 0, what="cancelled requests to leave the queue")
    replacement = stub.ModelInfer.future(request("held", 3.0), timeout=30)  # a slot is free again
    wait_until(lambda: held.scheduler.queue_depth == 1, what="the new request to queue")
    gate.release()
    assert float(y_of(first.result())[0]) == 2.0
    assert float(y_of(replacement.result())[0]) == 6.0
    assert gate.calls == 2  # cancelled requests never executed
    wait_until(lambda: held.scheduler.inflight == 0, what="in-flight to return to 0")


def test_cancelled_stream_frees_its_slots(served):
    server, stub, held, gate = served
    first = stub.ModelInfer.future(request("held", 1.0), timeout=30)
    assert gate.started.wait(5)
    keep_open = threading.Event()

    def requests():
        for value in (7.0, 8.0):
            yield request("held", value)
        keep_open.wait(10)  # the client does not close its side

    call = stub.ModelStreamInfer(requests(), timeout=30)
    wait_until(lambda: held.scheduler.queue_depth == 2, what="the stream's requests to queue")
    call.cancel()
    wait_until(lambda: held.scheduler.queue_depth == 0, what="the stream's requests to leave the queue")
    keep_open.set()
    gate.release()
    assert float(y_of(first.result())[0]) == 2.0
    responses = list(stub.ModelStreamInfer(iter([request("held", 4.0)]), timeout=5))
    assert float(y_of(responses[0].infer_response)[0]) == 8.0
    assert gate.calls == 2
    wait_until(lambda: held.scheduler.inflight == 0, what="in-flight to return to 0")


def success_count(stub, model: str) -> int:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=5)
    return stats.model_stats[0].inference_stats.success.count


def test_pending_call_limit_refuses_the_backlog_before_it_reaches_kiln(tmp_path, start_server):
    """--max-pending-calls: while the event loop cannot take calls, grpc-core holds at most 2 x N and
    refuses the rest at once (a bare CANCELLED, grpc-core's status); none of those reach kiln."""
    limit = 4
    server = start_server(make_repo(tmp_path / "repo"), max_pending_calls=limit)
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(request("plain"), timeout=5)  # connected and warm
        before = success_count(stub, "plain")
        server.loop.call_soon_threadsafe(time.sleep, 1.0)  # the event loop takes no call for 1 s
        time.sleep(0.05)
        futures = [stub.ModelInfer.future(request("plain", i), timeout=30) for i in range(100)]
        done_at: list[float] = []
        for future in futures:
            future.add_done_callback(lambda f: done_at.append(time.monotonic()))
        held = 2 * limit + 1  # the hard limit, plus the one call the server has already asked for
        # refused while kiln's event loop is still blocked (it frees up 1 s after the block began)
        wait_until(lambda: len(done_at) >= 100 - held, timeout=0.8, what="the refusals while the loop is blocked")
        outcomes = []
        for i, future in enumerate(futures):
            try:
                outcomes.append(float(y_of(future.result())[0]) == 2.0 * i)
            except grpc.RpcError as error:
                outcomes.append((error.code(), error.details()))
        served = outcomes.count(True)
        assert 1 <= served <= held, outcomes
        assert outcomes.count((grpc.StatusCode.CANCELLED, "CANCELLED")) == 100 - served, outcomes
        assert success_count(stub, "plain") - before == served  # the refused never reached kiln


def test_overload_script_with_h2load_behind_nginx(tmp_path):
    """loadtests/overload.py's h2load mode, shortened: the steps run, the excess is refused by nginx's
    cap and every call is accounted for. Its pass/fail figures depend on the machine: they go to
    docs/BENCHMARKS.md, not here."""
    import json
    import subprocess
    import sys

    from conftest import require_tool

    require_tool("h2load")
    require_tool("nginx")
    report_path = tmp_path / "overload.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.overload", "--generator", "h2load", "--via-nginx", "16", "--concurrency", "8",
         "--duration", "1.5", "--factors", "3", "--probe-rate", "100", "--json", str(report_path)],
        capture_output=True, text=True, timeout=180, cwd=Path(__file__).resolve().parent.parent,
    )
    assert report_path.exists(), proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert report["generator"] == "h2load + probe 100/s" and report["server_exit_code"] == 0
    capacity, over = report["steps"]["capacity"], report["steps"]["overload_3x"]
    assert capacity["accepted"] > 0 and capacity["other_failures"] == 0
    assert over["offered_per_s"] > 2 * capacity["accepted_per_s"]  # the load really was several times capacity
    # the probe saw refusals, all from nginx's cap, and nothing else fail
    assert over["refused_by"].get("too many calls in flight", 0) == over["refused"] > 0
    assert over["other_failures"] == 0 and over["sent"] == over["accepted"] + over["refused"]
    background = over["h2load"]
    assert background["ok"] + background["errors"] == background["done"] > 0 and background["errors"] > 0
    assert over["recovery_p50_ms"] is not None


def test_soak_script_samples_the_servers_memory_under_load(tmp_path):
    """loadtests/soak.py, a few seconds instead of minutes: the load ran, the server's RSS was sampled
    all along, every call is accounted for and the server stopped cleanly. The growth verdict needs
    minutes of load: it goes to docs/BENCHMARKS.md, not here."""
    import json
    import subprocess
    import sys

    report_path = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.soak", "--minutes", "0.1", "--warmup-minutes", "0", "--sample-secs", "0.5",
         "--processes", "1", "--concurrency", "4", "--json", str(report_path)],
        capture_output=True, text=True, timeout=180, cwd=Path(__file__).resolve().parent.parent,
    )
    assert report_path.exists(), proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert report["requests"] > 0 and report["failures"] == 0 and report["server_exit_code"] == 0
    assert len(report["rss_samples"]) >= 5  # ~6 s sampled every 0.5 s
    assert all(rss > 10 * 2**20 for _, rss in report["rss_samples"])  # a live Python server's RSS, not zeros
    assert [c["check"].split()[0] for c in report["checks"]] == ["RSS", f"{report['failures']}", "server"]
    assert [c["passed"] for c in report["checks"]][1:] == [True, True]
    assert proc.returncode == (0 if all(c["passed"] for c in report["checks"]) else 1)
