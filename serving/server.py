"""The gRPC server: `kunjax.serving.v2.KunjaxService` and JetStream's `Orchestrator` over a `kunjax.api.Runtime`.

Owns the translation between wire and runtime: proto requests become `GenerateRequest`s (sampling options
validated by `kunjax.SamplingParams`), runtime events become `GenerateResponse` chunks, and runtime errors
become status codes (`InvalidRequest` -> INVALID_ARGUMENT, `Overloaded` -> RESOURCE_EXHAUSTED with a
`retry-after-s` trailer); each stream's events also feed its `serving.metrics.StreamTimer`.

The bridge between the blocking runtime and the `grpc.aio` event loop (submit on a thread pool, runtime
callbacks into an `asyncio.Queue`, cancel -> abort, per-stream metrics) is `serving.streams.StreamBridge`, shared
with the JetStream service and the OpenAI HTTP front end (`serving.http_server`), so each is only a translation.
This module also assembles the servers: TLS when given a certificate and key, the interceptors of
`serving.interceptors` (bearer-token auth when given a token; unparsable requests -> INVALID_ARGUMENT), health,
reflection, the metrics HTTP endpoint when given a port, and the OpenAI HTTP server when given an HTTP port (same
token, TLS files, message limit, metrics and runtime).

Invariant: a stream that ends before its final event (client cancel, deadline, server stop) aborts its request,
so the runtime frees its blocks within a step. Never generates tokens, tokenizes or decides scheduling; never
shuts the runtime down (the caller owns it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kunjax.api import GenerateRequest, InvalidRequest, Overloaded, PolicyStatus, Runtime, TokenEvent
from kunjax.sampling_params import SamplingParams
from serving._generated.kunjax.serving.v2 import generate_pb2 as pb
from serving._generated.kunjax.serving.v2 import generate_pb2_grpc as pb_grpc
from serving.http_server import HttpServer, OpenAIApp
from serving.interceptors import BearerTokenInterceptor, MalformedRequestInterceptor, check_token
from serving.jetstream import JETSTREAM_SERVICE_NAME, add_jetstream_servicer
from serving.metrics import ServingMetrics
from serving.streams import StreamBridge

log = logging.getLogger("kunjax.serving.server")


class DisconnectedWriteFilter(logging.Filter):
    """gRPC's core logs an ERROR with a traceback (`ExecuteBatchError raised in core by servicer method`) for every
    response written to a stream whose client has gone; the handler's `finally` aborts that request as for a
    cancel. One debug line each instead (a 30-minute soak logged about 16,000 tracebacks)."""

    MARK = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.MARK in message:
            log.debug("a response was written to a stream whose client had gone: %s", message)
            return False
        return True


_GRPC_CORE_LOG = logging.getLogger("grpc._cython.cygrpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KunjaxService"].full_name  # "kunjax.serving.v2.KunjaxService"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
RETRY_AFTER_KEY = "retry-after-s"
HEALTH_SERVICES = ("", SERVICE_NAME, JETSTREAM_SERVICE_NAME)  # the names health answers for
MAX_SESSION_ID = 256  # characters of GenerateRequest.session_id
MAX_REQUEST_ID = 256  # characters of GenerateRequest.request_id (echoed in every response)

_FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                   "abort": pb.FINISH_REASON_ABORT, "error": pb.FINISH_REASON_ERROR}


def sampling_params_from_proto(sp: pb.SamplingParams) -> SamplingParams:
    """The kunjax `SamplingParams` for a proto message; unset optional fields keep kunjax's defaults.

    Raises `ValueError` (naming the field) for invalid values, exactly as `SamplingParams` does.
    """
    kwargs: dict[str, object] = {}
    for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "logprobs",
                 "skip_special_tokens"):
        if sp.HasField(name):
            kwargs[name] = getattr(sp, name)
    if sp.max_tokens_unlimited:
        kwargs["max_tokens"] = None
    return SamplingParams(stop=tuple(sp.stop), stop_token_ids=tuple(sp.stop_token_ids), ignore_eos=sp.ignore_eos,
                          include_stop_str_in_output=sp.include_stop_str_in_output, min_tokens=sp.min_tokens,
                          **kwargs)


def response_from_event(ev: TokenEvent, num_logprobs: int | None) -> pb.GenerateResponse:
    """One stream chunk for a runtime event; usage and finish reason only on the final one."""
    resp = pb.GenerateResponse(request_id=ev.request_id, token_ids=ev.token_ids, text=ev.text)
    for tok, lps in zip(ev.token_ids, ev.logprobs, strict=False):
        best = sorted(lps.items(), key=lambda kv: -kv[1])[: num_logprobs or 0]
        resp.logprobs.append(pb.TokenLogprob(
            token_id=tok, logprob=lps.get(tok, float("nan")),
            top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in best]))
    if ev.finished:
        resp.finish_reason = _FINISH_REASONS.get(ev.finish_reason or "", pb.FINISH_REASON_ERROR)
        if isinstance(ev.stop_reason, str):
            resp.stop_str = ev.stop_reason
        elif isinstance(ev.stop_reason, int):
            resp.stop_token_id = ev.stop_reason
        resp.usage.CopyFrom(pb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                                     cached_tokens=ev.cached_tokens, queue_time_s=ev.queue_s))
        if ev.error:
            resp.error = ev.error
        if ev.error_code:
            resp.error_code = ev.error_code
    return resp


def policy_status_to_proto(status: PolicyStatus) -> pb.PolicyStatus:
    """The wire form of the runtime's policy status (GetLoad's `policy`)."""
    return pb.PolicyStatus(
        policy=status.policy, counters=dict(status.counters),
        events=[pb.PolicyEvent(seq=ev.seq, kind=ev.kind, group=ev.group, members=list(ev.members), step=ev.step,
                               seconds=ev.seconds, detail=dict(ev.detail), time_unix_s=ev.time_unix_s)
                for ev in status.events],
        units=[pb.UnitStatus(unit=u.unit, mode=u.mode, members=list(u.members), running=u.running,
                             waiting=u.waiting, remote_dependent=u.remote_dependent, detail=dict(u.detail))
               for u in status.units])


class KunjaxServicer(pb_grpc.KunjaxServiceServicer):
    """`KunjaxService` over a blocking runtime, by way of the protocol-neutral `serving.streams.StreamBridge`
    (`streams`, shared with JetStream and the HTTP front end when given; else its own)."""

    def __init__(self, runtime: Runtime, *, metrics: ServingMetrics | None = None,
                 streams: StreamBridge | None = None):
        self.runtime = runtime
        self.metrics = metrics if metrics is not None else (
            streams.metrics if streams is not None else ServingMetrics(runtime))
        self.streams = streams if streams is not None else StreamBridge(runtime, self.metrics)
        self.readiness_task: asyncio.Task[None] | None = None  # set by `start_server`
        self.health: health.aio.HealthServicer | None = None  # set by `start_server`
        self.serving = threading.Event()  # set once health says SERVING (any thread may wait on it)

    def close(self) -> None:
        self.streams.close()

    async def drain(self) -> None:
        """Health reads NOT_SERVING from now on, for every service name (load balancers stop routing here);
        calls in flight and new ones are still answered (the runtime refuses new ones while it drains)."""
        self.streams.draining = True
        if self.readiness_task is not None:
            self.readiness_task.cancel()
        if self.health is not None:
            for service in HEALTH_SERVICES:
                await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _call(self, fn, *args):
        return await self.streams.call(fn, *args)

    async def _reject(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                      trailing_metadata: tuple[tuple[str, str], ...] = ()) -> NoReturn:
        self.metrics.count_rejected(code)
        await context.abort(code, message, trailing_metadata=trailing_metadata)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        arrived = time.monotonic()
        request_id = request.request_id or f"req-{uuid.uuid4().hex}"
        kind = request.WhichOneof("prompt")
        if kind is None:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "prompt is missing: set text or token_ids")
        try:
            params = sampling_params_from_proto(request.sampling)
        except ValueError as e:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if len(request.request_id) > MAX_REQUEST_ID:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT,
                               f"request_id has {len(request.request_id)} characters (at most {MAX_REQUEST_ID})")
        if kind == "text" and not request.text:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
        if len(request.session_id) > MAX_SESSION_ID:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT,
                               f"session_id has {len(request.session_id)} characters (at most {MAX_SESSION_ID})")
        greq = GenerateRequest(request_id=request_id, params=params,
                               prompt=request.text if kind == "text" else None,
                               prompt_ids=tuple(request.token_ids.ids) if kind == "token_ids" else None,
                               session_id=request.session_id or None)
        try:
            stream = await self.streams.open([greq], arrived)
        except InvalidRequest as e:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Overloaded as e:
            retry = f"{e.retry_after_s:g}"
            await self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry after {retry} s",
                               trailing_metadata=((RETRY_AFTER_KEY, retry),))
        try:
            async for _, ev in stream:
                yield response_from_event(ev, params.logprobs)
                if ev.finished and ev.finish_reason == "error":  # the last message says why; so does the status
                    code = (grpc.StatusCode.UNAVAILABLE if ev.error_code == "unavailable"
                            else grpc.StatusCode.INTERNAL)
                    await context.abort(code, ev.error or "the runtime failed on this request")
        finally:
            stream.close()  # a stream cut short (cancel, deadline, stop) aborts its request

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        await self._call(self.runtime.abort, request.request_id)
        return pb.AbortResponse()

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
                            ) -> pb.GetServerInfoResponse:
        info = await self._call(self.runtime.info)
        return pb.GetServerInfoResponse(
            model=info.model, architecture=info.architecture, num_layers=info.num_layers,
            vocab_size=info.vocab_size, max_model_len=info.max_model_len, instances=list(info.instances),
            policy=info.policy, versions=dict(info.versions), block_size=info.block_size,
            eos_token_ids=list(info.eos_token_ids), policy_settings=dict(info.policy_settings),
            kv_pool_blocks=info.kv_pool_blocks)

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        loads, status = await self._call(lambda: (self.runtime.load(), self.runtime.policy_status()))  # one hop
        return pb.GetLoadResponse(instances=[pb.InstanceLoad(**dataclasses.asdict(x)) for x in loads],
                                  policy=policy_status_to_proto(status))


async def _mark_serving_when_ready(runtime: Runtime, health_servicer: health.aio.HealthServicer,
                                   poll_s: float, serving: threading.Event) -> None:
    while not runtime.ready():
        await asyncio.sleep(poll_s)
    for service in HEALTH_SERVICES:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    serving.set()
    log.info("runtime ready: health is SERVING")


def load_server_credentials(tls_cert: str | Path | None, tls_key: str | Path | None
                            ) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None (plaintext) when neither is given; `ValueError` says what is wrong."""
    if tls_cert is None and tls_key is None:
        return None
    if tls_cert is None or tls_key is None:
        given, missing = ("tls_cert", "tls_key") if tls_key is None else ("tls_key", "tls_cert")
        raise ValueError(f"TLS needs both a certificate and its private key: {given} is set but {missing} is not")
    pem: dict[str, bytes] = {}
    for name, path in (("tls_cert", tls_cert), ("tls_key", tls_key)):
        try:
            pem[name] = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read {name} {str(path)!r}: {e.strerror or e}") from e
        if b"-----BEGIN " not in pem[name]:
            raise ValueError(f"{name} {str(path)!r} is not a PEM file")
    return grpc.ssl_server_credentials([(pem["tls_key"], pem["tls_cert"])])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass
class ServerHandle:
    """A running server on its own event-loop thread; `stop` is safe to call from any other thread."""

    server: grpc.aio.Server
    port: int
    servicer: KunjaxServicer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    metrics_port: int | None = None  # the metrics HTTP endpoint's port, None when not served
    tls: bool = False
    http: HttpServer | None = None  # the OpenAI-compatible HTTP server, None when not served

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @property
    def metrics(self) -> ServingMetrics:
        return self.servicer.metrics

    @property
    def target(self) -> str:
        """A loopback address of the server; by name under TLS, since certificates name hosts."""
        return f"{'localhost' if self.tls else '127.0.0.1'}:{self.port}"

    async def _end_readiness_watch(self) -> None:
        """Cancel and reap the task that turns health SERVING (still waiting when stopped during warm-up), so the
        loop does not close over a pending task."""
        task = self.servicer.readiness_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wait_serving(self, timeout: float | None = None) -> bool:
        """Whether health turned SERVING (warm-up done) within `timeout` seconds (None: wait for it)."""
        return self.servicer.serving.wait(timeout)

    def begin_drain(self) -> None:
        """Health NOT_SERVING now (`KunjaxServicer.drain`); safe from any thread, e.g. a signal's."""
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.servicer.drain(), self.loop).result(timeout=10)

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, give running ones `grace` seconds, cancel the rest (which aborts their
        requests), then end the loop thread and the metrics endpoint. Does not shut the runtime down."""
        if not self.loop.is_running():
            return
        if self.http is not None:
            self.http.stop()
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result()
        asyncio.run_coroutine_threadsafe(self._end_readiness_watch(), self.loop).result(timeout=10)
        self.servicer.close()
        self.metrics.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


async def start_server(runtime: Runtime, host: str = "127.0.0.1", port: int = 0, *,
                       max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, health_poll_s: float = 0.05,
                       auth_token: str | None = None, credentials: grpc.ServerCredentials | None = None,
                       metrics: ServingMetrics | None = None, streams: StreamBridge | None = None
                       ) -> tuple[grpc.aio.Server, int, KunjaxServicer]:
    """Builds and starts the server on the running loop; returns it, the bound port and the servicer.

    Serves `KunjaxService` and JetStream's `Orchestrator` (`serving.jetstream`), health and reflection.

    Listens on `host:port` (`port=0` picks a free one; localhost only by default), with TLS when given
    `credentials`; with `auth_token`, every RPC but health and reflection needs `authorization: Bearer <token>`.
    """
    metrics = metrics if metrics is not None else ServingMetrics(runtime)
    if not any(isinstance(f, DisconnectedWriteFilter) for f in _GRPC_CORE_LOG.filters):
        _GRPC_CORE_LOG.addFilter(DisconnectedWriteFilter())
    interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequestInterceptor(metrics.count_rejected)]
    if auth_token is not None:
        interceptors.insert(0, BearerTokenInterceptor(auth_token, metrics.count_rejected))
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    servicer = KunjaxServicer(runtime, metrics=metrics, streams=streams)
    pb_grpc.add_KunjaxServiceServicer_to_server(servicer, server)
    add_jetstream_servicer(server, runtime, kunjax=servicer)  # shares the servicer's pool, metrics and errors

    health_servicer = health.aio.HealthServicer()
    servicer.health = health_servicer
    for service in HEALTH_SERVICES:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, JETSTREAM_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)

    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    # Keep a reference: the loop holds tasks only weakly.
    servicer.readiness_task = asyncio.get_running_loop().create_task(
        _mark_serving_when_ready(runtime, health_servicer, health_poll_s, servicer.serving))
    return server, bound, servicer


def serve(runtime: Runtime, host: str = "127.0.0.1", port: int = 0, *,
          max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, health_poll_s: float = 0.05,
          auth_token: str | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
          metrics_port: int | None = None, metrics_host: str = "127.0.0.1", http_port: int | None = None,
          http_host: str = "127.0.0.1", model_name: str | None = None, chat_template: str | None = None
          ) -> ServerHandle:
    """Starts the server on a new event-loop thread and returns once it listens (raises if it cannot).

    `tls_cert`/`tls_key`: PEM files, both or neither (plaintext). `auth_token`: require it as a bearer token.
    `metrics_port`: serve Prometheus metrics over HTTP on `metrics_host:metrics_port` (0: a free port; None: no
    endpoint). `http_port`: also serve the OpenAI-compatible HTTP API (`serving.http_server`) on
    `http_host:http_port` with the same token, TLS files, size limit, metrics and stream layer; `model_name` is the
    model id it answers to (default: the runtime's `info().model`), `chat_template` overrides the model's own.
    Invalid settings raise `ValueError` naming the argument; ports that cannot be bound, `OSError`.
    """
    if auth_token is not None:
        check_token(auth_token)
    credentials = load_server_credentials(tls_cert, tls_key)
    for address in (host, http_host if http_port is not None else host):
        if auth_token is not None and credentials is None and not _is_loopback(address):
            log.warning("auth token sent in plaintext: %s is not a loopback address and TLS is off", address)
    metrics = ServingMetrics(runtime)
    streams = StreamBridge(runtime, metrics)
    try:
        http = None if http_port is None else HttpServer(
            OpenAIApp(streams, model_name=model_name if model_name is not None else runtime.info().model,
                      auth_token=auth_token, max_body_bytes=max_message_bytes, chat_template=chat_template),
            http_host, http_port, tls_cert=None if tls_cert is None else str(tls_cert),
            tls_key=None if tls_key is None else str(tls_key))
        bound_metrics = metrics.serve_http(metrics_port, metrics_host) if metrics_port is not None else None
    except BaseException:
        streams.close()
        raise

    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future[tuple[grpc.aio.Server, int, KunjaxServicer]] = concurrent.futures.Future()

    async def boot() -> None:
        try:
            started.set_result(await start_server(
                runtime, host, port, max_message_bytes=max_message_bytes, health_poll_s=health_poll_s,
                auth_token=auth_token, credentials=credentials, metrics=metrics, streams=streams))
        except BaseException as e:
            started.set_exception(e)
            loop.stop()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.create_task(boot())
        loop.run_forever()

    thread = threading.Thread(target=run, name="kunjax-grpc-loop", daemon=True)
    thread.start()
    try:
        server, bound, servicer = started.result(timeout=30)
    except BaseException:
        metrics.close()
        streams.close()
        if http is not None:
            http.stop()
        raise
    handle = ServerHandle(server=server, port=bound, servicer=servicer, loop=loop, thread=thread,
                          metrics_port=bound_metrics, tls=credentials is not None, http=http)
    if http is not None:
        try:
            http.start()
        except BaseException:
            handle.http = None
            handle.stop(grace=0)
            raise
    return handle
