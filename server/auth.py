"""Bearer-token authentication on the gRPC port (optional), checked in one server interceptor.

* ``--auth-token-file``: one token per line (blank lines and ``#`` comments skipped). Every RPC of the
  inference service needs metadata ``authorization: Bearer <token>`` with one of these tokens (or an
  admin token); otherwise UNAUTHENTICATED.
* ``--admin-token-file``: the tokens allowed to call RepositoryModelLoad / RepositoryModelUnload. A
  valid token that is not an admin token gets PERMISSION_DENIED there. When authentication is on and
  no admin file is given, nobody may load or unload.
* grpc.health.v1 and server reflection stay open (probes carry no token); the metrics port is
  another listener and stays open too.

Tokens are compared with hmac.compare_digest against every configured token, never stopping at the
first match, so timing says nothing about how close a guess was.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Iterable, Sequence

import grpc

__all__ = ["ADMIN_METHODS", "OPEN_SERVICES", "TokenAuthInterceptor", "read_token_file"]

_SERVICE = "/inference.GRPCInferenceService/"
ADMIN_METHODS = frozenset({_SERVICE + "RepositoryModelLoad", _SERVICE + "RepositoryModelUnload"})
# Reachable without a token: Kubernetes probes and service discovery.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def read_token_file(path: Path) -> tuple[bytes, ...]:
    """The tokens of a file, one per line; ValueError when it has none or a token has spaces."""
    tokens = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if any(c.isspace() for c in token):
            raise ValueError(f"{path}:{number}: a token cannot contain spaces")
        tokens.append(token.encode("utf-8"))
    if not tokens:
        raise ValueError(f"{path} holds no token (one per line)")
    return tuple(tokens)


def _matches(presented: bytes, tokens: Iterable[bytes]) -> bool:
    found = False
    for token in tokens:
        found |= hmac.compare_digest(presented, token)
    return found


def _bearer(metadata) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip().encode("utf-8")
            return None
    return None


def _denied(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as ``handler`` that fails the call with ``code``."""

    async def deny(request_or_iterator, context):
        await context.abort(code, message)

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a valid token; PERMISSION_DENIED for a non-admin token on load/unload."""

    def __init__(self, tokens: Sequence[bytes] = (), admin_tokens: Sequence[bytes] = ()) -> None:
        if not tokens and not admin_tokens:
            raise ValueError("token authentication needs at least one token")
        self.tokens = tuple(tokens)
        self.admin_tokens = tuple(admin_tokens)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        admin = method in ADMIN_METHODS
        if not admin and not self.tokens:
            return await continuation(handler_call_details)  # only admin RPCs are protected
        presented = _bearer(handler_call_details.invocation_metadata)
        if admin:
            is_admin = presented is not None and _matches(presented, self.admin_tokens)
            if is_admin:
                return await continuation(handler_call_details)
            known = presented is not None and _matches(presented, self.tokens)
            if known:
                hint = "" if self.admin_tokens else " (no admin tokens are configured: --admin-token-file)"
                return await self._deny(continuation, handler_call_details, grpc.StatusCode.PERMISSION_DENIED,
                                        f"{method.rsplit('/', 1)[-1]} needs an admin token{hint}")
        elif presented is not None and (_matches(presented, self.tokens) | _matches(presented, self.admin_tokens)):
            return await continuation(handler_call_details)
        why = "no bearer token" if presented is None else "invalid bearer token"
        return await self._deny(continuation, handler_call_details, grpc.StatusCode.UNAUTHENTICATED,
                                f"{why}: send metadata 'authorization: Bearer <token>'")

    @staticmethod
    async def _deny(continuation, details, code: grpc.StatusCode, message: str):
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED, as without authentication
        return _denied(handler, code, message)
