"""Metrics: bucket choice, the scrape-time collector, and agreement with the ModelStatistics RPC."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

from server import stats
from server.cli import build_parser
from server.errors import Status
from server.logs import JsonFormatter
from server.metrics import (
    DEFAULT_LATENCY_BUCKETS, FAMILIES, GpuCollector, KilnCollector, latency_buckets, parse_buckets, queue_capacity,
)
from server.stats import Buckets, ModelStats, UnroutedRequests

BUNDLED = Path(__file__).resolve().parent.parent / "model_repo"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page: (name, sorted label items) -> value."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def mlp_input(rows: int = 1, dtype=np.float32, width: int = 256) -> triton.InferInput:
    tensor = triton.InferInput("x", [rows, width], "FP32" if dtype == np.float32 else "FP64")
    tensor.set_data_from_numpy(np.random.default_rng(0).standard_normal((rows, width)).astype(dtype))
    return tensor


@pytest.fixture
def mlp_repo(tmp_path) -> Path:
    target = tmp_path / "repo"
    target.mkdir()
    shutil.copytree(BUNDLED / "mlp", target / "mlp")
    return target


# ---- bucket choice -------------------------------------------------------------------------


def test_default_buckets_span_50us_to_10s():
    assert DEFAULT_LATENCY_BUCKETS[0] == 50e-6
    assert DEFAULT_LATENCY_BUCKETS[-1] == 10.0
    assert list(DEFAULT_LATENCY_BUCKETS) == sorted(set(DEFAULT_LATENCY_BUCKETS))
    # no decade without a bucket between the ends
    for low in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        assert any(low <= b < low * 10 for b in DEFAULT_LATENCY_BUCKETS)


def test_buckets_from_env_and_flag(monkeypatch):
    monkeypatch.delenv("KILN_LATENCY_BUCKETS", raising=False)
    assert latency_buckets() == DEFAULT_LATENCY_BUCKETS
    monkeypatch.setenv("KILN_LATENCY_BUCKETS", "0.5, 0.001,0.01,0.01")
    assert latency_buckets() == (0.001, 0.01, 0.5)
    assert latency_buckets("0.2,0.1") == (0.1, 0.2)  # the flag wins over the environment
    args = build_parser().parse_args(["serve", "--latency-buckets", "0.002,0.02", "--allow-metrics", "false", "--access-log"])
    assert latency_buckets(args.latency_buckets) == (0.002, 0.02)
    assert args.allow_metrics is False and args.access_log is True
    defaults = build_parser().parse_args(["serve"])
    assert defaults.allow_metrics is True and defaults.access_log is False and defaults.latency_buckets is None


@pytest.mark.parametrize("text", ["", "a,b", "0,1", "-1", "1,inf", "nan"])
def test_bad_buckets_are_refused(text):
    with pytest.raises(ValueError, match="--latency-buckets"):
        parse_buckets(text)


def test_bad_bucket_flag_exits_with_a_message(capsys, tmp_path):
    from server.cli import main

    assert main(["serve", "--model-repository", str(tmp_path), "--latency-buckets", "x"]) == 2
    assert "--latency-buckets must be comma-separated seconds" in capsys.readouterr().err


def test_bucket_bounds_are_inclusive():
    b = Buckets((0.001, 0.01))
    for ns in (1_000_000, 1_000_001, 10_000_000, 20_000_000, 0):
        b.observe(ns)
    assert b.cumulative() == [("0.001", 2), ("0.01", 4), ("+Inf", 5)]


def test_configured_buckets_reach_the_scrape(start_server, mlp_repo):
    server = start_server(mlp_repo, latency_buckets=(0.001, 1.0))
    triton.InferenceServerClient(server.url).infer("mlp", [mlp_input()])
    samples = scrape(server.metrics_url)
    les = sorted(
        dict(labels)["le"] for (name, labels) in samples
        if name == "kiln_request_duration_seconds_bucket" and dict(labels)["model"] == "mlp"
    )
    assert les == ["+Inf", "0.001", "1.0"]


# ---- metrics and ModelStatistics agree ------------------------------------------------------


def test_metrics_agree_with_model_statistics(start_server, mlp_repo):
    server = start_server(mlp_repo)
    client = triton.InferenceServerClient(server.url)
    with ThreadPoolExecutor(16) as pool:  # concurrent, so the batcher forms batches of several sizes
        list(pool.map(lambda rows: client.infer("mlp", [mlp_input(rows)]), [1, 2, 3] * 20))
    for _ in range(4):
        with pytest.raises(triton.InferenceServerException):
            client.infer("mlp", [mlp_input(1, width=255)])

    rpc = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    samples = scrape(server.metrics_url)
    lv = {"model": "mlp", "version": "1"}
    inference = rpc["inference_stats"]

    def count(d):
        return int(d.get("count", 0))

    def seconds(d):
        return int(d.get("ns", 0)) / 1e9

    assert count(inference["success"]) == 60
    assert value(samples, "kiln_requests_total", outcome="success", **lv) == 60
    assert value(samples, "kiln_requests_total", outcome="invalid_argument", **lv) == 4
    assert count(inference["fail"]) == 4
    assert value(samples, "kiln_request_duration_seconds_count", **lv) == count(inference["success"])
    assert value(samples, "kiln_request_duration_seconds_sum", **lv) == pytest.approx(seconds(inference["success"]), rel=1e-9)
    assert value(samples, "kiln_request_duration_seconds_bucket", le="+Inf", **lv) == 60
    assert value(samples, "kiln_queue_duration_seconds_count", **lv) == count(inference["queue"])
    assert value(samples, "kiln_queue_duration_seconds_sum", **lv) == pytest.approx(seconds(inference["queue"]), rel=1e-9)

    assert value(samples, "kiln_inferences_total", **lv) == int(rpc["inference_count"]) == 120
    assert value(samples, "kiln_executions_total", **lv) == int(rpc["execution_count"])
    assert value(samples, "kiln_batch_size_count", **lv) == int(rpc["execution_count"])
    assert value(samples, "kiln_batch_size_sum", **lv) == 120
    batches = rpc["batch_stats"]
    assert sum(int(b["batch_size"]) * count(b["compute_infer"]) for b in batches) == 120
    for phase in ("input", "infer", "output"):
        key = f"compute_{phase}"
        assert value(samples, "kiln_compute_duration_seconds_count", phase=phase, **lv) == sum(count(b[key]) for b in batches)
        assert value(samples, "kiln_compute_duration_seconds_sum", phase=phase, **lv) == pytest.approx(
            sum(seconds(b[key]) for b in batches), rel=1e-9)
    # bucket counts are cumulative and end at the total
    buckets = sorted(
        (float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
        if name == "kiln_batch_size_bucket" and dict(labels)["model"] == "mlp"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert value(samples, "kiln_model_ready", **lv) == 1
    assert value(samples, "kiln_queue_depth", **lv) == 0
    assert value(samples, "kiln_inflight_requests", **lv) == 0


def test_exported_families_are_the_declared_ones(start_server, mlp_repo):
    server = start_server(mlp_repo)
    triton.InferenceServerClient(server.url).infer("mlp", [mlp_input()])
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    kiln = {f.name for f in text_string_to_metric_families(text) if f.name.startswith("kiln_")}
    declared = {name.removesuffix("_total") for name in FAMILIES if not name.startswith("kiln_gpu_")}
    assert kiln == declared
    names = {f.name for f in text_string_to_metric_families(text)}
    for process_metric in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"):
        assert process_metric in names


def test_requests_that_reach_no_model(start_server, mlp_repo):
    server = start_server(mlp_repo)
    client = triton.InferenceServerClient(server.url)
    for name, version in [("nope", ""), ("other-random-name", ""), ("mlp", "9"), ("../x", "")]:
        with pytest.raises(triton.InferenceServerException):
            client.infer(name, [mlp_input()], model_version=version)
    samples = scrape(server.metrics_url)
    assert value(samples, "kiln_requests_total", model="", version="", outcome="not_found") == 3
    assert value(samples, "kiln_requests_total", model="mlp", version="", outcome="not_found") == 1
    models = {dict(labels)["model"] for (name, labels) in samples if name.startswith("kiln_")}
    assert models == {"mlp", ""}  # no label value from an unknown name


def test_model_ready_after_unload_and_for_a_failed_load(start_server, mlp_repo):
    broken = mlp_repo / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"not an onnx file")
    (broken / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 4\n')
    shutil.copytree(mlp_repo / "mlp", mlp_repo / "spare")
    (mlp_repo / "spare" / "config.pbtxt").write_text(
        (mlp_repo / "mlp" / "config.pbtxt").read_text().replace('name: "mlp"', 'name: "spare"'))
    server = start_server(mlp_repo, control_mode="explicit", load_models=("mlp", "broken"), strict_readiness=False)
    samples = scrape(server.metrics_url)
    assert value(samples, "kiln_model_ready", model="mlp", version="1") == 1
    assert value(samples, "kiln_model_ready", model="broken", version="") == 0
    assert not any(dict(labels).get("model") == "spare" for (_, labels) in samples)  # never asked for: no series
    triton.InferenceServerClient(server.url).unload_model("mlp")
    samples = scrape(server.metrics_url)
    assert value(samples, "kiln_model_ready", model="mlp", version="1") == 0
    assert ("kiln_model_ready", (("model", "mlp"), ("version", ""))) not in samples


class _FakeScheduler:
    queue_depth = 3
    inflight = 5


def test_queue_depth_and_inflight_are_read_at_scrape_time():
    from server.model_types import DynamicBatchingConfig, QueuePolicy
    from server.repository import ModelEntry, ModelState

    stats.configure()
    config = types.SimpleNamespace(dynamic_batching=DynamicBatchingConfig(default_queue_policy=QueuePolicy(max_queue_size=7)))
    version = types.SimpleNamespace(
        version_str="2", state=ModelState.READY, scheduler=_FakeScheduler(), stats=ModelStats("m", "2"), config=config)
    repo = types.SimpleNamespace(models={"m": ModelEntry(name="m", versions={2: version})}, expected_at_start=())
    collector = KilnCollector(repo, UnroutedRequests(repo.models))
    families = {f.name: f for f in collector.collect()}
    sample = {f: families[f].samples[0].value for f in ("kiln_queue_depth", "kiln_inflight_requests", "kiln_queue_capacity")}
    assert sample == {"kiln_queue_depth": 3, "kiln_inflight_requests": 5, "kiln_queue_capacity": 7}
    _FakeScheduler.queue_depth = 0
    families = {f.name: f for f in collector.collect()}
    assert families["kiln_queue_depth"].samples[0].value == 0


def test_queue_capacity():
    from server.model_types import DynamicBatchingConfig, QueuePolicy

    def cfg(**kw):
        return types.SimpleNamespace(dynamic_batching=DynamicBatchingConfig(**kw) if kw is not None else None)

    assert queue_capacity(types.SimpleNamespace(dynamic_batching=None)) == 0
    assert queue_capacity(cfg()) == 0
    assert queue_capacity(cfg(default_queue_policy=QueuePolicy(max_queue_size=4))) == 4
    assert queue_capacity(cfg(priority_levels=2, default_priority_level=1, default_queue_policy=QueuePolicy(max_queue_size=4),
                              priority_queue_policy={1: QueuePolicy(max_queue_size=1)})) == 5
    assert queue_capacity(cfg(priority_levels=2, default_priority_level=1,
                              priority_queue_policy={1: QueuePolicy(max_queue_size=1)})) == 0


# ---- switches ------------------------------------------------------------------------------


def test_allow_metrics_false_records_no_histograms(start_server, mlp_repo):
    server = start_server(mlp_repo, allow_metrics=False)
    try:
        assert server.server.metrics_port is None
        client = triton.InferenceServerClient(server.url)
        client.infer("mlp", [mlp_input()])
        version = server.repository.get("mlp")
        assert version.stats.histograms is None
        rpc = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
        assert int(rpc["inference_stats"]["success"]["count"]) == 1  # the RPC is unaffected
    finally:
        stats.configure()  # back to the defaults for the servers of later tests


def test_access_log_off_by_default_and_one_line_per_request(start_server, mlp_repo, caplog):
    caplog.set_level(logging.INFO, logger="kiln.access")
    server = start_server(mlp_repo)
    client = triton.InferenceServerClient(server.url)
    client.infer("mlp", [mlp_input()])
    assert not [r for r in caplog.records if r.name == "kiln.access"]

    logged = start_server(mlp_repo, access_log=True)
    try:
        client = triton.InferenceServerClient(logged.url)
        client.infer("mlp", [mlp_input()])
        for name in ("mlp", "nope"):
            with pytest.raises(triton.InferenceServerException):
                client.infer(name, [mlp_input(width=3)])
    finally:
        stats.configure()
    records = [r for r in caplog.records if r.name == "kiln.access"]
    assert [r.fields["outcome"] for r in records] == ["success", "invalid_argument", "not_found"]
    assert records[0].fields["model"] == "mlp" and records[0].fields["version"] == "1"
    assert records[0].fields["duration_ms"] > 0
    line = json.loads(JsonFormatter().format(records[0]))
    assert {"time", "level", "logger", "message", "model", "version", "outcome", "duration_ms"} <= set(line)
    assert records[2].getMessage().startswith("model=- version=- outcome=not_found")


def test_json_logs_name_model_load_and_failures(tmp_path):
    """`kiln serve --log-format json`: every line is one JSON object; loads and failures are there."""
    import os
    import signal
    import subprocess

    from conftest import REPO_ROOT
    from loadtests.ports import free_port

    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED / "mlp", repo / "mlp")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"garbage")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model-repository", str(repo), "--grpc-port", str(free_port()),
         "--metrics-port", str(free_port()), "--log-format", "json", "--access-log", "--grace-period", "1"],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    lines = []
    try:
        for line in proc.stderr:
            lines.append(json.loads(line))  # every line is a JSON object
            if lines[-1]["message"].startswith("server ready"):
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=20)
    lines += [json.loads(line) for line in rest.splitlines()]
    messages = [(entry["level"], entry["message"]) for entry in lines]
    assert ("info", "model 'mlp' loaded, versions [1]") in messages
    assert any(level == "error" and m.startswith("model 'broken' failed to load") for level, m in messages)
    assert messages[-1] == ("info", "stopped")


# ---- GPU -----------------------------------------------------------------------------------


def test_gpu_metrics_off_without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if nvidia-ml-py were missing
    assert GpuCollector.create() is None


def test_gpu_metrics_with_nvml(monkeypatch):
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=1000 * (h + 1), total=8000),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=40),
        nvmlDeviceGetPowerUsage=lambda h: 150_000,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    collector = GpuCollector.create()
    assert collector is not None
    families = {f.name: f for f in collector.collect()}
    assert set(families) == {n for n in FAMILIES if n.startswith("kiln_gpu_")}
    assert [s.value for s in families["kiln_gpu_memory_used_bytes"].samples] == [1000, 2000]
    assert families["kiln_gpu_utilization_ratio"].samples[0].value == 0.4
    assert families["kiln_gpu_power_watts"].samples[1].labels == {"gpu": "1"}
    assert families["kiln_gpu_power_watts"].samples[1].value == 150.0


def test_gpu_metrics_when_nvml_has_no_driver(monkeypatch):
    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=no_driver))
    assert GpuCollector.create() is None


def test_unrouted_labels_are_bounded():
    known = {"mlp": object()}
    unrouted = UnroutedRequests(known)
    for i in range(100):
        unrouted.record(f"name{i}", Status.NOT_FOUND)
    unrouted.record("mlp", Status.UNAVAILABLE)
    assert unrouted.snapshot() == {("", "not_found"): 100, ("mlp", "unavailable"): 1}
