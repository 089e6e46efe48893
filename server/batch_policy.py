"""The batching decision as a pure function: which queued requests run now as one batch, or how long to wait.

server/batching.py's Scheduler applies it; tests/test_batching_properties.py drives it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from server.model_types import DynamicBatchingConfig

if TYPE_CHECKING:
    from server.batching import Pending

__all__ = ["BatchPolicy", "Dispatch", "Wait", "next_action"]


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """What :func:`next_action` needs to know about the model."""

    batching: bool  # False: every request is its own batch, in queue order
    max_batch_size: int = 0
    preferred_batch_sizes: frozenset[int] = frozenset()
    max_queue_delay_s: float = 0.0

    @property
    def max_preferred(self) -> int:
        return max(self.preferred_batch_sizes, default=self.max_batch_size)

    def dispatches_alone(self, rows: int) -> bool:
        """Whether :func:`next_action` dispatches a lone request of ``rows`` rows the moment it
        arrives (rather than waiting for company)."""
        return (not self.batching or self.max_queue_delay_s <= 0 or rows in self.preferred_batch_sizes
                or rows >= self.max_batch_size or rows >= self.max_preferred)

    @classmethod
    def from_config(cls, max_batch_size: int,
                    batching: DynamicBatchingConfig | None) -> "BatchPolicy":
        if max_batch_size <= 0 or batching is None:
            return cls(batching=False, max_batch_size=max(max_batch_size, 0))
        preferred = frozenset(p for p in batching.preferred_batch_size
                              if 0 < p <= max_batch_size)
        return cls(
            batching=True,
            max_batch_size=max_batch_size,
            preferred_batch_sizes=preferred,
            max_queue_delay_s=max(batching.max_queue_delay_microseconds, 0) / 1e6,
        )


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Execute these requests now, as one batch."""

    requests: tuple[Pending, ...]


@dataclass(frozen=True, slots=True)
class Wait:
    """Dispatch nothing; decide again after ``seconds`` (None: only when
    something changes - an arrival or a free instance)."""

    seconds: float | None


_IDLE = Wait(None)
_SLOP_S = 1e-7


def next_action(pending: Iterable[Pending], now: float, policy: BatchPolicy,
                free_instances: int, expected: int = 0) -> Dispatch | Wait:
    """The batching decision.  Pure: reads its arguments, changes nothing.

    ``pending`` are the queued requests in priority order: level 1 first;
    within a level, requests whose DELAY timeout passed come after the others;
    otherwise arrival order.  ``now`` is on the same clock as ``arrival``.

    The candidate batch starts at the head (the most urgent request) and takes
    the following requests of the same shape key, in order, while the rows fit
    in max_batch_size.  A request of another shape is skipped (it will head a
    later batch), but once one is skipped no request of a *lower* priority level
    joins: nothing executes ahead of a more urgent request it does not share a
    batch with.  A compatible request that does not fit closes the batch.

    Then, as Triton does:
      * a preferred batch size among the candidate's prefixes and the oldest
        member's delay not yet exceeded -> dispatch the largest such prefix;
      * the batch is full, or has reached the largest preferred size, or the
        oldest member has waited max_queue_delay, or no delay is configured
        -> dispatch the whole candidate;
      * and, beyond Triton: the candidate holds ``expected`` requests or more
        (``expected`` > 0: as many as the scheduler can still expect to arrive
        before these are answered) -> dispatch the whole candidate: waiting
        longer would add delay and no company;
      * otherwise wait for the rest of the oldest member's delay.
    """
    if free_instances <= 0:
        return _IDLE
    it = iter(pending)
    head = next(it, None)
    if head is None:
        return _IDLE
    if not policy.batching:
        return Dispatch((head,))

    mbs = policy.max_batch_size
    preferred = policy.preferred_batch_sizes
    key = head.key
    batch = [head]
    rows = head.rows
    oldest = head.arrival
    best = 1 if rows in preferred else 0
    full = rows >= mbs
    if not full:
        cut_level = None
        for e in it:
            if cut_level is not None and e.level > cut_level:
                break
            if e.key != key:
                if cut_level is None:
                    cut_level = e.level
                continue
            if rows + e.rows > mbs:
                full = True
                break
            batch.append(e)
            rows += e.rows
            if e.arrival < oldest:
                oldest = e.arrival
            if rows in preferred:
                best = len(batch)
            if rows >= mbs:
                full = True
                break

    delay = policy.max_queue_delay_s
    # (the slop keeps float rounding from turning 'wake at the deadline' into a second tiny wait)
    exceeded = delay > 0 and now - oldest >= delay - _SLOP_S
    if best and not exceeded:
        return Dispatch(tuple(batch[:best]))
    if full or exceeded or delay <= 0 or rows >= policy.max_preferred or 0 < expected <= len(batch):
        return Dispatch(tuple(batch))
    return Wait(oldest + delay - now)
