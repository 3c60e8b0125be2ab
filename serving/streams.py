"""The protocol-neutral stream layer every front end (gRPC, JetStream, OpenAI HTTP) is a translation over.

Owns the bridge between the blocking runtime and an asyncio event loop: admissions (`Runtime.submit`, which
tokenizes and admits) run on one small thread pool and control calls (`abort`, a cancelled stream's abort,
`load`, `info`, `token_texts` ...) on another, so no burst of new requests can hold up a cancel or a load query;
each request's events arrive through the callback the runtime calls from its own thread, straight into an
`asyncio.Queue` on the caller's loop: no thread per stream, and a loop never blocks on the runtime. One
`StreamBridge` can serve several loops (the gRPC server's and the HTTP server's): a stream belongs to the loop
that opened it. Each stream also feeds its `serving.metrics.StreamTimer`.

An `EventStream` is one or more requests admitted together (OpenAI's `n` and prompt lists), their events
interleaved on one queue, each tagged with its request's index. `StreamBridge.open` raises the runtime's
`InvalidRequest` / `Overloaded` for the front end to translate; if one of several requests is refused, the ones
already admitted are aborted.

Invariant: a stream that ends before its final events (client cancel or disconnect, deadline, server stop) aborts
its unfinished requests when it is closed (`EventStream.close`, also on cancellation during admission), so the
runtime frees their blocks within a step; each abort runs once, before a new request may reuse the id. A client
that cancels a stream and at once sends a new request with the same id races its own cancel on the server (the
new call may be admitted before the old handler sees the cancel): a request whose id a stream here still holds
waits up to `CANCEL_GRACE_S` for that stream to settle (end or close), on the event loop (holding no admission
thread), before the runtime judges it a duplicate.
Never generates tokens, tokenizes, or shuts the runtime down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from kunjax.api import GenerateRequest, Runtime, TokenEvent
from serving.metrics import ServingMetrics, StreamTimer

T = TypeVar("T")
CANCEL_GRACE_S = 1.0  # how long a request reusing the id of a stream still open here waits for that stream's cancel
SETTLE_POLL_S = 0.005


class StreamBridge:
    """Thread pools, the event bridge and cancel -> abort over one runtime (see the module docstring)."""

    def __init__(self, runtime: Runtime, metrics: ServingMetrics, *, control_threads: int = 4,
                 admission_threads: int = 4):
        self.runtime = runtime
        self.metrics = metrics
        self._pool = concurrent.futures.ThreadPoolExecutor(  # control calls and aborts: never behind admissions
            max_workers=control_threads, thread_name_prefix="kunjax-control")
        self._admit_pool = concurrent.futures.ThreadPoolExecutor(  # submit (tokenizing, admission)
            max_workers=admission_threads, thread_name_prefix="kunjax-admit")
        self._cancelling: set[str] = set()  # ids of cancelled streams whose abort has not run yet
        self._cancel_lock = threading.Lock()  # one abort per cancel: by its task or by a new request's submit
        # Ids of requests admitted here and not settled yet (final event delivered, or stream closed): the event is
        # set when it settles.
        self._open: dict[str, threading.Event] = {}
        self._open_lock = threading.Lock()
        self.draining = False  # set when the server drains: front ends answer new work "unavailable"

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._admit_pool.shutdown(wait=False)

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the control pool (a runtime query or abort), awaited without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def abort_in_background(self, request_id: str) -> None:
        """Queue `request_id`'s abort on the control pool; never waits (safe in a cancelled task's `finally`)."""
        self._cancelling.add(request_id)  # (atomic; not under `_cancel_lock`, which an abort in progress holds)
        try:
            self._pool.submit(self._abort_cancelled, request_id)
        except RuntimeError:  # pool already shut down: abort inline rather than leak the request's blocks
            self._abort_cancelled(request_id)

    def _abort_cancelled(self, request_id: str) -> None:
        with self._cancel_lock:  # not twice: a second abort by id would hit a new request that reused the id
            if request_id in self._cancelling:
                self._cancelling.discard(request_id)
                self.runtime.abort(request_id)

    async def _await_settled(self, request_ids: Sequence[str]) -> None:
        """Wait (up to `CANCEL_GRACE_S`, on the loop: no admission thread is held, so a client reusing a live id
        stalls nobody else) until no stream here holds any of `request_ids`: a client's cancel of the stream that
        had the id may still be on its way (module docstring)."""
        deadline = time.monotonic() + CANCEL_GRACE_S
        while time.monotonic() < deadline:
            with self._open_lock:
                held = [self._open.get(rid) for rid in request_ids]
            if all(g is None or g.is_set() for g in held):
                return
            await asyncio.sleep(SETTLE_POLL_S)

    def _settle(self, request_id: str, gone: threading.Event) -> None:
        """The request admitted with `gone` has settled: a new request may take its id without waiting."""
        gone.set()
        with self._open_lock:
            if self._open.get(request_id) is gone:  # (not a newer request's under the same id)
                del self._open[request_id]

    def _settling(self, on_event: Callable[[TokenEvent], None], request_id: str, gone: threading.Event
                  ) -> Callable[[TokenEvent], None]:
        def deliver(ev: TokenEvent) -> None:
            if ev.finished:
                self._settle(request_id, gone)
            on_event(ev)
        return deliver

    def _submit_one(self, request: GenerateRequest, on_event: Callable[[TokenEvent], None]) -> threading.Event:
        """Admit one request; returns the event set when it settles (`_settle`)."""
        rid = request.request_id
        with self._open_lock:
            prior = self._open.get(rid)  # (`open` waited for it to settle, up to the grace)
        # Its id's last stream was cancelled: that abort goes first, so reusing the id is no "duplicate".
        self._abort_cancelled(rid)
        gone = threading.Event()
        with self._open_lock:
            self._open[rid] = gone
        try:
            self.runtime.submit(request, self._settling(on_event, rid, gone))
        except BaseException:
            with self._open_lock:
                if self._open.get(rid) is gone:  # refused: the id stays with whoever held it
                    if prior is not None and not prior.is_set():
                        self._open[rid] = prior
                    else:
                        del self._open[rid]
            raise
        return gone

    def _submit_all(self, requests: Sequence[GenerateRequest],
                    on_events: Sequence[Callable[[TokenEvent], None]]) -> list[threading.Event]:
        """Admit every request, or none: a refusal aborts the ones already admitted, then propagates. Returns each
        request's settle event."""
        admitted: list[str] = []
        gones: list[threading.Event] = []
        try:
            for request, on_event in zip(requests, on_events, strict=True):
                gones.append(self._submit_one(request, on_event))
                admitted.append(request.request_id)
        except BaseException:
            for rid in admitted:
                self.abort_in_background(rid)
            raise
        return gones

    async def open(self, requests: Sequence[GenerateRequest], arrived: float) -> EventStream:
        """Admit `requests` (their ids distinct) on the admission pool and return their interleaved events.

        `arrived`: when the front end received the call (`time.monotonic()`), for the latency metrics. Raises the
        runtime's `InvalidRequest` / `Overloaded` (nothing stays admitted then). Cancelled while the runtime
        admits, the requests are aborted once admission is through, or they would run to completion unread.
        """
        if not requests:
            raise ValueError("open needs at least one request")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()

        def sink(index: int) -> Callable[[TokenEvent], None]:
            def on_event(ev: TokenEvent) -> None:  # the runtime's thread: must not block
                with contextlib.suppress(RuntimeError):  # the loop is gone (server stopped): nobody is listening
                    loop.call_soon_threadsafe(queue.put_nowait, (index, ev))
            return on_event

        ids = [r.request_id for r in requests]
        await self._await_settled(ids)
        submitted = loop.run_in_executor(self._admit_pool, self._submit_all, list(requests),
                                         [sink(i) for i in range(len(requests))])
        try:
            gones = await asyncio.shield(submitted)
        except asyncio.CancelledError:
            # (Not on a failed submit: `_submit_all` aborted what it admitted, and a duplicate id names someone
            # else's request.)
            submitted.add_done_callback(lambda f: f.cancelled() or f.exception() is not None
                                        or [self.abort_in_background(rid) for rid in ids])
            raise
        return EventStream(self, ids, queue, [self.metrics.stream(arrived) for _ in ids], gones)


class EventStream:
    """The events of requests admitted together, as `(index, event)` in arrival order (each request's in order),
    until every request's final event; `close` (call it in a `finally`) aborts the unfinished ones."""

    def __init__(self, bridge: StreamBridge, request_ids: list[str],
                 queue: asyncio.Queue[tuple[int, TokenEvent]], timers: list[StreamTimer], gones: list[threading.Event]):
        self._bridge = bridge
        self._gones = gones
        self.request_ids = request_ids
        self._queue = queue
        self._timers = timers
        self._finished = [False] * len(request_ids)
        self._closed = False

    @property
    def done(self) -> bool:
        """Every request's final event has been taken."""
        return all(self._finished)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> tuple[int, TokenEvent]:
        if self.done or self._closed:
            raise StopAsyncIteration
        index, ev = await self._queue.get()
        self._timers[index].on_event(ev)
        if ev.finished:
            self._finished[index] = True
        return index, ev

    def close(self) -> None:
        """Counts each stream that did not see its final event as cancelled and aborts its request; idempotent,
        never waits on the runtime."""
        if self._closed:
            return
        self._closed = True
        for timer, rid, finished, gone in zip(self._timers, self.request_ids, self._finished, self._gones, strict=True):
            timer.close()
            if not finished:
                self._bridge.abort_in_background(rid)
                self._bridge._settle(rid, gone)  # (after: a request waiting for the id finds the abort queued)
