"""The locust gRPC user against a live kiln server: headless for a few seconds, stats from its CSV."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPO_ROOT / "loadtests" / "locustfile.py"


def _locust() -> list[str]:
    exe = Path(sys.executable).with_name("locust")
    if exe.exists():
        return [str(exe)]
    if shutil.which("locust"):
        return ["locust"]
    pytest.skip("locust is not installed (pip install 'kiln-serve[dev]')")


def _run_locust(url: str, prefix: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    env = dict(os.environ, **(env or {}), PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [*_locust(), "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4", "-t", "4s", "--host", url,
         "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING", *extra],
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO_ROOT,
    )
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    return proc, rows


def test_locust_headless_against_live_server(start_server, bundled_repo, tmp_path):
    server = start_server(bundled_repo)
    proc, rows = _run_locust(server.url, tmp_path / "run", "--model", "mlp", "--batch-size", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mlp = rows["mlp"]
    assert mlp["Type"] == "grpc"
    assert int(mlp["Request Count"]) > 50, mlp
    assert int(mlp["Failure Count"]) == 0, (mlp, proc.stdout[-2000:])
    assert float(mlp["Average Content Size"]) > 0  # response_length: the serialized answer
    assert int(rows["Aggregated"]["Failure Count"]) == 0


def test_locust_reports_failures_by_grpc_status(start_server, bundled_repo, tmp_path):
    """Batch above max_batch_size: every call fails, and locust groups them under INVALID_ARGUMENT."""
    server = start_server(bundled_repo)
    env_model = {"KILN_MODEL": "mlp", "KILN_BATCH_SIZE": "65"}
    os.environ.update(env_model)
    try:
        proc, rows = _run_locust(server.url, tmp_path / "bad", "-t", "2s")
    finally:
        for key in env_model:
            os.environ.pop(key, None)
    assert proc.returncode == 1  # locust exits 1 when requests failed
    assert int(rows["mlp"]["Request Count"]) > 0
    assert rows["mlp"]["Failure Count"] == rows["mlp"]["Request Count"]
    with open(f"{tmp_path / 'bad'}_failures.csv", newline="") as f:
        errors = [row["Error"] for row in csv.DictReader(f)]
    assert errors and all("INVALID_ARGUMENT" in e for e in errors), errors


def test_an_unknown_model_fails_each_user_once_and_says_why(start_server, bundled_repo, tmp_path):
    server = start_server(bundled_repo)
    proc, rows = _run_locust(server.url, tmp_path / "unknown", "-t", "2s", "--model", "nosuch")
    assert proc.returncode == 1
    assert rows["nosuch"]["Failure Count"] == rows["nosuch"]["Request Count"] == "4"  # one per user, then it stops
    with open(f"{tmp_path / 'unknown'}_failures.csv", newline="") as f:
        errors = [row["Error"] for row in csv.DictReader(f)]
    assert errors and all("NOT_FOUND: ModelMetadata: unknown model 'nosuch'" in e for e in errors), errors
    assert "user stops: NOT_FOUND" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
