"""deploy/: promtool accepts the Prometheus config and rules; the Grafana dashboard names only metrics
the server exports; docker-compose wires kiln, Prometheus and Grafana together."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO_ROOT, require_tool
from server.metrics import FAMILIES

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "kiln.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

PROMQL_WORDS = {
    # aggregations, keywords and modifiers: never metric names
    "sum", "avg", "min", "max", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "topk", "bottomk", "quantile", "stddev", "stdvar", "group",
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows included."""
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard()["panels"])
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label names, functions and keywords removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        following = text[match.end():].lstrip()
        if word in PROMQL_WORDS or following.startswith("("):
            continue  # keyword, or a function call
        if text[match.start() - 1: match.start()].isdigit():
            continue  # exponent of a number such as 1e-3
        names.add(word)
    return names


def expected_series_names(family: str, kind: str) -> set[str]:
    if kind == "histogram":
        return {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
    return {family}


# ---- promtool ------------------------------------------------------------------------------


def test_promtool_check_config():
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules():
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for alert in ("KilnHighErrorRatio", "KilnHighP99Latency", "KilnQueueSaturation", "KilnModelNotReady", "KilnDown"):
        assert f"alert: {alert}\n" in ALERTS.read_text()


# ---- dashboard -----------------------------------------------------------------------------


def test_metric_name_parser():
    expr = ('histogram_quantile(0.99, sum by (model, le) (rate(kiln_request_duration_seconds_bucket'
            '{model=~"$model", outcome!="a b"}[$__rate_interval]))) / on(model) group_left(x) up > 1e-3 or vector(0)')
    assert metric_names(expr) == {"kiln_request_duration_seconds_bucket", "up"}


def test_dashboard_shape():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["model"]["query"]["query"] == "label_values(kiln_model_ready, model)"
    titles = " | ".join(title for title, _ in dashboard_targets())
    for needed in ("Request rate", "Error ratio", "p50 / p90 / p99", "Queue vs compute", "Batch size distribution",
                   "Queue depth", "In-flight", "GPU utilisation", "GPU memory", "GPU power"):
        assert needed in titles
    exprs = [expr for _, expr in dashboard_targets()]
    for q in ("0.5", "0.9", "0.99"):
        assert any(f"histogram_quantile({q}, sum by (model, le) (rate(kiln_request_duration_seconds_bucket" in e
                   for e in exprs)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_names_only_exported_metrics(start_server, tmp_path):
    """Fails when a dashboard query names a metric a live server does not export."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "model_repo" / "mlp", repo / "mlp")
    server = start_server(repo)
    x = triton.InferInput("x", [1, 256], "FP32")
    x.set_data_from_numpy(np.zeros((1, 256), np.float32))
    triton.InferenceServerClient(server.url).infer("mlp", [x])
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    exported = set()
    for family in text_string_to_metric_families(text):
        exported |= {sample.name for sample in family.samples}
    # GPU gauges exist only where NVML finds a GPU: accept them as declared (test_metrics checks the collector)
    gpu = set().union(*(expected_series_names(n, k) for n, k in FAMILIES.items() if n.startswith("kiln_gpu_")))
    # so does every declared family's full set of series
    for name, kind in FAMILIES.items():
        if not name.startswith("kiln_gpu_"):
            assert expected_series_names(name, kind) <= exported, name
    used = set().union(*(metric_names(expr) for _, expr in dashboard_targets()))
    assert "kiln_request_duration_seconds_bucket" in used
    unknown = {name for name in used - exported - gpu if name != "up"}
    assert not unknown, f"the dashboard names metrics the server does not export: {sorted(unknown)}"


def test_alert_rules_name_only_exported_metrics():
    used = set().union(*(metric_names(expr) for expr in re.findall(r"expr: \|?\s*\n?((?:.+\n)+?)\s+for:", ALERTS.read_text())))
    assert used, "no expressions parsed from alerts.yml"
    series = set().union(*(expected_series_names(n, k) for n, k in FAMILIES.items())) | {"up"}
    assert used <= series, sorted(used - series)


# ---- docker-compose ------------------------------------------------------------------------


def test_compose_wires_kiln_prometheus_and_grafana():
    compose = (DEPLOY / "docker-compose.yml").read_text()
    for service in ("kiln:", "prometheus:", "grafana:"):
        assert f"\n  {service}\n" in compose
    assert "context: .." in compose and "target: cpu" in compose
    assert "./prometheus:/etc/prometheus" in compose
    assert "./grafana/provisioning:/etc/grafana/provisioning" in compose
    assert "./grafana/dashboards:/var/lib/grafana/dashboards" in compose
    assert '"kiln:8002"' in (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    datasource = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "url: http://prometheus:9090" in datasource and "uid: prometheus" in datasource
    provider = (DEPLOY / "grafana" / "provisioning" / "dashboards" / "kiln.yml").read_text()
    assert "path: /var/lib/grafana/dashboards" in provider
    dockerfile = REPO_ROOT / "Dockerfile"
    if dockerfile.exists():
        assert re.search(r"^FROM .* AS cpu$", dockerfile.read_text(), re.M)
        assert "8002" in dockerfile.read_text()


@pytest.mark.parametrize("path", sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.json")))
def test_json_files_parse(path):
    json.loads((DEPLOY / path).read_text())
