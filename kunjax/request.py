"""A request's host-side state and the outputs handed back to users (vLLM-shaped `RequestOutput`).

A `Request` carries its token ids (prompt then generated), how many of them have KV in its unit's pool
(`num_computed`), where that KV is (`tables[s]`: one block id per logical block on each stage s of its unit;
`stale`: pre-drop history still on its home device), and its sampling state. The unit's scheduler moves it
between the waiting and running queues; preemption by recompute only resets `num_computed` and the tables —
generated tokens are kept, so a recomputed request continues exactly where it stopped.

Outputs are deltas: each engine step reports, per request that advanced, only what is new (ids, text,
logprobs); the cumulative `text`, `token_ids` and `logprobs` of a `CompletionOutput` are filled once, on the
request's final output. Nothing copies a request's whole output per token. A step's outputs are a `StepOutputs`:
a running request's delta is kept as the few values it is made of and becomes a `RequestOutput` when read, so the
step itself allocates no output object per running sequence.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from kunjax.sampling_params import SamplingParams, sampling_row, seed_to_uint32

if TYPE_CHECKING:
    from kunjax.blocks import PrefixNode


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # KV on the host tier (swap policy); comes back before new admissions
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class StaleKV:
    """Pre-drop history of a request that was running when its replicas fused."""

    home: int  # stage index of its home device
    old_blocks: list[int]  # full-layer block ids on the home device (before the reshape)
    length: int  # tokens of history
    pending: set[int]  # stages != home whose layers are still read remotely
    copied: dict[int, int] = dataclasses.field(default_factory=dict)  # stage -> history blocks copied so far

    def history_ids(self, k: int, stage: int) -> list[int]:
        """Pipeline ids on the home device holding stage `stage`'s layers of the history."""
        return [b * k + stage for b in self.old_blocks]


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    token_ids: list[int]  # prompt ids followed by generated ids
    num_prompt_tokens: int
    params: SamplingParams
    seed: int  # resolved: the user's seed, or one drawn by the engine
    eos_token_ids: frozenset[int]
    max_total_len: int  # prompt + generated never exceeds this (max_tokens and the model context)
    arrival_time: float = 0.0  # the engine's clock when it was added
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0  # leading tokens whose KV is in the pool
    tables: list[list[int]] = dataclasses.field(default_factory=lambda: [[]])  # [k] block ids per logical block
    index_path: list[PrefixNode] = dataclasses.field(default_factory=list)  # prefix-index nodes of its full blocks
    stale: StaleKV | None = None  # pre-drop history read remotely (pipeline units)
    in_flight: bool = False  # in a micro-batch that has not left the pipe
    aborted: bool = False  # aborted while in flight: its blocks go when its micro-batch leaves
    unit: int = -1  # the serving unit that holds it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    expected_cached_tokens: int = 0  # what the router expected of the cache where it sent it (kunjax.routing)
    num_preemptions: int = 0
    num_failures: int = 0  # times a device failure touched its KV (each one a recompute, `--step-retries` at most)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # why it ended with "error"
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    detokenizer: Any = None  # kunjax.detokenizer.IncrementalDetokenizer when a tokenizer exists
    first_scheduled_time: float | None = None  # first admitted to a step (queue time = this - arrival_time)
    first_token_time: float | None = None
    finish_time: float | None = None
    seed32: int = dataclasses.field(init=False)  # the device seed of `seed` (`seed_to_uint32`)
    sampling_row: tuple[float, int, float, float] = dataclasses.field(init=False)  # `sampling_row(params)`

    def __post_init__(self) -> None:
        self.seed32 = seed_to_uint32(self.seed)
        self.sampling_row = sampling_row(self.params)

    @property
    def blocks(self) -> list[int]:
        """The block table of a request on a one-stage unit (a replica)."""
        assert len(self.tables) == 1, f"{self.request_id} is on a {len(self.tables)}-stage unit"
        return self.tables[0]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer is not None else ""


@dataclasses.dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str  # final output only: all generated text (stop string excluded unless requested); "" before
    token_ids: list[int]  # final output only: all generated ids; [] before
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None  # final output only: per generated token {id: logprob}, sampled first
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    delta_text: str = ""  # new since the previous output of this request
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)
    delta_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)  # one per delta id


@dataclasses.dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]  # final output only; [] before
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # generated so far
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str | None = None  # on a final output with finish reason "error": what failed

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids


def delta_output(req: Request, new_ids: list[int], new_text: str, new_logprobs: list[dict[int, float]]
                 ) -> RequestOutput:
    """What `req` produced since its previous output; the cumulative fields too if it has finished."""
    final = req.status is RequestStatus.FINISHED
    metrics = {"arrival_time": req.arrival_time}
    if req.first_scheduled_time is not None:
        metrics["first_scheduled_time"] = req.first_scheduled_time
    if req.first_token_time is not None:
        metrics["first_token_time"] = req.first_token_time
    if req.finish_time is not None:
        metrics["finish_time"] = req.finish_time
    lps = req.logprobs
    cumulative = req.cumulative_logprob if lps is not None else None
    num_prompt = req.num_prompt_tokens
    if final:
        completion = CompletionOutput(0, req.text, req.token_ids[num_prompt:], cumulative,
                                      list(lps) if lps is not None else None, req.finish_reason, req.stop_reason,
                                      new_text, new_ids, new_logprobs)
        prompt_ids = req.token_ids[:num_prompt]
    else:
        completion = CompletionOutput(0, "", [], cumulative, None, req.finish_reason, req.stop_reason, new_text,
                                      new_ids, new_logprobs)
        prompt_ids = []
    return RequestOutput(req.request_id, req.prompt, prompt_ids, [completion], final, req.num_cached_tokens,
                         num_prompt, len(req.token_ids) - num_prompt, metrics, req.error if final else None)


class StepOutputs(Sequence[RequestOutput]):
    """One engine step's outputs, in the order they happened (a request's deltas in token order).

    Final outputs (and any output appended whole) are `RequestOutput`s at once. A running request's delta — one
    new token — is recorded as (request, token, text, logprobs) plus a snapshot of the counters that change later
    (tokens generated, cumulative logprob, cached tokens), and built into the same `RequestOutput` that
    `delta_output` gives when it is first read: the host work of a step does not grow by an output object per
    running sequence, and a reader that only wants finished requests (`finished()`) never builds the deltas.
    """

    __slots__ = ("_items", "_finished")

    def __init__(self, outputs: Iterable[RequestOutput] = ()):
        self._items: list[RequestOutput | tuple] = []
        self._finished: list[RequestOutput] = []
        for out in outputs:
            self.append(out)

    def append(self, out: RequestOutput) -> None:
        self._items.append(out)
        if out.finished:
            self._finished.append(out)

    def __iadd__(self, outputs: Iterable[RequestOutput]) -> StepOutputs:
        for out in outputs:
            self.append(out)
        return self

    def add_delta(self, req: Request, token: int, text: str, logprobs: list[dict[int, float]]) -> None:
        """`req` (still running) generated `token`; `text` and `logprobs` are what it adds."""
        self._items.append((req, token, text, logprobs, len(req.token_ids) - req.num_prompt_tokens,
                            req.cumulative_logprob if req.logprobs is not None else None, req.num_cached_tokens))

    def finished(self) -> list[RequestOutput]:
        """The final outputs of this step (no delta is built)."""
        return self._finished

    def tokens(self) -> Iterator[tuple[str, list[int], RequestOutput | None]]:
        """`(request id, its new token ids, its output when it is final)` per entry, in order, building no running
        request's delta: for a reader that wants the tokens and the final outputs only (a benchmark's records)."""
        for item in self._items:
            if isinstance(item, tuple):
                yield item[0].request_id, [item[1]], None
            else:
                yield item.request_id, item.outputs[0].delta_token_ids, item if item.finished else None

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, i: int) -> RequestOutput: ...

    @overload
    def __getitem__(self, i: slice) -> list[RequestOutput]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self._items)))]
        item = self._items[i]
        if isinstance(item, tuple):
            item = self._items[i] = _built_delta(*item)
        return item

    def __iter__(self) -> Iterator[RequestOutput]:
        for i in range(len(self._items)):
            yield self[i]

    def __repr__(self) -> str:
        return f"StepOutputs({list(self)!r})"


def _built_delta(req: Request, token: int, text: str, logprobs: list[dict[int, float]], num_output: int,
                 cumulative: float | None, num_cached: int) -> RequestOutput:
    """A running request's delta as `delta_output` builds it, from the values recorded at its step."""
    metrics = {"arrival_time": req.arrival_time}
    if req.first_scheduled_time is not None:
        metrics["first_scheduled_time"] = req.first_scheduled_time
    if req.first_token_time is not None:
        metrics["first_token_time"] = req.first_token_time
    completion = CompletionOutput(0, "", [], cumulative, None, None, None, text, [token], logprobs or [])
    return RequestOutput(req.request_id, req.prompt, [], [completion], False, num_cached, req.num_prompt_tokens,
                         num_output, metrics, None)
