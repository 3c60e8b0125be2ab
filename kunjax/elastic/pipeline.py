"""Device side of a pipeline group: the tick, remote attention, and KV block copies between stages.

A group fuses k instances into one mesh with axis `stage` (DESIGN.md §4, §6). Its weights' stacked layer axis is
sharded over `stage` (stage s keeps layers [s·L/k, (s+1)·L/k)); the vocabulary axis of the embedding and the LM
head is split over `stage` too when k divides it, so every stage drops (k-1)/k of every large weight. Each
device's KV pool is in pipeline format `[NB·k, L/k, 2, BS, K, D]` (a reshape of the full-layer pool) plus an
extension segment `[NE, L/k, ...]` allocated from the freed weight memory; block ids index base-then-extension.

One call of the tick is one pipeline beat, all stages in lockstep under `shard_map`:

* stage 0 embeds the entering micro-batch (a masked lookup of each stage's vocabulary rows, summed over stages);
  stage s > 0 takes the activations stage s-1 produced in the previous tick;
* every stage runs its local layer `scan` over its own micro-batch with its own metadata (positions, block
  tables into its own pool); new K/V are scattered into the donated pool/extension after the scan;
* remote attention (the `remote` variant): rows of requests whose pre-drop history still lives on another device
  (their home) go there and back each layer through `pallas_kernels.remote_attention` (one `all_to_all` each
  way by default, `GroupShapes.remote_transport`); the home attends over its local pool at pipeline blocks
  `old_block·k + sender_stage` (the host's `recv_tables`) at the same local layer; the sender merges the result
  with its local part by log-sum-exp;
* the last stage's exit rows go through the final norm and the (vocab-split) head; logits are gathered over
  `stage` and sampled identically on every stage, so the sampled ids are replicated;
* the activations move one stage on with a ring `ppermute` and stay on device for the next tick.

`make_copy_blocks` moves pipeline blocks between the group's devices (live KV exchange after a drop, moving KV
home before a restore): each device gathers the blocks it sends, one `all_to_all`, each device writes what it
received, merging only the requested token offsets of each block.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kunjax.config import ModelConfig
from kunjax.instance import sample_rows
from kunjax.model import Params, _run_layers, rms_norm
from pallas_kernels import gather_blocks, merge_attention_states, paged_attention
from pallas_kernels.remote_attention import remote_paged_attention

STAGE = "stage"


@dataclasses.dataclass(frozen=True)
class GroupShapes:
    """Static shapes of one group's compiled functions."""

    k: int  # stages
    num_base: int  # pipeline blocks of the base segment per device (NB·k)
    num_ext: int  # pipeline blocks of the extension segment per device
    tokens: int  # T: most rows of one micro-batch (the activation buffer's rows per stage)
    buckets: tuple[int, ...]  # padded row counts a tick is compiled for (ascending, the last is T)
    seqs: int  # S: sequences of one micro-batch
    max_blocks: int  # MB: block-table width
    remote_rows: int  # R: remote query rows per (stage, destination) per tick
    copy_blocks: int  # X: blocks per (source, destination) per copy call
    num_logprobs: int
    attention_backend: str = "auto"  # pallas_kernels.BACKENDS
    remote_transport: str = "all_to_all"  # pallas_kernels.remote_attention.TRANSPORTS


def embed_is_split(cfg: ModelConfig, k: int) -> bool:
    return cfg.vocab_size % k == 0


def stage_specs(cfg: ModelConfig, params: Params, k: int) -> Params:
    """PartitionSpecs of the weights on a k-stage group mesh."""
    split = embed_is_split(cfg, k)
    out: Params = {"layers": {name: P(STAGE) for name in params["layers"]},
                   "embed": P(STAGE, None) if split else P(), "final_norm": P()}
    if "lm_head" in params:
        out["lm_head"] = P(None, STAGE) if split else P()
    return out


def write_kv_segments(
    pool: jax.Array,  # [NBp, Lk, 2, BS, K, D]
    ext: jax.Array,  # [NE, Lk, 2, BS, K, D]
    new_kv: jax.Array,  # [Lk, T, 2, K, D]
    slot_mapping: jax.Array,  # [T] int32 slot in base-then-extension block ids (block * BS + offset)
) -> tuple[jax.Array, jax.Array]:
    bs, nbp = pool.shape[3], pool.shape[0]
    blocks, offsets = slot_mapping // bs, slot_mapping % bs
    vals = jnp.moveaxis(new_kv, 1, 0)  # [T, Lk, 2, K, D]
    in_base = blocks < nbp
    pool = pool.at[jnp.where(in_base, blocks, nbp), :, :, offsets].set(vals, mode="drop")
    ext = ext.at[jnp.where(in_base, ext.shape[0], blocks - nbp), :, :, offsets].set(vals, mode="drop")
    return pool, ext


def _embed(cfg: ModelConfig, embed: jax.Array, tokens: jax.Array, split: bool) -> jax.Array:  # -> [T, E]
    if not split:
        return embed[tokens]
    rows = embed.shape[0]
    local = tokens - jax.lax.axis_index(STAGE) * rows
    inside = (local >= 0) & (local < rows)
    part = jnp.where(inside[:, None], embed[jnp.clip(local, 0, rows - 1)], 0)
    return jax.lax.psum(part, STAGE)


def _logits(cfg: ModelConfig, params: Params, x: jax.Array, split: bool) -> jax.Array:  # x [S, E] -> [S, V]
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = (x @ head).astype(jnp.float32)
    return jax.lax.all_gather(logits, STAGE, axis=1, tiled=True) if split else logits


def _tick_body(cfg: ModelConfig, gs: GroupShapes, remote: bool, params, pool, ext, acts, positions, seq_ids,
               valid, slot_mapping, block_tables, context_lens, context_starts, send_rows, recv_tables,
               recv_lens, recv_pos, tokens_in, logits_indices, suppress_ids, temperature, top_k, top_p, min_p,
               seeds, counters):
    """One tick on one stage (inside `shard_map`). Local shapes: params hold this stage's L/k layers (and its
    vocabulary rows when split); pool [NB·k, L/k, 2, BS, K, D]; ext [NE, L/k, 2, BS, K, D]; acts [T_max, E]; the
    per-stage metadata is [1, ...] of the `TickInputs` shapes, the exit-row arrays are replicated."""
    k = gs.k
    split = embed_is_split(cfg, k)
    # Per-stage metadata arrives as [1, ...] local blocks of [k, ...] arrays.
    positions, seq_ids, valid, slot_mapping = positions[0], seq_ids[0], valid[0], slot_mapping[0]
    block_tables, context_lens, context_starts = block_tables[0], context_lens[0], context_starts[0]
    stage = jax.lax.axis_index(STAGE)
    scale = 1.0 / math.sqrt(cfg.head_dim)
    rows = positions.shape[0]  # this tick's bucket: the in-flight micro-batches' valid rows all fit in it
    h = jnp.where(stage == 0, _embed(cfg, params["embed"], tokens_in, split).astype(acts.dtype), acts[:rows])

    def attn(q, k_new, v_new, layer):  # q [T, H, D]
        out, lse = paged_attention(q, k_new, v_new, (pool, ext), layer, block_tables, context_lens, seq_ids,
                                   positions, valid, scale=scale, sliding_window=cfg.sliding_window,
                                   context_starts=context_starts, backend=gs.attention_backend)
        if not remote:
            return out
        rem_out, rem_lse = remote_paged_attention(
            q, send_rows[0], recv_tables[0], recv_lens[0], recv_pos[0], pool, layer, scale=scale, axis_name=STAGE,
            sliding_window=cfg.sliding_window, transport=gs.remote_transport, backend=gs.attention_backend)
        merged, _ = merge_attention_states(jnp.stack([out.astype(jnp.float32), rem_out]),
                                           jnp.stack([lse, rem_lse]))
        return merged.astype(q.dtype)

    h, (kk, vv) = _run_layers(cfg, params, h, positions, attn)
    new_kv = jnp.stack([kk, vv], axis=2).astype(pool.dtype)  # [Lk, T, 2, K, D]
    pool, ext = write_kv_segments(pool, ext, new_kv, slot_mapping)
    exit_rows = jax.lax.psum(jnp.where(stage == k - 1, h[logits_indices], 0), STAGE)  # [S, E]
    logits = _logits(cfg, params, exit_rows, split)
    sampled = sample_rows(logits, suppress_ids, temperature, top_k, top_p, min_p, seeds, counters,
                          gs.num_logprobs)
    acts = acts.at[:rows].set(jax.lax.ppermute(h, STAGE, [(i, (i + 1) % k) for i in range(k)]))
    return pool, ext, acts, sampled


@dataclasses.dataclass
class TickInputs:
    """Host arrays of one tick. Per-stage arrays have a leading [k] axis (row s for stage s)."""

    positions: object  # [k, T] int32
    seq_ids: object  # [k, T] int32
    valid: object  # [k, T] bool
    slot_mapping: object  # [k, T] int32
    block_tables: object  # [k, S, MB] int32
    context_lens: object  # [k, S] int32
    context_starts: object  # [k, S] int32
    send_rows: object  # [k, k, R] int32: stage s's rows whose history lives on device d (-1 pad)
    recv_tables: object  # [k, k, R, MB] int32: on device d, blocks of rows sent by stage s
    recv_lens: object  # [k, k, R] int32
    recv_pos: object  # [k, k, R] int32
    tokens_in: object  # [T] int32 tokens of the micro-batch entering stage 0
    logits_indices: object  # [S] int32 rows of the exiting micro-batch (last stage) to sample
    suppress_ids: object  # [S, MAX_SUPPRESSED] int32
    temperature: object  # [S] float32
    top_k: object  # [S] int32
    top_p: object  # [S] float32
    min_p: object  # [S] float32
    seeds: object  # [S] uint32
    counters: object  # [S] int32

    PER_STAGE = 11  # the first fields, sharded over `stage`

    def as_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def compile_tick(cfg: ModelConfig, gs: GroupShapes, mesh: Mesh, params, pool, ext, acts, example: TickInputs,
                 remote: bool) -> jax.stages.Compiled:
    """AOT-compile one tick variant for the group's mesh (pool, extension and activations donated)."""
    param_specs = jax.tree.map(lambda x: x.sharding.spec, params)
    meta = example.as_tuple()
    n_stage = TickInputs.PER_STAGE
    in_specs = (param_specs, P(STAGE), P(STAGE), P(STAGE)) + (P(STAGE),) * n_stage + (P(),) * (len(meta) - n_stage)
    body = functools.partial(_tick_body, cfg, gs, remote)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                           out_specs=(P(STAGE), P(STAGE), P(STAGE), P()), check_vma=False)
    sh = [NamedSharding(mesh, s) for s in in_specs[4:]]
    abstract_meta = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for a, s in zip(meta, sh, strict=True)]

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    jitted = jax.jit(mapped, donate_argnums=(1, 2, 3))
    return jitted.lower(jax.tree.map(abstract, params), abstract(pool), abstract(ext), abstract(acts),
                        *abstract_meta).compile()


def _copy_body(pool, ext, send_ids, recv_ids, recv_lo, recv_hi):
    """Local: send_ids [1, k(dest), X]; recv_ids / lo / hi [1, k(src), X]."""
    send_ids, recv_ids, recv_lo, recv_hi = send_ids[0], recv_ids[0], recv_lo[0], recv_hi[0]
    k, x = send_ids.shape
    n_base, lk = pool.shape[0], pool.shape[1]

    def all_layers(ids):  # [k, X] -> [k, X, Lk, 2, BS, K, D]
        return jnp.stack([gather_blocks((pool, ext), ids, j) for j in range(lk)], axis=2)

    out = all_layers(jnp.maximum(send_ids, 0))
    got = jax.lax.all_to_all(out, STAGE, 0, 0, tiled=True)  # [k(src), X, Lk, 2, BS, K, D]
    current = all_layers(jnp.maximum(recv_ids, 0))
    offsets = jnp.arange(pool.shape[3])
    keep = (offsets >= recv_lo[..., None]) & (offsets < recv_hi[..., None])  # [k, X, BS]
    merged = jnp.where(keep[:, :, None, None, :, None, None], got, current).reshape(k * x, *got.shape[2:])
    ids = recv_ids.reshape(-1)
    in_base = (ids >= 0) & (ids < n_base)
    in_ext = ids >= n_base
    pool = pool.at[jnp.where(in_base, ids, n_base)].set(merged, mode="drop")
    ext = ext.at[jnp.where(in_ext, ids - n_base, ext.shape[0])].set(merged, mode="drop")
    return pool, ext


def compile_copy_blocks(gs: GroupShapes, mesh: Mesh, pool, ext) -> jax.stages.Compiled:
    """AOT-compile the block copy: (pool, ext, send_ids [k, k, X], recv_ids, recv_lo, recv_hi) -> (pool, ext).

    Row d of `send_ids` on device s lists the blocks s sends to d, in the same order as row s of `recv_ids` on
    device d lists where they land (the deterministic order both sides agree on); a landing block takes the
    token offsets `[lo, hi)` from the copy and keeps the rest. Unused entries are -1.
    """
    mapped = jax.shard_map(_copy_body, mesh=mesh, in_specs=(P(STAGE),) * 6, out_specs=(P(STAGE), P(STAGE)),
                           check_vma=False)
    ids = jax.ShapeDtypeStruct((gs.k, gs.k, gs.copy_blocks), jnp.int32, sharding=NamedSharding(mesh, P(STAGE)))

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.jit(mapped, donate_argnums=(0, 1)).lower(abstract(pool), abstract(ext), ids, ids, ids, ids).compile()
