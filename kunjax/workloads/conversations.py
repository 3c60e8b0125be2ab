"""Multi-turn conversations: a synthetic workload whose prompts share a system prompt and grow with their history.

Chat and agent traffic resends everything said so far: turn t of a conversation is the system prompt, every
earlier turn's user message and answer, and the new user message. Context caching (MemServe, SGLang's radix
cache) exists for exactly this. Each conversation:

* arrives at a Poisson rate (`rate` conversations per second) and uses one of `system_prompts` shared system
  prompts of `system_tokens` tokens (chosen uniformly);
* has a number of turns drawn from `turns`; turn t + 1 arrives an exponential think time (mean `think_s`) after
  turn t (open loop: the replay does not wait for turn t's answer, so heavy load does not slow the arrivals);
* turn t's prompt is the system prompt, the history (each earlier user message and an answer of that turn's
  output length) and a new user message of `user_len` tokens.

The prompt is expressed as prefix blocks (`TraceRequest.prefix_ids`, `block_tokens` tokens each, as Mooncake's
hash ids): equal ids are equal tokens, so turn t + 1's prompt begins with turn t's whole prompt. The answers in
the history are synthesized tokens, not what the model generated (a replay sends prompts fixed in advance): the
cache can serve a turn its system prompt and every earlier turn's prompt, but not the previous answer, which is
computed with the new message (and cached for the turn after). Every length is rounded up to whole blocks.
Each turn carries its conversation's id as its session (`--routing session`).

`closed_loop=True` makes the replay a conversation's: turn t + 1 (`TraceRequest.follows` = turn t) is sent its
think time after turn t's answer ends, and its prompt is turn t's prompt and answer as they were sent and
generated, then its new message (`new_tokens`); its `arrival_s` is the open-loop estimate, used for ordering.
The cache can then serve a turn everything but its new message.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from kunjax.workloads.synthetic import LengthDist
from kunjax.workloads.trace import TraceRequest, Workload


def conversations(*, num_conversations: int, rate: float = 1.0, turns: LengthDist | str = "uniform:2:8",
                  system_prompts: int = 4, system_tokens: int = 256, user_len: LengthDist | str = "uniform:16:128",
                  output_len: LengthDist | str = "uniform:16:128", think_s: float = 10.0, block_tokens: int = 16,
                  seed: int = 0, closed_loop: bool = False) -> Workload:
    """The requests (turns) of `num_conversations` conversations, in arrival order (module docstring)."""
    if num_conversations < 1:
        raise ValueError(f"num_conversations must be >= 1, got {num_conversations}")
    if not rate > 0 or not think_s > 0:
        raise ValueError(f"rate and think_s must be > 0, got {rate:g} and {think_s:g}")
    if system_prompts < 1 or system_tokens < 0 or block_tokens < 1:
        raise ValueError("system_prompts and block_tokens must be >= 1 and system_tokens >= 0")
    t_dist, u_dist, o_dist = (LengthDist.parse(d) if isinstance(d, str) else d for d in (turns, user_len, output_len))
    rng = np.random.default_rng(seed)
    ids = itertools.count()

    def blocks(tokens: int) -> list[int]:
        return [next(ids) for _ in range(-(-tokens // block_tokens))]

    systems = [blocks(system_tokens) for _ in range(system_prompts)]
    starts = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate, num_conversations - 1))])
    reqs, keys = [], []  # keys[i]: (conversation, turn) of reqs[i]
    for c, start in enumerate(starts):
        n = int(t_dist.sample(rng, 1)[0])
        history = list(systems[int(rng.integers(system_prompts))])
        t = float(start)
        for turn, (user, out) in enumerate(zip(u_dist.sample(rng, n), o_dist.sample(rng, n), strict=True)):
            think = float(rng.exponential(think_s)) if turn else 0.0
            t += think
            new = blocks(int(user))
            prompt = history + new
            follow = closed_loop and turn > 0
            reqs.append(TraceRequest(t, len(prompt) * block_tokens, int(out), tuple(prompt), session=f"conv-{c}",
                                     think_s=think if follow else 0.0,
                                     new_tokens=len(new) * block_tokens if follow else 0))
            keys.append((c, turn))
            history = prompt + blocks(int(out))  # the answer joins the history of the next turn
    order = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s)
    reqs = [reqs[i] for i in order]
    if closed_loop:
        at = {keys[j]: i for i, j in enumerate(order)}
        reqs = [dataclasses.replace(r, follows=at[(keys[j][0], keys[j][1] - 1)]) if r.new_tokens else r
                for r, j in zip(reqs, order, strict=True)]
    source = (f"conversations: {num_conversations} at {rate:g}/s, turns {t_dist}, {system_prompts} system prompt(s) "
              f"of {system_tokens} tokens, user {u_dist}, output {o_dist}, think time {think_s:g}s, seed {seed}"
              f"{', closed loop' if closed_loop else ''}")
    return Workload(requests=tuple(reqs), source=source, prefix_block_tokens=block_tokens,
                    notes=(f"generated {len(reqs)} turns of {num_conversations} conversations over "
                           f"{reqs[-1].arrival_s:.1f}s",))
