"""OS thread names for instance threads (server/threadnames.py) and the per-thread CPU split the
load tools report (loadtests/threadcpu.py): unit cases, then a real `kiln serve --workers 2`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import BUNDLED_REPO
from loadtests import threadcpu
from server.instances import InstancePool
from server.threadnames import MAX_BYTES, native_thread_name, set_native_thread_name
from test_workers import CONNECTIONS, TIMEOUT_S, Workers, infer_request

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names and /proc are Linux's")


def os_thread_name() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


def test_native_names_fit_the_kernel_and_keep_the_instance_number():
    assert native_thread_name("kiln-mlp-0") == "kiln-mlp-0"
    assert native_thread_name("kiln-mlp_wide-0") == "kiln-mlp_wide-0"  # exactly 15 bytes
    assert native_thread_name("kiln-resnet50_onnx-0") == "kiln-resnet50-0"
    assert native_thread_name("kiln-resnet50_onnx-12") == "kiln-resnet5-12"
    assert native_thread_name("a" * 20) == "a" * MAX_BYTES
    assert native_thread_name("kiln-x-" + "9" * 20) == ("kiln-x-" + "9" * 20)[:MAX_BYTES]
    assert native_thread_name("kiln-müll-1") == "kiln-m?ll-1"


@linux_only
def test_a_thread_gets_its_name_at_the_os_level():
    seen = []

    def body():
        seen.append(set_native_thread_name())  # default: the Python name
        seen.append(os_thread_name())

    thread = threading.Thread(target=body, name="kiln-resnet50_onnx-3")
    thread.start()
    thread.join()
    assert seen == [True, "kiln-resnet50-3"]


@linux_only
def test_instance_threads_carry_the_model_name():
    pool = InstancePool(2, "kiln-digits")
    names, lock, both = [], threading.Lock(), threading.Barrier(2, timeout=10)

    def record():
        both.wait()  # two works at once: one on each instance thread
        with lock:
            names.append(os_thread_name())

    try:
        for _ in range(2):
            pool.submit(record)
        deadline = time.monotonic() + 10
        while len(names) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        pool.shutdown()
    assert sorted(names) == ["kiln-digits-0", "kiln-digits-1"]


@linux_only
def test_split_counts_each_role_across_the_process_tree():
    busy = threading.Event()
    release = threading.Event()

    def spin(name: str, seconds: float):
        set_native_thread_name(name)
        end = time.thread_time() + seconds  # CPU time: on a busy machine wall time would give less
        while time.thread_time() < end:
            pass
        busy.set()
        release.wait()  # stay alive: a thread that exited is missing from the second sample

    child_spin = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\nprint(flush=True)\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", child_spin], stdout=subprocess.PIPE)
    instance = threading.Thread(target=spin, args=("kiln-test-0", 0.4))
    started = time.monotonic()
    before = threadcpu.sample(os.getpid())
    try:
        instance.start()
        assert busy.wait(30)
        child.stdout.readline()  # the child has spun its 0.4 s of CPU
        after = threadcpu.sample(os.getpid())
        elapsed = time.monotonic() - started
        assert child.pid in {pid for pid, _ in after}, "a child process is part of the tree"
    finally:
        release.set()
        instance.join()
        child.kill()
        child.wait()
    split = threadcpu.cpu_split(before, after, elapsed)
    assert split["instances"] >= 0.25 / elapsed  # the named thread's ~0.4 s
    assert split["other"] >= 0.25 / elapsed  # the child: a single-threaded process has no event loop
    assert split["total"] == pytest.approx(sum(split[r] for r in threadcpu.ROLES), abs=0.01)
    assert split["total"] <= (os.cpu_count() or 1) + 0.1


@linux_only
def test_split_of_a_real_two_worker_server(tmp_path):
    repo = tmp_path / "model_repo"
    shutil.copytree(BUNDLED_REPO / "mlp", repo / "mlp")
    config = repo / "mlp" / "config.pbtxt"  # every batch on an instance thread, none inline on the loop
    config.write_text(config.read_text() + 'parameters { key: "inline_execution_max_microseconds" value: { string_value: "0" } }\n')
    running = Workers(repo, tmp_path)
    try:
        running.wait_ready()
        connections = [c for group in running.connect(CONNECTIONS).values() for c in group]
        before, started = threadcpu.sample(running.process.pid), time.monotonic()
        for _ in range(40):
            for connection in connections:
                connection.stub.ModelInfer(infer_request(), timeout=TIMEOUT_S)
        after, elapsed = threadcpu.sample(running.process.pid), time.monotonic() - started
    finally:
        running.close()
    instance_threads = {(pid, name) for (pid, _), (name, _) in after.items() if name.startswith("kiln-")}
    assert {name for _, name in instance_threads} == {"kiln-mlp-0"}
    assert len(instance_threads) == 2, "one instance thread in each of the two workers"
    split = threadcpu.cpu_split(before, after, elapsed)
    assert split["event_loop"] > 0 and split["instances"] > 0, split


def test_stat_fields_start_after_a_command_name_with_spaces_and_parentheses():
    fields = threadcpu.stat_fields("4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 0 0 0 0 7 3 0 0 20 0 1 0")
    assert fields[:3] == ["S", "1", "4242"]
    assert (fields[11], fields[12]) == ("7", "3")
