"""ModelStreamInfer as kiln bench's transport (`--streaming`).

A StreamPool stands in for a unary call: awaiting `pool(request, timeout=...)` takes an idle
ModelStreamInfer stream of its channel (or opens one), writes the request and reads its answer.
Each stream carries one request at a time, so N requests in flight hold N streams: the load
is the same as N unary callers, while each request costs gRPC a message on an open stream
instead of a whole call. (tritonclient's start_stream and perf_analyzer --streaming may instead
keep several requests in flight on one stream; kiln answers either, in any order.)
"""

from __future__ import annotations

import asyncio

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
_ERROR_MESSAGE_TAG = b"\x0a"  # ModelStreamInferResponse.error_message: field 1, length-delimited


class StreamError(Exception):
    """An answer that came back with `error_message` set, or a stream that ended or timed out."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def error_code(message: str) -> str:
    """The status of a stream's error_message: kiln writes '[NOT_FOUND] ...'; Triton writes bare text."""
    if message.startswith("[") and "]" in message:
        name = message[1:message.index("]")]
        if name.isupper() and name.replace("_", "").isalpha():
            return name
    return "STREAM_ERROR"


def _error_message(answer: bytes) -> str:
    from server.protocol import grpc_service_pb2 as pb

    return pb.ModelStreamInferResponse.FromString(answer).error_message


class StreamPool:
    def __init__(self, channel, metadata=None) -> None:
        self._open = channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=None)
        self._metadata = metadata
        self._idle: list = []
        self._expired: set = set()

    async def __call__(self, request: bytes, timeout: float) -> bytes:
        """The raw ModelStreamInferResponse; StreamError for an error answer, AioRpcError when the stream fails."""
        stream = self._idle.pop() if self._idle else self._open(metadata=self._metadata)
        timer = asyncio.get_running_loop().call_later(timeout, self._expire, stream)
        try:
            await stream.write(request)
            answer = await stream.read()
        except asyncio.CancelledError:
            if stream not in self._expired:
                stream.cancel()
                raise
            self._expired.discard(stream)
            raise StreamError("DEADLINE_EXCEEDED", f"no answer within {timeout:g} s") from None
        except BaseException:
            stream.cancel()
            raise
        finally:
            timer.cancel()
        if not isinstance(answer, bytes):  # grpc.aio.EOF: the server ended the stream
            code = await stream.code()
            raise StreamError(code.name if code.name != "OK" else "STREAM_ENDED", "the server ended the stream")
        self._idle.append(stream)
        if answer[:1] == _ERROR_MESSAGE_TAG:  # an empty error_message is not serialized
            message = _error_message(answer)
            raise StreamError(error_code(message), message)
        return answer

    def _expire(self, stream) -> None:
        self._expired.add(stream)
        stream.cancel()

    async def close(self) -> None:
        """End the idle streams cleanly (the server sees the client's half-close, not a cancel)."""
        idle, self._idle = self._idle, []
        for stream in idle:
            try:
                await stream.done_writing()
            except Exception:  # the stream already ended: nothing to close
                pass
