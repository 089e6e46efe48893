"""Property tests of the dynamic batcher.

Two layers:
* the pure decision, next_action(), driven with random queues and clocks;
* the whole Scheduler, driven with random arrivals, row counts, shapes,
  priorities, queue timeouts and cancellations against a fake execute whose
  output encodes its input (y = 2x + 1, x carries a per-request marker), so
  every request's VALUES can be checked.  Every decision the scheduler takes
  is recorded (next_action is wrapped) to check the queue-level invariants.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import server.batching as batching_mod
from server.batch_policy import BatchPolicy, Dispatch, Wait, next_action
from server.batching import Pending, Scheduler
from server.errors import KilnError, Status
from server.model_types import DynamicBatchingConfig, QueuePolicy, TimeoutAction

KEYS = ("a", "b", "c")

# --------------------------------------------------------------------------- pure


@st.composite
def queues(draw):
    mbs = draw(st.integers(1, 16))
    preferred = frozenset(draw(st.lists(st.integers(1, mbs), max_size=3)))
    delay = draw(st.sampled_from([0.0, 0.001, 0.01, 0.1]))
    policy = BatchPolicy(batching=True, max_batch_size=mbs,
                         preferred_batch_sizes=preferred, max_queue_delay_s=delay)
    items = draw(st.lists(st.tuples(st.integers(1, mbs), st.sampled_from(KEYS), st.integers(1, 3),
                                    st.floats(0, 0.2)), max_size=30))
    pending = [Pending(rows, key, level, arrival, seq)
               for seq, (rows, key, level, arrival) in enumerate(items)]
    pending.sort(key=lambda p: (p.level, p.seq))  # priority order
    now = max([p.arrival for p in pending], default=0.0) + draw(st.floats(0, 0.2))
    return policy, pending, now


def check_decision(policy: BatchPolicy, pending: list[Pending], now: float, action) -> None:
    if not pending:
        assert action == Wait(None)
        return
    if isinstance(action, Wait):
        assert action.seconds is not None and 0 < action.seconds <= policy.max_queue_delay_s + 1e-9
        return
    batch = action.requests
    assert batch and batch[0] is pending[0], "the most urgent request heads the batch"
    ids = [id(p) for p in batch]
    assert len(set(ids)) == len(ids)
    assert all(any(p is q for q in pending) for p in batch)
    assert len({p.key for p in batch}) == 1, "mixed shapes"
    rows = sum(p.rows for p in batch)
    assert rows <= policy.max_batch_size
    rest = [p for p in pending if all(p is not q for q in batch)]
    if rest:
        assert max(p.level for p in batch) <= min(p.level for p in rest), "priority order"
    # within the batch, the queue order is kept
    pos = {id(p): i for i, p in enumerate(pending)}
    assert [pos[id(p)] for p in batch] == sorted(pos[id(p)] for p in batch)


@settings(max_examples=200, deadline=None)
@given(queues(), st.integers(0, 3), st.integers(0, 8))
def test_next_action_invariants(q, free, expected):
    policy, pending, now = q
    action = next_action(pending, now, policy, free, expected)
    if free == 0:
        assert action == Wait(None)
        return
    check_decision(policy, pending, now, action)
    if isinstance(action, Dispatch):
        oldest = min(p.arrival for p in action.requests)
        rows = sum(p.rows for p in action.requests)
        waited = now - oldest >= policy.max_queue_delay_s - 1e-6
        assert (policy.max_queue_delay_s == 0 or waited or rows in policy.preferred_batch_sizes
                or rows >= policy.max_preferred
                or any(p.key == action.requests[0].key for p in pending if p not in action.requests)
                or rows == policy.max_batch_size
                or 0 < expected <= len(action.requests)), "dispatched early for no reason"
    same_key = [p for p in pending if p.key == pending[0].key and p.level == pending[0].level]
    if (free and not policy.preferred_batch_sizes and 0 < expected <= len(same_key)
            and sum(p.rows for p in same_key) <= policy.max_batch_size):
        # every request that can still come is here (and fits; no preferred size cuts it first)
        assert isinstance(action, Dispatch) and len(action.requests) >= expected


@settings(max_examples=200, deadline=None)
@given(queues())
def test_next_action_drains_everything_without_starvation(q):
    """Repeatedly applying the decision, with time moving on when it says wait,
    serves every request exactly once; every batch obeys the invariants."""
    policy, pending, now = q
    left = list(pending)
    served: list[Pending] = []
    steps = 0
    while left:
        steps += 1
        assert steps <= 2 * len(pending) + 2
        action = next_action(left, now, policy, 1)
        check_decision(policy, left, now, action)
        if isinstance(action, Wait):
            now += action.seconds
            continue
        served.extend(action.requests)
        left = [p for p in left if all(p is not q for q in action.requests)]
    assert sorted(p.seq for p in served) == sorted(p.seq for p in pending)


@given(queues(), st.integers(1, 16), st.booleans())
def test_dispatches_alone_is_what_next_action_does_with_a_lone_request(q, rows, batching):
    policy, _, now = q
    if not batching:
        policy = BatchPolicy(batching=False, max_batch_size=policy.max_batch_size)
    rows = min(rows, max(policy.max_batch_size, 1))
    lone = Pending(rows, "a", 1, now, 0)  # it arrives now: it has waited nothing yet
    action = next_action([lone], now, policy, 1)
    assert policy.dispatches_alone(rows) == isinstance(action, Dispatch)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=10))
def test_next_action_without_batching_is_fifo_one_by_one(rows):
    policy = BatchPolicy(batching=False)
    pending = [Pending(r, None, 1, 0.0, i) for i, r in enumerate(rows)]
    action = next_action(pending, 0.0, policy, 1)
    assert action == Dispatch((pending[0],))


# --------------------------------------------------------------- scheduler


SHAPES = ((2,), (3,), (2, 2))
LEVELS = 3
DEFAULT_LEVEL = 2
# level 1: no timeout; level 2 (default): DELAY after 2 ms; level 3: REJECT after 4 ms
POLICIES = {
    2: QueuePolicy(timeout_action=TimeoutAction.DELAY, default_timeout_microseconds=2_000),
    3: QueuePolicy(timeout_action=TimeoutAction.REJECT, default_timeout_microseconds=4_000),
}


@dataclass
class Req:
    marker: int
    rows: int
    shape: tuple[int, ...]
    priority: int
    gap_s: float
    cancel_after_s: float | None


requests_st = st.lists(
    st.builds(
        Req,
        marker=st.just(0),
        rows=st.integers(1, 4),
        shape=st.sampled_from(SHAPES),
        priority=st.integers(0, LEVELS),
        gap_s=st.sampled_from([0.0, 0.0, 0.0005, 0.002]),
        cancel_after_s=st.one_of(st.none(), st.none(), st.none(), st.sampled_from([0.0, 0.001, 0.004])),
    ),
    min_size=1, max_size=24,
)


def make_x(marker: int, rows: int, shape: tuple[int, ...]) -> np.ndarray:
    x = np.empty((rows, *shape), dtype=np.int64)
    for r in range(rows):
        x[r] = marker * 1000 + r
    return x


class Recorder:
    """Wraps next_action: keeps each decision that dispatched, with the queue it saw."""

    def __init__(self) -> None:
        self.decisions: list[tuple[list[Pending], tuple[Pending, ...]]] = []
        self.dispatched: set[int] = set()  # markers handed to an instance

    @contextlib.contextmanager
    def installed(self):
        original = batching_mod.next_action

        def wrapper(pending, now, policy, free, expected=0):
            snapshot = list(pending)
            action = original(snapshot, now, policy, free, expected)
            if isinstance(action, Dispatch):
                self.decisions.append((snapshot, action.requests))
                for p in action.requests:
                    if not p.future.done():  # the scheduler drops the others
                        self.dispatched.add(int(p.inputs["x"].flat[0]) // 1000)
            return action

        batching_mod.next_action = wrapper
        try:
            yield self
        finally:
            batching_mod.next_action = original


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=requests_st,
    mbs=st.integers(4, 8),
    delay_us=st.sampled_from([0, 500, 3000]),
    preferred=st.lists(st.integers(2, 8), max_size=2),
    instances=st.integers(1, 2),
    preserve=st.booleans(),
    exec_s=st.sampled_from([0.0, 0.001, 0.003]),
    inline=st.booleans(),
)
def test_scheduler_invariants(reqs, mbs, delay_us, preferred, instances, preserve, exec_s, inline):
    for i, r in enumerate(reqs):
        r.marker = i + 1
    cfg = DynamicBatchingConfig(
        preferred_batch_size=tuple(p for p in preferred if p <= mbs),
        max_queue_delay_microseconds=delay_us,
        preserve_ordering=preserve,
        priority_levels=LEVELS,
        default_priority_level=DEFAULT_LEVEL,
        priority_queue_policy=POLICIES,
    )
    executed: list[np.ndarray] = []
    lock = threading.Lock()
    running = [0, 0]  # now, max

    def execute(inputs):
        x = inputs["x"]
        with lock:
            executed.append(x.copy())
            running[0] += 1
            running[1] = max(running[1], running[0])
        if exec_s:
            time.sleep(exec_s)
        with lock:
            running[0] -= 1
        return {"y": x * 2 + 1, "rowsum": x.reshape(x.shape[0], -1).sum(axis=1)}

    async def main(recorder: Recorder):
        loop = asyncio.get_running_loop()
        # inline: lone executions (all are under 50 ms here) may run on the event loop, at the door
        s = Scheduler("prop", max_batch_size=mbs, batching=cfg, instance_count=instances,
                      execute=execute, inline_max_us=50_000 if inline else 0)
        completed: list[int] = []
        cancelled_while_queued: set[int] = set()

        async def one(r: Req):
            out, timings = await s.submit({"x": make_x(r.marker, r.rows, r.shape)}, priority=r.priority)
            completed.append(r.marker)
            return out, timings

        def cancel(task, marker):
            if not task.done() and marker not in recorder.dispatched:
                cancelled_while_queued.add(marker)
            task.cancel()

        tasks = []
        for r in reqs:
            task = asyncio.ensure_future(one(r))
            tasks.append(task)
            if r.cancel_after_s is not None:
                loop.call_later(r.cancel_after_s, cancel, task, r.marker)
            if r.gap_s:
                await asyncio.sleep(r.gap_s)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.01)
        depth, inflight = s.queue_depth, s.inflight
        await s.close()
        return results, completed, cancelled_while_queued, depth, inflight

    recorder = Recorder()
    with recorder.installed():
        results, completed, cancelled_while_queued, depth, inflight = asyncio.run(asyncio.wait_for(main(recorder), 20))

    assert depth == 0 and inflight == 0
    # --- what ran: no batch too big, no mixed shapes, every row of a batch is a whole request
    runs: dict[int, int] = {}
    for x in executed:
        assert x.shape[0] <= mbs
        markers = x.reshape(x.shape[0], -1)[:, 0] // 1000
        for m in np.unique(markers):
            runs[int(m)] = runs.get(int(m), 0) + 1
            req = reqs[int(m) - 1]
            assert req.shape == x.shape[1:], "mixed shapes in a batch"
            assert int((markers == m).sum()) == req.rows
    assert all(n == 1 for n in runs.values()), "a request executed twice"

    # --- every request: its own values back, or a legitimate error
    for r, res in zip(reqs, results):
        if isinstance(res, asyncio.CancelledError):
            assert r.cancel_after_s is not None
            if r.marker in cancelled_while_queued:
                assert r.marker not in runs, "a cancelled request was executed"
        elif isinstance(res, KilnError):
            assert res.status is Status.DEADLINE_EXCEEDED, res
            level = r.priority or DEFAULT_LEVEL
            assert level == 3  # only level 3 has a REJECT timeout
            assert r.marker not in runs, "an expired request was executed"
        elif isinstance(res, BaseException):
            raise res
        else:
            out, timings = res
            assert r.marker in runs
            np.testing.assert_array_equal(out["y"], make_x(r.marker, r.rows, r.shape) * 2 + 1)
            assert out["rowsum"].shape == (r.rows,)
            assert timings.queue_ns >= 0 and timings.compute_infer_ns >= 0
    # nothing lost: everything that ran was answered, unless it was cancelled
    for m in runs:
        res = results[m - 1]
        assert not isinstance(res, KilnError)

    # --- the queue-level invariants, at each dispatch decision
    for snapshot, batch in recorder.decisions:
        assert len({p.key for p in batch}) == 1
        assert sum(p.rows for p in batch) <= mbs
        rest = [p for p in snapshot if all(p is not q for q in batch)]
        if rest:
            assert max(p.level for p in batch) <= min(p.level for p in rest), "priority order"

    # --- preserve_ordering: responses left in arrival order
    if preserve:
        assert completed == sorted(completed)
    assert running[1] <= instances


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(st.integers(1, 3), min_size=2, max_size=12),
    priorities=st.data(),
)
def test_priority_order_when_everything_is_queued(rows, priorities):
    """With the only instance blocked, queue a random mix; once released,
    execution follows priority order strictly (batch by batch)."""
    levels = priorities.draw(st.lists(st.integers(1, LEVELS), min_size=len(rows), max_size=len(rows)))
    shapes = priorities.draw(st.lists(st.sampled_from(SHAPES), min_size=len(rows), max_size=len(rows)))
    gate = threading.Event()
    started = threading.Event()
    executed: list[list[int]] = []

    def execute(inputs):
        x = inputs["x"]
        executed.append(sorted({int(m) for m in x.reshape(x.shape[0], -1)[:, 0] // 1000}))
        started.set()
        assert gate.wait(5)
        return {"y": x * 2 + 1}

    cfg = DynamicBatchingConfig(priority_levels=LEVELS, default_priority_level=DEFAULT_LEVEL)

    async def main():
        s = Scheduler("prio", max_batch_size=4, batching=cfg, instance_count=1, execute=execute)
        first = asyncio.ensure_future(s.submit({"x": make_x(0, 1, (2,))}))
        assert await asyncio.to_thread(started.wait, 5)
        tasks = [asyncio.ensure_future(s.submit({"x": make_x(i + 1, r, sh)}, priority=lvl))
                 for i, (r, sh, lvl) in enumerate(zip(rows, shapes, levels))]
        await asyncio.sleep(0.005)
        gate.set()
        res = await asyncio.gather(first, *tasks)
        await s.close()
        return res

    results = asyncio.run(asyncio.wait_for(main(), 20))
    for i, (out, _) in enumerate(results[1:]):
        np.testing.assert_array_equal(out["y"], make_x(i + 1, rows[i], shapes[i]) * 2 + 1)
    batch_levels = [[levels[m - 1] for m in b] for b in executed[1:]]
    for earlier, later in zip(batch_levels, batch_levels[1:]):
        assert max(earlier) <= min(later)
    assert sorted(m for b in executed[1:] for m in b) == list(range(1, len(rows) + 1))
