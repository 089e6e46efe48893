"""loadtests/peers/compare.py's verdicts: each target per kiln variant and per generator, from round results.

The peer servers themselves are not started here (they need their own venvs: loadtests/peers/setup.sh).
"""

from __future__ import annotations

from loadtests.peers import compare


def step(rps: float, p50: float) -> dict:
    return {"throughput_rps": rps, "latency_ms": {"p50": p50, "p99": 2 * p50}, "server": {"avg_batch": 1.0}}


def h2(rps: float, p50: float, errors: int = 0) -> dict:
    return {"throughput_rps": rps, "latency_ms": {"p50": p50}, "errors": errors}


def server(rounds: list[tuple[dict, dict, dict]]) -> dict:
    """rounds of (kiln bench steps, perf_analyzer results, h2load steps), each keyed by concurrency."""
    return {"rounds": [{"bench": b, "perf_analyzer": p, "h2load": h} for b, p, h in rounds]}


def report() -> dict:
    pa_missing = {"error": "failed to get model config"}
    return {
        "model": "mlp",
        "concurrency": [1, 16],
        "servers": {
            "kiln": server([({"1": step(1000, 0.5), "16": step(3000, 5)}, {"1": {"throughput_rps": 1100, "p50_ms": 0.5}, "16": {"throughput_rps": 3300, "p50_ms": 5}},
                             {"1": h2(1500, 0.4), "16": h2(3600, 4)})]),
            "kiln-w2": server([({"1": step(1000, 0.5), "16": step(4000, 4)}, {}, {"1": h2(1500, 0.4), "16": h2(5000, 3)})] * 2),
            "pytriton": server([({"1": step(300, 3), "16": step(2000, 8)}, {"1": {"throughput_rps": 350, "p50_ms": 2.5}, "16": {"throughput_rps": 2200, "p50_ms": 7}},
                                 {"1": h2(400, 2.5), "16": h2(2400, 6)})]),
            "mlserver-w0": server([({"1": step(800, 1.2), "16": step(1000, 10)}, {"1": pa_missing, "16": pa_missing},
                                    {"1": h2(900, 1.0, errors=3), "16": h2(1100, 9)})]),
        },
    }


def by_target(checks: list[dict]) -> dict[str, dict]:
    return {c["target"]: c for c in checks}


def test_each_generator_gets_its_own_ratio_and_verdict():
    checks = by_target(compare.checks(report(), "kiln"))
    bench = checks["c=16 throughput (kiln bench) kiln >= 2x pytriton"]
    assert bench["measured"].startswith("1.50x") and not bench["pass"]
    assert checks["c=16 throughput (perf_analyzer) kiln >= 2x pytriton"]["measured"].startswith("1.50x")
    assert checks["c=16 throughput (h2load) kiln >= 2x pytriton"]["measured"].startswith("1.50x")
    assert checks["c=16 throughput (h2load) kiln >= 4x mlserver-w0"]["measured"].startswith("3.27x")
    # p50 at c=1 against each MLServer, per generator: 0.5 / 1.2 ms and 0.4 / 1.0 ms
    assert checks["c=1 p50 (kiln bench) kiln <= 50% of mlserver-w0"]["measured"].startswith("42%")
    assert checks["c=1 p50 (h2load) kiln <= 50% of mlserver-w0"]["pass"]
    # perf_analyzer could not measure MLServer: no verdict rather than a made-up one
    assert not any("perf_analyzer" in t and "mlserver" in t for t in checks)


def test_a_kiln_variant_is_judged_on_its_own_rounds():
    checks = by_target(compare.checks(report(), "kiln-w2"))
    h2load = checks["c=16 throughput (h2load) kiln-w2 >= 2x pytriton"]
    assert h2load["pass"] and h2load["measured"] == "2.08x (rounds: 2.08x)"
    assert "c=16 throughput (perf_analyzer) kiln-w2 >= 2x pytriton" not in checks  # it had no perf_analyzer rounds


def test_markdown_has_a_column_per_generator_and_names_failures():
    data = report()
    data["checks"] = compare.checks(data, "kiln")
    text = compare.markdown(data)
    header = text.splitlines()[0]
    assert "h2load c=16 req/s (p50 ms)" in header and "perf_analyzer c=1 req/s (p50 ms)" in header
    assert "| kiln-w2 | 1000 | 4000 |" in text and "5000 (3.00)" in text
    assert "mlserver-w0: h2load saw 3 failed calls at c=1" in text
    assert "perf_analyzer n/a, mlserver-w0: failed to get model config" in text
