"""Where a served model's time goes: py-spy profiles sorted into categories
(loadtests/pyspy_profile.py), and the served share tool end to end on the bundled mlp
(loadtests/served_share.py: h2load, ModelStatistics, the runtime in-process, a py-spy'd server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import BUNDLED_REPO, require_tool
from loadtests import pyspy_profile
from loadtests.pyspy_profile import Sample, category, parse_raw, summarize

DRIVER = ("<module> (server/__main__.py:4)", "main (server/cli.py:280)", "run (server/eventloop.py:44)",
          "Runner.run (asyncio/runners.py:118)")


def loop_sample(*frames: str, count: int = 1) -> Sample:
    return Sample("MainThread", DRIVER + frames, count)


def test_parse_raw_reads_threads_frames_and_counts():
    text = ('process 10:"python -m server serve";process 11:"python -m server.workers";thread (12): kiln-mlp-0;'
            "Thread.run (threading.py:982);OnnxRuntime.infer (server/runtime/onnxruntime.py:162) 7\n"
            'process 10:"python -m server serve";thread (10): MainThread;Runner.run (asyncio/runners.py:118) 3\n')
    first, second = parse_raw(text)
    assert first == Sample("kiln-mlp-0", ("Thread.run (threading.py:982)",
                                          "OnnxRuntime.infer (server/runtime/onnxruntime.py:162)"), 7)
    assert second == Sample("MainThread", ("Runner.run (asyncio/runners.py:118)",), 3)


def test_parse_raw_keeps_command_lines_with_newlines_and_semicolons_out_of_the_stack():
    """A server's child (a compiler's check, say) may run `python -c` with newlines and ';' in its
    command line: py-spy writes them as they are."""
    text = ('process 10:"python -m server serve";process 31:"python -c \nimport sys; import os\n'
            'cdll.LoadLibrary(\"/tmp/x.so\")\n";thread (31): MainThread;<module> (<string>:5);'
            "LibraryLoader.LoadLibrary (ctypes/__init__.py:460) 4\n"
            'process 10:"python -m server serve";thread (10): MainThread;Runner.run (asyncio/runners.py:118) 2\n')
    child, server = parse_raw(text)
    assert child == Sample("MainThread", ("<module> (<string>:5)", "LibraryLoader.LoadLibrary (ctypes/__init__.py:460)"),
                           4, in_server=False)
    assert server.in_server and server.count == 2
    summary = summarize([child, server])
    assert summary["other_process_samples"] == 4 and summary["serving_samples"] == 2


def test_parse_raw_takes_py_spys_own_child_as_the_server_when_its_command_line_was_not_read():
    """py-spy sometimes writes `process PID:""` for the server it started; its children stay apart."""
    text = ('process 10:"";thread (10): MainThread;Runner.run (asyncio/runners.py:118) 5\n'
            'process 10:"";process 31:"cc -shared";thread (31): MainThread;main (cc:1) 2\n')
    server, child = parse_raw(text)
    assert server.in_server and not child.in_server
    assert summarize([server, child])["serving_samples"] == 5


@pytest.mark.parametrize("frames, expected", [
    ((), "gRPC core and event loop (C)"),  # only the loop's drivers: C under uvloop
    (("InferenceService._infer (server/service.py:138)", "OnnxRuntime.infer (server/runtime/onnxruntime.py:162)",
      "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:406)"), "runtime"),
    (("InferenceService._infer (server/service.py:132)", "decode_inputs (server/codec.py:86)"), "serialization"),
    (("_safe_deserializer.<locals>.deserialize (server/service.py:244)",), "serialization"),
    (("DataPlane.infer (server/dataplane.py:77)", "ModelStats.record_success (server/stats.py:136)"),
     "statistics and metrics"),
    (("Scheduler._finish (server/batching.py:850)", "Scheduler._pump (server/batching.py:660)"), "scheduler"),
    (("InferenceService._infer (server/service.py:139)",), "kiln request path"),
    # asyncio code that kiln called belongs to kiln's step; grpc.aio's own Python is its own category
    (("Scheduler.submit (server/batching.py:560)", "Future.set_result (asyncio/futures.py:10)"), "scheduler"),
    (("wait (asyncio/tasks.py:424)",), "asyncio and grpc.aio (Python)"),
])
def test_categories_of_the_event_loop(frames, expected):
    assert category(loop_sample(*frames)) == expected


def test_categories_of_other_threads_and_what_is_left_out():
    instance = ("Thread._bootstrap (threading.py:1002)", "InstancePool._worker (server/batching.py:320)")
    assert category(Sample("kiln-mlp-0", instance + ("Scheduler._run_batch (server/batching.py:709)",
                                                     "Scheduler._compute (server/batching.py:722)"), 1)) == "batch copies"
    assert category(Sample("kiln-mlp-0", instance[:1] + ("InstancePool._worker (server/batching.py:312)",), 1)) is None
    assert category(Sample("Thread-1 (_poll_wrapper)", ("Thread.run (threading.py:982)",), 1)) == "gRPC poller thread"
    assert category(Sample("Thread-3", ("Thread.run (threading.py:982)",), 1)) == "other threads"
    start_up = loop_sample("KilnServer.start (server/app.py:160)", "OnnxRuntime.__init__ (server/runtime/onnxruntime.py:90)")
    assert category(start_up) is None


def test_summary_shares_add_up_and_leave_out_start_up():
    samples = [loop_sample(count=6), loop_sample("decode_inputs (server/codec.py:86)", count=3),
               loop_sample("KilnServer.stop (server/app.py:200)", count=5),
               Sample("kiln-mlp-0", ("OnnxRuntime.infer (server/runtime/onnxruntime.py:162)",), 11)]
    summary = summarize(samples, rate=100)
    assert summary["serving_samples"] == 20 and summary["left_out_samples"] == 5
    rows = {r["category"]: r for r in summary["categories"]}
    assert [r["category"] for r in summary["categories"]] == ["runtime", "gRPC core and event loop (C)", "serialization"]
    assert rows["runtime"]["share"] == pytest.approx(0.55) and rows["runtime"]["thread_s"] == pytest.approx(0.11)
    assert sum(r["share"] for r in summary["categories"]) == pytest.approx(1.0)
    assert "| runtime | 11 | 55.0% |" in pyspy_profile.markdown(summary)


def test_served_share_end_to_end_on_mlp(tmp_path: Path):
    require_tool("h2load")
    from loadtests import served_share

    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_REPO / "mlp", repo / "mlp")
    out = tmp_path / "share.json"
    assert served_share.main(["--model-repository", str(repo), "--model", "mlp", "--concurrency", "8",
                              "--connections", "4", "--rounds", "2", "--duration", "1", "--warmup", "0.3",
                              "--inprocess-duration", "1", "--profile-duration", "1.5", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["model"] == "mlp" and len(report["rounds"]) == 2
    for r in report["rounds"]:
        assert r["items_per_s"] > 0 and r["inprocess_items_per_s"] > 0
        assert r["share"] == pytest.approx(r["items_per_s"] / r["inprocess_items_per_s"])
        assert 1 <= r["inprocess_batch"] <= 64 and r["avg_batch"] >= 1
        assert r["server_cpu_cores"]["total"] > 0
    assert min(r["share"] for r in report["rounds"]) <= report["median_share"] <= max(r["share"] for r in report["rounds"])
    prof = report["profile"]
    names = {row["category"] for row in prof["categories"]}
    # the server ran the model and spent time under its event loop while profiled
    assert {"runtime", "gRPC core and event loop (C)"} <= names, prof
    assert sum(row["share"] for row in prof["categories"]) == pytest.approx(1.0)
    assert prof["items_per_s_while_profiled"] > 0 and prof["serving_samples"] > 50


@pytest.mark.parametrize("generator", ["bench", "bench-stream"])
def test_served_share_with_kiln_bench_as_the_generator(tmp_path: Path, generator: str):
    """No system tool needed (a GPU machine's image has no h2load): kiln bench drives the load."""
    from loadtests import served_share

    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_REPO / "mlp", repo / "mlp")
    out = tmp_path / "share.json"
    assert served_share.main(["--model-repository", str(repo), "--model", "mlp", "--generator", generator,
                              "--concurrency", "4", "--connections", "2", "--processes", "2", "--rounds", "1",
                              "--duration", "1", "--warmup", "0.3", "--inprocess-duration", "1",
                              "--profile-duration", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (r,) = report["rounds"]
    assert report["config"]["generator"] == generator and report["profile"] is None
    assert r["items_per_s"] > 0 and r["client_cpu_cores"] > 0
    assert r["share"] == pytest.approx(r["items_per_s"] / r["inprocess_items_per_s"])


def test_a_profile_without_serving_samples_is_retaken_then_fails_loudly(tmp_path: Path, monkeypatch):
    from types import SimpleNamespace

    from loadtests import served_share

    calls = []

    def empty_profile(args, workdir, log):
        calls.append(log.name)
        log.write_text("py-spy> Failed to sample\n")
        return {"serving_samples": 0}

    monkeypatch.setattr(served_share, "_profile_once", empty_profile)
    with pytest.raises(SystemExit, match="no serving sample in 2 attempts(.|\n)*Failed to sample"):
        served_share.profile(SimpleNamespace(), tmp_path)
    assert calls == ["profiled-server-1.log", "profiled-server-2.log"]
    results = iter([{"serving_samples": 0}, {"serving_samples": 5}])
    monkeypatch.setattr(served_share, "_profile_once", lambda args, workdir, log: next(results))
    assert served_share.profile(SimpleNamespace(), tmp_path) == {"serving_samples": 5, "attempts": 2}
