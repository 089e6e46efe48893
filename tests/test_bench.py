"""`kiln bench` against a live server: a short closed/open-loop sweep checked through its JSON report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtests.bench import report as rp
from server.app import ServerSettings

REPO_ROOT = Path(__file__).resolve().parent.parent


def _kiln(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT
    )


def serve_mlp_copy(tmp: Path):
    """A RunningServer on a repository of its own holding a copy of the bundled mlp."""
    from conftest import BUNDLED_REPO, RunningServer  # the module pytest loaded (tests/ is on sys.path)

    repo = tmp / "repo"
    repo.mkdir()
    shutil.copytree(BUNDLED_REPO / "mlp", repo / "mlp")
    return RunningServer(ServerSettings(model_repository=repo, grpc_port=0, metrics_port=None, grace_period_s=2.0))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One server, one `kiln bench` run: closed loop c=1,4; open loop 50/s (sustainable) and 100000/s (absurd)."""
    tmp = tmp_path_factory.mktemp("bench")
    server = serve_mlp_copy(tmp)
    try:
        proc = _kiln(
            "bench", "mlp", "--url", server.url, "--batch-size", "2",
            "--concurrency", "1,4", "--rate", "50,100000", "--duration", "1.5", "--warmup", "0.3",
            "--json", str(tmp / "report.json"), "--plot", str(tmp / "report.png"),
        )
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads((tmp / "report.json").read_text()), tmp


def test_every_step_accounts_for_its_requests(sweep):
    _, report, _ = sweep
    steps = report["steps"]
    assert [(s["mode"], s["concurrency"] or s["offered_rps"]) for s in steps] == [
        ("closed", 1), ("closed", 4), ("open", 50.0), ("open", 100000.0)
    ]
    for step in steps:
        assert step["sent"] == step["ok"] + step["error_count"], step
        assert step["error_count"] == sum(step["errors"].values())
        assert step["client"]["cpu_s"] > 0
        assert "-event_engine_client" in step["client"]["grpc_experiments"].split(",")  # set in the worker process
        assert step["client"]["event_loop"] == "uvloop"  # "auto", with uvloop installed as kiln depends on it
        assert 0.0 <= step["steal_share"] <= 1.0  # this Linux machine counts steal in /proc/stat




def test_closed_loop_percentiles_throughput_and_server_stats(sweep):
    _, report, _ = sweep
    for step in report["steps"][:3]:
        lat = step["latency_ms"]
        assert step["ok"] > 0 and step["error_count"] == 0, step
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"], lat
        assert step["throughput_rps"] > 0
        assert step["throughput_items_per_s"] == pytest.approx(2 * step["throughput_rps"])
        server = step["server"]
        assert server is not None, "ModelStatistics deltas missing"
        assert server["success_count"] > 0 and server["execution_count"] > 0
        assert server["queue_us"] is not None and server["compute_infer_us"] > 0
        assert server["avg_batch"] >= 2  # every request carries 2 rows
    assert report["config"]["model"] == "mlp" and report["machine"]["nproc"] >= 1


def test_open_loop_flags_an_unsustainable_rate(sweep):
    proc, report, _ = sweep
    modest, absurd = report["steps"][2], report["steps"][3]
    assert modest["rate_sustained"] is True, modest["open_loop"]
    assert absurd["rate_sustained"] is False
    assert absurd["open_loop"]["sustained"] is False and absurd["open_loop"]["reason"]
    assert absurd["open_loop"]["achieved_rps"] < 0.9 * 100000
    assert "offered rate 100000 req/s NOT sustained" in proc.stdout


def test_plot_is_a_png(sweep):
    _, _, tmp = sweep
    assert (tmp / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_in_process_ceiling(tmp_path):
    out = tmp_path / "ceiling.json"
    proc = _kiln(
        "bench", "--in-process", str(REPO_ROOT / "model_repo" / "mlp"), "--batch-sizes", "1,8",
        "--duration", "0.3", "--warmup", "0.1", "--json", str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert [b["batch_size"] for b in report["batches"]] == [1, 8]
    assert all(b["items_per_s"] > 0 and b["calls"] > 0 for b in report["batches"])
    assert report["config"]["platform"] == "onnxruntime_onnx"
    assert report["config"]["parameters"].get("intra_op_thread_count") == "1"  # the model's own options


def test_failed_calls_are_counted_by_status_with_the_servers_reason(tmp_path):
    """A batch over the model's max_batch_size: every call fails, and the report says why, not only how often."""
    from conftest import BUNDLED_REPO, RunningServer

    server = RunningServer(ServerSettings(model_repository=BUNDLED_REPO, grpc_port=0, metrics_port=None, grace_period_s=2.0))
    try:
        proc = _kiln(
            "bench", "mlp", "--url", server.url, "--batch-size", "65", "--concurrency", "2", "--event-loop", "asyncio",
            "--duration", "0.5", "--warmup", "0.1", "--json", str(tmp_path / "report.json"),
            "--plot", str(tmp_path / "report.png"),
        )
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    step = json.loads((tmp_path / "report.json").read_text())["steps"][0]
    assert step["sent"] > 0 and step["ok"] == 0
    assert step["client"]["event_loop"] == "asyncio"
    assert step["errors"] == {"INVALID_ARGUMENT": step["sent"]}
    assert "max_batch_size 64" in step["error_examples"]["INVALID_ARGUMENT"]
    assert "INVALID_ARGUMENT, e.g.:" in proc.stdout and "max_batch_size 64" in proc.stdout
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Warning" not in proc.stderr, proc.stderr  # nothing to plot is said on the plot, not warned about


def test_rows_from_an_npy_file_count_as_items(tmp_path):
    from conftest import BUNDLED_REPO, RunningServer

    np.save(tmp_path / "x.npy", np.ones((3, 256), np.float32))
    server = RunningServer(ServerSettings(model_repository=BUNDLED_REPO, grpc_port=0, metrics_port=None, grace_period_s=2.0))
    try:
        proc = _kiln(
            "bench", "mlp", "--url", server.url, "--input", f"x={tmp_path / 'x.npy'}", "--concurrency", "1",
            "--duration", "0.5", "--warmup", "0.1", "--json", str(tmp_path / "report.json"),
        )
        mismatch = _kiln("bench", "mlp", "--url", server.url, "--input", f"x={tmp_path / 'x.npy'}", "--batch-size", "4")
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    step = report["steps"][0]
    assert step["ok"] > 0 and step["error_count"] == 0
    assert report["config"]["batch_size"] == step["batch_size"] == 3
    assert step["throughput_items_per_s"] == pytest.approx(3 * step["throughput_rps"])
    assert step["server"]["avg_batch"] == pytest.approx(3.0)
    assert mismatch.returncode == 2 and "--batch-size 4 does not match the 3 row(s)" in mismatch.stderr


def test_bad_arguments_say_what_is_wrong():
    proc = _kiln("bench", "mlp", "--url", "127.0.0.1:1", "--duration", "9999")
    assert proc.returncode == 2 and "--duration" in proc.stderr
    proc = _kiln("bench", "--help")
    assert proc.returncode == 0 and "--concurrency" in proc.stdout and "--in-process" in proc.stdout


def test_percentiles_are_monotone_and_verdict_is_pure():
    summary = rp.latency_summary(np.random.default_rng(0).exponential(0.002, 5000))
    assert summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["p999"] <= summary["max"]
    assert rp.latency_summary(np.empty(0))["p50"] is None
    step = {"duration_s": 1.0, "open_loop": {"scheduled": 1000, "sent": 1000, "achieved_rps": 990.0, "inflight_cap_hits": 0, "max_inflight": 10}}
    assert rp.sustained_verdict(step) == (True, "")
    step["open_loop"] |= {"sent": 500, "achieved_rps": 480.0}
    ok, reason = rp.sustained_verdict(step)
    assert not ok and "500 of 1000" in reason and "480 req/s" in reason
