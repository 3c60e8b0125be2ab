"""A small synchronous client for `kunjax.serving.v2.KunjaxService`.

Owns building requests from Python values (a prompt string or token ids, sampling options as keyword
arguments named like `kunjax.SamplingParams`) and reading results back. Never validates sampling options
itself: the server does, and its INVALID_ARGUMENT surfaces as `grpc.RpcError` with the server's message.
Also owns the channel's security: TLS verified against a given CA (or the system roots), and a bearer token
attached to every call by a client interceptor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc

from serving._generated.kunjax.serving.v2 import generate_pb2 as pb
from serving._generated.kunjax.serving.v2 import generate_pb2_grpc as pb_grpc

FINISH_REASON_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                       pb.FINISH_REASON_ABORT: "abort", pb.FINISH_REASON_ERROR: "error"}


def build_request(prompt: str | Sequence[int], *, request_id: str = "", session_id: str = "",
                  **sampling: object) -> pb.GenerateRequest:
    """A `GenerateRequest`; `max_tokens=None` means "until the context is full", as in `kunjax.SamplingParams`;
    `session_id` names the conversation (`kunjax serve --routing session`)."""
    sp = pb.SamplingParams()
    if "max_tokens" in sampling and sampling["max_tokens"] is None:
        del sampling["max_tokens"]
        sp.max_tokens_unlimited = True
    for name, value in sampling.items():
        if value is None:
            continue  # unset: the server's default
        field = getattr(sp, name)  # AttributeError names an unknown option
        if isinstance(value, str) and name == "stop":
            value = [value]
        if hasattr(field, "extend"):
            field.extend(value)
        else:
            setattr(sp, name, value)
    req = pb.GenerateRequest(request_id=request_id, sampling=sp, session_id=session_id)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str | bytes]]):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = base.compression


class BearerTokenAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel (works on plaintext channels too, unlike
    gRPC call credentials, so a loopback server with a token but no TLS is reachable)."""

    def __init__(self, token: str):
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details, [*(details.metadata or ()), self._entry])

    def _intercept(self, continuation: Callable, details: grpc.ClientCallDetails, request: object) -> object:
        return continuation(self._details(details), request)

    intercept_unary_unary = intercept_unary_stream = _intercept
    intercept_stream_unary = intercept_stream_stream = _intercept


def _channel_security(options: Sequence[tuple[str, object]], tls: bool, tls_ca: str | Path | None,
                      tls_server_name: str | None) -> tuple[grpc.ChannelCredentials | None, list]:
    """TLS credentials (None for plaintext) and the channel options that go with them."""
    options = list(options)
    if not (tls or tls_ca is not None):
        return None, options
    if tls_server_name is not None:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    roots = Path(tls_ca).read_bytes() if tls_ca is not None else None
    return grpc.ssl_channel_credentials(root_certificates=roots), options


class KunjaxClient:
    """Blocking calls over one channel; `timeout_s` is the deadline of each call (None: no deadline).

    `tls_ca`: PEM file of the CA (or self-signed certificate) to verify the server with; `tls=True` without it
    uses the system roots. `tls_server_name` overrides the name checked against the certificate (e.g. when
    `target` is an IP address). `auth_token`: sent as a bearer token on every call.
    """

    def __init__(self, target: str, *, timeout_s: float | None = 30.0,
                 options: Sequence[tuple[str, object]] = (), auth_token: str | None = None,
                 tls: bool = False, tls_ca: str | Path | None = None, tls_server_name: str | None = None):
        self.target = target
        self.timeout_s = timeout_s
        creds, options = _channel_security(options, tls, tls_ca, tls_server_name)
        if creds is not None:
            channel = grpc.secure_channel(target, creds, options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
        if auth_token is not None:
            channel = grpc.intercept_channel(channel, BearerTokenAuth(auth_token))
        self.channel = channel
        self.stub = pb_grpc.KunjaxServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> KunjaxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompt: str | Sequence[int], *, request_id: str = "", session_id: str = "",
                 timeout_s: float | None = None, **sampling: object) -> Iterator[pb.GenerateResponse]:
        """The response stream; cancel it early with `.cancel()` on the returned call object."""
        req = build_request(prompt, request_id=request_id, session_id=session_id, **sampling)
        return self.stub.Generate(req, timeout=timeout_s if timeout_s is not None else self.timeout_s)

    def generate_text(self, prompt: str | Sequence[int], **kwargs: object) -> tuple[str, str]:
        """The whole output text and the finish reason ("stop", "length" or "abort"); a request the runtime failed
        on raises `grpc.RpcError` with status INTERNAL (its message says why)."""
        text, reason = [], ""
        for resp in self.generate(prompt, **kwargs):
            text.append(resp.text)
            if resp.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                reason = FINISH_REASON_NAMES[resp.finish_reason]
        return "".join(text), reason

    def abort(self, request_id: str) -> None:
        self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self.timeout_s)

    def load(self) -> list[pb.InstanceLoad]:
        return list(self.stub.GetLoad(pb.GetLoadRequest(), timeout=self.timeout_s).instances)

    def policy_status(self) -> pb.PolicyStatus:
        """The memory policy's counters, recent events and serving units (GetLoad's `policy`)."""
        return self.stub.GetLoad(pb.GetLoadRequest(), timeout=self.timeout_s).policy

    def info(self) -> pb.GetServerInfoResponse:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout_s)


class AsyncKunjaxClient:
    """The same calls for asyncio code (`grpc.aio`); same options as `KunjaxClient`.

        async with AsyncKunjaxClient("127.0.0.1:50051") as client:
            async for resp in client.generate("Hello", max_tokens=16):
                print(resp.text, end="")
    """

    def __init__(self, target: str, *, timeout_s: float | None = 30.0,
                 options: Sequence[tuple[str, object]] = (), auth_token: str | None = None,
                 tls: bool = False, tls_ca: str | Path | None = None, tls_server_name: str | None = None):
        self.target = target
        self.timeout_s = timeout_s
        creds, options = _channel_security(options, tls, tls_ca, tls_server_name)
        if creds is not None:
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token is not None else None
        self.stub = pb_grpc.KunjaxServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncKunjaxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def generate(self, prompt: str | Sequence[int], *, request_id: str = "", session_id: str = "",
                 timeout_s: float | None = None, **sampling: object):
        """The response stream (an async iterator; `.cancel()` ends it early and aborts the request)."""
        req = build_request(prompt, request_id=request_id, session_id=session_id, **sampling)
        return self.stub.Generate(req, timeout=timeout_s if timeout_s is not None else self.timeout_s,
                                  metadata=self._metadata)

    async def generate_text(self, prompt: str | Sequence[int], **kwargs: object) -> tuple[str, str]:
        text, reason = [], ""
        async for resp in self.generate(prompt, **kwargs):
            text.append(resp.text)
            if resp.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                reason = FINISH_REASON_NAMES[resp.finish_reason]
        return "".join(text), reason

    async def abort(self, request_id: str) -> None:
        await self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self.timeout_s,
                              metadata=self._metadata)

    async def load(self) -> list[pb.InstanceLoad]:
        resp = await self.stub.GetLoad(pb.GetLoadRequest(), timeout=self.timeout_s, metadata=self._metadata)
        return list(resp.instances)

    async def policy_status(self) -> pb.PolicyStatus:
        resp = await self.stub.GetLoad(pb.GetLoadRequest(), timeout=self.timeout_s, metadata=self._metadata)
        return resp.policy

    async def info(self) -> pb.GetServerInfoResponse:
        return await self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout_s,
                                             metadata=self._metadata)
