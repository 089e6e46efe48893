"""`kiln bench`: closed- and open-loop load against a running v2 gRPC server, and the in-process ceiling.

    kiln bench mlp --concurrency 1,4,16,64 --duration 10 --json out.json --plot out.png
    kiln bench mlp --rate 500,1000 --processes 2
    kiln bench --in-process model_repo/mlp_wide --batch-sizes 1,8,64

Library use (benchmark scripts): `run_bench(BenchConfig(...))`, `run_in_process(...)`.
"""

from __future__ import annotations

__all__ = ["BenchConfig", "BenchError", "main", "run_bench", "run_in_process"]


def __getattr__(name: str):  # lazy: `kiln --help` must not pay for grpc.aio and numpy
    if name in ("BenchConfig", "BenchError", "run_bench"):
        from loadtests.bench import runner

        return getattr(runner, name)
    if name == "run_in_process":
        from loadtests.bench.inprocess import run_in_process

        return run_in_process
    if name == "main":
        from loadtests.bench.cli import main

        return main
    raise AttributeError(name)
