"""Server interceptors that apply to every service on the server: bearer-token auth and malformed-input mapping.

Owns two checks that no servicer should repeat:

* `BearerTokenInterceptor`: when the server has a token, every RPC except health checks and reflection must
  carry metadata `authorization: Bearer <token>`, else it ends UNAUTHENTICATED before its handler runs (and
  before its request is even parsed). The token is compared in constant time.
* `MalformedRequestInterceptor`: a unary request whose bytes do not parse as the method's message ends
  INVALID_ARGUMENT naming the parse error, instead of gRPC's default UNKNOWN.

Both hold no per-call state and never look at request contents beyond parsing them.
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple

import grpc

AUTH_METADATA_KEY = "authorization"
# Clients must be able to probe liveness and discover services without a credential.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def check_token(token: str) -> str:
    """The token if it can travel as gRPC metadata (non-empty printable ASCII, no spaces); else `ValueError`."""
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError("auth token must be non-empty printable ASCII without spaces")
    return token


def _denying_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
                     ) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that ends the call with `code`; it never parses the request."""

    async def deny(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(handler.request_streaming,
                                                                  handler.response_streaming)]
    return make(deny, request_deserializer=None, response_serializer=handler.response_serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC outside `UNAUTHENTICATED_PREFIXES`.

    `on_reject` (e.g. a metrics counter) is called with the status code of each refused call.
    """

    def __init__(self, token: str, on_reject: Callable[[grpc.StatusCode], None] | None = None):
        self._token = check_token(token).encode()
        self._on_reject = on_reject

    def _refusal(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
        """Why the call is refused, or None if it carries the token."""
        values = [v for k, v in metadata or () if k == AUTH_METADATA_KEY]
        if not values:
            return f"missing credentials: send metadata '{AUTH_METADATA_KEY}: Bearer <token>'"
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, credential = value.partition(" ")
        if scheme.lower() != "bearer":  # never echoed: a token sent without a scheme would be the "scheme"
            return "unsupported authorization scheme: send 'Bearer <token>'"
        if not hmac.compare_digest(credential.strip().encode("utf-8", "replace"), self._token):
            return "invalid bearer token"
        return None

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails
                                ) -> grpc.RpcMethodHandler | None:
        if details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return await continuation(details)
        refusal = self._refusal(details.invocation_metadata)
        handler = await continuation(details)
        if refusal is None or handler is None:
            return handler  # unknown methods stay UNIMPLEMENTED (reflection lists the real ones anyway)
        if self._on_reject is not None:
            self._on_reject(grpc.StatusCode.UNAUTHENTICATED)
        return _denying_handler(handler, grpc.StatusCode.UNAUTHENTICATED, refusal)


class _Malformed(NamedTuple):
    error: str


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Maps unparsable unary requests to INVALID_ARGUMENT (stream requests keep gRPC's own handling)."""

    def __init__(self, on_reject: Callable[[grpc.StatusCode], None] | None = None):
        self._on_reject = on_reject
        # method -> (its handler, the tolerant wrapper of it); rebuilt only if the method's handler changes
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails
                                ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[details.method] = (handler, self._wrap(handler))
        return cached[1]

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer

        def tolerant_parse(data: bytes) -> object:
            try:
                return parse(data)
            except Exception as e:  # DecodeError, or anything a custom deserializer raises
                return _Malformed(f"malformed request: {e}")

        async def reject(request: _Malformed, context: grpc.aio.ServicerContext) -> None:
            if self._on_reject is not None:
                self._on_reject(grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)

        if handler.response_streaming:
            inner = handler.unary_stream
            if inspect.isasyncgenfunction(inner):
                async def behavior(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
                    if isinstance(request, _Malformed):
                        await reject(request, context)
                    async with contextlib.aclosing(inner(request, context)) as responses:
                        async for response in responses:
                            yield response
            else:  # a coroutine that writes with `context.write`
                async def behavior(request: object, context: grpc.aio.ServicerContext) -> object:
                    if isinstance(request, _Malformed):
                        await reject(request, context)
                    return await _maybe_await(inner(request, context))
            make = grpc.unary_stream_rpc_method_handler
        else:
            inner = handler.unary_unary

            async def behavior(request: object, context: grpc.aio.ServicerContext) -> object:
                if isinstance(request, _Malformed):
                    await reject(request, context)
                return await _maybe_await(inner(request, context))
            make = grpc.unary_unary_rpc_method_handler
        return make(behavior, request_deserializer=tolerant_parse, response_serializer=handler.response_serializer)


async def _maybe_await(result: object) -> object:
    return await result if inspect.isawaitable(result) else result
