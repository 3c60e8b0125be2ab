"""The device side of a serving unit's tick: one compiled function for every unit, replica or pipeline group.

A unit of k stages runs on a `('stage', 'tp')` mesh (`sharding.layouts`); its weights' stacked layer axis is
split over `stage` (stage s keeps layers [s·L/k, (s+1)·L/k); all of them when k = 1) and the tensor-parallel axes
over `tp`. The tick runs under `shard_map`, manual over both axes, every stage in lockstep:

* stage 0 embeds the entering micro-batch (with a vocabulary split over the stages, a masked lookup of each
  stage's rows summed over `stage`); stage s > 0 takes the activations stage s-1 produced in the previous tick;
* every stage scans its layers over its own micro-batch with its own metadata (`kunjax.model.run_layers`; the
  row-parallel products summed over `tp`); paged attention reads the stage's pool segments (the base pool, and
  after a drop the extension), per layer group's slot tables when G > 1 (layerkv);
* remote attention (the `remote` variant, k > 1): rows of requests whose pre-drop history still lives on another
  device go there and back each layer (`pallas_kernels.remote_attention`) and merge by log-sum-exp;
* new K/V go into the donated segments after the scan (`kunjax.model.write_kv`, the one KV write);
* the last stage's exit rows go through the final norm and the head; logits (gathered over `stage` when the head
  is split) are sampled identically on every device, so the sampled ids are replicated; the head and sampling
  run over only as many rows as the leaving micro-batch has sequences, rounded up to a compiled size
  (`head_and_sample`);
* the activations move one stage on by a ring `ppermute` and stay on device for the next tick (k > 1).

`compile_copy_blocks` moves blocks between a unit's stages (the live KV exchange after a drop, moving KV home
before a restore): each device gathers what it sends, one `all_to_all`, each device writes what it received,
merging only the requested token offsets of each block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kunjax.config import ModelConfig
from kunjax.model import Params, rms_norm, run_layers, slot_view, write_kv
from kunjax.plan import StepInputs, UnitShape, leaving_row_sizes
from kunjax.sampling import sample
from pallas_kernels import gather_blocks, merge_attention_states, paged_attention
from pallas_kernels.remote_attention import remote_paged_attention
from sharding.layouts import KV_POOL_SPEC, STAGE, TP

jax.tree_util.register_dataclass(StepInputs, data_fields=[f for f in StepInputs.__dataclass_fields__], meta_fields=[])


def sample_rows(logits: jax.Array,  # [S, V] float32
                suppress_ids: jax.Array,  # [S, MAX_SUPPRESSED] int32, -1 pad
                temperature, top_k, top_p, min_p, seeds, counters,  # [S] each
                num_logprobs: int, top_n: jax.Array | None = None):  # [] int32 top logprobs asked for
    """Mask each row's suppressed ids, then sample."""
    # Rows below their min_tokens cannot pick their EOS / stop ids (those ids then report logprob -inf).
    s, v = logits.shape
    rows = jnp.broadcast_to(jnp.arange(s)[:, None], suppress_ids.shape)
    # A scatter of the few banned entries, not a [S, V] mask and a select over every logit (1-2 ms on CPU).
    logits = logits.at[rows, jnp.where(suppress_ids >= 0, suppress_ids, v)].set(-jnp.inf, mode="drop")
    return sample(logits, temperature, top_k, top_p, min_p, seeds, counters, num_logprobs,
                  None if top_n is None else top_n > 0)


def head_and_sample(cfg: ModelConfig, params: Params,
                    exit_rows: jax.Array,  # [S, E] hidden state of each micro-batch row's last token
                    num_rows: jax.Array,  # [] int32 rows 0..num_rows-1 are the micro-batch's; the rest is padding
                    inp: StepInputs, *, split: bool, num_logprobs: int, sizes: tuple[int, ...]):
    """The final norm, the LM head and sampling over only the first `sizes[i]` rows, the smallest size that holds
    `num_rows` (a `lax.switch`; one branch when `sizes` has one size): a prefill tick whose micro-batch has few
    sequences does not multiply the head's [E, V] weights for all S rows (on a CPU, 7 ms a tick for S = 64 of
    this repository's 20M-parameter Llama). Each row's result depends on that row alone (`kunjax.sampling`), so
    rows below `num_rows` get exactly what the full computation gives; rows past the branch's size get zeros.
    Returns the `sample` tuple, each array [S, ...]."""
    s = exit_rows.shape[0]

    def branch(size):
        def run():
            rows = slice(0, size)
            logits = _logits(cfg, params, exit_rows[rows], split)
            out = sample_rows(logits, inp.suppress_ids[rows], inp.temperature[rows], inp.top_k[rows],
                              inp.top_p[rows], inp.min_p[rows], inp.seeds[rows], inp.counters[rows], num_logprobs,
                              inp.top_n)
            return tuple(jnp.pad(o, [(0, s - size)] + [(0, 0)] * (o.ndim - 1)) for o in out)
        return run

    if len(sizes) == 1:
        return branch(sizes[0])()
    index = jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < num_rows)  # the first size >= num_rows
    return jax.lax.switch(index, [branch(n) for n in sizes])


def _embed(embed: jax.Array, tokens: jax.Array, split: bool) -> jax.Array:  # -> [T, E]
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


def _tick_body(cfg: ModelConfig, shape: UnitShape, remote: bool, num_logprobs: int, backend: str, transport: str,
               params: Params, *args):
    """One tick on one device (inside `shard_map`). Local shapes: params hold this stage's L/k layers (its
    vocabulary rows when split) and this tp shard's heads; pool [NB, L/k, 2, BS, K/tp, D]; ext [NE, L/k, ...] and
    acts [T_max, E] when k > 1; per-stage metadata arrives as the [1, ...] blocks of the `StepInputs` arrays."""
    k = shape.k
    if k == 1:
        (pool,), inp = args[:1], args[1]
        segments, acts = (pool,), None
    else:
        pool, ext, acts, inp = args
        segments = (pool, ext)
    positions, seq_ids, valid = inp.positions[0], inp.seq_ids[0], inp.valid[0]
    slot_mapping, block_tables = inp.slot_mapping[0], inp.block_tables[0]
    context_lens, context_starts = inp.context_lens[0], inp.context_starts[0]
    scale = 1.0 / math.sqrt(cfg.head_dim)
    rows = positions.shape[0]  # this tick's bucket: the in-flight micro-batches' valid rows all fit in it
    x_in = _embed(params["embed"], inp.tokens_in, shape.split_vocab)
    h = x_in if k == 1 else jnp.where(jax.lax.axis_index(STAGE) == 0, x_in.astype(acts.dtype), acts[:rows])
    g_count = shape.layer_groups
    lg = jax.tree.leaves(params["layers"])[0].shape[0] // g_count

    def attn(q, k_new, v_new, layer):  # q [T, H/tp, D]
        if g_count > 1:
            out, lse = paged_attention(q, k_new, v_new, slot_view(pool, g_count), layer % lg,
                                       block_tables[layer // lg], context_lens, seq_ids, positions, valid,
                                       scale=scale, sliding_window=cfg.sliding_window, backend=backend)
        else:
            out, lse = paged_attention(q, k_new, v_new, segments, layer, block_tables, context_lens, seq_ids,
                                       positions, valid, scale=scale, sliding_window=cfg.sliding_window,
                                       context_starts=context_starts if k > 1 else None, backend=backend)
        if not remote:
            return out
        rem_out, rem_lse = remote_paged_attention(
            q, inp.send_rows[0], inp.recv_tables[0], inp.recv_lens[0], inp.recv_pos[0], pool, layer, scale=scale,
            axis_name=STAGE, sliding_window=cfg.sliding_window, transport=transport, backend=backend)
        merged, _ = merge_attention_states(jnp.stack([out.astype(jnp.float32), rem_out]),
                                           jnp.stack([lse, rem_lse]))
        return merged.astype(q.dtype)

    h, (kk, vv) = run_layers(cfg, params, h, positions, attn, tp_axis=TP if shape.tp > 1 else None)
    new_kv = jnp.stack([kk, vv], axis=2).astype(pool.dtype)  # [L/k, T, 2, K/tp, D]
    segments = write_kv(segments, new_kv, slot_mapping)
    exit_rows = h[inp.logits_indices]  # [S, E]
    # Rows of this stage's micro-batch: its sequences are rows 0..n-1 of the exit rows, the rest padding.
    num_rows = jnp.max(jnp.where(valid, seq_ids + 1, 0))
    if k > 1:  # the micro-batch leaving is the last stage's
        last = jax.lax.axis_index(STAGE) == k - 1
        exit_rows = jax.lax.psum(jnp.where(last, exit_rows, 0), STAGE)
        num_rows = jax.lax.psum(jnp.where(last, num_rows, 0), STAGE)
    # With the vocabulary split over stages the head gathers over `stage`: no collectives inside a switch.
    sizes = leaving_row_sizes(exit_rows.shape[0], rows)
    sampled = head_and_sample(cfg, params, exit_rows, num_rows, inp, split=shape.split_vocab,
                              num_logprobs=num_logprobs, sizes=sizes[-1:] if shape.split_vocab else sizes)
    if k == 1:
        return segments[0], sampled
    acts = acts.at[:rows].set(jax.lax.ppermute(h, STAGE, [(i, (i + 1) % k) for i in range(k)]))
    return segments[0], segments[1], acts, sampled


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def input_specs(example: StepInputs) -> StepInputs:
    """Per-stage fields split over `stage` (replicated over tp), the exit-row fields replicated."""
    names = list(StepInputs.__dataclass_fields__)
    per_stage = set(names[:StepInputs.PER_STAGE])
    return StepInputs(**{n: P(STAGE) if n in per_stage else P() for n in names})


def on_mesh(mesh: Mesh, tree, specs):
    """Host arrays (a pytree; `specs` one `PartitionSpec` for all or a matching tree) as arguments of a function
    compiled over `mesh`: as they are on one process; as global arrays, each process giving its own devices'
    slices, when the mesh spans processes (`jax.distributed`: every process passes the same values)."""
    if not mesh.is_multi_process:
        return tree

    def put(a, spec):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda idx: a[idx])

    if isinstance(specs, P):
        return jax.tree.map(lambda a: put(a, specs), tree)
    return jax.tree.map(put, tree, specs)


def compile_tick(cfg: ModelConfig, shape: UnitShape, mesh: Mesh, params, state: tuple, example: StepInputs,
                 remote: bool, *, num_logprobs: int, backend: str, transport: str) -> jax.stages.Compiled:
    """AOT-compile one tick of a unit: `(params, *state, inputs) -> (*state, sampled)` with `state` = (pool,) for
    a replica or (pool, ext, acts) for a group, donated. `params` and `state` are arrays or abstract structs."""
    param_specs = jax.tree.map(lambda x: x.sharding.spec, params)
    state_specs = (KV_POOL_SPEC,) + (KV_POOL_SPEC, P(STAGE)) * (shape.k > 1)
    specs = input_specs(example)
    body = functools.partial(_tick_body, cfg, shape, remote, num_logprobs, backend, transport)
    out_specs = (*state_specs, P())
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(param_specs, *state_specs, specs), out_specs=out_specs,
                           check_vma=False)
    abstract_inputs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                     sharding=NamedSharding(mesh, s)),
                                   example, specs)
    n = len(state)
    jitted = jax.jit(mapped, donate_argnums=tuple(range(1, 1 + n)))
    return jitted.lower(jax.tree.map(_abstract, params), *(_abstract(x) for x in state), abstract_inputs).compile()


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


def compile_copy_blocks(shape: UnitShape, mesh: Mesh, pool, ext) -> jax.stages.Compiled:
    """AOT-compile the block copy: (pool, ext, send_ids [k, k, X], recv_ids, recv_lo, recv_hi) -> (pool, ext).

    Row d of `send_ids` on device s lists the blocks s sends to d, in the same order as row s of `recv_ids` on
    device d lists where they land (the deterministic order both sides agree on); a landing block takes the
    token offsets `[lo, hi)` from the copy and keeps the rest. Unused entries are -1.
    """
    meta = P(STAGE)
    mapped = jax.shard_map(_copy_body, mesh=mesh, in_specs=(KV_POOL_SPEC, KV_POOL_SPEC) + (meta,) * 4,
                           out_specs=(KV_POOL_SPEC, KV_POOL_SPEC), check_vma=False)
    ids = jax.ShapeDtypeStruct((shape.k, shape.k, shape.copy_blocks), jnp.int32, sharding=NamedSharding(mesh, meta))
    return jax.jit(mapped, donate_argnums=(0, 1)).lower(_abstract(pool), _abstract(ext), ids, ids, ids, ids).compile()
