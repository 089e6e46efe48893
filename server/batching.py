"""The dynamic batcher: one Scheduler per loaded model version.

Shape of the thing (after Ray Serve's ``_BatchQueue`` and Triton core's
``GetDynamicBatch``):

* ``submit()`` validates the request at the door (rows, priority, queue size),
  puts it in its priority level's queue and awaits a future.  Except on an idle,
  fast model (the inline path below): a request its policy dispatches alone runs
  right there and its result is returned, with no queue entry or future.
* The batching decision is a pure function, :func:`next_action` in
  server/batch_policy.py: from the queued requests (in priority order), a
  monotonic ``now`` and the policy it answers ``Dispatch(requests)`` or
  ``Wait(seconds)``.  Property tests drive it directly.
* ``_pump()`` applies that decision.  It is event driven, never polling: it
  runs when a request arrives (inline, so a lone request on an idle instance
  is dispatched without an extra event-loop hop), when an instance frees up,
  and from one ``loop.call_at`` timer armed for the earliest of "the oldest
  request has waited max_queue_delay" and "the next queue timeout/deadline".
* Batches run on an :class:`InstancePool` (server/instances.py) of
  ``instance_count`` threads; a free-instance counter owned by the event loop
  keeps at most that many batches in flight.
* With an execution timeout, a watchdog timer on the event loop guards each
  batch: when it fires the batch fails INTERNAL, the stuck instance thread is
  abandoned and a fresh one takes its place (``instance_replacements``); the
  stuck call's result, if it ever comes, is discarded.  Concatenation, ``execute`` and the split into per-request
  row-range views all happen on the instance thread; one
  ``call_soon_threadsafe`` hands the results back to the loop.

Everything except the instance-thread body runs on the event loop thread, so
no locks are needed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Callable, Hashable, Iterable, NamedTuple

import numpy as np

from server.batch_policy import BatchPolicy, Wait, next_action
from server.errors import KilnError, Status
from server.instances import InstancePool
from server.model_types import DynamicBatchingConfig, TimeoutAction

__all__ = ["ExecutionRecord", "Pending", "RequestTimings", "Scheduler"]

_log = logging.getLogger(__name__)
_perf_ns = time.perf_counter_ns


# --------------------------------------------------------------------------- #
# Public records
# --------------------------------------------------------------------------- #


# NamedTuples, not frozen dataclasses: one of each is made per request or batch, and a frozen
# dataclass's __init__ sets every field through object.__setattr__.
class RequestTimings(NamedTuple):
    """Per request, nanoseconds (perf_counter_ns)."""

    queue_ns: int  # submit -> batch picked for execution
    compute_input_ns: int  # concatenating the batch's inputs
    compute_infer_ns: int  # the execute() call
    compute_output_ns: int  # splitting outputs back to requests


class ExecutionRecord(NamedTuple):
    """Per successfully executed batch, passed to ``on_execution``."""

    rows: int
    requests: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int


# --------------------------------------------------------------------------- #
# Queued requests (the batching decision itself is server/batch_policy.py)
# --------------------------------------------------------------------------- #

# Request states
_QUEUED = 0
_RUNNING = 1
_DONE = 2  # has an outcome (result or error), maybe not yet released (preserve_ordering)


class Pending:
    """One accepted request.  :func:`next_action` reads only ``rows``, ``key``,
    ``level`` and ``arrival``; the rest is the scheduler's bookkeeping."""

    __slots__ = (
        "rows", "key", "level", "arrival", "seq", "inputs", "future",
        "submit_ns", "state", "queue", "outcome",
    )

    def __init__(
        self,
        rows: int,
        key: Hashable,
        level: int = 1,
        arrival: float = 0.0,
        seq: int = 0,
        inputs: dict[str, np.ndarray] | None = None,
        future: asyncio.Future | None = None,
        submit_ns: int = 0,
    ) -> None:
        self.rows = rows
        self.key = key
        self.level = level
        self.arrival = arrival
        self.seq = seq
        self.inputs = inputs
        self.future = future
        self.submit_ns = submit_ns
        self.state = _QUEUED
        self.queue: OrderedDict[int, Pending] | None = None
        self.outcome: Any = None

    def __repr__(self) -> str:
        return (f"Pending(seq={self.seq}, rows={self.rows}, level={self.level}, "
                f"key={self.key!r}, arrival={self.arrival:.6f})")


PEAK_WINDOW_S = 0.1  # long enough to span a few batch cycles, short enough to follow the load


# --------------------------------------------------------------------------- #
# The scheduler
# --------------------------------------------------------------------------- #

_REJECT = 0  # heap entry kinds
_DEMOTE = 1


def _deadline_error(model: str, why: str) -> KilnError:
    return KilnError(Status.DEADLINE_EXCEEDED, f"request for model '{model}' {why}")


class Scheduler:
    """Queues requests for one model version, forms batches, runs them on a
    pool of ``instance_count`` threads and hands each request its rows back."""

    def __init__(
        self,
        model_name: str,
        *,
        max_batch_size: int,
        batching: DynamicBatchingConfig | None,
        instance_count: int,
        execute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
        on_execution: Callable[[ExecutionRecord], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        inline_max_us: float = 0.0,
        execution_timeout_s: float = 0.0,
    ) -> None:
        if instance_count < 1:
            raise ValueError(f"model '{model_name}': instance_count must be >= 1, got {instance_count}")
        self.model_name = model_name
        self._mbs = max(max_batch_size, 0)
        self._execute = execute
        self._on_execution = on_execution
        self._clock = clock
        self._instances = instance_count
        self._policy = BatchPolicy.from_config(max_batch_size, batching)
        self._batching = self._policy.batching

        # Priority levels (only with dynamic batching): index 1..levels.
        if self._batching:
            assert batching is not None
            levels = batching.priority_levels
            if levels < 0:
                raise ValueError(f"model '{model_name}': priority_levels must be >= 0, got {levels}")
            default = batching.default_priority_level
            if levels > 0 and not 1 <= default <= levels:
                raise ValueError(
                    f"model '{model_name}': default_priority_level must be in [1, {levels}], got {default}")
            self._max_priority = levels
            self._levels = max(levels, 1)
            self._default_level = default if levels > 0 else 1
            policies = [batching.policy_for(lvl) for lvl in range(1, self._levels + 1)]
            self._preserve = batching.preserve_ordering
        else:
            self._max_priority = 0
            self._levels = 1
            self._default_level = 1
            policies = []
            self._preserve = False
        # Per level (index level-1): max size (0 = unbounded), timeout (s), action, override.
        self._max_size = [p.max_queue_size for p in policies] or [0]
        self._timeout_s = [p.default_timeout_microseconds / 1e6 for p in policies] or [0.0]
        self._delay_action = [p.timeout_action is TimeoutAction.DELAY for p in policies] or [False]
        self._override = [p.allow_timeout_override for p in policies] or [False]
        self._max_size_any = any(self._max_size)
        self._timeouts_any = any(self._timeout_s) or any(self._override)

        # Queues in priority order: [L1 normal, L1 delayed, L2 normal, L2 delayed, ...]
        self._queues: list[OrderedDict[int, Pending]] = [
            OrderedDict() for _ in range(2 * self._levels)]
        self._level_count = [0] * (self._levels + 1)
        self._waiting = 0
        self._inflight = 0
        # The most requests in flight at once in the current window of PEAK_WINDOW_S and in the
        # last completed one: what a closed-loop load keeps outstanding (see _expected).
        self._peak = self._last_peak = 0
        self._peak_window_end = 0.0  # on self._clock
        self._free = instance_count
        self._seq = itertools.count()
        self._expiries: list[tuple[float, int, int, Pending]] = []  # (time, n, kind, req)
        self._expiry_n = itertools.count()
        self._order: OrderedDict[int, Pending] = OrderedDict()  # preserve_ordering
        self._running: set[tuple[Pending, ...]] = set()

        # Inline fast path: a lone request on an idle model whose lone executions take less
        # than inline_max_us runs on the event loop. For such tiny models the two thread
        # wake-ups of the hand-off cost more than the execution itself; under load (anything
        # queued or running) every batch still goes to the instance threads.
        # (never with an execution timeout: a call on the event loop cannot be abandoned)
        self._inline_max_ns = 0 if execution_timeout_s > 0 else inline_max_us * 1000
        self._lone_ewma_ns = float("inf")  # unknown until a lone execution was measured

        self._pool = InstancePool(instance_count, f"kiln-{model_name}")
        # Execution timeout: a watchdog per running batch (0: none).
        self._exec_timeout_s = max(execution_timeout_s, 0.0)
        self._watchdogs: dict[tuple[Pending, ...], asyncio.TimerHandle] = {}
        self.instance_replacements = 0  # instances abandoned after an execution timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")  # on self._clock
        self._closing = False
        self._drained: asyncio.Event | None = None
        self._closed = False

    # ------------------------------------------------------------------ API

    @property
    def queue_depth(self) -> int:
        """Requests waiting in the queue (not executing)."""
        return self._waiting

    @property
    def inflight(self) -> int:
        """Requests accepted and not yet answered."""
        return self._inflight

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        *,
        priority: int = 0,
        timeout_us: int | None = None,
        deadline: float | None = None,
    ) -> tuple[dict[str, np.ndarray], RequestTimings]:
        if self._closing:
            raise KilnError(Status.UNAVAILABLE, f"model '{self.model_name}' is unloading")
        # -- the door: validate
        if priority:
            if priority < 0 or priority > self._max_priority:
                raise KilnError(
                    Status.INVALID_ARGUMENT,
                    f"model '{self.model_name}': priority {priority} is out of range "
                    f"[0, {self._max_priority}] (0 means the default level)")
            level = priority
        else:
            level = self._default_level
        mbs = self._mbs
        if mbs:
            rows = -1
            for name, arr in inputs.items():
                shape = arr.shape
                if not shape or (rows >= 0 and shape[0] != rows):
                    raise KilnError(
                        Status.INVALID_ARGUMENT,
                        f"model '{self.model_name}': every input needs the same batch dimension "
                        f"(dim 0); input '{name}' has shape {list(shape)}")
                rows = shape[0]
            if rows > mbs:
                raise KilnError(
                    Status.INVALID_ARGUMENT,
                    f"model '{self.model_name}': request has {rows} rows, more than "
                    f"max_batch_size {mbs}")
            if rows < 0:
                raise KilnError(Status.INVALID_ARGUMENT,
                                f"model '{self.model_name}': request has no inputs")
        else:
            rows = 1
        if self._max_size_any:
            limit = self._max_size[level - 1]
            if limit and self._level_count[level] >= limit:
                raise KilnError(
                    Status.UNAVAILABLE,
                    f"model '{self.model_name}': queue is full (max_queue_size {limit} "
                    f"at priority level {level})")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = self._clock()
        if deadline is not None and deadline <= now:
            raise _deadline_error(self.model_name, "reached its deadline before it was queued")

        # Not under preserve_ordering: an answer released just before may not have reached its
        # caller yet (its task wakes on the next turn), and this one would overtake it.
        if self._inline_fits(self._free) and not self._preserve and self._policy.dispatches_alone(rows):
            return self._run_alone_now(Pending(rows, None, level, now, next(self._seq), inputs, None, _perf_ns()))

        # -- accept
        if self._batching:
            key = tuple(sorted([(n, a.dtype, a.shape[1:]) for n, a in inputs.items()]))
        else:
            key = None
        fut = loop.create_future()
        req = Pending(rows, key, level, now, next(self._seq), inputs, fut, _perf_ns())
        q = self._queues[2 * level - 2]
        req.queue = q
        q[req.seq] = req
        self._level_count[level] += 1
        self._waiting += 1
        if now >= self._peak_window_end:  # a new window; the last one's peak is what _expected uses
            self._last_peak, self._peak = self._peak, self._inflight
            self._peak_window_end = now + PEAK_WINDOW_S
        self._inflight += 1
        if self._inflight > self._peak:
            self._peak = self._inflight
        if self._preserve:
            self._order[req.seq] = req
        if deadline is not None:
            self._push_expiry(deadline, _REJECT, req)
        if self._timeouts_any:
            t = self._timeout_s[level - 1]
            if timeout_us is not None and timeout_us > 0 and self._override[level - 1]:
                t = timeout_us / 1e6
            if t > 0:
                self._push_expiry(now + t, _DEMOTE if self._delay_action[level - 1] else _REJECT, req)
        try:
            if self._free:
                self._pump()
            elif self._expiries:
                self._arm_timer(self._clock())
            return await fut
        except asyncio.CancelledError:
            if req.state == _QUEUED:
                self._unqueue(req)
                req.state = _DONE
            if self._preserve and self._order.pop(req.seq, None) is not None:
                self._release()
            raise
        finally:
            self._inflight -= 1
            if self._closing and not self._inflight and self._drained is not None:
                self._drained.set()

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting (UNAVAILABLE), let queued and running requests finish;
        after ``drain_timeout_s`` fail the rest with UNAVAILABLE.  Shuts the pool."""
        if self._closed:
            return
        if not self._closing:
            self._closing = True
            # Flush: nothing waits for company any more.
            self._policy = replace(self._policy, max_queue_delay_s=0.0,
                                   preferred_batch_sizes=frozenset())
            if self._loop is not None:
                self._pump()
        drained = True
        if self._inflight:
            if self._drained is None:
                self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), drain_timeout_s)
            except (TimeoutError, asyncio.TimeoutError):
                drained = False
                self._fail_all(KilnError(
                    Status.UNAVAILABLE,
                    f"model '{self.model_name}' was unloaded before the request completed"))
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for watchdog in self._watchdogs.values():
            watchdog.cancel()
        self._watchdogs.clear()
        if drained and not self._running:
            await asyncio.to_thread(self._pool.shutdown, True)
        else:  # a stuck execute() must not hold up the unload
            self._pool.shutdown(wait=False)

    # ------------------------------------------------------------ internals

    def _push_expiry(self, when: float, kind: int, req: Pending) -> None:
        heap = self._expiries
        heapq.heappush(heap, (when, next(self._expiry_n), kind, req))
        # Entries of requests that already left the queue are dropped lazily;
        # compact when they dominate so memory stays bounded.
        if len(heap) > 64 and len(heap) > 4 * self._waiting:
            heap[:] = [x for x in heap if x[3].state == _QUEUED]
            heapq.heapify(heap)

    def _unqueue(self, req: Pending) -> None:
        del req.queue[req.seq]  # type: ignore[index]
        req.queue = None
        self._level_count[req.level] -= 1
        self._waiting -= 1

    def _pending(self) -> Iterable[Pending]:
        qs = [q for q in self._queues if q]
        if len(qs) == 1:
            return qs[0].values()
        return itertools.chain.from_iterable(q.values() for q in qs)

    def _pump(self) -> None:
        """Apply queue timeouts, dispatch what next_action says, re-arm the timer."""
        now = self._clock()
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, _, kind, req = heapq.heappop(heap)
            if req.state != _QUEUED:
                continue
            if kind == _REJECT:
                self._unqueue(req)
                self._fail(req, _deadline_error(self.model_name, "timed out in the queue"))
            elif req.queue is self._queues[2 * req.level - 2]:
                # DELAY: the request loses its place and goes behind the level's others.
                del req.queue[req.seq]
                req.queue = self._queues[2 * req.level - 1]
                req.queue[req.seq] = req

        wait = None
        while self._free and self._waiting:
            action = next_action(self._pending(), now, self._policy, self._free, self._expected())
            if type(action) is Wait:
                wait = action.seconds
                break
            batch = action.requests
            dead = [r for r in batch if r.future.done()]
            for r in batch:
                self._unqueue(r)
            if dead:  # cancelled but not yet noticed by submit(): never execute them
                for r in dead:
                    r.state = _DONE
                batch = tuple(r for r in batch if r.state == _QUEUED)
                if not batch:
                    continue
            for r in batch:
                r.state = _RUNNING
            self._free -= 1
            self._running.add(batch)
            if len(batch) == 1 and self._inline_fits(self._free + 1):
                result = self._compute(batch, _perf_ns())
                self._loop.call_soon(self._finish, batch, result)  # type: ignore[union-attr]
            else:
                work = self._pool.submit(self._run_batch, batch, _perf_ns())
                if self._exec_timeout_s:
                    self._watchdogs[batch] = self._loop.call_later(  # type: ignore[union-attr]
                        self._exec_timeout_s, self._on_hung, batch, work)
        self._arm_timer(now, wait)

    def _expected(self) -> int:
        """How many requests can still be expected to join a batch formed now (0: unknown).

        A client waits for its answer before it sends again, so no more requests arrive
        before an answer than the most there were in flight lately; those executing now
        will not join. Once that many are queued the batch takes them all at once instead
        of waiting out the queue delay for company that cannot come. Under a closed-loop
        load of N streams this merges the two halves a busy instance would otherwise split
        them into: one execution of N rows instead of two of N/2.
        """
        if self._policy.max_queue_delay_s <= 0 or not self._last_peak:
            return 0
        executing = sum(len(batch) for batch in self._running)
        return max(self._last_peak - executing, 0)

    def _arm_timer(self, now: float, wait: float | None = None) -> None:
        heap = self._expiries
        while heap and heap[0][3].state != _QUEUED:
            heapq.heappop(heap)
        when = now + wait if wait is not None else float("inf")
        if heap and heap[0][0] < when:
            when = heap[0][0]
        if when >= self._timer_at:
            return  # an earlier (or equal) wake-up is already armed
        if when == float("inf"):
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop
        assert loop is not None
        self._timer_at = when
        self._timer = loop.call_at(loop.time() + max(when - now, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self._pump()

    def _run_batch(self, batch: tuple[Pending, ...], dispatch_ns: int) -> None:
        """Instance thread: compute, then hand the result back to the loop."""
        result = self._compute(batch, dispatch_ns)
        try:
            self._loop.call_soon_threadsafe(self._finish, batch, result)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is gone (process shutting down)
            pass

    def _compute(self, batch: tuple[Pending, ...], dispatch_ns: int) -> Any:
        """Concatenate, execute, split: the batch's result, or the KilnError that fails it."""
        t0 = _perf_ns()
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = {name: np.concatenate([r.inputs[name] for r in batch])
                          for name in batch[0].inputs}
            t1 = _perf_ns()
            try:
                outputs = self._execute(inputs)
            except Exception as exc:  # noqa: BLE001 - isolation: any runtime failure
                # INTERNAL for every request of the batch, whatever the runtime raised.
                raise KilnError(
                    Status.INTERNAL,
                    f"model '{self.model_name}' failed to execute: {type(exc).__name__}: {exc}",
                ) from exc
            t2 = _perf_ns()
            if self._mbs:
                rows = sum(r.rows for r in batch)
                for name, arr in outputs.items():
                    shape = arr.shape
                    got = shape[0] if shape else 0
                    if got != rows or not shape:
                        raise KilnError(
                            Status.INTERNAL,
                            f"model '{self.model_name}' returned output '{name}' with "
                            f"{got if shape else 'no'} rows for a batch of {rows} rows")
            else:
                rows = len(batch)
            if len(batch) == 1:
                parts = [outputs]
            else:
                parts = []
                start = 0
                for r in batch:
                    stop = start + r.rows
                    parts.append({name: arr[start:stop] for name, arr in outputs.items()})
                    start = stop
            t3 = _perf_ns()
            result: Any = (parts, rows, dispatch_ns, t1 - t0, t2 - t1, t3 - t2)
        except KilnError as exc:
            result = exc
        except Exception as exc:  # noqa: BLE001 - e.g. outputs that cannot be split
            result = KilnError(
                Status.INTERNAL,
                f"model '{self.model_name}' failed to handle a batch: {type(exc).__name__}: {exc}")
        return result

    def _on_hung(self, batch: tuple[Pending, ...], work: Any) -> None:
        """Event loop, watchdog: the batch ran past the execution timeout.  Fail it, abandon
        its instance thread (Python cannot kill it) and start a replacement."""
        self._watchdogs.pop(batch, None)
        if batch not in self._running:
            return
        self._running.discard(batch)
        self._pool.replace(work)
        self.instance_replacements += 1
        timeout_ms = self._exec_timeout_s * 1000
        _log.error("model '%s': execution exceeded %.0f ms; its instance was abandoned and replaced",
                   self.model_name, timeout_ms)
        error = KilnError(
            Status.INTERNAL,
            f"model '{self.model_name}' execution exceeded the execution timeout of {timeout_ms:g} ms "
            "(execution_timeout_microseconds); the instance was replaced")
        for r in batch:
            self._resolve(r, error, True)
        self._free += 1  # the replacement instance
        if self._preserve:
            self._release()
        if self._waiting:
            self._pump()

    def _inline_fits(self, free: int) -> bool:
        """A lone batch may run on the event loop: with ``free`` instances free before it, the
        model is idle, nothing else waits, and its lone executions are measured fast enough."""
        return free == self._instances and not self._waiting and self._lone_ewma_ns < self._inline_max_ns

    def _run_alone_now(self, req: Pending) -> tuple[dict[str, np.ndarray], RequestTimings]:
        """The inline path taken at the door: an idle model, an empty queue, a fast model and a
        request its policy dispatches alone run here and now, on the event loop, and the result
        goes straight back to the caller: no future, no queue entry, no wake-up of its task."""
        req.state = _RUNNING
        self._free -= 1
        self._inflight += 1  # as the gauge reads it from the metrics thread while the runtime runs
        try:
            result = self._compute((req,), _perf_ns())
        finally:
            self._inflight -= 1
            req.state = _DONE
            req.inputs = None
            # The instance stays taken until the loop's next turn, as after any inline run:
            # requests arriving meanwhile queue and batch (that is what tells load from a lone call).
            self._loop.call_soon(self._free_inline_instance)  # type: ignore[union-attr]
        if isinstance(result, KilnError):
            raise result
        (out,), rows, dispatch_ns, cin, cinf, cout = result
        self._executed(1, rows, cin, cinf, cout)
        return out, RequestTimings(dispatch_ns - req.submit_ns, cin, cinf, cout)

    def _free_inline_instance(self) -> None:
        self._free += 1
        if self._waiting:
            self._pump()

    def _executed(self, requests: int, rows: int, cin: int, cinf: int, cout: int) -> None:
        """A batch ran: learn how long lone executions take, report the execution."""
        if requests == 1 and self._inline_max_ns:
            ewma = self._lone_ewma_ns
            self._lone_ewma_ns = cinf if ewma == float("inf") else 0.8 * ewma + 0.2 * cinf
        if self._on_execution is not None:
            try:
                self._on_execution(ExecutionRecord(rows, requests, cin, cinf, cout))
            except Exception:  # noqa: BLE001 - metrics must not break serving
                _log.exception("on_execution callback failed for model '%s'", self.model_name)

    def _finish(self, batch: tuple[Pending, ...], result: Any) -> None:
        """Event loop: resolve the batch's futures, free the instance, pump."""
        if self._exec_timeout_s:
            watchdog = self._watchdogs.pop(batch, None)
            if watchdog is not None:
                watchdog.cancel()
            elif batch not in self._running:
                return  # abandoned after the execution timeout: its requests already failed
        self._free += 1
        self._running.discard(batch)
        if isinstance(result, KilnError):
            for r in batch:
                self._resolve(r, result, True)
        else:
            parts, rows, dispatch_ns, cin, cinf, cout = result
            for r, out in zip(batch, parts):
                self._resolve(r, (out, RequestTimings(dispatch_ns - r.submit_ns, cin, cinf, cout)), False)
            self._executed(len(batch), rows, cin, cinf, cout)
        if self._preserve:
            self._release()
        if self._waiting:
            self._pump()

    def _resolve(self, req: Pending, value: Any, is_error: bool) -> None:
        req.state = _DONE
        req.inputs = None
        if self._preserve:
            req.outcome = (value, is_error)
            return
        fut = req.future
        if not fut.done():
            if is_error:
                fut.set_exception(value)
            else:
                fut.set_result(value)

    def _release(self) -> None:
        """preserve_ordering: hand out finished responses in arrival order."""
        order = self._order
        while order:
            req = next(iter(order.values()))
            if req.state != _DONE:
                return
            order.popitem(last=False)
            fut = req.future
            if not fut.done():
                value, is_error = req.outcome
                if is_error:
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
            req.outcome = None

    def _fail(self, req: Pending, error: KilnError) -> None:
        """Fail a request that never executed (timeout, close): no ordering wait."""
        req.state = _DONE
        req.inputs = None
        if self._preserve:
            self._order.pop(req.seq, None)
        if not req.future.done():
            req.future.set_exception(error)
        if self._preserve:
            self._release()

    def _fail_all(self, error: KilnError) -> None:
        for q in self._queues:
            for req in list(q.values()):
                self._unqueue(req)
                self._fail(req, error)
        for batch in list(self._running):
            for req in batch:
                req.state = _DONE
                if not req.future.done():
                    req.future.set_exception(error)
        self._running.clear()
        if self._preserve:  # release finished ones, fail the rest
            self._release()
            for req in self._order.values():
                if not req.future.done():
                    req.future.set_exception(error)
            self._order.clear()
