"""A tick's host arrays, packed: a micro-batch's own arrays from its items (`pack_microbatch`: one pass over the
items, the rest numpy), and a replica's decode tick built from the tick before it (`DecodeInputs`).

A decode-only tick of a replica runs, most of the time, the same requests as the tick before, each one position
further. Its inputs are then the previous tick's with positions and context lengths one higher, the new input
tokens and sampling counters, and the block tables unchanged except in the rows that crossed into a new block
(an entry appended there, and the block just filled possibly replaced by an equal cached one:
`ServingUnit.commit`) or whose table length changed; the `min_tokens` masks are rebuilt only when one changed.
`DecodeInputs.build` takes that path only when it holds — the same unit's next tick, only decodes, the same
requests in the same order, each one position further — and otherwise builds the inputs from the micro-batch
(`ServingUnit.tick_inputs`' general path) and remembers them.

Invariant (tested over random steps with admissions, finishes, preemptions and block boundaries): the inputs
`DecodeInputs.build` returns equal the ones built fresh from the micro-batch. Owns copies of the previous tick's
arrays only; never touches a request or the books.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple, Protocol

import numpy as np

from kunjax.plan import MAX_SUPPRESSED, SMALL_BATCH_ROWS, StepInputs, flat_tables
from kunjax.sampling_params import SamplingArrays, fill_sampling


class MicroBatch(Protocol):
    """What packing reads of a `kunjax.microbatch.MicroBatch` (one row per item)."""

    items: list  # [R] `kunjax.microbatch.Scheduled`: request, start, num_tokens
    reqs: list  # [R] each item's `Request`
    starts: list[int]  # [R] each item's first position
    num_tokens: int  # N
    seqs: int  # S
    seeds: tuple[int, ...]  # [R] device seeds
    counters: tuple[int, ...]  # [R] tokens generated so far
    suppress: tuple[tuple[int, ...], ...]  # [R] ids not to sample yet
    top_n: int


class MicroBatchArrays(NamedTuple):
    """The stage-independent part of a micro-batch's tick inputs. The token arrays hold its N tokens only (a tick
    pads them to its bucket); the row arrays are padded to S."""

    tokens: np.ndarray  # [N] int32
    positions: np.ndarray  # [N] int32
    seq_ids: np.ndarray  # [N] int32
    context_lens: np.ndarray  # [S] int32
    logits_indices: np.ndarray  # [S] int32
    suppress_ids: np.ndarray  # [S, MAX_SUPPRESSED] int32
    sampling: SamplingArrays  # [S] each


def suppress_array(suppress: tuple[tuple[int, ...], ...], seqs: int) -> np.ndarray:  # [S, MAX_SUPPRESSED] int32
    """Each row's ids it may not sample yet (`MicroBatch.suppress`), -1 padded."""
    out = np.full((seqs, MAX_SUPPRESSED), -1, np.int32)
    for i, ids in enumerate(suppress):
        if ids:
            out[i, :len(ids)] = ids
    return out


def pack_microbatch(mb: MicroBatch) -> MicroBatchArrays:
    """A micro-batch's arrays (R rows, N tokens, padded to S rows); requests do not change while in the pipe, so
    they are the same whenever they are built."""
    items, s = mb.items, mb.seqs
    reqs = mb.reqs
    num = len(items)
    start_a = np.array(mb.starts, np.int32)  # [R]
    if mb.num_tokens == num:  # one token each (decodes): row i is item i
        tokens = np.array(list(map(operator.getitem, map(_TOKEN_IDS, reqs), mb.starts)), np.int32)
        positions, seq_ids = start_a, np.arange(num, dtype=np.int32)
        last = seq_ids
    else:
        flat: list[int] = []
        for it in items:
            flat += it.req.token_ids[it.start:it.start + it.num_tokens]
        tokens = np.array(flat, np.int32)
        count_a = np.array([it.num_tokens for it in items], np.int64)
        ends = np.cumsum(count_a)
        seq_ids = np.repeat(np.arange(num, dtype=np.int32), count_a)
        # token j of item i sits at row ends[i] - counts[i] + j and position starts[i] + j
        positions = (np.arange(len(tokens)) + np.repeat(start_a - (ends - count_a), count_a)).astype(np.int32)
        last = ends - 1
    context_lens = np.zeros(s, np.int32)
    context_lens[:num] = start_a
    logits_indices = np.zeros(s, np.int32)
    logits_indices[:num] = last
    sampling = SamplingArrays(np.zeros(s, np.float32), np.zeros(s, np.int32), np.ones(s, np.float32),
                              np.zeros(s, np.float32), np.zeros(s, np.uint32), np.zeros(s, np.int32))
    if num:
        fill_sampling(sampling, [r.sampling_row for r in reqs], mb.seeds, mb.counters)
    return MicroBatchArrays(tokens, positions, seq_ids, context_lens, logits_indices,
                            suppress_array(mb.suppress, s), sampling)


class DecodeInputs:
    """A replica's (k = 1, whole-block tables) previous tick inputs, and the next decode tick built from them
    (module docstring)."""

    __slots__ = ("block_size", "_tick", "_reqs", "_lens", "_suppress", "_inputs")

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._tick = -1  # the unit's tick number the inputs below are of
        self._reqs: list = []  # [R] each row's request
        self._lens: np.ndarray = np.zeros(0, np.int64)  # [R] each row's block-table length
        self._suppress: tuple[tuple[int, ...], ...] = ()  # the micro-batch's `suppress`
        self._inputs: StepInputs | None = None  # the previous tick's inputs (a private copy)

    def forget(self) -> None:
        self._inputs = None

    def build(self, tick: int, mb: MicroBatch, fresh: Callable[[], StepInputs]) -> StepInputs:
        """The inputs of the unit's tick number `tick` running `mb` alone; `fresh()` builds them from `mb`."""
        reqs = mb.reqs
        tables = [r.tables[0] for r in reqs]
        lens = np.array(list(map(len, tables)), np.int64)  # [R]
        prev = self._inputs
        inp = None
        # (`==` on two lists of requests compares identities: `Request` has no `__eq__`)
        if prev is not None and tick == self._tick + 1 and mb.num_tokens == len(reqs) and reqs == self._reqs:
            inp = self._next(prev, mb, tables, lens)
        if inp is None:
            inp = fresh()
        # Kept as handed out, never written: the next tick replaces the arrays that change (the overlapped loop
        # patches `tokens_in`, which the next tick rewrites) and shares the others.
        self._tick, self._reqs, self._lens, self._suppress, self._inputs = tick, reqs, lens, mb.suppress, inp
        return inp

    def _next(self, prev: StepInputs, mb: MicroBatch, tables: list[list[int]], lens: np.ndarray
              ) -> StepInputs | None:
        num, bs = len(tables), self.block_size
        starts = np.array(mb.starts, np.int32)  # [R] each row's position
        if (starts != prev.positions[0, :num] + 1).any():
            return None
        inp = object.__new__(StepInputs)  # a shallow copy: the arrays that do not change are shared (never written)
        inp.__dict__.update(prev.__dict__)
        inp.positions = positions = prev.positions.copy()
        positions[0, :num] = starts
        inp.context_lens = context_lens = prev.context_lens.copy()
        context_lens[0, :num] = starts
        inp.tokens_in = tokens = prev.tokens_in.copy()
        tokens[:num] = list(map(operator.getitem, map(_TOKEN_IDS, mb.reqs), mb.starts))  # token_ids[start]
        inp.counters = counters = prev.counters.copy()
        counters[:num] = mb.counters
        inp.top_n = np.asarray(mb.top_n, np.int32)
        if mb.suppress != self._suppress:
            inp.suppress_ids = suppress_array(mb.suppress, prev.suppress_ids.shape[0])
        changed = rows_to_refresh(starts, lens, self._lens, bs)
        if len(changed):
            inp.block_tables = block_tables = prev.block_tables.copy()
            rows = block_tables[0]  # [S, MB]
            if len(changed) <= SMALL_BATCH_ROWS:
                for i in changed.tolist():
                    t = tables[i]
                    rows[i, :len(t)] = t
                    rows[i, len(t):] = 0
            else:  # many (requests of one length cross together): one masked write
                picked = [tables[i] for i in changed.tolist()]
                fresh = np.zeros((len(picked), rows.shape[1]), np.int32)  # [C, MB]
                fresh[np.arange(rows.shape[1]) < lens[changed][:, None]] = flat_tables(picked)
                rows[changed] = fresh
        logical, offset = np.divmod(starts, bs)  # [R] each row's block index and offset in it
        if (logical >= lens).any():
            raise IndexError("a token's position is past its block table")
        inp.slot_mapping = slot_mapping = prev.slot_mapping.copy()
        slot_mapping[0, :num] = inp.block_tables[0, np.arange(num), logical] * bs + offset
        return inp


def rows_to_refresh(starts: np.ndarray,  # [R] int32 each row's position this tick
                    lens: np.ndarray,  # [R] int64 each row's block-table length now
                    prev_lens: np.ndarray,  # [R] int64 ... at the previous tick
                    block_size: int) -> np.ndarray:  # [C] int64 rows whose block table must be written again
    """Rows that entered a new block (the block they filled may have been replaced by an equal cached one at its
    commit) or whose table changed length; every other row's table is as it was at the previous tick."""
    return np.flatnonzero((starts % block_size == 0) | (lens != prev_lens))


_TOKEN_IDS = operator.attrgetter("token_ids")
