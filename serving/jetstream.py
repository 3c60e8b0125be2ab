"""JetStream compatibility: `jetstream_proto.Orchestrator` (Decode, HealthCheck) over a `kunjax.api.Runtime`.

Owns only the translation between JetStream's wire messages and kunjax's: a `DecodeRequest` becomes a kunjax
`GenerateRequest` (greedy, since JetStream's request carries no sampling options) and each kunjax chunk becomes a
`DecodeResponse` with one `Sample`. Everything else is `serving.server.KunjaxServicer.Generate`, called directly,
so both services share one translation to `serving.streams` (the protocol-neutral stream layer: submit on a thread
pool, runtime events into an `asyncio.Queue`, cancel -> abort), one error mapping (`InvalidRequest` -> INVALID_ARGUMENT,
`Overloaded` -> RESOURCE_EXHAUSTED with a `retry-after-s` trailer) and of the invariant that a stream which ends
before its final event (client cancel, deadline, server stop) aborts its request.

What JetStream clients see, following JetStream's own `LLMOrchestrator.Decode`: a text prompt streams text and
ids; a token prompt streams ids only (the client detokenizes); the stream ends with status OK after the last
token. JetStream's proto has no finish reason or error field, so a request that the runtime aborts ends with
ABORTED and one that fails ends with INTERNAL (UNAVAILABLE when the server can no longer serve, e.g. it lost a
process of its multi-host group). Fields kunjax cannot honour (`num_samples` > 1, a LoRA adapter)
are INVALID_ARGUMENT rather than silently ignored; `metadata.start_time` and `has_bos` are ignored.

Never generates tokens, tokenizes, or shuts the runtime down.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from kunjax.api import Runtime
from serving._generated.jetstream_proto import jetstream_pb2 as js
from serving._generated.jetstream_proto import jetstream_pb2_grpc as js_grpc
from serving._generated.kunjax.serving.v2 import generate_pb2 as pb
from serving.streams import StreamBridge


class GenerateServicer(Protocol):
    """What this module needs of `serving.server.KunjaxServicer`: its streaming `Generate` and its stream layer."""

    streams: StreamBridge

    def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext  # noqa: N802 (gRPC name)
                 ) -> AsyncIterator[pb.GenerateResponse]: ...

JETSTREAM_SERVICE_NAME = js.DESCRIPTOR.services_by_name["Orchestrator"].full_name  # "jetstream_proto.Orchestrator"


class UnsupportedDecodeRequest(ValueError):
    """A `DecodeRequest` that kunjax can never serve as given; the message says which field to change."""


def generate_request_from_decode(request: js.DecodeRequest, request_id: str) -> pb.GenerateRequest:
    """The kunjax request for a JetStream one: same prompt, `max_tokens` as given (validated by kunjax's
    `SamplingParams`, so 0 or less is INVALID_ARGUMENT naming `max_tokens`), greedy decoding."""
    kind = request.WhichOneof("content")
    if kind is None:
        raise UnsupportedDecodeRequest("content is missing: set text_content or token_content")
    if not 0 <= request.num_samples <= 1:
        raise UnsupportedDecodeRequest(f"num_samples must be 0 or 1 (one sample per request), got "
                                       f"{request.num_samples}")
    if request.lora_adapter_id:
        raise UnsupportedDecodeRequest(f"lora_adapter_id must be empty: this server has no LoRA adapters, got "
                                       f"{request.lora_adapter_id!r}")
    greq = pb.GenerateRequest(request_id=request_id,
                              sampling=pb.SamplingParams(max_tokens=request.max_tokens, temperature=0.0))
    if kind == "text_content":
        greq.text = request.text_content.text
    else:
        greq.token_ids.ids.extend(request.token_content.token_ids)
    return greq


def decode_response_from_chunk(chunk: pb.GenerateResponse, *, with_text: bool) -> js.DecodeResponse:
    """One JetStream stream message holding a chunk's new ids (and text, for text prompts)."""
    sample = js.DecodeResponse.StreamContent.Sample(token_ids=chunk.token_ids, text=chunk.text if with_text else "")
    return js.DecodeResponse(stream_content=js.DecodeResponse.StreamContent(samples=[sample]))


class JetStreamServicer(js_grpc.OrchestratorServicer):
    """`jetstream_proto.Orchestrator` over a blocking runtime, by way of the server's `KunjaxServicer.Generate`
    (`kunjax`, whose stream layer it shares; its owner closes it)."""

    def __init__(self, runtime: Runtime, *, kunjax: GenerateServicer):
        self.runtime = runtime
        self._kunjax = kunjax

    async def Decode(self, request: js.DecodeRequest, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[js.DecodeResponse]:
        try:
            greq = generate_request_from_decode(request, f"jetstream-{uuid.uuid4().hex}")
        except UnsupportedDecodeRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        with_text = request.WhichOneof("content") == "text_content"
        chunks = self._kunjax.Generate(greq, context)
        try:
            async for chunk in chunks:
                if chunk.token_ids or chunk.text:
                    yield decode_response_from_chunk(chunk, with_text=with_text)
                if chunk.finish_reason == pb.FINISH_REASON_ABORT:
                    await context.abort(grpc.StatusCode.ABORTED, f"request {greq.request_id} was aborted")
                if chunk.finish_reason == pb.FINISH_REASON_ERROR:
                    code = (grpc.StatusCode.UNAVAILABLE if chunk.error_code == "unavailable"
                            else grpc.StatusCode.INTERNAL)
                    await context.abort(code, f"request {greq.request_id} failed: {chunk.error or 'unknown error'}")
        finally:
            # Ends Generate where it stands (a write cancelled under us, an abort above), so its own `finally`
            # aborts a request that has not finished.
            await chunks.aclose()

    async def HealthCheck(self, request: js.HealthCheckRequest, context: grpc.aio.ServicerContext
                          ) -> js.HealthCheckResponse:
        return js.HealthCheckResponse(is_live=await self._kunjax.streams.call(self.runtime.ready))


def add_jetstream_servicer(server: grpc.aio.Server, runtime: Runtime, *,
                           kunjax: GenerateServicer) -> JetStreamServicer:
    """Registers `jetstream_proto.Orchestrator` on `server` (before it starts) and returns its servicer.

    Add `JETSTREAM_SERVICE_NAME` to the server's reflection list yourself; see `serving.server.start_server`.
    """
    servicer = JetStreamServicer(runtime, kunjax=kunjax)
    js_grpc.add_OrchestratorServicer_to_server(servicer, server)
    return servicer
