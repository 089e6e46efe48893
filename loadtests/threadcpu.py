"""Where a local server's CPU goes, per thread, from /proc (Linux).

    before = sample(server_pid); ...load...; split = cpu_split(before, sample(server_pid), seconds)

The server's process and its children (`kiln serve --workers N` runs each worker as a
child) are read thread by thread. Threads fall into three roles:

  event_loop  the main thread of a process that has other threads: asyncio's loop, where
              grpc.aio, decode/encode and the batcher run (a worker's supervisor counts too;
              it is idle but for /metrics)
  instances   kiln's instance threads (OS name "kiln-<model>-<n>", server/threadnames.py):
              the runtime call, with the batch's concatenation and split
  other       the rest: grpc-core's poller and event-engine threads, a runtime's own pool
              threads (ORT intra-op threads beyond the calling one), loading threads

Values are in cores (CPU seconds per wall second), so on 2 cores they add up to at most 2.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

__all__ = ["cpu_split", "sample", "stat_fields"]

INSTANCE_PREFIX = "kiln-"
ROLES = ("event_loop", "instances", "other")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# (pid, tid) -> (thread name, CPU seconds)
Sample = dict[tuple[int, int], tuple[str, float]]


def stat_fields(stat: str) -> list[str]:
    """The fields of a /proc/<pid>/stat line after the command name (which may hold spaces and
    parentheses): [0] state, [1] ppid, [2] process group, [11] utime, [12] stime."""
    return stat[stat.rindex(")") + 2 :].split()


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from every process's parent in /proc/<pid>/stat."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat_fields(stat)[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += parents.get(current, [])
    return tree


def _thread_cpu(task: Path) -> tuple[str, float]:
    """(name, CPU seconds) of one thread: nanoseconds from schedstat where the kernel keeps it,
    else utime + stime in clock ticks (10 ms steps)."""
    stat = (task / "stat").read_text()
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    try:
        return name, int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        fields = stat_fields(stat)
        return name, (int(fields[11]) + int(fields[12])) / _TICKS


def sample(pid: int) -> Sample:
    """CPU seconds so far of every thread of `pid` and its descendants (threads that exit in
    between are simply missing)."""
    result: Sample = {}
    for proc in _process_tree(pid):
        for task in Path(f"/proc/{proc}/task").glob("*"):
            try:
                result[(proc, int(task.name))] = _thread_cpu(task)
            except (OSError, ValueError):
                pass
    return result


def _role(key: tuple[int, int], name: str, multithreaded: set[int]) -> str:
    pid, tid = key
    if name.startswith(INSTANCE_PREFIX):
        return "instances"
    if pid == tid and pid in multithreaded:
        return "event_loop"
    return "other"


def cpu_split(before: Sample, after: Sample, seconds: float) -> dict[str, float]:
    """Cores used by each role between two samples, and their total."""
    threads_per_process = Counter(pid for pid, _ in after)
    multithreaded = {pid for pid, n in threads_per_process.items() if n > 1}
    split = dict.fromkeys(ROLES, 0.0)
    for key, (name, cpu) in after.items():
        used = cpu - before.get(key, (name, 0.0))[1]
        split[_role(key, name, multithreaded)] += used / seconds
    split["total"] = sum(split[r] for r in ROLES)
    return {k: round(v, 3) for k, v in split.items()}
