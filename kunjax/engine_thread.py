"""The engine on its own thread: the `kunjax.api.Runtime` implementation over `LLMEngine`.

Owns the stepping thread and the hand-off between callers (gRPC handlers, any thread) and the engine (one
thread). Callers `submit` — validated synchronously, so a bad request is refused before it is accepted — then
read the request's events from its own queue; the engine thread steps whenever there is work and pushes each
request's new tokens to that queue. One lock guards the engine: it is held for a step and for an admission. An
abort only queues the id (it never waits for that lock): the engine thread aborts every queued id at the next
step boundary, in one batch, and frees their blocks there (a resubmission of a queued id aborts it at once).

Never loses an accepted request: every accepted request gets exactly one final event (stop, length, abort,
or error if a step itself failed), also on shutdown.

Also the read side of the engine for front ends: `info`, `load` and `policy_status` copy engine state into the
frozen `kunjax.api` records (`kunjax.status`) under the same lock, so a reader never sees an instance half-way
into a pipeline unit. `load` and `policy_status` do not queue behind steps and admissions: while the engine
steps it publishes a snapshot every `STATUS_PUBLISH_S` (and at the end of a step a reader asked during), so a
reader that finds the lock taken gets the latest one at once: at most that interval plus a step old, and never of
a layout the instances have left (then it waits for the lock). The policy's events are numbered after every
step, so each gets one number however many the policy keeps.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import version

from kunjax import __version__
from kunjax.api import (
    EventSink,
    GenerateRequest,
    InstanceLoad,
    InvalidRequest,
    Overloaded,
    PolicyStatus,
    RuntimeInfo,
    TokenEvent,
    iter_events,
)
from kunjax.engine import LLMEngine
from kunjax.executor import ExecutorLost
from kunjax.request import RequestOutput
from kunjax.status import EventLog, instance_loads, policy_status, runtime_info

log = logging.getLogger("kunjax.engine_thread")
IDLE_GROUP_STEP_S = 0.05  # step period of an engine whose only work is idle pipeline groups
STATUS_FRESH_S = 0.02  # a snapshot this young is returned as it is (GetLoad reads load and status back to back)
STATUS_LOCK_WAIT_S = 0.005  # a status reader waits this long for the lock before taking the latest snapshot
STATUS_PUBLISH_S = 0.1  # a stepping engine publishes a snapshot at least this often (about 1 ms of host work each)
# Python's default (700) is crossed by a decode step's short-lived objects at a few hundred sequences, and every
# collection also runs JAX's callback (~40 µs): at 10,000 a step at 256 sequences triggers none
# (docs/performance.md)
GC_GEN0_THRESHOLD = 10_000


def quiet_gc() -> None:
    """For a process serving one engine, once it is warm: collect, then move every object alive out of the cyclic
    collector's reach (`gc.freeze`: the model, the compiled steps and the books are never garbage, and a full
    collection that walks them paused all threads for 100-200 ms under 1,000 streams; 67 ms on the host-time
    benchmark), and raise the youngest generation's threshold to `GC_GEN0_THRESHOLD`. Cyclic garbage made from
    then on is still collected; cycles among the frozen objects are not (a second engine in the process after
    this one is released would keep the first one's)."""
    gc.collect()
    gc.freeze()
    g0, g1, g2 = gc.get_threshold()
    gc.set_threshold(max(g0, GC_GEN0_THRESHOLD), g1, g2)


def _event(out: RequestOutput) -> TokenEvent:
    c = out.outputs[0]
    return TokenEvent(
        request_id=out.request_id, token_ids=tuple(c.delta_token_ids), text=c.delta_text,
        logprobs=tuple(c.delta_logprobs), finished=out.finished, finish_reason=c.finish_reason,
        stop_reason=c.stop_reason, prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
        cached_tokens=out.num_cached_tokens, queue_s=_queue_s(out), error=out.error)


def _queue_s(out: RequestOutput) -> float:
    """Seconds from arrival to the first scheduled step (0 until it has been scheduled)."""
    m = out.metrics
    return max(0.0, m["first_scheduled_time"] - m["arrival_time"]) if "first_scheduled_time" in m else 0.0


class EngineThread:
    def __init__(self, engine: LLMEngine, *, max_queued: int = 1024, warmup: bool = True, freeze_gc: bool = False,
                 warmup_progress: Callable[[int, int], None] | None = None,
                 on_fatal: Callable[[str], None] | None = None):
        """`warmup_progress`: the warm-up's `on_progress` (`LLMEngine.warmup`), called on the engine's thread.
        `freeze_gc` (a server process): once warm-up is done, `quiet_gc()` (frozen heap, a higher first-generation
        threshold). `on_fatal(reason)`
        runs after `fatal` (the executor is lost: a multi-host server exits)."""
        self.engine = engine
        self._on_fatal = on_fatal
        self._fatal: str | None = None
        self.max_queued = max_queued
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._admitting = True
        self._closed_reason = "server is shutting down"
        self._ready = False
        # A request's queue lives from submit until its reader has taken the final event (or a new request
        # reuses the id of a finished one: its reader keeps the old queue); `_inflight` holds the requests the
        # engine has not finished (what the admission limit and duplicate ids are checked against).
        self._queues: dict[str, queue.Queue[TokenEvent] | EventSink] = {}
        self._queues_lock = threading.Lock()  # swapping and releasing queues (never held while stepping)
        self._inflight: set[str] = set()
        self._warmup = warmup
        self._warmup_progress = warmup_progress
        self._freeze_gc = freeze_gc
        self._events = EventLog()  # the policy's recent events, numbered
        self._aborts: dict[str, None] = {}  # ids to abort at the next step boundary, in order
        self._aborts_lock = threading.Lock()
        # (monotonic time, loads, status, the engine's layout version then): a snapshot of another layout (a fuse or
        # split since) is never handed out
        self._status: tuple[float, list[InstanceLoad], PolicyStatus, int] | None = None
        self._status_wanted = False  # a reader asked during the current step: a snapshot at its end
        self._thread = threading.Thread(target=self._run, name="kunjax-engine", daemon=True)
        self._thread.start()

    # ---- Runtime API --------------------------------------------------------------------------------
    def submit(self, request: GenerateRequest, on_event: Callable[[TokenEvent], None] | None = None) -> None:
        if (request.prompt is None) == (request.prompt_ids is None):
            raise InvalidRequest("give exactly one of a text prompt or prompt token ids")
        prompt = request.prompt if request.prompt is not None else list(request.prompt_ids)
        try:  # tokenizing (and refusing a huge text) needs no lock: other streams keep flowing meanwhile
            encoded = self.engine.encode(prompt, add_special_tokens=request.add_special_tokens)
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        with self._lock:
            if not self._admitting:
                raise Overloaded(self._closed_reason, retry_after_s=5.0)
            if len(self._inflight) >= self.max_queued:
                raise Overloaded(f"{len(self._inflight)} requests in flight (limit {self.max_queued})")
            if request.request_id in self._aborts:  # its abort is queued: it goes now, freeing the id
                self._drain_aborts(only=request.request_id)
            if request.request_id in self._inflight:
                raise InvalidRequest(f"duplicate request id {request.request_id!r}")
            try:
                self.engine.add_request(prompt, request.params, request_id=request.request_id,
                                        session_id=request.session_id, encoded=encoded)
            except ValueError as e:
                raise InvalidRequest(str(e)) from e
            rid = request.request_id
            with self._queues_lock:
                if on_event is None:
                    self._queues[rid] = queue.Queue()
                else:
                    sink = EventSink(on_event, lambda: self._release(rid, sink))
                    self._queues[rid] = sink
            self._inflight.add(request.request_id)
        self._wake.set()

    def events(self, request_id: str, timeout_s: float | None = None) -> Iterator[TokenEvent]:
        q = self._queues.get(request_id)
        if not isinstance(q, queue.Queue):
            raise KeyError(f"unknown request {request_id!r}" if q is None else
                           f"request {request_id!r} delivers its events to the callback it was submitted with")
        return iter_events(q, timeout_s, lambda: self._release(request_id, q))

    def _release(self, request_id: str, q: queue.Queue[TokenEvent] | EventSink) -> None:
        with self._queues_lock:  # not a newer request's queue under the same id
            if self._queues.get(request_id) is q:
                del self._queues[request_id]

    def abort(self, request_id: str) -> None:
        with self._aborts_lock:
            self._aborts[request_id] = None
        self._wake.set()

    def _drain_aborts(self, only: str | None = None) -> None:
        """Abort the queued ids (or just `only`); the engine lock is held."""
        with self._aborts_lock:
            if only is not None:
                ids = [only] if self._aborts.pop(only, 0) is None else []
            else:
                ids, self._aborts = list(self._aborts), {}
        for rid in ids:
            out = self.engine.abort(rid)
            if out is not None:
                self._deliver(out)

    def info(self) -> RuntimeInfo:
        with self._lock:
            return runtime_info(self.engine, {"kunjax": __version__, "jax": version("jax")})

    def token_texts(self, token_ids: Sequence[int]) -> tuple[str, ...]:
        tok = self.engine.tokenizer  # immutable once loaded: no lock
        if tok is None:
            raise InvalidRequest("this model has no tokenizer.json: token texts are unknown")
        vocab = self.engine.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return tuple(tok.decode([t], skip_special_tokens=False) for t in token_ids)

    def load(self) -> list[InstanceLoad]:
        return self._read_status()[1]

    def policy_status(self) -> PolicyStatus:
        return self._read_status()[2]

    def _snapshot(self) -> tuple[float, list[InstanceLoad], PolicyStatus, int]:
        """The engine lock is held."""
        snap = (time.monotonic(), instance_loads(self.engine), policy_status(self.engine, self._events),
                self.engine.layout_version)
        self._status, self._status_wanted = snap, False
        return snap

    def _read_status(self) -> tuple[float, list[InstanceLoad], PolicyStatus, int]:
        return self._fresh_status()

    def _fresh_status(self) -> tuple[float, list[InstanceLoad], PolicyStatus, int]:
        last = self._status
        if last is not None and last[3] != self.engine.layout_version:
            last = None  # instances fused or split since: only a new snapshot will do
        # Young since it was *taken* (GetLoad reads load and policy status back to back). Not since it was last
        # handed out: a reader polling faster than STATUS_FRESH_S would keep an idle engine's last one forever.
        if last is not None and time.monotonic() - last[0] < STATUS_FRESH_S:
            return last
        if self._lock.acquire(timeout=STATUS_LOCK_WAIT_S):  # free, or about to be: a step's tail is short
            try:
                return self._snapshot()
            finally:
                self._lock.release()
        if last is not None:  # the engine is stepping or admitting: its latest, and a new one after this step
            self._status_wanted = True
            return last
        with self._lock:  # no snapshot of this layout yet (before warm-up ended, or just after a transition)
            return self._snapshot()

    def ready(self) -> bool:
        return self._ready

    def shutdown(self, grace_s: float, cut_short: threading.Event | None = None) -> None:
        """Stop admitting; let in-flight requests finish for `grace_s` (or until `cut_short` is set: a second
        signal), then abort the rest and stop."""
        with self._lock:
            self._admitting = False
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._inflight and not (cut_short is not None and cut_short.is_set()):
            time.sleep(0.01)
        with self._lock:
            for rid in list(self._inflight):
                self.abort(rid)
            self._drain_aborts()
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)

    def fatal(self, reason: str) -> None:
        """The runtime cannot go on (`ExecutorLost`: a process of a multi-host group is gone). From any thread and
        without the engine lock (the engine thread may be stuck in a collective): stop admitting, turn not ready,
        and end every in-flight request with an "unavailable" error (gRPC UNAVAILABLE, HTTP 503); then
        `on_fatal`. Idempotent."""
        if self._fatal is not None:
            return
        self._fatal = reason
        self._admitting, self._ready = False, False
        self._closed_reason = f"the runtime is unavailable: {reason}"
        with self._queues_lock:  # (not held while putting: a callback sink releases its queue under it)
            ended = [(rid, self._queues.get(rid)) for rid in list(self._inflight)]
            self._inflight.clear()
        for rid, q in ended:
            if q is not None:
                q.put(TokenEvent(request_id=rid, token_ids=(), text="", finished=True, finish_reason="error",
                                 error=f"the runtime is unavailable: {reason}", error_code="unavailable"))
        self._stop.set()
        self._wake.set()
        if self._on_fatal is not None:
            self._on_fatal(reason)

    # ---- the engine thread --------------------------------------------------------------------------
    def _deliver(self, out: RequestOutput) -> None:
        if self._fatal is not None:  # every request already got its final (unavailable) event
            return
        q = self._queues.get(out.request_id)
        if q is None:
            return
        q.put(_event(out))
        if out.finished:
            self._inflight.discard(out.request_id)

    def _fail_all(self, error: str) -> None:
        for rid in list(self._inflight):
            self.engine.abort(rid)
            self._inflight.discard(rid)
            self._queues[rid].put(TokenEvent(request_id=rid, token_ids=(), text="", finished=True,
                                                 finish_reason="error", error=error))

    def _run(self) -> None:
        if self._warmup:
            try:
                self.engine.warmup(self._warmup_progress)
            except Exception as e:  # never ready: health stays NOT_SERVING, and nobody waits forever
                log.exception("warm-up failed")
                with self._lock:
                    self._admitting = False
                    self._closed_reason = f"runtime failed to start: {type(e).__name__}: {e}"
                    self._fail_all(f"warm-up failed: {type(e).__name__}: {e}")
                return
        with self._lock:
            self._snapshot()  # so a status reader never has to queue for the lock behind admissions
        if self._freeze_gc:
            quiet_gc()
        self._ready = True
        while not self._stop.is_set():
            if self._aborts:
                with self._lock:
                    self._drain_aborts()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            if not self.engine.has_requests():
                # Only idle pipeline units: pace their steps, so the restore window means some idle time and
                # not a few microseconds of spinning between two bursts.
                self._wake.wait(timeout=IDLE_GROUP_STEP_S)
                self._wake.clear()
            with self._lock:
                try:
                    self._drain_aborts()
                    for out in self.engine.step():
                        self._deliver(out)
                    self._events.update(self.engine)
                except ExecutorLost as e:
                    log.error("the executor is lost: %s", e)
                    self.fatal(str(e))
                    return
                except Exception as e:  # a failed step must not hang or lose the requests waiting on it
                    log.exception("engine step failed")
                    self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                if self._status_wanted or time.monotonic() - self._status[0] > STATUS_PUBLISH_S:
                    self._snapshot()
