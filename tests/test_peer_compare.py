"""loadtests/peers/compare.py's verdicts: each target per kiln variant and per generator, from round results.

The peer servers themselves are not started here (they need their own venvs: loadtests/peers/setup.sh);
kiln and the floor are, in one short live run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loadtests.peers import compare


def step(rps: float, p50: float, failed: dict[str, int] | None = None) -> dict:
    """A 5 s kiln bench step; `failed`: failed calls by gRPC status."""
    failed = failed or {}
    return {"throughput_rps": rps, "ok": int(rps * 5), "error_count": sum(failed.values()), "errors": failed,
            "latency_ms": {"p50": p50, "p99": 2 * p50}, "server": {"avg_batch": 1.0}}


def h2(rps: float, p50: float, errors: int = 0) -> dict:
    """A 5 s h2load step."""
    return {"throughput_rps": rps, "ok": int(rps * 5), "latency_ms": {"p50": p50}, "errors": errors}


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


def test_plot_shows_each_generators_mean_at_the_judged_concurrency(tmp_path):
    data = report()
    data.update(date="2026-12-03T10:00:00+00:00", machine={"nproc": 2, "cpu_model": "AMD EPYC"})
    assert compare.plotted_concurrency(data) == 16
    bars = compare.plot_data(data, 16)
    assert bars["kiln bench"] == {"kiln": 3000, "kiln-w2": 4000, "pytriton": 2000, "mlserver-w0": 1000}
    assert bars["perf_analyzer"] == {"kiln": 3300, "pytriton": 2200}  # no bar where it could not measure
    assert bars["h2load"]["kiln-w2"] == 5000
    recorded = tmp_path / "peers.json"
    recorded.write_text(json.dumps(data))
    assert compare.main(["--replot", str(recorded)]) == 0
    assert (tmp_path / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the judged c=16, not the last step measured; a model without targets plots its last step
    assert compare.plotted_concurrency(dict(data, concurrency=[1, 16, 64])) == 16
    assert compare.plotted_concurrency(dict(data, model="resnet18", concurrency=[1, 8])) == 8


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def fake_peer_venvs(tmp_path, monkeypatch) -> None:
    """server_commands only looks for the peers' venv interpreters."""
    for venv in ("mlserver", "pytriton"):
        (tmp_path / "venvs" / venv / "bin").mkdir(parents=True)
        (tmp_path / "venvs" / venv / "bin" / "python").touch()
    monkeypatch.setattr(compare, "VENVS", tmp_path / "venvs")


def resnet_model(tmp_path) -> Path:
    """A model folder whose config sets every setting the peers copy (800 us delay)."""
    model = tmp_path / "repo" / "resnet"
    model.mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "resnet"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 32\n'
        'input [ { name: "image" data_type: TYPE_FP32 dims: [ 3, 8, 8 ] } ]\n'
        'output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]\n'
        'dynamic_batching { max_queue_delay_microseconds: 800 }\n'
        'instance_group [ { count: 2 kind: KIND_CPU } ]\n'
        'parameters { key: "intra_op_thread_count" value: { string_value: "2" } }\n')
    return model


def test_every_peer_gets_kilns_threads_batch_size_delay_and_instances(tmp_path, monkeypatch):
    model = resnet_model(tmp_path)
    fake_peer_venvs(tmp_path, monkeypatch)

    servers = compare.server_commands("resnet", model / "1" / "model.onnx", model.parent, 9000)

    assert {"kiln", "kiln-w2", "floor", "mlserver-w0", "mlserver-w1", "pytriton"} <= set(servers)
    for name in ("floor", "mlserver-w0", "mlserver-w1", "pytriton"):
        assert flag(servers[name][0], "--intra-op-threads") == "2", name
    for name in ("mlserver-w0", "mlserver-w1", "pytriton"):
        assert flag(servers[name][0], "--max-batch-size") == "32", name
    assert flag(servers["pytriton"][0], "--max-queue-delay-us") == "800"
    assert flag(servers["pytriton"][0], "--instances") == "2"
    assert flag(servers["mlserver-w0"][0], "--max-batch-time") == "0.0008"


def test_peer_queue_delay_replaces_kilns_for_the_peers_only(tmp_path, monkeypatch):
    model = resnet_model(tmp_path)
    fake_peer_venvs(tmp_path, monkeypatch)

    servers = compare.server_commands("resnet", model / "1" / "model.onnx", model.parent, 9000, peer_delay_us=2000)

    assert flag(servers["pytriton"][0], "--max-queue-delay-us") == "2000"
    assert flag(servers["mlserver-w1"][0], "--max-batch-time") == "0.002"
    assert flag(servers["pytriton"][0], "--instances") == "2"  # the rest still from kiln's config
    assert "max_queue_delay_microseconds: 800" in (model / "config.pbtxt").read_text()  # kiln keeps its own


def test_mlserver_keeps_its_own_wait_when_kiln_has_no_queue_delay(tmp_path, monkeypatch):
    fake_peer_venvs(tmp_path, monkeypatch)
    repo = compare.REPO_ROOT / "model_repo"  # the bundled mlp: dynamic_batching { }, one ORT thread

    servers = compare.server_commands("mlp", repo / "mlp" / "1" / "model.onnx", repo, 9000)

    argv = servers["mlserver-w0"][0]
    assert flag(argv, "--max-batch-time") is None  # serve_mlserver's 0.5 ms: MLServer batches nothing without a wait
    assert flag(argv, "--intra-op-threads") == "1" and flag(argv, "--max-batch-size") == "64"
    assert flag(servers["floor"][0], "--intra-op-threads") == "1" and flag(servers["floor"][0], "--max-batch-size") == "64"
    assert flag(servers["pytriton"][0], "--instances") == "1"


def test_kiln_flags_reach_both_kiln_commands_and_no_peer(tmp_path, monkeypatch):
    fake_peer_venvs(tmp_path, monkeypatch)
    repo = compare.REPO_ROOT / "model_repo"

    servers = compare.server_commands("mlp", repo / "mlp" / "1" / "model.onnx", repo, 9000, ["--runtime-nice", "10"])

    assert flag(servers["kiln"][0], "--runtime-nice") == "10"
    assert flag(servers["kiln-w2"][0], "--runtime-nice") == "10" and flag(servers["kiln-w2"][0], "--workers") == "2"
    assert all("--runtime-nice" not in argv for name, (argv, _) in servers.items() if not name.startswith("kiln"))


def test_streaming_leaves_out_mlserver_and_streams_perf_analyzer(tmp_path, monkeypatch):
    assert compare.streaming_servers(["kiln", "mlserver-w0", "pytriton", "mlserver-w1"]) == (
        ["kiln", "pytriton"], ["mlserver-w0", "mlserver-w1"])
    (tmp_path / "perf_analyzer").touch()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    calls = []
    monkeypatch.setattr(compare.subprocess, "run", lambda argv, **kw: calls.append(argv)
                        or subprocess.CompletedProcess(argv, 1, "", "no server"))
    assert compare.perf_analyzer("mlp", "127.0.0.1:1", 16, 1000, tmp_path, streaming=True) == {"error": "no server"}
    assert compare.perf_analyzer("mlp", "127.0.0.1:1", 16, 1000, tmp_path) == {"error": "no server"}
    assert "--streaming" in calls[0] and "--streaming" not in calls[1]
    streamed = {**report(), "streaming": True, "checks": []}
    assert compare.markdown(streamed).startswith("kiln bench and perf_analyzer over ModelStreamInfer streams")


def test_a_model_without_targets_is_tabulated_but_not_judged():
    measured = {**report(), "model": "resnet18"}
    assert compare.checks(measured) == []
    assert "| kiln |" in compare.markdown({**measured, "checks": []})


def test_stop_waits_for_every_process_of_the_group_not_only_its_leader():
    # the leader exits on SIGTERM at once; its child ignores SIGTERM, like a server's worker that
    # would otherwise keep running into the next server's measurement
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    leader = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", leader], start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert len(compare.group_members(proc.pid)) == 2
    compare.stop(proc, timeout_s=1)
    assert proc.returncode is not None
    assert compare.group_members(proc.pid) == []


def test_a_round_measured_while_the_hypervisor_stole_cpu_is_marked():
    data = report()
    disturbed = step(1000, 10)
    disturbed["steal_share"] = 0.12
    data["servers"]["kiln"]["rounds"].append({"bench": {"16": disturbed}, "perf_analyzer": {}, "h2load": {}})
    data["servers"]["pytriton"]["rounds"].append({"bench": {"16": {**step(2000, 8), "steal_share": 0.01}},
                                                  "perf_analyzer": {}, "h2load": {}})
    data["checks"] = compare.checks(data, "kiln")
    bench = by_target(data["checks"])["c=16 throughput (kiln bench) kiln >= 2x pytriton"]
    assert bench["measured"].endswith("(rounds: 1.50x, 0.50x*)")
    assert compare.STEAL_NOTE in compare.markdown(data)
    # rounds without a steal reading (older reports) are not marked
    assert "*" not in by_target(compare.checks(report(), "kiln"))["c=16 throughput (kiln bench) kiln >= 2x pytriton"]["measured"]


def test_a_round_that_failed_on_one_side_does_not_shift_the_pairing():
    pa = lambda rps: {"throughput_rps": rps, "p50_ms": 5}  # noqa: E731
    data = {"model": "mlp", "concurrency": [16], "servers": {
        # kiln's perf_analyzer failed in round 1; PyTriton's in round 2
        "kiln": server([({"16": step(3000, 5)}, {"16": {"error": "timed out"}}, {}),
                        ({"16": step(3000, 5)}, {"16": pa(4000)}, {}),
                        ({"16": step(3000, 5)}, {"16": pa(6000)}, {})]),
        "pytriton": server([({"16": step(1000, 8)}, {"16": pa(1000)}, {}),
                            ({"16": step(1000, 8)}, {"16": {"error": "timed out"}}, {}),
                            ({"16": step(1000, 8)}, {"16": pa(2000)}, {})]),
    }}
    checks = by_target(compare.checks(data, "kiln"))
    # only round 3 was measured on both sides: 6000 / 2000; the means still use every successful round
    assert checks["c=16 throughput (perf_analyzer) kiln >= 2x pytriton"]["measured"] == "3.33x (rounds: 3.00x)"
    assert compare.summary(data, "kiln", 16)["pa_rounds_rps"] == [None, 4000, 6000]


def crashed_peer_report() -> dict:
    """mlp_wide: PyTriton's server died during round 2 (as its tritonserver did on 2026-12-07: signal 11)."""
    crashed = step(115.2, 0.1, failed={"UNAVAILABLE": 54076})
    pa = {"64": {"throughput_rps": 1600, "p50_ms": 40}}
    return {"model": "mlp_wide", "concurrency": [64], "servers": {
        "kiln-w2": server([({"64": step(1638, 34)}, pa, {}), ({"64": step(2115, 30)}, pa, {}),
                           ({"64": step(1873, 33)}, pa, {})]),
        "pytriton": server([({"64": step(883, 70)}, {"64": {"throughput_rps": 874, "p50_ms": 75}}, {}),
                            ({"64": crashed}, {"64": {"error": "connection refused"}}, {}),
                            ({"64": step(832, 76)}, {"64": {"error": "timed out"}}, {})]),
    }}


def test_a_step_whose_calls_failed_is_left_out_and_named(tmp_path):
    data = crashed_peer_report()
    check = by_target(compare.checks(data, "kiln-w2"))["c=64 throughput (kiln bench) kiln-w2 >= 1.5x pytriton"]
    # each side's mean over its working rounds, not pulled down by a dead server's 115 req/s
    assert check["measured"] == ("2.19x (rounds: 1.86x, 2.25x); pytriton's round(s) 2 left out: its calls failed")
    assert check["pass"]
    # a report recorded before this rule, judged again: checks, table and notes rewritten
    recorded = tmp_path / "peers.json"
    recorded.write_text(json.dumps(dict(data, date="2026-12-07T05:03:08+00:00", checks=[{"stale": True}],
                                        machine={"nproc": 2, "cpu_model": "Intel Xeon"})))
    assert compare.main(["--replot", str(recorded)]) == 0
    assert json.loads(recorded.read_text())["checks"][0]["measured"] == check["measured"]
    table = (tmp_path / "peers.md").read_text()
    assert ("- pytriton, round 2, kiln bench c=64: 54076 of 54652 calls failed {'UNAVAILABLE': 54076}: "
            "left out of the means and ratios") in table
    # perf_analyzer measured PyTriton once: its two failed rounds are named, not only counted out
    assert "- perf_analyzer c=64, pytriton: failed in round(s) 2, 3 (the first: connection refused)" in table


def test_kiln_failing_calls_fails_the_target_however_fast_its_other_rounds():
    data = crashed_peer_report()
    data["servers"]["kiln-w2"]["rounds"][0]["bench"]["64"] = step(5000, 10, failed={"RESOURCE_EXHAUSTED": 600})
    check = by_target(compare.checks(data, "kiln-w2"))["c=64 throughput (kiln bench) kiln-w2 >= 1.5x pytriton"]
    assert not check["pass"] and check["measured"].endswith("kiln-w2's calls failed in round(s) 1")
    # every round broken: still a verdict, not a silent gap
    for rnd in data["servers"]["kiln-w2"]["rounds"]:
        rnd["bench"]["64"] = step(100, 10, failed={"UNAVAILABLE": 5000})
    check = by_target(compare.checks(data, "kiln-w2"))["c=64 throughput (kiln bench) kiln-w2 >= 1.5x pytriton"]
    assert not check["pass"] and check["measured"].startswith("no round of kiln's without failed calls")
    data = crashed_peer_report()
    # a failed call or two in a long step (<= 1%) is reported by kiln bench but does not void the step
    data["servers"]["kiln-w2"]["rounds"][0]["bench"]["64"] = step(1638, 34, failed={"DEADLINE_EXCEEDED": 2})
    assert by_target(compare.checks(data, "kiln-w2"))["c=64 throughput (kiln bench) kiln-w2 >= 1.5x pytriton"]["pass"]


def stolen_round(share: float | None) -> dict:
    return {"bench": {"16": {**step(1000, 5), "steal_share": share}}, "perf_analyzer": {"16": {"error": "timed out"}},
            "h2load": {}}


def test_a_disturbed_round_is_measured_again_and_kept_aside():
    shares = iter([0.30, 0.08, 0.01])
    kept, disturbed = compare.measure_undisturbed(lambda attempt: stolen_round(next(shares)), retries=2)
    assert compare.round_steal(kept) == 0.01
    assert [compare.round_steal(r) for r in disturbed] == [0.30, 0.08]


def test_retries_end_with_the_last_round_even_if_it_was_disturbed():
    calls = []
    kept, disturbed = compare.measure_undisturbed(lambda attempt: calls.append(attempt) or stolen_round(0.2), retries=1)
    assert calls == [0, 1] and compare.round_steal(kept) == 0.2 and len(disturbed) == 1
    # no steal reading (not Linux, or an old report): nothing to retry
    kept, disturbed = compare.measure_undisturbed(lambda attempt: stolen_round(None), retries=2)
    assert compare.round_steal(kept) == 0.0 and disturbed == []


def test_a_short_live_run_measures_kiln_and_the_floor_and_publishes_them(tmp_path):
    """The script end to end on the servers that need no peer venv: each one started, measured by kiln bench
    in every round, stopped, and the JSON, table and plot written."""
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.peers.compare", "--servers", "kiln,floor", "--rounds", "1", "--duration", "1",
         "--warmup", "0.3", "--concurrency", "1,4", "--no-perf-analyzer", "--no-h2load", "--steal-retries", "0",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (report_path,) = tmp_path.glob("peers-*.json")
    report = json.loads(report_path.read_text())
    assert sorted(report["servers"]) == ["floor", "kiln"] and report["concurrency"] == [1, 4]
    for name, measured in report["servers"].items():
        (only_round,) = measured["rounds"]
        assert "error" not in only_round, only_round.get("error")
        for c in ("1", "4"):
            bench = only_round["bench"][c]
            assert bench["ok"] > 0 and bench["error_count"] == 0 and bench["ok"] == bench["sent"], (name, c)
    kiln_step = report["servers"]["kiln"]["rounds"][0]["bench"]["4"]
    assert kiln_step["server"]["success_count"] > 0  # kiln's own ModelStatistics moved
    markdown = report_path.with_suffix(".md").read_text()
    assert "| kiln |" in markdown and "| floor |" in markdown
    assert report_path.with_suffix(".png").stat().st_size > 10_000
