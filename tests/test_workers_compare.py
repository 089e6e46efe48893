"""loadtests/workers_compare.py: real `kiln serve` processes per (workers, event loop, runtime nice), measured by h2load."""

from __future__ import annotations

import json

from conftest import require_tool
from loadtests import workers_compare


def test_one_round_measures_every_variant(tmp_path, capsys):
    require_tool("h2load")
    out = tmp_path / "workers.json"
    code = workers_compare.main([
        "--workers", "1", "--event-loops", "asyncio,uvloop", "--runtime-nices", "0,5", "--generator", "h2load",
        "--concurrency", "4",
        "--connections", "2", "--rounds", "1", "--duration", "1", "--warmup", "0.3", "--json", str(out),
    ])
    assert code == 0
    steps = json.loads(out.read_text())["steps"]
    assert sorted((s["workers"], s["event_loop"], s["runtime_nice"]) for s in steps) == [
        (1, "asyncio", 0), (1, "asyncio", 5), (1, "uvloop", 0), (1, "uvloop", 5)]
    for step in steps:
        assert step["errors"] == 0 and step["ok"] == step["done"] > 20
        assert step["server_cpu_cores"] > 0
    table = capsys.readouterr().out
    assert "| 1 | asyncio | 0 | 4 |" in table and "| 1 | uvloop | 5 | 4 |" in table
