"""A `kunjax.api.Runtime` whose every output can be computed by hand, for testing `serving/` without a model.

Owns a tiny imitation of the engine thread: admission with the real runtime's validation and a bounded number
of in-flight requests, one background thread that emits one token per in-flight request every
`step_interval_s`, and "KV blocks" (one per `block_size` tokens of prompt plus output of each in-flight request)
so `load()` moves and returns to zero. It has one instance that is always a replica:
`policy_status()` reports policy "fake" and that one unit. It never touches JAX, a model or a tokenizer.

The arithmetic (what tests assert against):
* a text prompt is "tokenized" one id per character, `ord(c) % vocab_size`;
* output token i (from 0) is `(last prompt id + i + 1) % vocab_size`, and its text is `f"<{id}>"`;
* a generated id in `stop_token_ids` (once `min_tokens` are out) ends the request with finish "stop" and
  `stop_reason` the id; the stop id is part of the output, as in the real engine's token ids;
* `max_tokens` tokens, or prompt plus output reaching `max_model_len`, end it with finish "length";
* with `logprobs=k`, the sampled token's logprob is 0.0 and the alternatives are `id+1..id+k` (mod vocab) with
  logprobs -1.0, -2.0, ...; stop strings, EOS and `ignore_eos` have no effect here;
* `token_texts` of an id is `f"<{id}>"`; `info()` carries the `chat_template` it was made with (none by default),
  and `add_special_tokens` changes nothing (there are no special tokens).

Invariant: every accepted request gets exactly one final event, also on abort and shutdown; its blocks are
freed the moment that event is queued.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from kunjax.api import (
    EventSink,
    GenerateRequest,
    InstanceLoad,
    InvalidRequest,
    Overloaded,
    PolicyStatus,
    RuntimeInfo,
    TokenEvent,
    UnitStatus,
    iter_events,
)
from kunjax.sampling_params import SamplingParams


@dataclasses.dataclass
class _FakeRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    generated: list[int] = dataclasses.field(default_factory=list)


class FakeRuntime:
    """Arithmetic token generator implementing `kunjax.api.Runtime` (see the module docstring)."""

    def __init__(self, *, vocab_size: int = 1000, max_model_len: int = 128, max_queued: int = 16,
                 step_interval_s: float = 0.001, warmup_s: float = 0.0, block_size: int = 4,
                 max_logprobs: int = 5, chat_template: str | None = None):
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_queued = max_queued
        self.step_interval_s = step_interval_s
        self.block_size = block_size
        self.max_logprobs = max_logprobs
        self.chat_template = chat_template
        # Enough blocks for every admitted request at full length: admission is bounded by `max_queued` only.
        self.kv_total = max_queued * math.ceil(max_model_len / block_size)
        self._ready_at = time.monotonic() + warmup_s
        self._lock = threading.Lock()
        self._admitting = True
        self._fatal: str | None = None  # why the runtime cannot go on (`fatal`)
        # A request's queue lives from submit until its reader took the final event (or a new request reuses the
        # id of a finished one); `_inflight` holds the unfinished requests, which hold blocks, count against
        # capacity and are what duplicate ids are checked against.
        self._queues: dict[str, queue.Queue[TokenEvent] | EventSink] = {}
        self._inflight: dict[str, _FakeRequest] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-runtime", daemon=True)
        self._thread.start()

    # ---- Runtime API --------------------------------------------------------------------------------
    def tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(ord(c) % self.vocab_size for c in text)

    def submit(self, request: GenerateRequest, on_event: Callable[[TokenEvent], None] | None = None) -> None:
        if (request.prompt is None) == (request.prompt_ids is None):
            raise InvalidRequest("give exactly one of a text prompt or prompt token ids")
        ids = self.tokenize(request.prompt) if request.prompt is not None else tuple(request.prompt_ids)
        if not ids:
            raise InvalidRequest("prompt is empty")
        for pos, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise InvalidRequest(f"prompt token id {t} at position {pos} is outside the vocabulary "
                                     f"[0, vocab_size={self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(f"prompt is too long: {len(ids)} tokens, but max_model_len={self.max_model_len} "
                                 f"leaves room for at most {self.max_model_len - 1}")
        try:
            request.params.validate_for(self.vocab_size, self.max_logprobs)
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        with self._lock:
            if not self._admitting:
                raise Overloaded("server is shutting down", retry_after_s=5.0)
            if request.request_id in self._inflight:
                raise InvalidRequest(f"duplicate request id {request.request_id!r}")
            if len(self._inflight) >= self.max_queued:
                raise Overloaded(f"{len(self._inflight)} requests in flight (limit {self.max_queued})",
                                 retry_after_s=max(self.step_interval_s * 10, 0.1))
            rid = request.request_id
            if on_event is None:
                self._queues[rid] = queue.Queue()
            else:  # put under the lock: the final event forgets it without taking the lock again
                sink = EventSink(on_event, lambda: self._queues.pop(rid) if self._queues.get(rid) is sink else None)
                self._queues[rid] = sink
            self._inflight[request.request_id] = _FakeRequest(request.request_id, ids, request.params)

    def events(self, request_id: str, timeout_s: float | None = None) -> Iterator[TokenEvent]:
        q = self._queues.get(request_id)
        if not isinstance(q, queue.Queue):
            raise KeyError(f"unknown request {request_id!r}" if q is None else
                           f"request {request_id!r} delivers its events to the callback it was submitted with")
        def forget() -> None:
            with self._lock:  # not a newer request's queue under the same id
                if self._queues.get(request_id) is q:
                    del self._queues[request_id]

        return iter_events(q, timeout_s, forget)

    def abort(self, request_id: str) -> None:
        with self._lock:
            req = self._inflight.get(request_id)
            if req is not None:
                self._finish(req, (), "abort")

    def info(self) -> RuntimeInfo:
        return RuntimeInfo(model="fake", architecture="FakeArithmetic", num_layers=0, vocab_size=self.vocab_size,
                           max_model_len=self.max_model_len, instances=("instance 0: fake on host",),
                           policy="fake", versions={"fake_runtime": "1"}, block_size=self.block_size,
                           kv_pool_blocks=self.kv_total, chat_template=self.chat_template,
                           special_token_texts={"bos_token": "<s>", "eos_token": "</s>"})

    def token_texts(self, token_ids: Sequence[int]) -> tuple[str, ...]:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return tuple(f"<{t}>" for t in token_ids)

    def load(self) -> list[InstanceLoad]:
        with self._lock:
            used = sum(self._blocks(r) for r in self._inflight.values())
            return [InstanceLoad(instance=0, mode="replica", kv_free=self.kv_total - used, kv_used=used,
                                 kv_cached=0, kv_total=self.kv_total, running=len(self._inflight), waiting=0,
                                 queued_tokens=0)]

    def policy_status(self) -> PolicyStatus:
        return PolicyStatus(policy="fake", units=(UnitStatus(unit=0, mode="replica", members=(0,),
                                                             running=len(self._inflight), waiting=0,
                                                             remote_dependent=0),))

    def ready(self) -> bool:
        return time.monotonic() >= self._ready_at and self._fatal is None

    def fatal(self, reason: str) -> None:
        """The runtime cannot go on (as `EngineThread.fatal`, e.g. a lost process of a multi-host group): stop
        admitting, turn not ready, and end every in-flight request with an "unavailable" error."""
        with self._lock:
            self._admitting, self._fatal = False, reason
            for req in list(self._inflight.values()):
                del self._inflight[req.request_id]
                self._queues[req.request_id].put(dataclasses.replace(
                    self._event(req, (), True, "error"), error=f"the runtime is unavailable: {reason}",
                    error_code="unavailable"))

    def shutdown(self, grace_s: float, cut_short: threading.Event | None = None) -> None:
        """Stop admitting; let in-flight requests finish for `grace_s` (or until `cut_short` is set), then abort
        the rest and stop."""
        with self._lock:
            self._admitting = False
        deadline = time.monotonic() + grace_s
        while self._inflight and time.monotonic() < deadline and not (cut_short is not None and cut_short.is_set()):
            time.sleep(self.step_interval_s)
        for rid in list(self._inflight):
            self.abort(rid)
        self._stop.set()
        self._thread.join(timeout=10)

    # ---- the stepping thread ------------------------------------------------------------------------
    def _blocks(self, req: _FakeRequest) -> int:
        return math.ceil((len(req.prompt_ids) + len(req.generated)) / self.block_size)

    def _finish(self, req: _FakeRequest, new_ids: tuple[int, ...], reason: str,
                stop_reason: int | None = None) -> None:
        """Queues the final event and frees the request's blocks; caller holds the lock."""
        del self._inflight[req.request_id]
        self._queues[req.request_id].put(self._event(req, new_ids, True, reason, stop_reason))

    def _event(self, req: _FakeRequest, new_ids: tuple[int, ...], finished: bool = False,
               reason: str | None = None, stop_reason: int | None = None) -> TokenEvent:
        k = req.params.logprobs
        logprobs = () if k is None else tuple(
            {t: 0.0, **{(t + j) % self.vocab_size: -float(j) for j in range(1, k + 1)}} for t in new_ids)
        return TokenEvent(request_id=req.request_id, token_ids=new_ids, text="".join(f"<{t}>" for t in new_ids),
                          logprobs=logprobs, finished=finished, finish_reason=reason, stop_reason=stop_reason,
                          prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.generated))

    def _step(self, req: _FakeRequest) -> None:
        """Emits the request's next token, finishing it if that token ends it; caller holds the lock."""
        t = (req.prompt_ids[-1] + len(req.generated) + 1) % self.vocab_size
        req.generated.append(t)
        p = req.params
        n = len(req.generated)
        if t in p.stop_token_ids and n >= p.min_tokens:
            self._finish(req, (t,), "stop", stop_reason=t)
        elif (p.max_tokens is not None and n >= p.max_tokens) or len(req.prompt_ids) + n >= self.max_model_len:
            self._finish(req, (t,), "length")
        else:
            self._queues[req.request_id].put(self._event(req, (t,)))

    def _run(self) -> None:
        while not self._stop.wait(self.step_interval_s):
            with self._lock:
                for req in list(self._inflight.values()):
                    self._step(req)
