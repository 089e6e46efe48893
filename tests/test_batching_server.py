"""The dynamic batcher through the real gRPC server: batching, queue policies, priorities, isolation.

The runtime under the scheduler is the real ONNX Runtime, wrapped (as DESIGN.md allows) so that a
test can hold executions on a gate and script failures; everything above it is the real server.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

import server.repository
from onnx_models import identity_config, identity_model, write_config


class GatedRuntime:
    """Delegates to the real runtime; waits on `gate` first, records batches, fails on marker -1."""

    def __init__(self, runtime, controls: "Controls") -> None:
        self._runtime = runtime
        self._controls = controls
        self.inputs, self.outputs = runtime.inputs, runtime.outputs
        self.bytes_as_text = getattr(runtime, "bytes_as_text", False)

    def infer(self, inputs, output_names):
        controls = self._controls
        controls.started.set()
        assert controls.gate.wait(20), "gate never opened"
        x = inputs["x"]
        with controls.lock:
            controls.batches.append([int(v) for v in x[:, 0]])
        if (x[:, 0] == -1).any():
            raise RuntimeError("scripted failure")
        return self._runtime.infer(inputs, output_names)

    def close(self) -> None:
        self._runtime.close()


class Controls:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.lock = threading.Lock()
        self.batches: list[list[int]] = []

    def hold(self) -> None:
        self.gate.clear()
        self.started.clear()

    def executed_markers(self) -> list[int]:
        return [m for batch in self.batches for m in batch]


@pytest.fixture
def controls(monkeypatch) -> Controls:
    controls = Controls()
    real_create = server.repository.create_runtime
    monkeypatch.setattr(
        server.repository, "create_runtime", lambda path, config: GatedRuntime(real_create(path, config), controls)
    )
    yield controls
    controls.gate.set()


def make_model(repo, name: str, batching: str, max_batch_size: int = 16, instances: int = 1) -> None:
    identity_model(repo / name / "1" / "model.onnx", "INT64", [2])
    extra = f"{batching}\ninstance_group [ {{ count: {instances} kind: KIND_CPU }} ]"
    write_config(repo / name, identity_config(name, "INT64", [2], max_batch_size=max_batch_size, extra=extra))


def request(marker: int, rows: int = 1):
    x = np.full((rows, 2), marker, dtype=np.int64)
    tensor = triton.InferInput("x", list(x.shape), "INT64")
    tensor.set_data_from_numpy(x)
    return [tensor]


def infer(client, model: str, marker: int, **kwargs):
    return client.infer(model, request(marker), **kwargs).as_numpy("y")


def statistics(client, model: str):
    return client.get_inference_statistics(model).model_stats[0]


def wait_for_queue(running, model: str, depth: int, timeout: float = 10.0) -> None:
    scheduler = running.repository.get(model).scheduler
    deadline = time.monotonic() + timeout
    while scheduler.queue_depth < depth:
        assert time.monotonic() < deadline, f"queue of {model} never reached {depth}"
        time.sleep(0.01)


def test_concurrent_requests_are_batched_and_statistics_show_it(tmp_path, start_server, controls):
    make_model(tmp_path, "m", "dynamic_batching { max_queue_delay_microseconds: 20000 }")
    running = start_server(tmp_path)
    client = triton.InferenceServerClient(running.url)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: infer(triton.InferenceServerClient(running.url), "m", i), range(32)))
    for i, y in enumerate(results):
        np.testing.assert_array_equal(y, np.full((1, 2), i))  # each request got its own rows back
    stats = statistics(client, "m")
    assert stats.inference_count == 32
    assert stats.inference_count / stats.execution_count > 1  # batching happened
    assert max(len(b) for b in controls.batches) <= 16


def test_without_dynamic_batching_each_request_runs_alone(tmp_path, start_server, controls):
    make_model(tmp_path, "m", "")
    running = start_server(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: infer(triton.InferenceServerClient(running.url), "m", i), range(16)))
    assert all(len(batch) == 1 for batch in controls.batches) and len(controls.batches) == 16


def test_queue_full_is_refused_at_once(tmp_path, start_server, controls):
    make_model(tmp_path, "m", "dynamic_batching { default_queue_policy { max_queue_size: 2 } }")
    running = start_server(tmp_path)
    client = triton.InferenceServerClient(running.url)
    controls.hold()
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(infer, triton.InferenceServerClient(running.url), "m", i) for i in range(3)]
        assert controls.started.wait(10)
        wait_for_queue(running, "m", 2)  # one executing, two queued: the queue is full
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as error:
            infer(client, "m", 99)
        assert time.monotonic() - started < 1.0  # refused immediately, not after a timeout
        assert error.value.status() == "StatusCode.UNAVAILABLE"
        assert "queue is full" in error.value.message() and "'m'" in error.value.message()
        controls.gate.set()
        assert [f.result(10)[0, 0] for f in held] == [0, 1, 2]
    assert 99 not in controls.executed_markers()


def test_queue_timeout_reject_and_delay(tmp_path, start_server, controls):
    make_model(
        tmp_path, "reject",
        "dynamic_batching { default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 100000 } }",
    )
    make_model(
        tmp_path, "delay",
        "dynamic_batching { default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 100000 } }",
    )
    running = start_server(tmp_path)
    client = triton.InferenceServerClient(running.url)
    for model, marker in (("reject", 7), ("delay", 8)):
        controls.hold()
        with ThreadPoolExecutor(2) as pool:
            blocker = pool.submit(infer, triton.InferenceServerClient(running.url), model, 1)
            assert controls.started.wait(10)
            waiting = pool.submit(infer, triton.InferenceServerClient(running.url), model, marker)
            wait_for_queue(running, model, 1)
            time.sleep(0.3)  # well past the 100 ms queue timeout
            controls.gate.set()
            blocker.result(10)
            if model == "reject":
                with pytest.raises(InferenceServerException) as error:
                    waiting.result(10)
                assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
                assert "'reject'" in error.value.message()
                assert marker not in controls.executed_markers()  # never executed
            else:
                assert waiting.result(10)[0, 0] == marker  # DELAY: late, but served
    assert statistics(client, "reject").inference_stats.fail.count == 1


def test_per_request_timeout_only_with_allow_timeout_override(tmp_path, start_server, controls):
    make_model(tmp_path, "override", "dynamic_batching { default_queue_policy { allow_timeout_override: true } }")
    make_model(tmp_path, "fixed", "dynamic_batching { }")
    running = start_server(tmp_path)
    for model in ("override", "fixed"):
        controls.hold()
        with ThreadPoolExecutor(2) as pool:
            blocker = pool.submit(infer, triton.InferenceServerClient(running.url), model, 1)
            assert controls.started.wait(10)
            waiting = pool.submit(infer, triton.InferenceServerClient(running.url), model, 5, timeout=50_000)
            wait_for_queue(running, model, 1)
            time.sleep(0.25)
            controls.gate.set()
            blocker.result(10)
            if model == "override":
                with pytest.raises(InferenceServerException) as error:
                    waiting.result(10)
                assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            else:
                assert waiting.result(10)[0, 0] == 5  # the parameter is ignored without the override


def test_client_deadline_drops_the_queued_request(tmp_path, start_server, controls):
    make_model(tmp_path, "m", "dynamic_batching { }")
    running = start_server(tmp_path)
    controls.hold()
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(infer, triton.InferenceServerClient(running.url), "m", 1)
        assert controls.started.wait(10)
        with pytest.raises(InferenceServerException) as error:
            infer(triton.InferenceServerClient(running.url), "m", 42, client_timeout=0.2)
        assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        time.sleep(0.2)
        controls.gate.set()
        blocker.result(10)
    infer(triton.InferenceServerClient(running.url), "m", 3)
    assert 42 not in controls.executed_markers()


def test_higher_priority_is_dispatched_first(tmp_path, start_server, controls):
    make_model(tmp_path, "m", "dynamic_batching { priority_levels: 2 default_priority_level: 2 }", max_batch_size=1)
    running = start_server(tmp_path)
    controls.hold()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(infer, triton.InferenceServerClient(running.url), "m", 1)]
        assert controls.started.wait(10)
        futures.append(pool.submit(infer, triton.InferenceServerClient(running.url), "m", 2))  # default level 2
        wait_for_queue(running, "m", 1)
        futures.append(pool.submit(infer, triton.InferenceServerClient(running.url), "m", 3, priority=2))
        wait_for_queue(running, "m", 2)
        futures.append(pool.submit(infer, triton.InferenceServerClient(running.url), "m", 4, priority=1))
        wait_for_queue(running, "m", 3)
        controls.gate.set()
        for f in futures:
            f.result(10)
    assert controls.executed_markers() == [1, 4, 2, 3]
    with pytest.raises(InferenceServerException) as error:
        infer(triton.InferenceServerClient(running.url), "m", 5, priority=3)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT" and "priority 3" in error.value.message()


def test_a_failing_batch_does_not_hurt_the_next(tmp_path, start_server, controls):
    make_model(tmp_path, "m", "dynamic_batching { }")
    make_model(tmp_path, "other", "dynamic_batching { }")
    running = start_server(tmp_path)
    client = triton.InferenceServerClient(running.url)
    with pytest.raises(InferenceServerException) as error:
        infer(client, "m", -1)
    assert error.value.status() == "StatusCode.INTERNAL"
    assert "'m'" in error.value.message() and "scripted failure" in error.value.message()
    assert infer(client, "m", 6)[0, 0] == 6
    assert infer(client, "other", 7)[0, 0] == 7


def test_different_shapes_queue_apart_and_are_all_served(tmp_path, start_server, controls):
    identity_model(tmp_path / "v" / "1" / "model.onnx", "INT64", [-1])
    write_config(tmp_path / "v", identity_config("v", "INT64", [-1], max_batch_size=16,
                                                 extra="dynamic_batching { max_queue_delay_microseconds: 20000 }"))
    running = start_server(tmp_path)

    def send(i):
        width = 2 + i % 3
        x = np.full((1, width), i, dtype=np.int64)
        tensor = triton.InferInput("x", [1, width], "INT64")
        tensor.set_data_from_numpy(x)
        return triton.InferenceServerClient(running.url).infer("v", [tensor]).as_numpy("y")

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(send, range(24)))
    for i, y in enumerate(results):
        np.testing.assert_array_equal(y, np.full((1, 2 + i % 3), i))
