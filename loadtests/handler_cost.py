"""kiln's request path in Python, without gRPC: its ModelInfer handler against the floor's, in-process.

    .venv/bin/python -m loadtests.handler_cost                      # mlp of model_repo/, 5 rounds of 20,000 calls
    .venv/bin/python -m loadtests.handler_cost --model-repository /tmp/wide --model mlp_wide --calls 2000

Side-by-side throughput runs cannot see a few microseconds in the request path: the machine
moves more than that between rounds, and grpc.aio's own work per call dwarfs it. This calls
both servicers' ModelInfer coroutines directly, on one event loop, with the same request
(random valid inputs from the model's metadata), alternating kiln and the floor
(loadtests/floor_server.py: decode, run ONNX Runtime, encode) round by round. Each round
awaits one handler `--calls` times, one event-loop turn apart (as lone calls reach a
server: kiln holds its instance until the loop's next turn, so back-to-back calls in one turn
would queue and measure its batching path instead). The minimum over the rounds is the figure:
what the code costs when the machine is not in its way. kiln's extra is the price of its
validation, scheduler, statistics and error mapping; the runtime call is in both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests.floor_server import FloorService  # noqa: E402
from loadtests.inputs import make_requests  # noqa: E402
from server.dataplane import DataPlane  # noqa: E402
from server.protocol import grpc_service_pb2 as pb  # noqa: E402
from server.repository import ControlMode, ModelRepository, model_filename  # noqa: E402
from server.runtime.base import worker_cpu_share  # noqa: E402
from server.service import InferenceService  # noqa: E402

__all__ = ["measure", "main"]


class _Context:
    """What the handlers ask of a grpc.aio servicer context on a successful call."""

    def time_remaining(self):
        return None

    async def abort(self, code, details):
        raise RuntimeError(f"{code}: {details}")


def _onnx_file(repository: Path, version) -> Path:
    """The ONNX file a loaded version was read from (the floor serves only ONNX)."""
    filename = model_filename(version.config_proto, version.config.platform)
    path = Path(repository) / version.name / str(version.version) / filename
    if path.suffix != ".onnx" or not path.is_file():
        raise SystemExit(f"model '{version.name}' has no {path}: the floor runs ONNX models only")
    return path


async def _per_call_us(handler, request, context, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await handler(request, context)
        await asyncio.sleep(0)  # one loop turn between calls, as between two lone requests of a server
    return (time.perf_counter() - started) / calls * 1e6


async def measure(repository: Path, model: str, calls: int, rounds: int, batch_size: int = 1) -> dict:
    """Microseconds per ModelInfer call of kiln and of the floor: each round's, and the minimum."""
    repo = ModelRepository(repository, control_mode=ControlMode.EXPLICIT, startup_models=(model,))
    await repo.start()
    try:
        kiln = InferenceService(DataPlane(repo))
        context = _Context()
        metadata = await kiln.ModelMetadata(pb.ModelMetadataRequest(name=model), context)
        version = repo.get(model, "")
        # the floor's ORT runs with the intra-op threads kiln's runtime gave its session
        threads = version.runtime.options.intra_op_threads or worker_cpu_share()
        floor = FloorService(str(_onnx_file(repository, version)), model, intra_op_threads=threads)
        request = make_requests(metadata, batch_size, variants=1)[0]
        handlers = {"kiln": kiln.ModelInfer, "floor": floor.ModelInfer}
        for handler in handlers.values():  # warm: first-call allocations, ORT's first run
            await _per_call_us(handler, request, context, min(calls, 200))
        per_round: dict[str, list[float]] = {name: [] for name in handlers}
        for _ in range(rounds):
            for name, handler in handlers.items():
                per_round[name].append(await _per_call_us(handler, request, context, calls))
        served = version.stats.success.count  # every kiln call answered OK by the model, warm-up included
    finally:
        await repo.close()
    best = {name: min(values) for name, values in per_round.items()}
    return {
        "model": model,
        "batch_size": batch_size,
        "calls_per_round": calls,
        "rounds_us": per_round,
        "kiln_us": best["kiln"],
        "floor_us": best["floor"],
        "kiln_extra_us": best["kiln"] - best["floor"],
        "kiln_requests_served": served,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-repository", type=Path, default=ROOT / "model_repo")
    ap.add_argument("--model", default="mlp", help="an ONNX model of the repository (default: mlp)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--calls", type=int, default=20000, help="calls per handler per round (default: 20000)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        ap.error("--calls and --rounds must be at least 1")
    result = asyncio.run(measure(args.model_repository, args.model, args.calls, args.rounds, args.batch_size))
    for name in ("kiln", "floor"):
        rounds = ", ".join(f"{v:.1f}" for v in result["rounds_us"][name])
        print(f"{name:6s} {result[f'{name}_us']:7.2f} us per call (min; rounds {rounds})")
    print(f"kiln - floor: {result['kiln_extra_us']:+.2f} us per call")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
