"""What a replay sends requests to: an engine in this process, or a `kunjax serve` over gRPC.

Owns starting one request without blocking the replay (open loop), letting the runtime work until the replay's
next event (`advance`), recording each request's timestamps as its output arrives, and reading the runtime's
load and policy events for the timeline. Both targets give every request the same sampling: greedy,
`ignore_eos`, `max_tokens` = the workload's output length, so each request produces exactly its trace's output
tokens. A target has a clock (`kunjax.clock`), which is the replay's time base.

* `InProcessTarget`: the engine itself, driven by the replay's event loop on the engine's clock: `advance` runs
  one engine step (or, when idle, lets the clock pass to the next event: a real sleep on the wall clock, a jump
  on a virtual one). No thread, no lock: the same code replays on the wall clock with the real model and on the
  virtual clock with the arithmetic executor.
* `serving.bench_target.GrpcTarget` (in `serving/`, wired in by the CLI): against a `kunjax serve`, on the wall
  clock, one asyncio task per streaming call.

Queue time: the runtime's final event (`RequestOutput.metrics`, `Usage.queue_time_s` over gRPC) says how long the
request waited in the engine before its first step; the record's `scheduled_s` is its submit time plus that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from kunjax.bench.metrics import RequestRecord
from kunjax.clock import WALL, Clock
from kunjax.request import RequestOutput
from kunjax.sampling_params import SamplingParams
from kunjax.status import EventLog, instance_loads, policy_status, runtime_info

if TYPE_CHECKING:
    from kunjax.engine import LLMEngine


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    policy: str
    model: str
    vocab_size: int
    max_model_len: int
    block_size: int
    kv_capacity_blocks: int  # all instances' device KV pools at start, whatever the policy sets aside
    excluded_ids: tuple[int, ...]  # ids prompts avoid (special tokens)
    instances: tuple[str, ...]
    versions: dict[str, str]
    notes: tuple[str, ...] = ()

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_capacity_blocks * self.block_size


class LoadRow(Protocol):
    """`kunjax.api.InstanceLoad` or its proto twin: the fields the timeline reads."""

    instance: int
    mode: str
    kv_free: int
    kv_used: int
    kv_cached: int
    kv_total: int
    running: int
    waiting: int
    queued_tokens: int
    group: int
    stage: int


class Target(Protocol):
    clock: Clock  # the replay's time base

    def info(self) -> TargetInfo: ...

    def start(self, record: RequestRecord, prompt_ids: list[int], t0: float) -> None:
        """Begin one request (never blocks on the runtime); fills `record` (times since `t0` on `clock`) as its
        output arrives, `finish_reason` last."""

    def advance(self, until: float) -> None:
        """Let the runtime work until clock time `until` at most (sooner when something happened)."""

    def abort(self, request_id: str) -> None: ...

    def load(self) -> list[LoadRow]: ...

    def policy_events(self) -> list:
        """Recent policy events (`seq`, `kind`, `group`, `members`, `step`, `seconds`, `detail`), oldest first."""

    def policy_stats(self) -> dict[str, int]:
        """The memory policy's own figures since the runtime started (`PolicyStatus.counters`)."""

    def close(self) -> None: ...


def since(t0: float, clock: Clock = WALL) -> float:
    return clock.now() - t0


def scheduled_from_queue(record: RequestRecord, queue_s: float) -> None:
    """The engine's queue time of a finished request -> when it was first scheduled (None if it never was)."""
    if record.submit_s is not None and (queue_s > 0 or record.first_token_s is not None):
        record.scheduled_s = record.submit_s + queue_s


def finish_record(record: RequestRecord, end_s: float, reason: str, error: str = "") -> None:
    record.end_s, record.error = end_s, error
    record.finish_reason = reason  # last: other threads read it as "done"


IDLE_STEP_S = 0.05  # step period of an engine whose only work is idle pipeline units (their restore window)


class InProcessTarget:
    def __init__(self, engine: LLMEngine):
        """`engine` must be warmed up already (`LLMEngine.warmup()`)."""
        self.engine = engine
        self.clock = engine.clock
        self._records: dict[str, tuple[RequestRecord, float]] = {}  # request id -> (record, t0)
        self._events = EventLog()

    def info(self) -> TargetInfo:
        from kunjax import __version__

        e = self.engine
        ri = runtime_info(e, {"kunjax": __version__})
        tok = e.tokenizer
        special = {i for i in range(ri.vocab_size) if tok is not None and tok.is_special(i)}
        special |= set(e.eos_token_ids)
        if e.model_config.bos_token_id is not None:
            special.add(e.model_config.bos_token_id)
        return TargetInfo(policy=ri.policy, model=ri.model, vocab_size=ri.vocab_size, max_model_len=ri.max_model_len,
                          block_size=e.config.block_size, kv_capacity_blocks=ri.kv_pool_blocks,
                          excluded_ids=tuple(sorted(special)), instances=ri.instances, versions=dict(ri.versions))

    def start(self, record: RequestRecord, prompt_ids: list[int], t0: float) -> None:
        params = SamplingParams(max_tokens=record.max_tokens, temperature=0.0, ignore_eos=True)
        try:
            self.engine.add_request(prompt_ids, params, request_id=record.request_id,
                                    session_id=record.session_id or None)
        except ValueError as e:
            finish_record(record, since(t0, self.clock), "rejected", str(e))
            return
        record.submit_s = since(t0, self.clock)
        self._records[record.request_id] = (record, t0)

    def advance(self, until: float) -> None:
        e, clock = self.engine, self.clock
        if e.has_requests():
            self._record(e.step().tokens())
        elif e.has_unfinished():  # only idle pipeline units: pace their steps (a restore window means idle time)
            e.step()
            clock.sleep_until(min(clock.now() + IDLE_STEP_S, until))
        else:
            clock.sleep_until(until)

    def _record(self, outputs: Iterable[tuple[str, list[int], RequestOutput | None]]) -> None:
        """Each `(request id, new token ids, final output or None)` of a step (`StepOutputs.tokens`)."""
        for request_id, ids, out in outputs:
            entry = self._records.get(request_id)
            if entry is None:
                continue
            record, t0 = entry
            now = since(t0, self.clock)
            if ids:
                if record.first_token_s is None:
                    record.first_token_s = now
                record.output_tokens += len(ids)
                if record.output_ids is not None:
                    record.output_ids += ids
            if out is not None:
                record.cached_tokens = out.num_cached_tokens
                m = out.metrics
                if "first_scheduled_time" in m:
                    scheduled_from_queue(record, max(0.0, m["first_scheduled_time"] - m["arrival_time"]))
                finish_record(record, now, out.outputs[0].finish_reason or "error")
                del self._records[request_id]

    def abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._record([(out.request_id, out.outputs[0].delta_token_ids, out if out.finished else None)])

    def load(self) -> list[LoadRow]:
        return instance_loads(self.engine)

    def policy_events(self) -> list:
        return list(policy_status(self.engine, self._events).events)

    def policy_stats(self) -> dict[str, int]:
        return dict(policy_status(self.engine, self._events).counters)

    def close(self) -> None:
        for rid in list(self._records):
            self.abort(rid)
