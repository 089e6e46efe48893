"""Summaries of a bench step, and their three outputs: terminal table, JSON, PNG plot."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))

# open loop: the offered rate counts as sustained when at least this share of the
# scheduled requests were sent and answered at this share of the offered rate
SUSTAINED_SENT_SHARE = 0.99
SUSTAINED_RATE_SHARE = 0.90


def latency_summary(latencies_s: np.ndarray) -> dict[str, float | None]:
    """Percentiles in ms (None without samples); always p50 <= p90 <= p99 <= p999."""
    if latencies_s.size == 0:
        return {name: None for name, _ in PERCENTILES} | {"mean": None, "min": None, "max": None}
    values = np.percentile(latencies_s, [q for _, q in PERCENTILES]) * 1000.0
    summary: dict[str, float | None] = {name: float(v) for (name, _), v in zip(PERCENTILES, values)}
    summary["mean"] = float(latencies_s.mean() * 1000.0)
    summary["min"] = float(latencies_s.min() * 1000.0)
    summary["max"] = float(latencies_s.max() * 1000.0)
    return summary


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(), "loadavg": load}


def server_delta(before: dict | None, after: dict | None) -> dict[str, Any] | None:
    """Server-side split from two ModelStatistics snapshots (summed over versions)."""
    if before is None or after is None:
        return None
    d = {key: after[key] - before[key] for key in after}

    def avg_us(name: str) -> float | None:
        count = d[f"{name}_count"]
        return d[f"{name}_ns"] / count / 1000.0 if count > 0 else None

    return {
        "success_count": d["success_count"],
        "fail_count": d["fail_count"],
        "request_us": avg_us("success"),
        "queue_us": avg_us("queue"),
        "compute_input_us": avg_us("compute_input"),
        "compute_infer_us": avg_us("compute_infer"),
        "compute_output_us": avg_us("compute_output"),
        "inference_count": d["inference_count"],
        "execution_count": d["execution_count"],
        "avg_batch": d["inference_count"] / d["execution_count"] if d["execution_count"] > 0 else None,
    }


def sustained_verdict(step: dict) -> tuple[bool, str]:
    """Open loop: was the offered rate actually delivered? The reason says why not."""
    ol = step["open_loop"]
    scheduled = ol["scheduled"]
    if scheduled == 0:
        return True, ""
    realized_rps = scheduled / step["duration_s"]
    reasons = []
    if scheduled - ol["sent"] > max(2, (1 - SUSTAINED_SENT_SHARE) * scheduled):
        reasons.append(
            f"{scheduled - ol['sent']} of {scheduled} requests scheduled in the window were never sent"
            + (f" (in-flight cap {ol['max_inflight']} reached)" if ol["inflight_cap_hits"] else " (the client fell behind)")
        )
    if ol["achieved_rps"] < SUSTAINED_RATE_SHARE * realized_rps:
        reasons.append(f"answers came back at {ol['achieved_rps']:.0f} req/s, {realized_rps:.0f} req/s were scheduled")
    return (not reasons), "; ".join(reasons)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def percent(share: float | None) -> str:
    """A 0..1 share as whole percent, '-' when unknown."""
    return "-" if share is None else f"{share * 100:.0f}"


TABLE_COLUMNS = (
    ("step", 10), ("sent", 8), ("ok", 8), ("err", 6), ("req/s", 9), ("items/s", 10),
    ("p50 ms", 8), ("p90 ms", 8), ("p99 ms", 8), ("p99.9 ms", 9), ("cli cpu", 7),
    ("srv q us", 9), ("srv inf us", 10), ("batch", 6), ("steal%", 6),
)


def table_header() -> str:
    return " ".join(name.rjust(width) for name, width in TABLE_COLUMNS)


def step_label(step: dict) -> str:
    return f"c={step['concurrency']}" if step["mode"] == "closed" else f"r={step['offered_rps']:g}"


def table_row(step: dict) -> str:
    lat = step["latency_ms"]
    srv = step["server"] or {}
    cells = [
        step_label(step), str(step["sent"]), str(step["ok"]), str(step["error_count"]),
        _fmt(step["throughput_rps"], 1), _fmt(step["throughput_items_per_s"], 1),
        _fmt(lat["p50"]), _fmt(lat["p90"]), _fmt(lat["p99"]), _fmt(lat["p999"]),
        _fmt(step["client"]["cpu_cores"], 2),
        _fmt(srv.get("queue_us"), 0), _fmt(srv.get("compute_infer_us"), 0), _fmt(srv.get("avg_batch"), 1),
        percent(step.get("steal_share")),
    ]
    return " ".join(cell.rjust(width) for cell, (_, width) in zip(cells, TABLE_COLUMNS))


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def step_notes(step: dict) -> list[str]:
    """Lines printed under a row: errors by status, and an unsustained offered rate."""
    notes = []
    if step["errors"]:
        notes.append("  errors: " + ", ".join(f"{code} {n}" for code, n in sorted(step["errors"].items())))
        for code, details in sorted(step.get("error_examples", {}).items()):
            if details:
                notes.append(f"    {code}, e.g.: {_one_line(details)}")
    if step["mode"] == "open" and step["rate_sustained"] is False:
        notes.append(
            f"  ! offered rate {step['offered_rps']:g} req/s NOT sustained: {step['open_loop']['reason']}"
        )
    return notes


def write_json(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def write_plot(report: dict, path: Path) -> None:
    """Latency percentiles (log ms) against achieved throughput, one line per percentile and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    markers = {"closed": "o", "open": "s"}
    styles = {"p50": "-", "p90": "--", "p99": "-.", "p999": ":"}
    colors = {"p50": "tab:blue", "p90": "tab:green", "p99": "tab:orange", "p999": "tab:red"}
    plotted = False
    for mode in ("closed", "open"):
        steps = [s for s in report["steps"] if s["mode"] == mode and s["latency_ms"]["p50"] is not None]
        if not steps:
            continue
        plotted = True
        x = [s["throughput_rps"] * report["config"]["batch_size"] for s in steps]
        for name, _ in PERCENTILES:
            ax.plot(
                x, [s["latency_ms"][name] for s in steps], linestyle=styles[name], marker=markers[mode],
                color=colors[name], label=f"{name} ({mode} loop)",
            )
        for s, xi in zip(steps, x):
            ax.annotate(step_label(s), (xi, s["latency_ms"]["p50"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    cfg = report["config"]
    if plotted:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:  # every call failed: say so rather than draw empty axes
        ax.text(0.5, 0.5, "no successful calls: see the errors in the report", transform=ax.transAxes, ha="center")
    ax.set_xlabel(f"throughput (items/s, batch size {cfg['batch_size']})")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"kiln bench: {cfg['model']} @ {cfg['url']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_in_process_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = report["batches"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot([r["batch_size"] for r in rows], [r["items_per_s"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("items/s (runtime alone)")
    ax.set_title(f"kiln bench --in-process: {report['config']['model']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
