"""The OpenAI-compatible HTTP front end: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health` and
`/metrics`, on Starlette served by uvicorn on its own event-loop thread.

Owns only HTTP: routes, the bearer token (every `/v1` route needs `Authorization: Bearer <token>` when the server
has one, else 401; `/health` and `/metrics` are open, like gRPC health), the request-size limit (413), JSON
parsing, status codes and Server-Sent Events. The wire format is `serving.openai_protocol`; submitting, the
event bridge, cancel -> abort and the per-stream metrics are `serving.streams.StreamBridge`, the same object the
gRPC services use, with the same `ServingMetrics` (rejections are counted under gRPC's code names:
INVALID_ARGUMENT, UNAUTHENTICATED, NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE).

Status codes: 400 for bad input (an OpenAI error body naming the field), 401 for a missing or wrong token, 404 for
an unknown model or route, 413 for a body over the limit, 429 with `Retry-After` when the runtime is full, 503 with
`Retry-After` while the server drains or when a shutdown aborted the request, 500 when the runtime failed on it.

Invariant: a client that disconnects (mid-stream or while waiting for a whole response) has its requests aborted
at once, so the runtime frees their KV within a step. Never tokenizes, generates or shuts the runtime down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kunjax.api import GenerateRequest, InvalidRequest, Overloaded
from serving import openai_protocol as oai
from serving.streams import EventStream, StreamBridge

log = logging.getLogger("kunjax.serving.http")

_CODE_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
               429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


def _error_response(err: oai.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _EventStreamResponse(StreamingResponse):
    """SSE whose stream is closed (aborting unfinished requests) however the response ends: done, client gone
    (Starlette cancels the body on `http.disconnect`), or the server stopping."""

    def __init__(self, body: AsyncIterator[bytes], stream: EventStream):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[union-attr]


class OpenAIApp:
    """The Starlette app over a `StreamBridge`; `model_name` is the one id `/v1/models` lists and requests name."""

    def __init__(self, streams: StreamBridge, *, model_name: str, auth_token: str | None = None,
                 max_body_bytes: int = 4 * 1024 * 1024, chat_template: str | None = None):
        self.streams = streams
        self.runtime = streams.runtime
        self.model_name = model_name
        self._token = auth_token.encode() if auth_token is not None else None
        self.max_body_bytes = max_body_bytes
        self._chat_template = chat_template  # overrides the model's own
        self._info = None  # RuntimeInfo, read once (it never changes while serving)
        self.created = int(time.time())
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics, methods=["GET"])]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_exception,
                                                                Exception: self._internal_error})

    # ---- plumbing ---------------------------------------------------------------------------------------
    async def _http_exception(self, request: Request, exc: HTTPException) -> JSONResponse:
        return _error_response(oai.APIError(f"{request.method} {request.url.path}: {exc.detail}",
                                            status=exc.status_code, code="not_found" if exc.status_code == 404
                                            else None))

    async def _internal_error(self, request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error_response(oai.APIError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                            type="server_error", code="internal_error"))

    def _reject(self, err: oai.APIError) -> JSONResponse:
        self.streams.metrics.count_rejected(_CODE_NAMES.get(err.status, str(err.status)))
        return _error_response(err)

    def _check_auth(self, request: Request) -> None:
        if self._token is None:
            return
        value = request.headers.get("authorization")
        if value is None:
            why = "missing credentials: send the header 'Authorization: Bearer <token>'"
        else:
            scheme, _, credential = value.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                credential.strip().encode("utf-8", "replace"), self._token)
            why = None if ok else "invalid bearer token"
        if why is not None:
            raise oai.APIError(why, status=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _json(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise oai.APIError(f"request body of {length} bytes is over the limit of {self.max_body_bytes}",
                               status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise oai.APIError(f"request body is over the limit of {self.max_body_bytes} bytes", status=413)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise oai.APIError(f"the request body is not valid JSON: {e}") from e

    async def _runtime_info(self):
        if self._info is None:
            self._info = await self.streams.call(self.runtime.info)
        return self._info

    # ---- routes -----------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def models(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except oai.APIError as e:
            return self._reject(e)
        return JSONResponse({"object": "list", "data": [await self._model_card()]})

    async def model(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            if request.path_params["model"] != self.model_name:
                raise oai.APIError(f"The model `{request.path_params['model']}` does not exist", status=404,
                                   param="model", code="model_not_found")
        except oai.APIError as e:
            return self._reject(e)
        return JSONResponse(await self._model_card())

    async def _model_card(self) -> dict[str, Any]:
        info = await self._runtime_info()
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "kunjax",
                "max_model_len": info.max_model_len}

    async def health(self, request: Request) -> Response:
        ready = not self.streams.draining and await self.streams.call(self.runtime.ready)
        status = "ok" if ready else ("draining" if self.streams.draining else "warming up")
        return JSONResponse({"status": status}, status_code=200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        body = await self.streams.call(self.streams.metrics.exposition)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- generation -------------------------------------------------------------------------------------
    async def _generate(self, request: Request, *, chat: bool) -> Response:
        arrived = time.monotonic()
        try:
            self._check_auth(request)
            body = await self._json(request)
            if chat:
                info = await self._runtime_info()
                template = self._chat_template if self._chat_template is not None else info.chat_template
                plan = oai.chat_plan(body, model_name=self.model_name, chat_template=template,
                                     special_tokens=info.special_token_texts)
            else:
                plan = oai.completion_plan(body, model_name=self.model_name)
            if self.streams.draining:
                raise oai.APIError("the server is shutting down", status=503, type="server_error",
                                   code="unavailable", headers={"Retry-After": "5"})
            stream = await self._open(plan, arrived)
        except oai.APIError as e:
            return self._reject(e)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if plan.stream:
            return _EventStreamResponse(self._stream_body(plan, stream, rid), stream)
        try:
            return await self._until_disconnected(request, self._whole(plan, stream, rid))
        except oai.APIError as e:
            return _error_response(e)
        finally:
            stream.close()

    async def _open(self, plan: oai.Plan, arrived: float) -> EventStream:
        base = uuid.uuid4().hex
        requests = []
        for i in range(plan.num_choices):
            prompt, params = plan.choice(i)
            requests.append(GenerateRequest(
                request_id=f"http-{base}-{i}", params=params, prompt=prompt if isinstance(prompt, str) else None,
                prompt_ids=prompt if not isinstance(prompt, str) else None,
                add_special_tokens=plan.add_special_tokens))
        try:
            return await self.streams.open(requests, arrived)
        except InvalidRequest as e:
            raise oai.APIError(str(e)) from e
        except Overloaded as e:
            retry = str(max(1, math.ceil(e.retry_after_s)))
            status, code = (503, "unavailable") if self.streams.draining else (429, "overloaded")
            raise oai.APIError(f"{e}; retry after {e.retry_after_s:g} s", status=status, type="server_error",
                               code=code, headers={"Retry-After": retry}) from e

    async def _until_disconnected(self, request: Request, work) -> Response:
        """`work`'s response, unless the client disconnects first: then `work` is cancelled (its stream is closed
        by the caller, which aborts the requests) and nobody is answered."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
        if task.cancelled():
            return Response(status_code=499)  # nobody reads it: the client is gone
        return task.result()

    async def _token_texts(self, ids: list[int]) -> dict[int, str]:
        unique = list(dict.fromkeys(ids))
        try:
            texts = await self.streams.call(self.runtime.token_texts, unique)
        except InvalidRequest as e:  # a model without a tokenizer has no token texts to show
            raise oai.APIError(f"logprobs need token texts: {e}", param="logprobs") from e
        return dict(zip(unique, texts, strict=True))

    async def _whole(self, plan: oai.Plan, stream: EventStream, rid: str) -> Response:
        n = plan.num_choices
        texts: list[list[str]] = [[] for _ in range(n)]
        events: list[list] = [[] for _ in range(n)]
        finals: list = [None] * n
        async for i, ev in stream:
            texts[i].append(ev.text)
            if plan.logprobs is not None:
                events[i].append(ev)
            if ev.finished:
                finals[i] = ev
                if (err := oai.failure(ev)) is not None:
                    return _error_response(err)
        choices = []
        for i in range(n):
            logprobs = None
            if plan.logprobs is not None:
                lookup = await self._token_texts([t for ev in events[i] for t in oai.logprob_ids(ev, plan.logprobs)])
                if plan.chat:
                    logprobs = {"content": [e for ev in events[i] for e in oai.chat_logprobs(ev, plan.logprobs,
                                                                                                lookup)]}
                else:
                    logprobs, offset = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}, 0
                    for ev in events[i]:
                        for key, values in oai.completion_logprobs(ev, plan.logprobs, lookup, offset).items():
                            logprobs[key].extend(values)
                        offset += len(ev.text)
            text = "".join(texts[i])
            choice: dict[str, Any] = {"index": i, "logprobs": logprobs, "finish_reason": oai.finish_reason(finals[i])}
            if plan.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return JSONResponse({"id": rid, "object": "chat.completion" if plan.chat else "text_completion",
                             "created": int(time.time()), "model": plan.model, "choices": choices,
                             "usage": oai.usage(finals, plan.n)})

    async def _stream_body(self, plan: oai.Plan, stream: EventStream, rid: str) -> AsyncIterator[bytes]:
        created = int(time.time())
        obj = "chat.completion.chunk" if plan.chat else "text_completion"
        finals: list = [None] * plan.num_choices
        offsets = [0] * plan.num_choices

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            out = {"id": rid, "object": obj, "created": created, "model": plan.model, "choices": choices}
            if plan.include_usage:
                out["usage"] = None
            return out

        try:
            if plan.chat:  # OpenAI opens each choice with the assistant's role
                for i in range(plan.num_choices):
                    yield _sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None}]))
            async for i, ev in stream:
                if ev.finished and (err := oai.failure(ev)) is not None:
                    yield _sse(err.body())
                    return
                logprobs = None
                if plan.logprobs is not None and ev.token_ids:
                    try:
                        lookup = await self._token_texts(oai.logprob_ids(ev, plan.logprobs))
                    except oai.APIError as e:
                        yield _sse(e.body())
                        return
                    logprobs = ({"content": oai.chat_logprobs(ev, plan.logprobs, lookup)} if plan.chat else
                                oai.completion_logprobs(ev, plan.logprobs, lookup, offsets[i]))
                offsets[i] += len(ev.text)
                if not (ev.text or ev.token_ids or ev.finished):
                    continue
                choice: dict[str, Any] = {"index": i, "logprobs": logprobs,
                                          "finish_reason": oai.finish_reason(ev) if ev.finished else None}
                if plan.chat:
                    choice["delta"] = {"content": ev.text} if ev.text or not ev.finished else {}
                else:
                    choice["text"] = ev.text
                if ev.finished:
                    finals[i] = ev
                yield _sse(chunk([choice]))
            if plan.include_usage:
                yield _sse({**chunk([]), "usage": oai.usage(finals, plan.n)})
            yield _sse("[DONE]")
        finally:
            stream.close()


class HttpServer:
    """uvicorn serving an `OpenAIApp` on its own event-loop thread; `stop` is safe from any other thread."""

    def __init__(self, app: OpenAIApp, host: str = "127.0.0.1", port: int = 0, *, tls_cert: str | None = None,
                 tls_key: str | None = None):
        self.app = app
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host.strip("[]"), port))
        except OSError:
            self._sock.close()
            raise
        self._sock.listen(2048)
        self._sock.set_inheritable(True)
        self.port: int = self._sock.getsockname()[1]
        self.tls = tls_cert is not None
        config = uvicorn.Config(app.app, log_level="warning", lifespan="off", access_log=False,
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key, timeout_graceful_shutdown=2,
                                h11_max_incomplete_event_size=app.max_body_bytes)
        self._server = uvicorn.Server(config)
        self._loop = asyncio.new_event_loop()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kunjax-http-loop", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._server.serve(sockets=[self._sock]))
        except BaseException as e:  # reported by `start`
            self._failed = e
        finally:
            self._loop.close()

    def start(self, timeout_s: float = 30.0) -> HttpServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise OSError(f"the HTTP server did not start: {self._failed or 'timed out'}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop accepting, close open connections (their streams abort their requests), end the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sock.close()
