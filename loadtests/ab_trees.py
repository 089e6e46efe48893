"""Two kiln checkouts side by side: did a change make serving faster? Same model, same h2load
load, many short rounds in alternating order, so that the machine's swings hit both alike.

    git worktree add /tmp/kiln-before HEAD~1
    python -m loadtests.ab_trees /tmp/kiln-before . --model mlp --concurrency 16 --connections 8 --rounds 16

The same for a configuration change: one tree twice, B on its own repository (e.g. a copy of
the model with another queue delay), the runtime's in-process ceiling measured every round:

    python -m loadtests.ab_trees . . --repository /tmp/wide --repository-b /tmp/wide10 \
        --model mlp_wide --workers 2 --concurrency 64 --connections 16 --ceiling-duration 2

Each tree's `python -m server serve` runs in that tree's folder (so it imports that tree's
server/ package) with this environment's Python and packages, on the same repository (by
default the current tree's model_repo/). On a shared machine one round says little; the
median of the per-round ratios (B / A, A measured right before or after B) is the figure.
Prints every round and the medians; --json keeps them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from loadtests import h2load  # noqa: E402
from loadtests.bench.report import percent  # noqa: E402
from loadtests.batching_sweep import ceiling, start_server  # noqa: E402
from loadtests.ports import free_port  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree_a", type=Path, help="the reference checkout (e.g. the commit before)")
    ap.add_argument("tree_b", type=Path, help="the checkout measured against it")
    ap.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repo")
    ap.add_argument("--repository-b", type=Path, default=None, help="B's repository (default: --repository)")
    ap.add_argument("--ceiling-duration", type=float, default=0.0,
                    help="seconds of the runtime alone at batch 64 after every round (A's model), for each one's share")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--workers", type=int, default=1, help="kiln serve --workers for both")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--duration", type=float, default=2.0, help="measured seconds per round and tree")
    ap.add_argument("--warmup", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if h2load.h2load_path() is None:
        raise SystemExit("ab_trees: h2load not found (apt-get install nghttp2-client)")
    names = {"A": args.tree_a.resolve(), "B": args.tree_b.resolve()}
    repositories = {"A": args.repository.resolve(), "B": (args.repository_b or args.repository).resolve()}
    rounds: dict[str, list[float]] = {"A": [], "B": []}
    stolen: dict[str, list[float | None]] = {"A": [], "B": []}  # the hypervisor's share of the CPU, per round
    ceilings: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kiln-ab-") as tmp:
        procs, workloads = [], {}
        try:
            for key, tree in names.items():
                port = free_port()
                procs.append(start_server(repositories[key], port, Path(tmp) / f"{key}.log", args.workers, cwd=tree))
                workloads[key] = h2load.prepare(f"127.0.0.1:{port}", args.model, Path(tmp))
            for r in range(args.rounds):
                for key in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    step = h2load.run_closed_loop(workloads[key], args.concurrency, args.duration, args.connections,
                                                  warmup_s=args.warmup)
                    if step["errors"]:
                        raise SystemExit(f"ab_trees: {key} answered {step['errors']} calls with an error")
                    rounds[key].append(step["throughput_rps"])
                    stolen[key].append(step["steal_share"])
                    print(f"[{r + 1}/{args.rounds}] {key} {step['throughput_rps']:8.0f} req/s  p50 {step['latency_ms']['p50']:.2f} ms"
                          f"  steal {percent(step['steal_share'])}%", flush=True)
                if args.ceiling_duration > 0:
                    ceilings.append(ceiling(repositories["A"] / args.model, args.ceiling_duration)["items_per_s"])
                    print(f"[{r + 1}/{args.rounds}] ceiling {ceilings[-1]:8.0f} items/s; share A {rounds['A'][-1] / ceilings[-1]:.0%},"
                          f" B {rounds['B'][-1] / ceilings[-1]:.0%}", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    ratios = [b / a for a, b in zip(rounds["A"], rounds["B"])]
    result = {
        "trees": {k: str(v) for k, v in names.items()}, "repositories": {k: str(v) for k, v in repositories.items()},
        "model": args.model, "workers": args.workers,
        "concurrency": args.concurrency, "connections": args.connections, "duration_s": args.duration,
        "rounds_rps": rounds, "rounds_steal_share": stolen, "ratios_b_over_a": ratios,
        "median_rps": {k: statistics.median(v) for k, v in rounds.items()},
        "median_ratio": statistics.median(ratios),
    }
    if ceilings:
        result["ceilings_items_per_s"] = ceilings
        result["median_share"] = {k: statistics.median(x / c for x, c in zip(v, ceilings)) for k, v in rounds.items()}
    print(f"A {names['A']}: median {result['median_rps']['A']:.0f} req/s")
    print(f"B {names['B']}: median {result['median_rps']['B']:.0f} req/s")
    print(f"B / A per round: {', '.join(f'{x:.2f}' for x in ratios)}; median {result['median_ratio']:.3f}")
    if ceilings:
        print(f"share of the ceiling, median: A {result['median_share']['A']:.1%}, B {result['median_share']['B']:.1%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
