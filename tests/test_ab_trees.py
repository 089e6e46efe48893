"""loadtests/ab_trees.py, shortened: two real `kiln serve` processes (here both from this checkout,
one of them from a copy of it) under h2load, alternating rounds, and a consistent report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import BUNDLED_REPO, REPO_ROOT, require_tool


def test_two_trees_alternate_and_the_ratios_add_up(tmp_path):
    require_tool("h2load")
    copy = tmp_path / "tree-a"  # tree A: a copy of this checkout's server package
    shutil.copytree(REPO_ROOT / "server", copy / "server", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.ab_trees", str(copy), str(REPO_ROOT), "--repository", str(BUNDLED_REPO),
         "--rounds", "2", "--duration", "0.5", "--warmup", "0.1", "--concurrency", "4", "--connections", "2",
         "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["trees"] == {"A": str(copy), "B": str(REPO_ROOT)}
    a, b = report["rounds_rps"]["A"], report["rounds_rps"]["B"]
    assert len(a) == len(b) == 2 and min(a + b) > 0
    assert report["ratios_b_over_a"] == pytest.approx([y / x for x, y in zip(a, b)])
    assert all(0.0 <= share <= 1.0 for key in "AB" for share in report["rounds_steal_share"][key])
    assert "median" in proc.stdout and "B / A per round" in proc.stdout
