"""`kiln serve --runtime-nice N`: the runtime's threads run N nice steps below the event loop.

The helpers on real threads (per-thread nice values, read back from the kernel), then a real
`kiln serve --workers 2` whose every worker runs its instance thread and ONNX Runtime's intra-op
thread at the lower priority while its event loop keeps the server's, and still answers.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from server.threadpriority import RUNTIME_NICE_ENV, call_on_lowered_thread, lower_thread_priority, runtime_nice
from test_workers import TIMEOUT_S, Workers, infer_request

pytestmark = pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are a Linux feature")


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def on_thread(fn):
    """fn() on a fresh thread (nice values cannot be lowered back without privilege); its result."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def test_lowering_a_thread_leaves_its_creator_alone_and_passes_on_to_its_own_threads():
    own = nice_of(threading.get_native_id())

    def lowered():
        assert lower_thread_priority(3)
        child = on_thread(lambda: nice_of(threading.get_native_id()))
        return nice_of(threading.get_native_id()), child

    assert on_thread(lowered) == (own + 3, own + 3)
    assert nice_of(threading.get_native_id()) == own
    assert on_thread(lambda: lower_thread_priority(0)) is False


def test_call_on_lowered_thread_returns_raises_and_lowers_what_it_starts():
    own = nice_of(threading.get_native_id())
    caller = threading.get_native_id()
    tid, started = call_on_lowered_thread(
        4, lambda: (threading.get_native_id(), on_thread(lambda: nice_of(threading.get_native_id()))))
    assert tid != caller and started == own + 4
    assert nice_of(caller) == own
    with pytest.raises(ValueError, match="bad model"):
        call_on_lowered_thread(4, lambda: (_ for _ in ()).throw(ValueError("bad model")))
    assert call_on_lowered_thread(0, threading.get_native_id) == caller  # 0: a plain call


@pytest.mark.parametrize("raw, expected", [("", 0), ("7", 7), ("40", 19), ("-3", 0), ("high", 0)])
def test_runtime_nice_reads_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv(RUNTIME_NICE_ENV, raw)
    assert runtime_nice() == expected


def thread_nices(pid: int) -> dict[int, tuple[str, int]]:
    return {int(tid): (Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip(), nice_of(int(tid)))
            for tid in os.listdir(f"/proc/{pid}/task")}


def test_serve_runs_every_workers_runtime_threads_below_its_event_loop(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "model_repo" / "mlp", repo / "mlp")
    config = repo / "mlp" / "config.pbtxt"
    text = config.read_text().replace('string_value: "1"', 'string_value: "2"')  # an ORT pool thread too
    assert 'key: "intra_op_thread_count" value: { string_value: "2" }' in text
    config.write_text(text)
    workers = Workers(repo, tmp_path, extra_args=("--runtime-nice", "7"))
    try:
        workers.wait_ready()  # returns once its connections reached both workers
        base = nice_of(workers.process.pid)
        one_per_worker = {}
        for connection in workers.connections:
            one_per_worker.setdefault(connection.worker()[0], connection)
        seen = set()
        for index, connection in one_per_worker.items():
            # an answer from this worker: its instance thread has started (and lowered itself)
            assert connection.stub.ModelInfer(infer_request(rows=4), timeout=TIMEOUT_S).outputs[0].shape == [4, 10]
            _, pid = connection.worker()
            nices = thread_nices(pid)
            lowered = sorted(name for name, nice in nices.values() if nice == base + 7)
            # the instance thread and ORT's one intra-op pool thread; the event loop and gRPC's threads not
            assert lowered == ["kiln-mlp-0", "python"], nices
            assert nices[pid][1] == base, nices
            assert sum(nice == base for _, nice in nices.values()) == len(nices) - 2, nices
            seen.add(index)
        assert seen == {0, 1}
    finally:
        workers.close()
