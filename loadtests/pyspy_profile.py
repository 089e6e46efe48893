"""Where a server's threads are busy, from a py-spy profile: the runtime, (de)serialization, batch
copies, statistics, kiln's own Python, asyncio/grpc.aio, and the C under the event loop (gRPC
core, uvloop). py-spy samples every thread that is not waiting, so on a full machine a thread
that is ready but not running still counts: shares of busy-thread time, not of CPU.

    python -m loadtests.pyspy_profile PROFILE.raw          # summarize a `py-spy record --format raw --threads` file

The server runs as py-spy's child (`command_under_pyspy`), so no ptrace permission beyond a
parent's is needed. Samples of start-up and shutdown (model loading, imports, drain) are left
out, and so are threads waiting for work: what remains is the serving itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# (category, file fragments, function prefix or None): the first rule matching a frame, going
# from the innermost frame outwards, names the sample's category.
RULES: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("runtime", ("server/runtime/", "onnxruntime/", "tensorrt/", "torch/"), None),
    ("serialization", ("server/codec.py", "google/protobuf/"), None),
    ("serialization", ("server/service.py",), "_safe_deserializer"),
    ("statistics and metrics", ("server/stats.py", "server/metrics.py", "prometheus_client/"), None),
    ("batch copies", ("server/batching.py",), "Scheduler._compute"),
    ("scheduler", ("server/batching.py",), None),
    ("kiln request path", ("server/",), None),
)
# asyncio's and grpc.aio's own Python: the category of a sample with no kiln frame around it
# (asyncio code that kiln called counts as kiln's step).
FRAMEWORK = ("asyncio and grpc.aio (Python)", ("asyncio/", "grpc/", "uvloop/"))
# Frames that only drive the event loop: a sample whose innermost frame is one of these is in C
# under the loop (uvloop, grpc-core's completion callbacks), not in any Python function.
LOOP_DRIVERS = ("asyncio/runners.py", "asyncio/base_events.py", "server/eventloop.py", "server/cli.py",
                "server/__main__.py", "server/workers.py", "runpy.py", "<frozen runpy>")
# Frames of a server starting or stopping, not serving.
NOT_SERVING = ("KilnServer.start ", "KilnServer.stop ", "_find_and_load ", "ModelRepository.load")
# Innermost frames of a thread that waits for work (py-spy cannot tell that wait from running).
WAITING = ("InstancePool._worker ",)
# Command-line fragments of kiln's serving processes (the server and its --workers).
SERVER_PROCESSES = ("server serve", "server.workers")
EVENT_LOOP_C = "gRPC core and event loop (C)"
OTHER_PROCESSES = "other processes"
POLLER = "gRPC poller thread"
OTHER_THREADS = "other threads"


@dataclass(frozen=True)
class Sample:
    thread: str
    frames: tuple[str, ...]  # outermost first, as py-spy writes them: "function (file:line)"
    count: int
    in_server: bool = True  # False: a process the server started that is not kiln (e.g. a compiler's)


def command_under_pyspy(argv: list[str], output: Path, rate: int = 250) -> list[str]:
    """`argv` run as py-spy's child, recording every process and thread into `output` (raw format)."""
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        raise RuntimeError("py-spy not found: pip install py-spy (the dev extra has it)")
    return [exe, "record", "--format", "raw", "--threads", "--subprocesses", "--nonblocking",
            "--rate", str(rate), "--output", str(output), "--", *argv]


def _records(text: str) -> Iterator[str]:
    """One string per sample line. With --subprocesses every line starts with `process PID:"command"`,
    and a command line may hold newlines: the lines that do not start so continue the last one."""
    if not text.startswith("process "):
        yield from (line for line in text.splitlines() if line.strip())
        return
    current = None
    for line in text.splitlines():
        if line.startswith("process "):
            if current is not None:
                yield current
            current = line
        elif current is not None:
            current += "\n" + line
    if current is not None:
        yield current


def parse_raw(text: str) -> list[Sample]:
    """py-spy's raw lines: `process ...;thread (tid): name;frame;...;frame COUNT`."""
    samples = []
    for record in _records(text):
        stack, _, count = record.rpartition(" ")
        # the process chain comes first; its command lines may hold ';', so cut at the thread
        cut = 0 if stack.startswith("thread (") else stack.rfind(";thread (") + 1
        processes, rest = stack[:cut], stack[cut:]
        thread = "?"
        if rest.startswith("thread ("):
            label, _, rest = rest.partition(";")
            thread = label.split(":", 1)[1].strip() if ":" in label else "?"
        # py-spy's own child (the first process of the chain) is the server by construction, also when
        # py-spy could not read its command line (it then writes `process PID:""`)
        innermost_process = processes[processes.rfind("process "):]
        in_server = (processes.count("process ") <= 1
                     or any(marker in innermost_process for marker in SERVER_PROCESSES))
        samples.append(Sample(thread, tuple(rest.split(";")) if rest else (), int(count), in_server))
    return samples


def _frame_file(frame: str) -> str:
    return frame[frame.rfind("(") + 1:] if "(" in frame else ""


def category(sample: Sample) -> str | None:
    """The sample's category; None for samples that are not serving (start-up, shutdown, waiting)."""
    frames = sample.frames
    if any(f.startswith(NOT_SERVING) for f in frames):
        return None
    if frames and frames[-1].startswith(WAITING):
        return None
    if not sample.in_server:
        return OTHER_PROCESSES
    if "_poll_wrapper" in sample.thread:
        return POLLER
    in_framework = False
    for frame in reversed(frames):
        where = _frame_file(frame)
        if any(driver in where for driver in LOOP_DRIVERS):
            continue
        for name, files, function in RULES:
            if any(fragment in where for fragment in files) and (function is None or frame.startswith(function)):
                return name
        in_framework = in_framework or any(fragment in where for fragment in FRAMEWORK[1])
    if in_framework:
        return FRAMEWORK[0]
    return EVENT_LOOP_C if sample.thread == "MainThread" else OTHER_THREADS


def summarize(samples: list[Sample], rate: int | None = None) -> dict:
    """Samples per category and their share of the serving samples (and thread-seconds, given the rate)."""
    counts: Counter[str] = Counter()
    left_out = 0
    for sample in samples:
        name = category(sample)
        if name is None:
            left_out += sample.count
        else:
            counts[name] += sample.count
    # processes the server started (a compiler's checks at model load, say) are not serving: apart
    others = counts.pop(OTHER_PROCESSES, 0)
    total = sum(counts.values())
    rows = [{"category": name, "samples": n, "share": n / total if total else 0.0,
             **({"thread_s": n / rate} if rate else {})} for name, n in counts.most_common()]
    return {"serving_samples": total, "left_out_samples": left_out, "other_process_samples": others,
            "categories": rows}


def markdown(summary: dict) -> str:
    lines = ["| where | samples | share |", "|---|---:|---:|"]
    for row in summary["categories"]:
        lines.append(f"| {row['category']} | {row['samples']} | {row['share']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path, help="a py-spy raw profile recorded with --threads")
    ap.add_argument("--rate", type=int, help="the sampling rate it was recorded at (adds thread-seconds)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    summary = summarize(parse_raw(args.profile.read_text()), args.rate)
    print(json.dumps(summary, indent=2) if args.json else markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
