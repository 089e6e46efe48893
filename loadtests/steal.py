"""CPU time the hypervisor gave to other guests while this VM wanted it ("steal"), from /proc/stat.

    before = cpu_ticks(); ...load...; share = steal_share(before, cpu_ticks())

On a shared VM a neighbour's burst can halve a server's throughput for one step. A server
measured then cannot be compared with one measured in a quiet moment, and without this
number the slow step looks like a slow server. Every load step records the share of the
machine's CPU time that was stolen over its window (0.0 on bare metal; None off Linux).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CpuTicks", "cpu_ticks", "steal_share"]

CpuTicks = tuple[int, int]  # (stolen, all) ticks of every core since boot

# /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal guest guest_nice;
# guest time is already counted in user and nice, so "all" is the first eight
_STEAL_FIELD = 7


def cpu_ticks(stat_path: Path = Path("/proc/stat")) -> CpuTicks | None:
    try:
        line = stat_path.read_text().split("\n", 1)[0]
    except OSError:
        return None
    fields = [int(value) for value in line.split()[1:]]
    if len(fields) <= _STEAL_FIELD:  # a kernel too old to count steal
        return None
    return fields[_STEAL_FIELD], sum(fields[: _STEAL_FIELD + 1])


def steal_share(before: CpuTicks | None, after: CpuTicks | None) -> float | None:
    """Stolen share (0..1) of the machine's CPU time between two readings."""
    if before is None or after is None:
        return None
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None
