"""What a replay sends requests to: an engine in this process, or a `kunjax serve` over gRPC.

Owns starting one request without blocking the caller (the replay's scheduler must never wait on the runtime:
open loop), recording the request's timestamps as its events arrive, and reading the runtime's load and
elastic events for the timeline. Both targets give every request the same sampling: greedy, `ignore_eos`,
`max_tokens` = the workload's output length, so each request produces exactly its trace's output tokens.

* `InProcessTarget`: `kunjax.engine_thread.EngineThread` (the runtime the gRPC server uses) over an engine
  built and warmed up here. Each request gets a thread that submits it (the submit waits for the engine's
  current step to end, which is why it is not done on the scheduler's thread) and then blocks on the request's
  event queue.
* `GrpcTarget`: one `grpc.aio` channel on its own event-loop thread, one streaming `Generate` call per request;
  unary calls (`GetServerInfo`, `GetLoad`) on a synchronous channel.

Queue time: the runtime's final event (`TokenEvent.queue_s`, `Usage.queue_time_s` over gRPC) says how long the
request waited in the engine before its first step; the record's `scheduled_s` is its submit time plus that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
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
    """`serving.runtime.InstanceLoad` or its proto twin: the fields the timeline reads."""

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


def _since(t0: float) -> float:
    return time.monotonic() - t0


def _scheduled(record: RequestRecord, queue_s: float) -> None:
    """The engine's queue time of a finished request -> when it was first scheduled (None if it never was)."""
    if record.submit_s is not None and (queue_s > 0 or record.first_token_s is not None):
        record.scheduled_s = record.submit_s + queue_s


def _finish(record: RequestRecord, end_s: float, reason: str, error: str = "") -> None:
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
        from kunjax.sampling_params import SamplingParams
        from serving.runtime import GenerateRequest, InvalidRequest, Overloaded

        rid = record.request_id
        params = SamplingParams(max_tokens=record.max_tokens, temperature=0.0, ignore_eos=True)
        try:
            self.runtime.submit(GenerateRequest(request_id=rid, prompt=None, prompt_ids=tuple(prompt_ids),
                                                params=params))
        except (InvalidRequest, Overloaded) as e:
            _finish(record, _since(t0), "rejected", str(e))
            on_done()
            return
        record.submit_s = _since(t0)
        try:
            for ev in self.runtime.events(rid):
                now = _since(t0)
                if ev.token_ids:
                    if record.first_token_s is None:
                        record.first_token_s = now
                    record.output_tokens += len(ev.token_ids)
                if ev.finished:
                    _scheduled(record, ev.queue_s)
                    _finish(record, now, ev.finish_reason or "error", ev.error or "")
        finally:
            if record.finish_reason is None:
                _finish(record, _since(t0), "error", "the event stream ended without a final event")
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


class GrpcTarget:
    def __init__(self, address: str, *, block_size: int, auth_token: str | None = None,
                 tls_ca: Path | None = None, timeout_s: float = 30.0):
        from serving.client import KunjaxClient

        self.address, self.block_size = address, block_size
        self._token, self._tls_ca = auth_token, tls_ca
        self.client = KunjaxClient(address, timeout_s=timeout_s, auth_token=auth_token, tls_ca=tls_ca)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-grpc", daemon=True)
        self._thread.start()
        self._calls: dict[str, object] = {}
        self._aclient = asyncio.run_coroutine_threadsafe(self._make_async_client(), self._loop).result(30)

    async def _make_async_client(self):
        from serving.client import AsyncKunjaxClient

        return AsyncKunjaxClient(self.address, timeout_s=None, auth_token=self._token, tls_ca=self._tls_ca)

    def info(self) -> TargetInfo:
        ri = self.client.info()
        notes = ["over gRPC the server's special tokens are not reported: prompts avoid its EOS ids and ids 0-2"]
        block_size = ri.block_size
        if not block_size:  # a server older than the field
            block_size = self.block_size
            notes.append(f"the server does not report its block size: --block-size {block_size} is assumed")
        excluded = set(range(min(3, ri.vocab_size))) | set(ri.eos_token_ids)
        return TargetInfo(
            policy=ri.policy, model=ri.model, vocab_size=ri.vocab_size, max_model_len=ri.max_model_len,
            block_size=block_size, kv_capacity_blocks=sum(x.kv_total for x in self.client.load()),
            excluded_ids=tuple(sorted(excluded)), instances=tuple(ri.instances), versions=dict(ri.versions),
            notes=tuple(notes))

    def start(self, record: RequestRecord, prompt_ids: list[int], t0: float, on_done: Callable[[], None]) -> None:
        asyncio.run_coroutine_threadsafe(self._serve(record, prompt_ids, t0, on_done), self._loop)

    async def _serve(self, record: RequestRecord, prompt_ids: list[int], t0: float,
                     on_done: Callable[[], None]) -> None:
        import grpc

        from serving.client import FINISH_REASON_NAMES

        rid = record.request_id
        try:
            call = self._aclient.generate(prompt_ids, request_id=rid, max_tokens=record.max_tokens,
                                          temperature=0.0, ignore_eos=True)
            self._calls[rid] = call
            record.submit_s = _since(t0)
            async for resp in call:
                now = _since(t0)
                if resp.token_ids:
                    if record.first_token_s is None:
                        record.first_token_s = now
                    record.output_tokens += len(resp.token_ids)
                if resp.finish_reason:
                    _scheduled(record, resp.usage.queue_time_s)
                    _finish(record, now, FINISH_REASON_NAMES.get(resp.finish_reason, "error"), resp.error)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            reason = ("rejected" if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
                      else "abort" if code == grpc.StatusCode.CANCELLED else "error")
            _finish(record, _since(t0), reason, f"{code.name}: {e.details()}")
        except asyncio.CancelledError:
            _finish(record, _since(t0), "abort", "cancelled by the client")
        except Exception as e:  # a client-side failure must not leave the replay waiting
            _finish(record, _since(t0), "error", f"{type(e).__name__}: {e}")
        finally:
            if record.finish_reason is None:
                _finish(record, _since(t0), "error", "the stream ended without a final message")
            self._calls.pop(rid, None)
            on_done()

    def abort(self, request_id: str) -> None:
        call = self._calls.get(request_id)
        if call is not None:
            self._loop.call_soon_threadsafe(call.cancel)

    def load(self) -> list[LoadRow]:
        return self.client.load()

    def elastic_events(self) -> list:
        return list(self.client.elastic().events)

    def policy_stats(self) -> dict[str, int]:
        return dict(self.client.elastic().policy_stats)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._aclient.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self.client.close()
