"""The runtime interface: what a front end (the gRPC server, the bench, a notebook) sees of the engine.

It lives in `kunjax` because it is the runtime's contract; `serving/` only adapts protocols to it. A front end
talks to the runtime only through `Runtime`: submit a validated request and iterate its events,
abort, and read info, load and the memory policy's status. `kunjax.engine_thread.EngineThread` implements it over
the real engine; `serving.fake_runtime.FakeRuntime` implements it with outputs computable by hand, so the
server's threading, streaming, cancellation and error paths are tested without a model (STYLE.md: a narrow
engine interface and a fake you can compute by hand).

Contract:
* `submit` validates synchronously and raises `InvalidRequest` (-> INVALID_ARGUMENT) or `Overloaded`
  (-> RESOURCE_EXHAUSTED); once it returns, the request is accepted and its stream ends with exactly one
  event whose `finished` is True (finish reason "stop", "length", "abort" or "error").
* Events of one request arrive in order; `abort` is idempotent and frees the request's KV within a step.
* All methods are safe to call from any thread; `events` blocks only the caller.
* `load` and `policy_status` are each one consistent snapshot; two calls are two snapshots (a transition may fall
  between them). Policy events are numbered (`PolicyEvent.seq`) in the order they happened, so a reader that
  polls sees each one once however often it asks.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from kunjax.sampling_params import SamplingParams


class InvalidRequest(ValueError):
    """The request can never be served as given; the message says what is wrong."""


class Overloaded(RuntimeError):
    """The runtime cannot accept more work now; `retry_after_s` is a hint for the client."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt: str | None  # exactly one of prompt / prompt_ids
    prompt_ids: tuple[int, ...] | None
    params: SamplingParams
    session_id: str | None = None  # the conversation it belongs to (`--routing session`)
    # False for a text that already holds its special tokens (a rendered chat template): no BOS/EOS is added
    add_special_tokens: bool = True


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """New output of one request since its previous event."""

    request_id: str
    token_ids: tuple[int, ...]  # new ids
    text: str  # new text
    logprobs: tuple[dict[int, float], ...] = ()  # one entry per new id when logprobs were requested
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    prompt_tokens: int = 0  # usage, on the final event
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_s: float = 0.0  # on the final event: seconds from arrival to the first scheduled step
    error: str | None = None
    # with finish_reason "error": "unavailable" when the runtime itself is going away (a multi-host peer was lost:
    # gRPC UNAVAILABLE, HTTP 503, retry elsewhere), else None (this request failed: INTERNAL, 500)
    error_code: str | None = None


@dataclasses.dataclass(frozen=True)
class InstanceLoad:
    """One instance's load. A pipeline-group member reports its stage's KV blocks (its slice of every block of
    the group, extension included) and the whole group's requests, so running/waiting repeat on each member."""

    instance: int
    mode: str  # "replica" (serving alone) | "pipeline" (a stage of a pipeline group)
    kv_free: int
    kv_used: int
    kv_cached: int
    kv_total: int
    running: int
    waiting: int
    queued_tokens: int
    group: int = -1  # pipeline group id; -1 for a replica
    stage: int = -1  # position in the group's pipeline (0 runs the first layers); -1 for a replica
    demand_blocks: int = 0  # running requests' blocks + what the queued and swapped-out requests need to start
    swapped: int = 0  # requests whose KV is on the host tier (swap policy)


MAX_POLICY_EVENTS = 32  # most recent events a `PolicyStatus` carries


@dataclasses.dataclass(frozen=True)
class PolicyEvent:
    """One transition the memory policy made (e.g. drop, restore, exchange_done for a policy that fuses replicas;
    migration, migration_cancelled for one that migrates; ...)."""

    seq: int  # 1-based position among all events of this runtime: new events have higher seq
    kind: str
    group: int  # the pipeline unit concerned, -1 when none
    members: tuple[int, ...]  # instances concerned (a pipeline's, by stage)
    step: int  # engine step after which it happened
    seconds: float  # time it took, on the engine's clock (modelled time on a virtual clock)
    detail: dict[str, str]  # kind-specific facts (e.g. "reason", "moved_blocks"), values as text
    time_unix_s: float = 0.0  # when it happened (the engine clock's wall time)


@dataclasses.dataclass(frozen=True)
class UnitStatus:
    """One serving unit: a replica (one stage) or a pipeline fused from several instances."""

    unit: int  # unit id (a replica's is its instance index)
    mode: str  # "replica" | "pipeline"
    members: tuple[int, ...]  # instances, by stage
    running: int
    waiting: int
    remote_dependent: int  # running requests still reading history on another device (pipelines)
    detail: dict[str, str] = dataclasses.field(default_factory=dict)  # the policy's facts about the unit


@dataclasses.dataclass(frozen=True)
class PolicyStatus:
    """The memory policy in use: its counters, its recent events, and every serving unit."""

    policy: str
    # The policy's own figures by name ("preemptions" always; swaps, migrations, drops ... by policy).
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    events: tuple[PolicyEvent, ...] = ()  # the most recent `MAX_POLICY_EVENTS`, oldest first
    units: tuple[UnitStatus, ...] = ()


@dataclasses.dataclass(frozen=True)
class RuntimeInfo:
    model: str
    architecture: str
    num_layers: int
    vocab_size: int
    max_model_len: int
    instances: tuple[str, ...]  # human-readable layout of each instance ("instance 0: replica, tp=1 on cpu:0")
    policy: str
    versions: dict[str, str]
    block_size: int = 0  # tokens per KV block
    eos_token_ids: tuple[int, ...] = ()  # ids that end a generation unless ignore_eos
    policy_settings: dict[str, str] = dataclasses.field(default_factory=dict)  # the policy's thresholds, as text
    kv_pool_blocks: int = 0  # usable KV blocks of all instances' device pools, what a policy sets aside included
    chat_template: str | None = None  # the model's Jinja chat template (`kunjax.chat_template`); None: it has none
    special_token_texts: dict[str, str] = dataclasses.field(default_factory=dict)  # "bos_token" -> "<s>", ...


class Runtime(Protocol):
    def submit(self, request: GenerateRequest, on_event: Callable[[TokenEvent], None] | None = None) -> None:
        """Admit `request` or raise `InvalidRequest` / `Overloaded`. Its events then go to `on_event` (called from
        the runtime's thread; it must not block), or, without one, to `events(request_id)`."""

    def events(self, request_id: str, timeout_s: float | None = None) -> Iterator[TokenEvent]: ...

    def abort(self, request_id: str) -> None:
        """Abort `request_id` (unknown or finished ids are ignored); returns at once, never behind admissions or a
        step: the request ends with an "abort" event, and frees its KV, at the next step boundary."""

    def info(self) -> RuntimeInfo: ...

    def token_texts(self, token_ids: Sequence[int]) -> tuple[str, ...]:
        """The text of each id on its own, special tokens included (logprobs' token strings); raises
        `InvalidRequest` when the model has no tokenizer or an id is outside the vocabulary."""

    def load(self) -> list[InstanceLoad]:
        """Every instance's load, at most about 0.1 s or one step old, never of a layout the instances have left
        (a fuse or a split since); answered without waiting behind steps or admissions."""

    def policy_status(self) -> PolicyStatus: ...

    def ready(self) -> bool: ...

    def shutdown(self, grace_s: float, cut_short: threading.Event | None = None) -> None:
        """Stop admitting; let in-flight requests finish for `grace_s` (or until `cut_short` is set), then abort
        the rest and stop."""


class EventSink:
    """Where a request's events go when its submitter gave `on_event` instead of reading `events()`: `put` hands
    each event to it (from the runtime's own thread, so it must not block: e.g. `loop.call_soon_threadsafe`), and
    after the final one calls `on_final` (the runtime forgets the request). One dispatcher for every stream, no
    thread per stream."""

    def __init__(self, on_event: Callable[[TokenEvent], None], on_final: Callable[[], None]):
        self.on_event, self.on_final = on_event, on_final

    def put(self, ev: TokenEvent) -> None:
        self.on_event(ev)
        if ev.finished:
            self.on_final()


def iter_events(q: queue.Queue[TokenEvent], timeout_s: float | None,
                on_final: Callable[[], None]) -> Iterator[TokenEvent]:
    """A request's events from its queue, up to the final one (calling `on_final` just before yielding it), or
    until `timeout_s` passes without one. Shared by the runtimes so they keep one contract."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            ev = q.get(timeout=wait)
        except queue.Empty:
            return
        if ev.finished:
            on_final()
        yield ev
        if ev.finished:
            return
