"""loadtests/batching_sweep.py end to end, shortened: a real `kiln serve`, both copies of mlp, kiln bench.

Checks the report's shape and its own consistency (not the targets, which need the full run):
every step of both copies, the server CPU split per step, the checks evaluated, the table."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import BUNDLED_REPO, REPO_ROOT
from loadtests import threadcpu

CONCURRENCY = (1, 8)


def test_short_sweep_reports_every_step_with_its_server_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.batching_sweep", "--source", str(BUNDLED_REPO), "--models", "mlp",
         "--concurrency", ",".join(map(str, CONCURRENCY)), "--duration", "1", "--warmup", "0.3", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: a target missed in so short a run
    report = json.loads(next(out.glob("batching_sweep-*.json")).read_text())
    for variant in ("mlp", "mlp_nobatch"):
        assert sorted(report["results"][variant]) == sorted(str(c) for c in CONCURRENCY)
        for step in report["results"][variant].values():
            assert step["error_count"] == 0 and step["ok"] > 0
            cpu = step["server_cpu_cores"]
            assert set(cpu) == {*threadcpu.ROLES, "total"}
            assert cpu["event_loop"] > 0, cpu  # every call passes the event loop
            assert cpu["total"] <= (report["machine"]["nproc"] or 1) + 0.1
    targets = [check["target"] for check in report["checks"]]
    assert any(t.startswith("mlp c=1:") for t in targets) and any(t.startswith("mlp c=8:") for t in targets)
    assert (proc.returncode == 0) == all(check["pass"] for check in report["checks"])
    table = next(out.glob("batching_sweep-*.md")).read_text()
    assert "server CPU on: loop / instances / other" in table
    assert table.count("| mlp |") == len(CONCURRENCY)
