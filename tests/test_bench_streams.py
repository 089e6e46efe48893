"""`kiln bench --streaming`: the same load over ModelStreamInfer streams, and its error paths."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from loadtests.bench.streams import StreamError, StreamPool, error_code
from server.protocol import grpc_service_pb2 as pb
from test_bench import _kiln, serve_mlp_copy


@pytest.fixture(scope="module")
def stream_sweep(tmp_path_factory):
    """kiln bench --streaming: closed loop c=1,8, open loop 100/s and 100000/s, then batch 65 (every request refused)."""
    tmp = tmp_path_factory.mktemp("bench-streams")
    server = serve_mlp_copy(tmp)
    try:
        good = _kiln("bench", "mlp", "--url", server.url, "--streaming", "--concurrency", "1,8", "--rate", "100,100000",
                     "--duration", "1", "--warmup", "0.2", "--json", str(tmp / "good.json"))
        bad = _kiln("bench", "mlp", "--url", server.url, "--streaming", "--batch-size", "65", "--concurrency", "2",
                    "--duration", "0.5", "--warmup", "0.1", "--json", str(tmp / "bad.json"))
    finally:
        server.stop()
    assert good.returncode == 0, good.stdout + good.stderr
    assert bad.returncode == 0, bad.stdout + bad.stderr
    return json.loads((tmp / "good.json").read_text()), json.loads((tmp / "bad.json").read_text()), good


def test_streamed_steps_account_for_their_requests(stream_sweep):
    report, _, proc = stream_sweep
    assert report["config"]["streaming"] is True
    assert ", streaming," in proc.stdout
    assert [(s["mode"], s["concurrency"] or s["offered_rps"]) for s in report["steps"]] == [
        ("closed", 1), ("closed", 8), ("open", 100.0), ("open", 100000.0)
    ]
    for step in report["steps"]:
        assert step["sent"] == step["ok"] + step["error_count"], step
    for step in report["steps"][:3]:  # the sustainable ones
        assert step["error_count"] == 0, step
        lat = step["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"], lat
        assert step["server"]["success_count"] > 0 and step["server"]["avg_batch"] >= 1
    assert report["steps"][2]["rate_sustained"] is True
    absurd = report["steps"][3]  # an offered rate the streams cannot carry is reported, not quietly slowed
    assert absurd["rate_sustained"] is False and absurd["open_loop"]["achieved_rps"] < 0.9 * 100000
    assert "offered rate 100000 req/s NOT sustained" in proc.stdout


def test_error_answers_on_a_stream_are_counted_by_their_status(stream_sweep):
    _, report, _ = stream_sweep
    step = report["steps"][0]
    assert step["sent"] > 0 and step["ok"] == 0
    assert step["errors"] == {"INVALID_ARGUMENT": step["sent"]}
    # kiln's stream error text, '[STATUS] message': proof that the answers came over the stream
    assert step["error_examples"]["INVALID_ARGUMENT"].startswith("[INVALID_ARGUMENT]")
    assert "max_batch_size 64" in step["error_examples"]["INVALID_ARGUMENT"]


def test_error_code_of_a_stream_message():
    assert error_code("[NOT_FOUND] unknown model 'x'") == "NOT_FOUND"
    assert error_code("in ensemble 'e', [request id: 3] bad input") == "STREAM_ERROR"  # Triton's bare text
    assert error_code("[a b] c") == "STREAM_ERROR"


async def _pool_against(handler, calls):
    """Run `calls(pool)` against a grpc.aio server whose ModelStreamInfer is `handler`."""
    server = grpc.aio.server()
    method = grpc.stream_stream_rpc_method_handler(handler)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelStreamInfer": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await calls(StreamPool(channel))
    finally:
        await server.stop(0)


def test_a_silent_stream_times_out_and_is_not_reused():
    ended = asyncio.Event()

    async def silent(requests, context):
        try:
            async for _ in requests:
                pass
        finally:
            ended.set()
        yield b""  # never reached while the client waits

    async def calls(pool):
        with pytest.raises(StreamError) as info:
            await pool(pb.ModelInferRequest(model_name="m").SerializeToString(), timeout=0.2)
        await asyncio.wait_for(ended.wait(), 5)  # the client cancelled the stream
        return info.value, len(pool._idle)

    error, idle = asyncio.run(_pool_against(silent, calls))
    assert error.code == "DEADLINE_EXCEEDED" and "0.2 s" in error.details
    assert idle == 0


def test_answers_reuse_one_stream_and_an_ended_stream_is_an_error():
    opened = []

    async def answer_twice(requests, context):
        opened.append(1)
        count = 0
        async for _ in requests:
            count += 1
            if count > 2:
                return  # ends the stream without answering the third
            yield pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(id=str(count))).SerializeToString()

    async def calls(pool):
        request = pb.ModelInferRequest(model_name="m").SerializeToString()
        answers = [pb.ModelStreamInferResponse.FromString(await pool(request, timeout=5)) for _ in range(2)]
        with pytest.raises(StreamError) as info:
            await pool(request, timeout=5)
        return answers, info.value

    answers, error = asyncio.run(_pool_against(answer_twice, calls))
    assert [a.infer_response.id for a in answers] == ["1", "2"]
    assert opened == [1]  # both answers came over the one stream
    assert error.code == "STREAM_ENDED"
