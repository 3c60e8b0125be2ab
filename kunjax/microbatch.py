"""What a unit schedules into its pipe: `Scheduled` items and the `MicroBatch` they make, which carries one tick's
items through the pipe with what the tick computes and samples in counts; its host arrays (`kunjax.packing`) are
built on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

from kunjax.packing import MicroBatchArrays, pack_microbatch
from kunjax.request import Request


@dataclasses.dataclass(slots=True)
class Scheduled:
    req: Request
    start: int  # first token computed (== req.num_computed when scheduled)
    num_tokens: int
    sample: bool  # the chunk reaches the end of the known tokens: a token is sampled


class MicroBatch:
    """What one micro-batch carries through the pipe: its scheduled items, its attention work counted as if every
    row's history were local (a stage adjusts for the stale rows it reads remotely), what sampling needs of each
    item, and, built on first use (only for an executor that reads arrays), its `MicroBatchArrays`
    (`kunjax.packing`). Requests do not change while in the pipe (they are in flight), so the arrays are the same
    whenever they are built."""

    __slots__ = ("items", "num_tokens", "seqs", "kv_tokens", "attn_pairs", "prefill_tokens", "stale", "seeds",
                 "counters", "suppress", "top_n", "reqs", "starts", "__dict__")

    def __init__(self, items: list[Scheduled], seqs: int):
        self.items = items
        self.seqs = seqs  # S
        # (C-level passes over the items, `map` and `attrgetter`: this runs for every tick at every batch size)
        reqs = self.reqs = list(map(_REQ, items))  # per item: its request
        starts = self.starts = list(map(_START, items))  # per item: its first position
        total = sum(map(_NUM_TOKENS, items))
        if total == len(items):  # decodes only: n = 1 each
            kv = pairs = sum(starts) + total
            prefill = 0
        else:
            kv = pairs = prefill = 0
            for it in items:
                n, start = it.num_tokens, it.start
                kv += start + n
                pairs += n * start + n * (n + 1) // 2
                if n > 1:
                    prefill += n
        self.num_tokens = total  # N
        self.kv_tokens, self.attn_pairs, self.prefill_tokens = kv, pairs, prefill  # see `StageLoad`
        # items whose pre-drop history may be read remotely
        self.stale = (tuple(i for i, r in enumerate(reqs) if r.stale is not None) if any(map(_STALE, reqs))
                      else ())
        self.seeds = tuple(map(_SEED, reqs))  # per item: its request's device seed
        # per item: tokens its request has generated so far
        counters = self.counters = tuple(map(operator.sub, map(len, map(_TOKEN_IDS, reqs)),
                                             map(_PROMPT_LEN, reqs)))
        params = list(map(_PARAMS, reqs))
        # per item: ids it may not sample yet (below `min_tokens`)
        if any(map(_MIN_TOKENS, params)):
            self.suppress = tuple(() if g >= p.min_tokens else tuple(suppressed_ids(r))
                                  for r, g, p in zip(reqs, counters, params, strict=True))
        else:
            self.suppress = ((),) * len(reqs)
        # the most top logprobs an item asked for
        self.top_n = max((r.params.logprobs for r in reqs if r.logprobs is not None), default=0)

    @functools.cached_property
    def arrays(self) -> MicroBatchArrays:
        return pack_microbatch(self)


_REQ, _START, _NUM_TOKENS = (operator.attrgetter(a) for a in ("req", "start", "num_tokens"))
_STALE, _SEED, _TOKEN_IDS, _PROMPT_LEN, _PARAMS = (operator.attrgetter(a) for a in (
    "stale", "seed32", "token_ids", "num_prompt_tokens", "params"))
_MIN_TOKENS = operator.attrgetter("min_tokens")


def suppressed_ids(req: Request) -> list[int]:
    """Ids a request may not sample yet: its stop ids and EOS ids while it is below `min_tokens`."""
    if req.num_output_tokens >= req.params.min_tokens:
        return []
    return sorted(set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else set(req.eos_token_ids)))
