"""The executor seam's vocabulary: what host code hands an executor, and what comes back (DESIGN.md §14).

Host code (router, scheduler, memory pool, policies) decides; an executor (`kunjax.executor`) computes. What
crosses the seam is only what is defined here, all of it plain host data (numpy arrays, ints, tuples):

* `UnitShape` — the static shapes of one serving unit's step (a replica: one stage; a pipeline group: k);
* `TickWork` — one tick of one unit in counts: per stage, the tokens and attention work it computes
  (`StageLoad`), and the sampling rows of the micro-batch leaving the last stage. Every executor gets it; a
  cost model charges it, and an executor without a model synthesizes tokens from it;
* `StepInputs` — the same tick as the padded host arrays a compiled step reads: the entering micro-batch's
  tokens and, per stage, the metadata of the micro-batch that stage processes (positions, block tables, KV slots,
  remote-attention work lists), plus the sampling rows of the leaving micro-batch. Every per-stage field has a
  leading `[k]` axis. Built only for an executor that reads arrays (`Executor.needs_arrays`);
* `Sampled` — the leaving micro-batch's sampled ids and logprobs;
* memory operations — block copies inside a unit, transfers between units, moves to and from the host tier,
  layer-group slot moves (layerkv), and the reshards that fuse replicas into a group and split it again.

Axis names: k stages, T tokens (a bucket), S rows (sequences of a micro-batch), MB blocks per sequence, G layer
groups, R remote rows per (stage, destination), X copies per (source, destination) call, N top logprobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

from kunjax.blocks import NULL_BLOCK

# Most token ids a request can have masked while it is below `min_tokens` (its EOS ids and stop token ids).
MAX_SUPPRESSED = 16


@dataclasses.dataclass(frozen=True)
class UnitShape:
    """Static shapes of one serving unit's compiled step (what a compiled step is keyed by, with the members)."""

    k: int  # stages (1: a replica)
    tp: int  # devices per stage (tensor parallelism)
    tokens: int  # T of the largest bucket: the token budget of one micro-batch
    buckets: tuple[int, ...]  # padded token counts compiled (ascending, the last is `tokens`)
    seqs: int  # S: most sequences in one micro-batch
    max_blocks: int  # MB: block-table width
    num_base: int  # blocks of each stage's base pool segment (a replica's pool; NB·k after a drop)
    num_ext: int = 0  # blocks of each stage's extension segment (the memory the dropped weights freed)
    layer_groups: int = 1  # G: per-layer-group block tables (layerkv); 1 everywhere else
    remote_rows: int = 1  # R: remote-attention rows per (stage, destination) per tick (k > 1)
    copy_blocks: int = 1  # X: blocks per (source, destination) per block-copy call (k > 1)
    split_vocab: bool = False  # the embedding and LM head are split over the stages (k > 1, k | V)
    remote_transport: str = "all_to_all"  # how remote-attention rows travel (pallas_kernels.remote_attention)

    def bucket(self, num_tokens: int) -> int:
        for b in self.buckets:
            if b >= num_tokens:
                return b
        raise ValueError(f"{num_tokens} tokens exceed the step budget {self.buckets[-1]}")


class StageLoad(NamedTuple):
    """What one stage computes in one tick, in counts (a unit's `StepInputs` for that stage imply the same).
    NamedTuples, this and `TickWork`: the engine makes them every tick."""

    valid_tokens: int = 0  # tokens of its micro-batch (the rest of the bucket is padding)
    kv_tokens: int = 0  # per row, the tokens attention reads on this device (cached locally + new), summed
    attn_pairs: int = 0  # causal (query, key) pairs over the local context, summed over rows
    prefill_tokens: int = 0  # new tokens of rows that bring more than one
    remote_rows_out: int = 0  # token rows whose older history is attended on another device (k > 1)
    remote_kv_in: int = 0  # history tokens this stage's device reads for rows other stages send it (k > 1)


class TickWork(NamedTuple):
    """One tick of one unit in counts (module docstring). The leaving rows are in micro-batch order."""

    rows: int  # T: the bucket every stage's tokens are padded to
    seqs: int  # S: the rows a micro-batch is padded to (the LM head runs over `head_rows` of them)
    max_blocks: int  # MB: the block-table width
    stages: tuple[StageLoad, ...]  # [k]
    remote: bool  # some row needs remote attention (the step with the remote path runs)
    leaving_seeds: tuple[int, ...] = ()  # uint32 sampling seed of each leaving row (`seed_to_uint32`)
    leaving_counters: tuple[int, ...] = ()  # tokens each leaving row's request has generated so far
    leaving_suppress: tuple[tuple[int, ...], ...] = ()  # ids each leaving row may not sample yet
    leaving_top_n: int = 0  # most logprobs a leaving row asked for (0: an executor may leave the top-N empty)


@dataclasses.dataclass
class StepInputs:
    """Host arrays of one tick of one unit. Per-stage fields have a leading [k] axis (row s for stage s)."""

    positions: np.ndarray  # [k, T] int32
    seq_ids: np.ndarray  # [k, T] int32 row of each token's sequence in its micro-batch
    valid: np.ndarray  # [k, T] bool, False on padding
    slot_mapping: np.ndarray  # [k, T] int32 block * BS + offset (base-then-extension ids); [k, G, T] per group
    block_tables: np.ndarray  # [k, S, MB] int32; [k, G, S, MB] slot ids per layer group (layerkv)
    context_lens: np.ndarray  # [k, S] int32 tokens already in the pool
    context_starts: np.ndarray  # [k, S] int32 first cached position read locally (the rest is remote)
    send_rows: np.ndarray  # [k, k, R] int32 stage s's rows whose history lives on device d (-1 pad)
    recv_tables: np.ndarray  # [k, k, R, MB] int32 on device d, the blocks of rows sent by stage s
    recv_lens: np.ndarray  # [k, k, R] int32
    recv_pos: np.ndarray  # [k, k, R] int32
    tokens_in: np.ndarray  # [T] int32 tokens of the micro-batch entering stage 0
    logits_indices: np.ndarray  # [S] int32 rows of the micro-batch leaving the last stage to sample
    suppress_ids: np.ndarray  # [S, MAX_SUPPRESSED] int32 ids a row may not sample yet; -1 pad
    temperature: np.ndarray  # [S] float32
    top_k: np.ndarray  # [S] int32
    top_p: np.ndarray  # [S] float32
    min_p: np.ndarray  # [S] float32
    seeds: np.ndarray  # [S] uint32
    counters: np.ndarray  # [S] int32
    top_n: np.ndarray  # [] int32 most top logprobs a leaving row asked for (0: the tick may skip the top-N)

    PER_STAGE = 11  # the first fields carry the [k] stage axis

    @classmethod
    def empty(cls, shape: UnitShape, tokens: int) -> StepInputs:
        """All padding, for a bucket of `tokens` rows (padding rows write to the null block)."""
        k, s, mb, r, g = shape.k, shape.seqs, shape.max_blocks, shape.remote_rows, shape.layer_groups
        i32, f32 = np.int32, np.float32
        groups = (g,) if g > 1 else ()
        return cls(
            positions=np.zeros((k, tokens), i32), seq_ids=np.zeros((k, tokens), i32),
            valid=np.zeros((k, tokens), bool), slot_mapping=np.full((k, *groups, tokens), NULL_BLOCK, i32),
            block_tables=np.zeros((k, *groups, s, mb), i32), context_lens=np.zeros((k, s), i32),
            context_starts=np.zeros((k, s), i32), send_rows=np.full((k, k, r), -1, i32),
            recv_tables=np.zeros((k, k, r, mb), i32), recv_lens=np.zeros((k, k, r), i32),
            recv_pos=np.zeros((k, k, r), i32), tokens_in=np.zeros(tokens, i32),
            logits_indices=np.zeros(s, i32), suppress_ids=np.full((s, MAX_SUPPRESSED), -1, i32),
            temperature=np.zeros(s, f32), top_k=np.zeros(s, i32), top_p=np.ones(s, f32), min_p=np.zeros(s, f32),
            seeds=np.zeros(s, np.uint32), counters=np.zeros(s, i32), top_n=np.zeros((), i32))

    def as_tuple(self) -> tuple[np.ndarray, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclasses.dataclass
class Sampled:
    """What one tick returns for the micro-batch leaving the last stage (rows in micro-batch order)."""

    tokens: np.ndarray  # [S] int32 (at least the leaving rows; the rest is padding)
    logprobs: np.ndarray  # [S] float32 of the sampled token
    top_ids: np.ndarray  # [S, N] int32
    top_logprobs: np.ndarray  # [S, N] float32


# ---- memory operations ----------------------------------------------------------------------------------------
# Applied by the executor in the order they were issued, before the step that follows them; an executor never
# reorders them and never waits for the device to apply them (a fuse or split may wait for its own transfers).


@dataclasses.dataclass(frozen=True)
class CopyBlocks:
    """Blocks between the stages of one unit: `(src_stage, src_id, dst_stage, dst_id, lo, hi)` each; the destination
    block takes the token offsets `[lo, hi)` from the source and keeps the rest (live KV exchange, move home)."""

    unit: int
    copies: tuple[tuple[int, int, int, int, int, int], ...]


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Whole blocks from one instance's pool into already allocated blocks of another's (live migration).

    `streamed` G > 1: a prefill/decode handoff sent layer group by layer group as the prefill computed them, so
    only the last group's share follows the prefill (the cost model charges that share). An executor on one host
    copies the blocks whole after the tick either way; a cross-host transport would stream them. `measure`: an
    executor that can waits for the copy and adds its wall time to `transfer_measured_s` (a handoff's, reported
    when time is not modelled)."""

    src: int  # instance
    dst: int  # instance
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]
    streamed: int = 1
    measure: bool = False


@dataclasses.dataclass(frozen=True)
class SwapOut:
    """Blocks (or layer-group slots, `groups` > 1) of an instance's pool to its host tier as entry `key`."""

    instance: int
    key: Hashable
    blocks: tuple[int, ...]
    groups: int = 1  # G > 1: `blocks` are slot ids of the pool's G-slot view


@dataclasses.dataclass(frozen=True)
class SwapIn:
    """Host entry `key` into blocks (or slots) of the instance's pool; `keep` leaves the entry on the host.
    `src`: the entry is on another instance's host tier (a prefix transfer through the host tier, with `keep`)."""

    instance: int
    key: Hashable
    blocks: tuple[int, ...]
    groups: int = 1
    keep: bool = False
    src: int | None = None


@dataclasses.dataclass(frozen=True)
class DropHost:
    """Forget host entry `key` of an instance (its request finished, or its KV came back)."""

    instance: int
    key: Hashable


@dataclasses.dataclass(frozen=True)
class SlotCopy:
    """Layer-group slots within one instance's pool (G-slot view): `src[i]` into `dst[i]`."""

    instance: int
    src: tuple[int, ...]
    dst: tuple[int, ...]
    groups: int


@dataclasses.dataclass(frozen=True)
class Fuse:
    """Drop replicated weights: instances `members` (stage order) become the k-stage unit `unit` of `shape`; their
    pools are reinterpreted in pipeline format in place and the freed weight memory becomes the extension."""

    unit: int
    members: tuple[int, ...]
    shape: UnitShape


@dataclasses.dataclass(frozen=True)
class Split:
    """Restore: the unit's pool back to full-layer format, extension freed, weights gathered back, its members
    serve as replicas again (each its own one-stage unit)."""

    unit: int
    members: tuple[int, ...]


MemoryOp = CopyBlocks | Transfer | SwapOut | SwapIn | DropHost | SlotCopy | Fuse | Split


# Up to this many rows, a micro-batch's tables are written row by row; above, in a few whole-array operations
# (a fixed cost of some numpy calls, repaid once a row by row loop would make as many).
SMALL_BATCH_ROWS = 4


def leaving_row_sizes(seqs: int, tokens: int) -> tuple[int, ...]:
    """Row counts the LM head and sampling are compiled for in a tick of `tokens` rows and `seqs` sequences
    (ascending; the last is the most rows that can leave: at most one per sequence and one per token)."""
    cap = min(seqs, tokens)
    return tuple(sorted({cap} | {n for n in (cap // 4, cap // 2) if n >= 8}))


def head_rows(seqs: int, tokens: int, leaving: int, split_vocab: bool) -> int:
    """Rows the compiled step runs the LM head and sampling over when `leaving` sequences leave a tick of `tokens`
    rows (`kunjax.executor.step.head_and_sample`): the smallest of `leaving_row_sizes` that holds them, or the
    largest when the vocabulary is split over stages (one size, no collective inside a branch)."""
    sizes = leaving_row_sizes(seqs, tokens)
    if split_vocab:
        return sizes[-1]
    return next((n for n in sizes if n >= leaving), sizes[-1])


def flat_tables(tables: Sequence[Sequence[int]]) -> np.ndarray:
    """Rows' block tables end to end: [sum of lengths] int32."""
    flat: list[int] = []
    for t in tables:
        flat += t
    return np.array(flat, np.int32)


def fill_tables(slot_mapping: np.ndarray,  # [T] int32, written: each token's KV slot
                block_tables: np.ndarray,  # [S, MB] int32, written: row i's table, zero padded
                tables: Sequence[Sequence[int]],  # [R] each row's block ids
                counts: Sequence[int],  # [R] each row's tokens
                positions: np.ndarray,  # [N] int32 each token's position (rows' tokens in row order)
                seq_ids: np.ndarray,  # [N] int32 each token's row
                block_size: int,
                flat: np.ndarray | None = None) -> None:  # [sum of lengths] int32 `tables` end to end, if known
    """A micro-batch's KV slots and block tables (R rows, N tokens) of one stage (and layer group)."""
    bs = block_size
    if len(tables) <= SMALL_BATCH_ROWS:
        row = 0
        for i, (t, n) in enumerate(zip(tables, counts, strict=True)):
            if n == 1:  # a decode: its slot in plain ints
                p = int(positions[row])
                slot_mapping[row] = t[p // bs] * bs + p % bs
            else:
                pos = positions[row:row + n]
                slot_mapping[row:row + n] = np.asarray(t, np.int32)[pos // bs] * bs + pos % bs
            block_tables[i, :len(t)] = t
            row += n
        return
    if flat is None:
        flat = flat_tables(tables)
    lens = np.array([len(t) for t in tables], np.int64)
    logical = positions // bs
    if (logical >= lens[seq_ids]).any():
        raise IndexError("a token's position is past its block table")
    n = len(positions)
    slot_mapping[:n] = flat[(np.cumsum(lens) - lens)[seq_ids] + logical] * bs + positions % bs
    mask = np.arange(block_tables.shape[-1]) < lens[:, None]  # [R, MB]
    block_tables[:len(lens)][mask] = flat

