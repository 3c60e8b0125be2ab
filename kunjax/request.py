"""A request's host-side state and the outputs handed back to users (vLLM-shaped `RequestOutput`).

A `Request` carries its token ids (prompt then generated), how many of them have KV in the pool
(`num_computed`), the blocks holding that KV, and its sampling state. The scheduler moves it between the
waiting and running queues; preemption by recompute only resets `num_computed` and `blocks` — generated tokens
are kept, so a recomputed request continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import enum
import time

from kunjax.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # KV on the host tier (swap policy); comes back before new admissions
    FINISHED = "finished"


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
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0  # leading tokens whose KV is in the pool
    blocks: list[int] = dataclasses.field(default_factory=list)
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)  # hashes of full computed blocks
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    detokenizer: object | None = None  # kunjax.detokenizer.IncrementalDetokenizer when a tokenizer exists
    instance: int = -1
    group: object | None = None  # kunjax.elastic.runtime.PipelineGroup while it is served by a pipeline group
    first_scheduled_time: float | None = None  # first admitted to a step (queue time = this - arrival_time)
    first_token_time: float | None = None
    finish_time: float | None = None
    # Streaming cursor: how much of the output has already been reported.
    _reported_tokens: int = 0
    _reported_text: int = 0

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


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str  # all generated text so far (stop string excluded unless requested)
    token_ids: list[int]  # all generated ids so far
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None  # per generated token: {token id: logprob}, sampled token first
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    delta_text: str = ""  # new since the previous output of this request
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids


def make_output(req: Request) -> RequestOutput:
    """Snapshot of `req` with the deltas since the last snapshot; advances the streaming cursor."""
    out_ids = req.output_ids
    text = req.text
    delta_ids = out_ids[req._reported_tokens:]
    delta_text = text[req._reported_text:]
    req._reported_tokens, req._reported_text = len(out_ids), len(text)
    metrics = {"arrival_time": req.arrival_time}
    if req.first_scheduled_time is not None:
        metrics["first_scheduled_time"] = req.first_scheduled_time
    if req.first_token_time is not None:
        metrics["first_token_time"] = req.first_token_time
    if req.finish_time is not None:
        metrics["finish_time"] = req.finish_time
    completion = CompletionOutput(
        index=0, text=text, token_ids=list(out_ids),
        cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
        logprobs=list(req.logprobs) if req.logprobs is not None else None,
        finish_reason=req.finish_reason, stop_reason=req.stop_reason,
        delta_text=delta_text, delta_token_ids=list(delta_ids))
    return RequestOutput(request_id=req.request_id, prompt=req.prompt,
                         prompt_token_ids=req.token_ids[:req.num_prompt_tokens], outputs=[completion],
                         finished=req.finished, num_cached_tokens=req.num_cached_tokens, metrics=metrics)
