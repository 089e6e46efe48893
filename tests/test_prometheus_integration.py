"""A real Prometheus scrapes a live kiln every second and evaluates deploy/prometheus/alerts.yml.

Checked through Prometheus's HTTP API: request counts per outcome equal what was sent, every query of
the Grafana dashboard evaluates and returns data, and each alert fires when caused on purpose.
Only the `for:` durations are shortened (and, in a test-only copy, the p99 threshold); the
expressions are the deployed ones.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from conftest import REPO_ROOT, require_tool
from loadtests.ports import free_port
from onnx_models import slow_identity_model
from test_monitoring_bundle import ALERTS, dashboard_targets

GOOD, BAD, UNKNOWN = 30, 12, 5
ALL_ALERTS = {"KilnHighErrorRatio", "KilnHighP99Latency", "KilnQueueSaturation", "KilnModelNotReady"}


def build_repo(root: Path) -> Path:
    shutil.copytree(REPO_ROOT / "model_repo" / "mlp", root / "mlp")
    # y = x @ I ... (12 MatMuls over [64, 512] rows): tens of milliseconds per request on one CPU thread
    slow_identity_model(root / "slow" / "1" / "model.onnx", [64, 512], 12)
    (root / "slow" / "config.pbtxt").write_text("""
name: "slow"
platform: "onnxruntime_onnx"
max_batch_size: 1
input [ { name: "x" data_type: TYPE_FP32 dims: [ 64, 512 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 64, 512 ] } ]
dynamic_batching { default_queue_policy { max_queue_size: 2 } }
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
""")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    (root / "broken" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 8\n')
    return root


def test_rules(tmp_path: Path) -> Path:
    """alerts.yml with every `for:` at 0s and a p99 threshold any request exceeds; expressions otherwise unchanged."""
    text = ALERTS.read_text()
    text, n_for = re.subn(r"(\n\s+for: )\S+", r"\g<1>0s", text)
    assert n_for == 5
    text, n_p99 = re.subn(r"(rate\(kiln_request_duration_seconds_bucket\[5m\]\)\)\)) > 0\.5\b", r"\1 > 1e-9", text)
    assert n_p99 == 1, "the KilnHighP99Latency expression changed: update this test's threshold rewrite"
    path = tmp_path / "alerts-test.yml"
    path.write_text(text)
    return path


test_rules.__test__ = False  # a helper, not a test


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str, rules: Path) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {rules}\n"
            "scrape_configs:\n  - job_name: kiln\n    scrape_timeout: 900ms\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.get("/api/v1/query", query=expr)["result"]

    def wait(self, what: str, check, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
            try:
                last = check()
                if last:
                    return last
            except (OSError, urllib.error.URLError) as exc:
                last = exc
            time.sleep(0.25)
        pytest.fail(f"timed out waiting for {what}; last: {last}")

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def tensor(shape, dtype=np.float32, name="x") -> triton.InferInput:
    t = triton.InferInput(name, list(shape), "FP32" if dtype == np.float32 else "FP64")
    t.set_data_from_numpy(np.ones(shape, dtype))
    return t


def test_real_prometheus_scrapes_kiln_and_fires_every_alert(start_server, tmp_path):
    binary = require_tool("prometheus")
    repo = build_repo(tmp_path / "repo")
    server = start_server(repo, strict_readiness=False)
    prom = Prometheus(binary, tmp_path, f"127.0.0.1:{server.server.metrics_port}", test_rules(tmp_path))
    stop_load = threading.Event()
    threads: list[threading.Thread] = []
    try:
        check_everything(prom, server, stop_load, threads)
    finally:
        stop_load.set()
        for t in threads:
            t.join(10)
        prom.stop()


def check_everything(prom: Prometheus, server, stop_load: threading.Event, threads: list) -> None:
    if True:
        # the first scrape lands before any traffic, so rate() sees every request from 0
        prom.wait("kiln to be up", lambda: [r for r in prom.query('up{job="kiln"}') if r["value"][1] == "1"])

        client = triton.InferenceServerClient(server.url)
        for _ in range(GOOD):
            client.infer("mlp", [tensor((2, 256))])
        for _ in range(BAD):
            with pytest.raises(triton.InferenceServerException, match="expected FP32"):
                client.infer("mlp", [tensor((1, 256), np.float64)])
        for i in range(UNKNOWN):
            with pytest.raises(triton.InferenceServerException):
                client.infer(f"no-such-model-{i}", [tensor((1, 256))])

        # overload `slow` (one instance, max_queue_size 2) from 6 clients until the alerts have fired
        outcomes = {"ok": 0, "rejected": 0}

        def hammer():
            own = triton.InferenceServerClient(server.url)
            while not stop_load.is_set():
                try:
                    own.infer("slow", [tensor((1, 64, 512))])
                    outcomes["ok"] += 1
                except triton.InferenceServerException as exc:
                    assert "queue is full" in exc.message(), exc.message()
                    outcomes["rejected"] += 1
                    time.sleep(0.01)

        threads += [threading.Thread(target=hammer, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()

        # counts per outcome, as Prometheus stored them
        def counts():
            return {
                (r["metric"].get("model", ""), r["metric"].get("version", ""), r["metric"]["outcome"]): float(r["value"][1])
                for r in prom.query('kiln_requests_total{model!="slow"} > 0')
            }

        expected = {("mlp", "1", "success"): GOOD, ("mlp", "1", "invalid_argument"): BAD, ("", "", "not_found"): UNKNOWN}
        prom.wait("the request counts", lambda: counts() == expected, timeout=15)
        assert prom.query('kiln_requests_total{model="mlp", outcome="unavailable"}')[0]["value"][1] == "0"

        fired = prom.wait("every alert to fire", lambda: ALL_ALERTS <= prom.firing() and prom.firing(), timeout=25)
        alerts = prom.get("/api/v1/alerts")["alerts"]
        by_name: dict[str, set] = {}
        for alert in alerts:
            if alert["state"] == "firing":
                by_name.setdefault(alert["labels"]["alertname"], set()).add(alert["labels"].get("model"))
        assert "mlp" in by_name["KilnHighErrorRatio"], by_name
        assert by_name["KilnModelNotReady"] == {"broken"}, by_name
        assert "slow" in by_name["KilnQueueSaturation"], by_name
        assert "mlp" in by_name["KilnHighP99Latency"], by_name
        assert "KilnDown" not in fired
        assert outcomes["rejected"] > 0 and outcomes["ok"] > 0, outcomes
        # the gauges are sampled once a second while `slow` stays overloaded: some scrape sees its queue
        # and its in-flight requests (a slow CI machine may have scraped only a few times by now)
        prom.wait("a scrape of slow's queue", lambda: prom.query('max_over_time(kiln_queue_depth{model="slow"}[1m]) >= 1'))
        prom.wait("a scrape of slow's requests in flight",
                  lambda: prom.query('max_over_time(kiln_inflight_requests{model="slow"}[1m]) >= 2'))

        # every query of the Grafana dashboard evaluates and returns data
        gpu = bool(prom.query("kiln_gpu_memory_total_bytes"))
        empty = []
        for title, expr in dashboard_targets():
            promql = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
            assert "$" not in promql, (title, promql)
            result = prom.query(promql)  # raises on a PromQL error
            if not result and not (title.startswith("GPU") and not gpu):
                empty.append((title, promql))
        assert not empty, f"dashboard queries without data: {empty}"
        models = prom.get("/api/v1/label/model/values", **{"match[]": "kiln_model_ready"})
        assert set(models) == {"mlp", "slow", "broken"}

    # a stopped server: the scrape fails, `up` drops to 0, KilnDown fires
    stop_load.set()
    for t in threads:
        t.join(10)
    server.call(server.server.stop())
    prom.wait("KilnDown to fire", lambda: "KilnDown" in prom.firing(), timeout=15)
