"""Unit and timing tests of the dynamic batcher (server/batching.py).

Timing assertions use generous margins: they check "well under the configured
delay" or "no more than the delay plus a margin", never tight bounds.  Tests
that need a request to stay queued block the only instance with a gate
(threading.Event) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import numpy as np
import pytest

from server.batching import ExecutionRecord, RequestTimings, Scheduler
from server.errors import KilnError, Status
from server.model_types import DynamicBatchingConfig, QueuePolicy, TimeoutAction


def run(coro):
    return asyncio.run(coro)


class FakeModel:
    """execute(): y = 2x + 1, records each batch; can block on a gate or fail."""

    def __init__(self, *, gate: threading.Event | None = None, delay: float = 0.0,
                 fail: Exception | None = None, fail_times: int = 0, bad_rows: bool = False):
        self.gate = gate
        self.delay = delay
        self.fail = fail
        self.fail_times = fail_times
        self.bad_rows = bad_rows
        self.batches: list[dict[str, np.ndarray]] = []
        self.inputs_seen: list[dict[str, np.ndarray]] = []
        self.outputs: list[dict[str, np.ndarray]] = []
        self.started = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0

    def __call__(self, inputs):
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.batches.append({k: v.copy() for k, v in inputs.items()})
            self.inputs_seen.append(inputs)
        self.started.set()
        try:
            if self.gate is not None:
                assert self.gate.wait(10), "gate never opened"
            if self.delay:
                time.sleep(self.delay)
            if self.fail is not None and self.fail_times > 0:
                self.fail_times -= 1
                raise self.fail
            x = inputs["x"]
            y = x * 2 + 1
            if self.bad_rows:
                y = y[:-1]
            out = {"y": y}
            self.outputs.append(out)
            return out
        finally:
            with self.lock:
                self.running -= 1

    def rows_per_batch(self) -> list[int]:
        return [b["x"].shape[0] for b in self.batches]

    def markers(self) -> list[int]:
        return [int(v) for b in self.batches for v in b["x"][:, 0]]


def x_of(marker: int, rows: int = 1, width: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, width), marker, dtype=np.int64)}


def batching(**kw) -> DynamicBatchingConfig:
    return DynamicBatchingConfig(**kw)


async def started(model: FakeModel) -> None:
    assert await asyncio.to_thread(model.started.wait, 5)


async def held_scheduler(max_batch_size: int, config: DynamicBatchingConfig | None, first: dict | None = None,
                         name: str = "m") -> tuple[Scheduler, FakeModel, threading.Event, asyncio.Future]:
    """A one-instance scheduler kept busy: its first request (`first`, default x_of(0)) is executing,
    held until the returned gate is set. Returns (scheduler, model, gate, the first request's task)."""
    gate = threading.Event()
    model = FakeModel(gate=gate)
    s = Scheduler(name, max_batch_size=max_batch_size, batching=config, instance_count=1, execute=model)
    running = asyncio.ensure_future(s.submit(x_of(0) if first is None else first))
    await started(model)
    return s, model, gate, running


async def until(cond, timeout: float = 5.0) -> None:
    """Let other tasks run until cond() holds (test helper only)."""
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "condition never held"
        await asyncio.sleep(0.001)


# --------------------------------------------------------------------------- door


def test_too_many_rows_is_invalid_argument():
    async def main():
        s = Scheduler("resnet", max_batch_size=4, batching=batching(), instance_count=1,
                      execute=FakeModel())
        with pytest.raises(KilnError) as ei:
            await s.submit(x_of(1, rows=5))
        assert ei.value.status is Status.INVALID_ARGUMENT
        assert "resnet" in ei.value.message and "5" in ei.value.message and "4" in ei.value.message
        assert s.inflight == 0 and s.queue_depth == 0
        await s.close()
    run(main())


def test_bad_priority_is_invalid_argument():
    async def main():
        s = Scheduler("m", max_batch_size=4, batching=batching(priority_levels=2, default_priority_level=1),
                      instance_count=1, execute=FakeModel())
        for bad in (3, 7, -1):
            with pytest.raises(KilnError) as ei:
                await s.submit(x_of(1), priority=bad)
            assert ei.value.status is Status.INVALID_ARGUMENT
            assert str(bad) in ei.value.message
        out, _ = await s.submit(x_of(1), priority=2)
        assert out["y"][0, 0] == 3
        await s.close()
    run(main())


def test_mismatched_batch_dims_is_invalid_argument():
    async def main():
        s = Scheduler("m", max_batch_size=4, batching=batching(), instance_count=1, execute=FakeModel())
        with pytest.raises(KilnError) as ei:
            await s.submit({"x": np.zeros((2, 2)), "z": np.zeros((3, 2))})
        assert ei.value.status is Status.INVALID_ARGUMENT
        await s.close()
    run(main())


# ---------------------------------------------------------------- timing & batching


def test_lone_request_waits_at_most_the_queue_delay():
    async def main():
        model = FakeModel()
        s = Scheduler("m", max_batch_size=8, batching=batching(max_queue_delay_microseconds=100_000),
                      instance_count=1, execute=model)
        t = time.monotonic()
        out, timings = await s.submit(x_of(3))
        took = time.monotonic() - t
        assert 0.09 <= took < 0.1 + 0.4
        assert 0.09e9 <= timings.queue_ns < 0.5e9
        assert isinstance(timings, RequestTimings)
        assert out["y"].tolist() == [[7, 7]]
        await s.close()
    run(main())


def test_no_delay_dispatches_at_once():
    async def main():
        model = FakeModel()
        s = Scheduler("m", max_batch_size=8, batching=batching(), instance_count=1, execute=model)
        t = time.monotonic()
        for i in range(20):
            await s.submit(x_of(i))
        assert time.monotonic() - t < 1.0  # 20 sequential requests, no waiting for company
        assert model.rows_per_batch() == [1] * 20
        await s.close()
    run(main())


def test_preferred_batch_size_dispatches_without_waiting_the_delay():
    async def main():
        model = FakeModel()
        s = Scheduler("m", max_batch_size=8,
                      batching=batching(preferred_batch_size=(4,), max_queue_delay_microseconds=2_000_000),
                      instance_count=1, execute=model)
        t = time.monotonic()
        results = await asyncio.gather(*(s.submit(x_of(i)) for i in range(4)))
        assert time.monotonic() - t < 1.0
        assert model.rows_per_batch() == [4]
        for i, (out, _) in enumerate(results):
            assert out["y"].tolist() == [[2 * i + 1] * 2]
        await s.close()
    run(main())


def test_closed_loop_batches_dispatch_once_every_client_is_queued_not_after_the_delay():
    """8 clients, each sending again when answered: once the scheduler has seen them all in
    flight, a batch leaves as soon as all 8 are queued instead of waiting out the 1 s delay for a
    preferred size of 64 that cannot form. Only the first batch (nothing seen yet) waits."""
    async def main():
        model = FakeModel()
        s = Scheduler("m", max_batch_size=64,
                      batching=batching(preferred_batch_size=(64,), max_queue_delay_microseconds=1_000_000),
                      instance_count=1, execute=model)

        async def client(marker: int) -> list[int]:
            answers = []
            for round_ in range(6):
                out, _ = await s.submit(x_of(marker * 10 + round_))
                answers.append(int(out["y"][0, 0]))
            return answers

        t = time.monotonic()
        answers = await asyncio.gather(*(client(i) for i in range(8)))
        took = time.monotonic() - t
        assert 0.95 <= took < 1.0 + 0.8  # the first delay, then five batches without one (not 6 s)
        assert model.rows_per_batch() == [8] * 6
        assert answers == [[2 * (i * 10 + r) + 1 for r in range(6)] for i in range(8)]
        await s.close()
    run(main())


def test_lone_requests_in_sequence_stop_waiting_for_company_once_one_was_seen_alone():
    async def main():
        model = FakeModel()
        s = Scheduler("m", max_batch_size=8, batching=batching(max_queue_delay_microseconds=300_000),
                      instance_count=1, execute=model)
        t = time.monotonic()
        await s.submit(x_of(0))  # nothing seen yet: waits the delay, as Triton does
        assert time.monotonic() - t >= 0.29
        t = time.monotonic()
        for i in range(1, 6):
            await s.submit(x_of(i))  # one client at a time: no company can come
        assert time.monotonic() - t < 0.3  # five requests, less than one delay in all
        assert model.rows_per_batch() == [1] * 6
        await s.close()
    run(main())


def test_max_batch_size_dispatches_without_waiting_the_delay():
    async def main():
        model = FakeModel()
        s = Scheduler("m", max_batch_size=4, batching=batching(max_queue_delay_microseconds=2_000_000),
                      instance_count=1, execute=model)
        t = time.monotonic()
        a, b = await asyncio.gather(s.submit(x_of(1, rows=3)), s.submit(x_of(2, rows=1)))
        assert time.monotonic() - t < 1.0
        assert model.rows_per_batch() == [4]
        assert a[0]["y"].tolist() == [[3, 3]] * 3 and b[0]["y"].tolist() == [[5, 5]]
        await s.close()
    run(main())


def test_requests_queue_up_behind_a_busy_instance_and_batch_together():
    async def main():
        s, model, gate, first = await held_scheduler(8, batching())
        rest = [asyncio.ensure_future(s.submit(x_of(i, rows=2))) for i in range(1, 4)]
        await asyncio.sleep(0.01)
        assert s.queue_depth == 3 and s.inflight == 4
        gate.set()
        await asyncio.gather(first, *rest)
        assert model.rows_per_batch() == [1, 6]
        assert s.queue_depth == 0 and s.inflight == 0
        await s.close()
    run(main())


def test_different_shapes_are_never_mixed_and_all_served():
    async def main():
        s, model, gate, first = await held_scheduler(8, batching())
        tasks = [asyncio.ensure_future(s.submit(x_of(i, width=2 + i % 2))) for i in range(1, 7)]
        tasks.append(asyncio.ensure_future(s.submit({"x": np.full((1, 2), 9, dtype=np.int32)})))
        await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(first, *tasks)
        assert len(results) == 8
        assert sorted(model.rows_per_batch()) == [1, 1, 3, 3]
        for b in model.batches:
            assert len({b["x"].shape[1:]}) == 1
        assert results[-1][0]["y"].dtype == np.int32
        await s.close()
    run(main())


def test_single_request_passes_arrays_through_and_outputs_are_views():
    async def main():
        inp = x_of(5)
        s, model, gate, first = await held_scheduler(8, batching(), inp)
        assert model.inputs_seen[0]["x"] is inp["x"]
        others = [asyncio.ensure_future(s.submit(x_of(i, rows=2))) for i in (6, 7)]
        await asyncio.sleep(0.01)
        gate.set()
        (out0, _), (out1, _), (out2, _) = await asyncio.gather(first, *others)
        assert out0["y"] is model.outputs[0]["y"]
        batch_y = model.outputs[1]["y"]
        assert np.shares_memory(out1["y"], batch_y) and np.shares_memory(out2["y"], batch_y)
        assert out1["y"].tolist() == [[13, 13]] * 2 and out2["y"].tolist() == [[15, 15]] * 2
        await s.close()
    run(main())


def test_no_batching_runs_each_request_alone_through_the_pool():
    async def main():
        model = FakeModel(delay=0.02)
        s = Scheduler("m", max_batch_size=0, batching=None, instance_count=2, execute=model)
        inputs = [x_of(i) for i in range(8)]
        results = await asyncio.gather(*(s.submit(x) for x in inputs))
        assert model.max_running == 2
        assert len(model.batches) == 8
        assert {id(b["x"]) for b in model.inputs_seen} == {id(x["x"]) for x in inputs}
        for i, (out, _) in enumerate(results):
            assert out["y"].tolist() == [[2 * i + 1] * 2]
        await s.close()
    run(main())


def test_instance_count_two_runs_two_batches_at_once_never_three():
    async def main():
        model = FakeModel(delay=0.03)
        records: list[ExecutionRecord] = []
        s = Scheduler("m", max_batch_size=1, batching=batching(), instance_count=2, execute=model,
                      on_execution=records.append)
        await asyncio.gather(*(s.submit(x_of(i)) for i in range(8)))
        assert model.max_running == 2
        assert len(records) == 8 and all(r.rows == 1 and r.requests == 1 for r in records)
        assert all(r.compute_infer_ns >= 0.025e9 for r in records)
        await s.close()
    run(main())


def test_priorities_higher_level_first():
    async def main():
        s, model, gate, first = await held_scheduler(1, batching(priority_levels=3, default_priority_level=2))
        tasks = [asyncio.ensure_future(s.submit(x_of(m), priority=p))
                 for m, p in ((1, 3), (2, 0), (3, 1), (4, 3), (5, 1), (6, 2))]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(first, *tasks)
        # level 1: 3, 5; level 2 (0 = default 2): 2, 6; level 3: 1, 4
        assert model.markers() == [0, 3, 5, 2, 6, 1, 4]
        await s.close()
    run(main())


def test_preserve_ordering_releases_in_arrival_order():
    async def main():
        slow_gate = threading.Event()

        def execute(inputs):
            if inputs["x"][0, 0] == 0:
                assert slow_gate.wait(5)
            return {"y": inputs["x"] * 2 + 1}

        s = Scheduler("m", max_batch_size=1, batching=batching(preserve_ordering=True),
                      instance_count=2, execute=execute)
        done: list[int] = []

        async def one(i):
            await s.submit(x_of(i))
            done.append(i)

        t0 = asyncio.ensure_future(one(0))
        await asyncio.sleep(0.01)
        t1 = asyncio.ensure_future(one(1))
        await asyncio.sleep(0.1)  # request 1 has long finished executing
        assert done == [] and s.inflight == 2
        slow_gate.set()
        await asyncio.gather(t0, t1)
        assert done == [0, 1]
        await s.close()
    run(main())


def test_preserve_ordering_holds_when_a_fast_model_could_answer_at_the_door():
    """An answer released by the scheduler reaches its caller on the loop's next turn; a request
    answered inline at the door in between would overtake it. Task 1 waits for the instance task
    0 holds, task 2 arrives just as 1 is released: 2 must not be answered before 1."""
    async def main():
        s = Scheduler("m", max_batch_size=8, batching=batching(preserve_ordering=True), instance_count=1,
                      execute=FakeModel(), inline_max_us=1_000_000)
        for i in range(2):  # the first lone execution is measured; from then on the model counts as fast
            await s.submit(x_of(i))
        done: list[int] = []

        async def one(i):
            await s.submit(x_of(i))
            done.append(i)

        tasks = [asyncio.ensure_future(one(0))]
        tasks.append(asyncio.ensure_future(one(1)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        tasks += [asyncio.ensure_future(one(i)) for i in (2, 3)]
        await asyncio.gather(*tasks)
        assert done == [0, 1, 2, 3]
        await s.close()
    run(main())


# ------------------------------------------------------------------ queue policy


def test_queue_full_is_unavailable_immediately():
    async def main():
        bounded = batching(default_queue_policy=QueuePolicy(max_queue_size=2))
        s, model, gate, running = await held_scheduler(1, bounded, name="bert")
        queued = [asyncio.ensure_future(s.submit(x_of(i))) for i in (1, 2)]
        await asyncio.sleep(0.01)
        coro = s.submit(x_of(3))
        with pytest.raises(KilnError) as ei:
            coro.send(None)  # refused on the first step, before any wait
        assert ei.value.status is Status.UNAVAILABLE
        assert "queue is full" in ei.value.message
        assert "bert" in ei.value.message and "2" in ei.value.message
        gate.set()
        await asyncio.gather(running, *queued)
        assert model.markers() == [0, 1, 2]
        await s.close()
    run(main())


def test_queue_full_is_per_priority_level():
    async def main():
        cfg = batching(priority_levels=2, default_priority_level=2,
                       priority_queue_policy={1: QueuePolicy(max_queue_size=1)})
        s, model, gate, running = await held_scheduler(1, cfg)
        ok = [asyncio.ensure_future(s.submit(x_of(1), priority=1)),
              asyncio.ensure_future(s.submit(x_of(2))), asyncio.ensure_future(s.submit(x_of(3)))]
        await asyncio.sleep(0.01)
        with pytest.raises(KilnError) as ei:
            await s.submit(x_of(4), priority=1)
        assert ei.value.status is Status.UNAVAILABLE and "queue is full" in ei.value.message
        gate.set()
        await asyncio.gather(running, *ok)
        await s.close()
    run(main())


def test_reject_timeout_is_deadline_exceeded_and_never_executed():
    async def main():
        policy = QueuePolicy(timeout_action=TimeoutAction.REJECT, default_timeout_microseconds=50_000)
        s, model, gate, running = await held_scheduler(4, batching(default_queue_policy=policy))
        t = time.monotonic()
        with pytest.raises(KilnError) as ei:
            await s.submit(x_of(1))
        took = time.monotonic() - t
        assert ei.value.status is Status.DEADLINE_EXCEEDED
        assert 0.045 <= took < 0.05 + 0.4
        assert s.queue_depth == 0
        gate.set()
        await running
        await asyncio.sleep(0.02)
        assert model.markers() == [0]
        await s.close()
    run(main())


def test_delay_timeout_loses_its_place_but_still_runs():
    async def main():
        # Only `a` carries a timeout (through the override), so however late the
        # loop runs, `b` can never be demoted too.
        policy = QueuePolicy(timeout_action=TimeoutAction.DELAY, allow_timeout_override=True)
        s, model, gate, running = await held_scheduler(1, batching(default_queue_policy=policy))
        a = asyncio.ensure_future(s.submit(x_of(1), timeout_us=20_000))
        await asyncio.sleep(0.06)  # a's timeout passes: it goes behind b
        b = asyncio.ensure_future(s.submit(x_of(2)))
        await asyncio.sleep(0.005)
        gate.set()
        (ya, _), (yb, _) = await asyncio.gather(a, b)
        await running
        assert ya["y"][0, 0] == 3 and yb["y"][0, 0] == 5
        assert model.markers() == [0, 2, 1]
        await s.close()
    run(main())


def test_timeout_override_only_when_allowed():
    async def go(allow: bool):
        policy = QueuePolicy(allow_timeout_override=allow)
        s, model, gate, running = await held_scheduler(4, batching(default_queue_policy=policy))
        req = asyncio.ensure_future(s.submit(x_of(1), timeout_us=30_000))
        await asyncio.sleep(0.15)
        gate.set()
        await running
        if allow:
            with pytest.raises(KilnError) as ei:
                await req
            assert ei.value.status is Status.DEADLINE_EXCEEDED
            assert model.markers() == [0]
        else:
            out, _ = await req
            assert out["y"][0, 0] == 3
        await s.close()

    run(go(True))
    run(go(False))


def test_grpc_deadline_bounds_the_wait():
    async def main():
        s, model, gate, running = await held_scheduler(4, batching())
        t = time.monotonic()
        with pytest.raises(KilnError) as ei:
            await s.submit(x_of(1), deadline=time.monotonic() + 0.05)
        assert ei.value.status is Status.DEADLINE_EXCEEDED
        assert time.monotonic() - t < 0.05 + 0.4
        with pytest.raises(KilnError) as ei:  # already past
            await s.submit(x_of(2), deadline=time.monotonic() - 1)
        assert ei.value.status is Status.DEADLINE_EXCEEDED
        gate.set()
        await running
        out, _ = await s.submit(x_of(3), deadline=time.monotonic() + 5)
        assert out["y"][0, 0] == 7
        assert model.markers() == [0, 3]
        await s.close()
    run(main())


def test_deadline_applies_without_batching_too():
    async def main():
        s, model, gate, running = await held_scheduler(0, None)
        with pytest.raises(KilnError) as ei:
            await s.submit(x_of(1), deadline=time.monotonic() + 0.03)
        assert ei.value.status is Status.DEADLINE_EXCEEDED
        gate.set()
        await running
        assert model.markers() == [0]
        await s.close()
    run(main())


# ------------------------------------------------------------- cancellation


def test_cancelled_request_leaves_the_queue_and_is_never_executed():
    async def main():
        s, model, gate, running = await held_scheduler(4, batching())
        victim = asyncio.ensure_future(s.submit(x_of(1)))
        other = asyncio.ensure_future(s.submit(x_of(2)))
        await asyncio.sleep(0.01)
        assert s.queue_depth == 2
        victim.cancel()
        await asyncio.sleep(0)
        assert s.queue_depth == 1 and s.inflight == 2
        gate.set()
        await asyncio.gather(running, other)
        assert victim.cancelled()
        assert model.markers() == [0, 2]
        await s.close()
    run(main())


def test_cancel_racing_dispatch_is_dropped_before_execution():
    """A future cancelled in the same loop turn as a dispatch, before submit()
    has noticed, is dropped from the batch (white-box: drives _pump directly)."""
    async def main():
        model = FakeModel()
        s = Scheduler("m", max_batch_size=4, batching=batching(max_queue_delay_microseconds=5_000_000),
                      instance_count=1, execute=model)
        victim = asyncio.ensure_future(s.submit(x_of(1)))
        other = asyncio.ensure_future(s.submit(x_of(2)))
        await asyncio.sleep(0.01)
        assert s.queue_depth == 2 and model.batches == []
        victim.cancel()
        s._policy = dataclasses.replace(s._policy, max_queue_delay_s=0.0)
        s._pump()  # dispatches now; the victim's submit() has not run its except yet
        out, _ = await other
        assert out["y"][0, 0] == 5
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert model.markers() == [2]
        assert s.queue_depth == 0 and s.inflight == 0
        await s.close()
    run(main())


# ------------------------------------------------------------------ failures


def test_failure_is_isolated_to_its_batch():
    async def main():
        model = FakeModel(fail=ValueError("tensor exploded"), fail_times=1)
        s = Scheduler("resnet", max_batch_size=4, batching=batching(), instance_count=1, execute=model)
        with pytest.raises(KilnError) as ei:
            await s.submit(x_of(1))
        assert ei.value.status is Status.INTERNAL
        assert "resnet" in ei.value.message and "tensor exploded" in ei.value.message
        out, _ = await s.submit(x_of(2))
        assert out["y"][0, 0] == 5
        await s.close()
    run(main())


def test_failure_fails_every_request_of_the_batch():
    async def main():
        gate = threading.Event()
        model = FakeModel(gate=gate, fail=RuntimeError("cuda oops"), fail_times=2)
        s = Scheduler("m", max_batch_size=4, batching=batching(), instance_count=1, execute=model)
        first = asyncio.ensure_future(s.submit(x_of(0)))
        await started(model)
        batch = [asyncio.ensure_future(s.submit(x_of(i))) for i in (1, 2)]
        await asyncio.sleep(0.01)
        gate.set()
        res = await asyncio.gather(first, *batch, return_exceptions=True)
        assert all(isinstance(r, KilnError) and r.status is Status.INTERNAL for r in res)
        out, _ = await s.submit(x_of(3))
        assert out["y"][0, 0] == 7
        await s.close()
    run(main())


def test_runtime_kiln_error_becomes_internal_for_the_batch():
    async def main():
        model = FakeModel(fail=KilnError(Status.INVALID_ARGUMENT, "bad value"), fail_times=1)
        s = Scheduler("m", max_batch_size=4, batching=batching(), instance_count=1, execute=model)
        with pytest.raises(KilnError) as ei:
            await s.submit(x_of(1))
        assert ei.value.status is Status.INTERNAL
        assert "'m'" in ei.value.message and "bad value" in ei.value.message
        await s.close()
    run(main())


def test_wrong_output_rows_is_internal():
    async def main():
        model = FakeModel(bad_rows=True)
        s = Scheduler("x", max_batch_size=8, batching=batching(), instance_count=1, execute=model)
        with pytest.raises(KilnError) as ei:
            await s.submit(x_of(1, rows=4))
        assert ei.value.status is Status.INTERNAL
        assert ei.value.message == "model 'x' returned output 'y' with 3 rows for a batch of 4 rows"
        await s.close()
    run(main())


# --------------------------------------------------------------------- close


def test_close_drains_queued_and_running_then_refuses():
    async def main():
        long_delay = batching(max_queue_delay_microseconds=5_000_000)
        s, model, gate, first = await held_scheduler(2, long_delay, x_of(0, rows=2))
        queued = [asyncio.ensure_future(s.submit(x_of(i))) for i in (1,)]
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(s.close(drain_timeout_s=10))
        await asyncio.sleep(0.01)
        with pytest.raises(KilnError) as ei:
            await s.submit(x_of(9))
        assert ei.value.status is Status.UNAVAILABLE
        t = time.monotonic()
        gate.set()
        await closing
        assert time.monotonic() - t < 2  # the 5 s queue delay was not waited out
        results = await asyncio.gather(first, *queued)
        assert [r[0]["y"][0, 0] for r in results] == [1, 3]
        assert s.inflight == 0
    run(main())


def test_close_after_timeout_fails_the_rest_unavailable():
    async def main():
        s, model, gate, first = await held_scheduler(1, batching())
        queued = asyncio.ensure_future(s.submit(x_of(1)))
        await asyncio.sleep(0.01)
        await s.close(drain_timeout_s=0.1)
        for task in (first, queued):
            with pytest.raises(KilnError) as ei:
                await task
            assert ei.value.status is Status.UNAVAILABLE
        gate.set()
        await asyncio.sleep(0.02)
        assert model.markers() == [0]
    run(main())


def test_close_idle_scheduler():
    async def main():
        s = Scheduler("m", max_batch_size=0, batching=None, instance_count=3, execute=FakeModel())
        await s.close()
        await s.close()
        with pytest.raises(KilnError) as ei:
            await s.submit(x_of(0))
        assert ei.value.status is Status.UNAVAILABLE
    run(main())


# ---------------------------------------------------------------- inline fast path


def _threads_used(inline_max_us: float, delay: float, lone_requests: int, concurrent: int = 0):
    """Run lone requests one after another, then `concurrent` at once; return the thread names per batch."""
    names: list[str] = []

    def execute(inputs):
        names.append(threading.current_thread().name)
        if delay:
            time.sleep(delay)
        return {"y": inputs["x"] * 2 + 1}

    async def main():
        scheduler = Scheduler("m", max_batch_size=8, batching=DynamicBatchingConfig(), instance_count=1,
                              execute=execute, inline_max_us=inline_max_us)
        for i in range(lone_requests):
            outputs, _ = await scheduler.submit(x_of(i))
            assert outputs["y"][0, 0] == 2 * i + 1
        if concurrent:
            results = await asyncio.gather(*(scheduler.submit(x_of(100 + i)) for i in range(concurrent)))
            assert [int(o["y"][0, 0]) for o, _ in results] == [2 * (100 + i) + 1 for i in range(concurrent)]
        await scheduler.close()
        return threading.current_thread().name

    loop_thread = run(main())
    return loop_thread, names


def test_fast_lone_requests_run_on_the_event_loop_after_the_first_measurement():
    loop_thread, names = _threads_used(inline_max_us=1_000_000, delay=0, lone_requests=5)
    assert names[0] != loop_thread  # nothing measured yet: the instance thread
    assert names[1:] == [loop_thread] * 4


def test_slow_models_and_disabled_inline_never_run_on_the_event_loop():
    loop_thread, names = _threads_used(inline_max_us=200, delay=0.005, lone_requests=4)
    assert loop_thread not in names
    loop_thread, names = _threads_used(inline_max_us=0, delay=0, lone_requests=4)
    assert loop_thread not in names


def test_requests_arriving_together_go_to_the_instance_threads():
    loop_thread, names = _threads_used(inline_max_us=1_000_000, delay=0, lone_requests=2, concurrent=6)
    assert names[1] == loop_thread
    # the first of the burst finds the model idle and may run inline; the rest queue behind it
    burst = names[2:]
    assert burst and burst.count(loop_thread) <= 1 and len(burst) < 6  # and they were batched
