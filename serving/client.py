"""A small synchronous client for `kunjax.serving.v1.KunjaxService`.

Owns building requests from Python values (a prompt string or token ids, sampling options as keyword
arguments named like `kunjax.SamplingParams`) and reading results back. Never validates sampling options
itself: the server does, and its INVALID_ARGUMENT surfaces as `grpc.RpcError` with the server's message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc

from serving._generated.kunjax.serving.v1 import generate_pb2 as pb
from serving._generated.kunjax.serving.v1 import generate_pb2_grpc as pb_grpc

FINISH_REASON_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                       pb.FINISH_REASON_ABORT: "abort", pb.FINISH_REASON_ERROR: "error"}


def build_request(prompt: str | Sequence[int], *, request_id: str = "", **sampling: object) -> pb.GenerateRequest:
    """A `GenerateRequest`; `max_tokens=None` means "until the context is full", as in `kunjax.SamplingParams`."""
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
    req = pb.GenerateRequest(request_id=request_id, sampling=sp)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


class KunjaxClient:
    """Blocking calls over one channel; `timeout_s` is the deadline of each call (None: no deadline)."""

    def __init__(self, target: str, *, timeout_s: float | None = 30.0,
                 options: Sequence[tuple[str, object]] = ()):
        self.target = target
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(target, options=list(options))
        self.stub = pb_grpc.KunjaxServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> KunjaxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompt: str | Sequence[int], *, request_id: str = "", timeout_s: float | None = None,
                 **sampling: object) -> Iterator[pb.GenerateResponse]:
        """The response stream; cancel it early with `.cancel()` on the returned call object."""
        req = build_request(prompt, request_id=request_id, **sampling)
        return self.stub.Generate(req, timeout=timeout_s if timeout_s is not None else self.timeout_s)

    def generate_text(self, prompt: str | Sequence[int], **kwargs: object) -> tuple[str, str]:
        """The whole output text and the finish reason ("stop", "length", "abort" or "error")."""
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

    def info(self) -> pb.GetServerInfoResponse:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout_s)
