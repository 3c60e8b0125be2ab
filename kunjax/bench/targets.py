"""What a replay sends requests to: an engine in this process, or a `kunjax serve` over gRPC.

Owns starting one request without blocking the caller (the replay's scheduler must never wait on the runtime:
open loop), recording the request's timestamps as its events arrive, and reading the runtime's load and
elastic events for the timeline. Both targets give every request the same sampling: greedy, `ignore_eos`,
`max_tokens` = the workload's output length, so each request produces exactly its trace's output tokens.

* `InProcessTarget`: `kunjax.engine_thread.EngineThread` (the runtime the gRPC server uses) over an engine
  built and warmed up here. Each request gets a thread that submits it (the submit waits for the engine's
  current step to end, which is why it is not done on the scheduler's thread) and then blocks on the request's
  event queue.
* `serving.bench_target.GrpcTarget` (in `serving/`, wired in by the CLI): the same over gRPC against a
  `kunjax serve`.

Queue time: the runtime's final event (`TokenEvent.queue_s`, `Usage.queue_time_s` over gRPC) says how long the
request waited in the engine before its first step; the record's `scheduled_s` is its submit time plus that.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Protocol

from kunjax.bench.metrics import RequestRecord


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    policy: str
    model: str
    vocab_size: int
    max_model_len: int
    block_size: int
    kv_capacity_blocks: int  # all instances' KV blocks (replica mode)
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
    def info(self) -> TargetInfo: ...

    def start(self, record: RequestRecord, prompt_ids: list[int], t0: float, on_done: Callable[[], None]) -> None:
        """Begin one request (never blocks on the runtime); fills `record` as events arrive, then `on_done()`."""

    def abort(self, request_id: str) -> None: ...

    def load(self) -> list[LoadRow]: ...

    def elastic_events(self) -> list:
        """Recent elastic events (`seq`, `kind`, `group`, `members`, `step`, `seconds`, `detail`), oldest first."""

    def policy_stats(self) -> dict[str, int]:
        """The memory policy's own figures since the runtime started (`ElasticStatus.policy_stats`)."""

    def close(self) -> None: ...


def since(t0: float) -> float:
    return time.monotonic() - t0


def scheduled_from_queue(record: RequestRecord, queue_s: float) -> None:
    """The engine's queue time of a finished request -> when it was first scheduled (None if it never was)."""
    if record.submit_s is not None and (queue_s > 0 or record.first_token_s is not None):
        record.scheduled_s = record.submit_s + queue_s


def finish_record(record: RequestRecord, end_s: float, reason: str, error: str = "") -> None:
    record.end_s, record.error = end_s, error
    record.finish_reason = reason  # last: other threads read it as "done"


class InProcessTarget:
    def __init__(self, engine):
        """`engine` must be warmed up already (`LLMEngine.warmup()`), so the runtime is ready at once."""
        from kunjax.engine_thread import EngineThread

        self.engine = engine
        self.runtime = EngineThread(engine, max_queued=1 << 30, warmup=False)

    def info(self) -> TargetInfo:
        ri = self.runtime.info()
        e = self.engine
        tok = e.tokenizer
        special = {i for i in range(ri.vocab_size) if tok is not None and tok.is_special(i)}
        special |= set(e.eos_token_ids)
        if e.model_config.bos_token_id is not None:
            special.add(e.model_config.bos_token_id)
        return TargetInfo(policy=ri.policy, model=ri.model, vocab_size=ri.vocab_size, max_model_len=ri.max_model_len,
                          block_size=e.config.block_size, kv_capacity_blocks=sum(x.kv_total for x in self.load()),
                          excluded_ids=tuple(sorted(special)), instances=ri.instances, versions=dict(ri.versions))

    def start(self, record: RequestRecord, prompt_ids: list[int], t0: float, on_done: Callable[[], None]) -> None:
        threading.Thread(target=self._serve, args=(record, prompt_ids, t0, on_done), daemon=True,
                         name=f"bench-{record.request_id}").start()

    def _serve(self, record: RequestRecord, prompt_ids: list[int], t0: float, on_done: Callable[[], None]) -> None:
        from kunjax.api import GenerateRequest, InvalidRequest, Overloaded
        from kunjax.sampling_params import SamplingParams

        rid = record.request_id
        params = SamplingParams(max_tokens=record.max_tokens, temperature=0.0, ignore_eos=True)
        try:
            self.runtime.submit(GenerateRequest(request_id=rid, prompt=None, prompt_ids=tuple(prompt_ids),
                                                params=params))
        except (InvalidRequest, Overloaded) as e:
            finish_record(record, since(t0), "rejected", str(e))
            on_done()
            return
        record.submit_s = since(t0)
        try:
            for ev in self.runtime.events(rid):
                now = since(t0)
                if ev.token_ids:
                    if record.first_token_s is None:
                        record.first_token_s = now
                    record.output_tokens += len(ev.token_ids)
                if ev.finished:
                    scheduled_from_queue(record, ev.queue_s)
                    finish_record(record, now, ev.finish_reason or "error", ev.error or "")
        finally:
            if record.finish_reason is None:
                finish_record(record, since(t0), "error", "the event stream ended without a final event")
            on_done()

    def abort(self, request_id: str) -> None:
        self.runtime.abort(request_id)

    def load(self) -> list[LoadRow]:
        return self.runtime.load()

    def elastic_events(self) -> list:
        return list(self.runtime.elastic().events)

    def policy_stats(self) -> dict[str, int]:
        return dict(self.runtime.elastic().policy_stats)

    def close(self) -> None:
        self.runtime.shutdown(0.0)
