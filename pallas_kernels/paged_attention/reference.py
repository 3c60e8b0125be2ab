"""Pure-JAX reference of ragged paged attention: the semantics every backend kernel must match.

A step's tokens are a ragged batch: prefill chunks and decodes of several sequences, flattened to T rows.
Token t belongs to sequence `seq_ids[t]` at absolute position `positions[t]`. It attends to

* the sequence's cached history, positions `[0, context_lens[s])`, read from the paged pool through
  `block_tables[s]`, and
* the new keys of this step of the same sequence at positions `<= positions[t]` (causal within the chunk).

The pool is read-only here: the new tokens' K/V are scattered into it by the caller after the layer scan
(DESIGN.md §11: carrying the cache through the scan is ~2x slower on GPU). Masking uses -inf with guards, so a
row with nothing to attend to yields zeros and lse = -inf instead of NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

ROW_CHUNK = 16  # query rows attended per iteration


def paged_attention(
    q: jax.Array,  # [T, H, D] query rows of this step
    k_new: jax.Array,  # [T, K, D] keys of this step's tokens (not yet in the pool)
    v_new: jax.Array,  # [T, K, D]
    kv_pool: jax.Array | Sequence[jax.Array],  # [NB, L, 2, BS, K, D] block-major pool, or its segments
    layer: jax.Array,  # [] int32 layer index into the pool's L axis
    block_tables: jax.Array,  # [S, MB] int32 block ids of each sequence
    context_lens: jax.Array,  # [S] int32 tokens of each sequence already in the pool
    seq_ids: jax.Array,  # [T] int32 sequence row of each token
    positions: jax.Array,  # [T] int32 absolute position of each token
    valid: jax.Array,  # [T] bool, False on padding rows
    *,
    scale: float,
    sliding_window: int | None = None,
    context_starts: jax.Array | None = None,  # [S] int32 first cached position attended (default 0)
    soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Returns `(out [T, H, D] in q.dtype, lse [T, H] float32)`.

    `kv_pool` may be a sequence of segments (the base pool, then an extension segment after a drop): block ids
    index base-then-extension. `context_starts` restricts the cached history to `[start, context_len)`; the
    rest of a sequence's history is then attended elsewhere (remote attention) and merged by log-sum-exp.
    `soft_cap` bounds the logits Gemma-2 style: scores (already scaled) become `soft_cap * tanh(s / soft_cap)`
    before masking.
    """
    segments = (kv_pool,) if isinstance(kv_pool, jax.Array) else tuple(kv_pool)
    t, h, d = q.shape
    kh = k_new.shape[1]
    # Query rows go in chunks through a sequential map: the per-row gather of the history is
    # [rows, MB * BS, K, D], and past a few MiB it falls out of cache (on CPU, 64 rows at once ran 4-5x
    # slower than four chunks of 16).
    chunk = min(t, ROW_CHUNK)
    pad = -t % chunk
    qf = jnp.pad(q.astype(jnp.float32) * scale, ((0, pad), (0, 0), (0, 0)))
    rows = (qf.reshape(-1, chunk, kh, h // kh, d),
            jnp.pad(seq_ids, (0, pad)).reshape(-1, chunk),
            jnp.pad(positions, (0, pad)).reshape(-1, chunk),
            jnp.pad(valid, (0, pad)).reshape(-1, chunk))
    kf, vf = k_new.astype(jnp.float32), v_new.astype(jnp.float32)

    def cap(s):
        return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)

    def attend(args):
        qc, sid, pos, ok = args  # [R, K, G, D], [R], [R], [R]
        r = qc.shape[0]
        # History from the pool: gather each row's sequence blocks at this layer (one row gather on the
        # flattened [NB * L] axis, cheaper than a two-index gather).
        tables = block_tables[sid]  # [R, MB]
        bs = segments[0].shape[3]
        mb = tables.shape[1]
        hist = gather_blocks(segments, tables, layer)  # [R, MB, 2, BS, K, D]
        hist = jnp.moveaxis(hist, 2, 1).reshape(r, 2, mb * bs, kh, d).astype(jnp.float32)
        s_hist = cap(jnp.einsum("rkgd,rckd->rkgc", qc, hist[:, 0]))  # [R, K, G, C]
        hist_pos = jnp.arange(mb * bs, dtype=jnp.int32)
        hist_mask = hist_pos[None, :] < context_lens[sid][:, None]  # [R, C]
        if context_starts is not None:
            hist_mask &= hist_pos[None, :] >= context_starts[sid][:, None]
        if sliding_window is not None:
            hist_mask &= hist_pos[None, :] > pos[:, None] - sliding_window
        s_hist = jnp.where(hist_mask[:, None, None, :], s_hist, -jnp.inf)

        # This step's own tokens: same sequence, causal.
        s_new = cap(jnp.einsum("rkgd,ukd->rkgu", qc, kf))  # [R, K, G, T]
        new_mask = (sid[:, None] == seq_ids[None, :]) & (positions[None, :] <= pos[:, None])
        new_mask &= valid[None, :] & ok[:, None]
        if sliding_window is not None:
            new_mask &= positions[None, :] > pos[:, None] - sliding_window
        s_new = jnp.where(new_mask[:, None, None, :], s_new, -jnp.inf)

        # One softmax over both key sets, without concatenating them.
        m = jnp.maximum(jnp.max(s_hist, axis=-1), jnp.max(s_new, axis=-1))[..., None]  # [R, K, G, 1]
        m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
        p_hist = jnp.exp(s_hist - m_safe)  # exp(-inf) = 0 on masked entries
        p_new = jnp.exp(s_new - m_safe)
        denom = jnp.sum(p_hist, axis=-1) + jnp.sum(p_new, axis=-1)  # [R, K, G]
        acc = jnp.einsum("rkgc,rckd->rkgd", p_hist, hist[:, 1]) + jnp.einsum("rkgu,ukd->rkgd", p_new, vf)
        safe = jnp.where(denom > 0, denom, 1.0)
        lse = jnp.where(denom > 0, m_safe[..., 0] + jnp.log(safe), -jnp.inf)
        return acc / safe[..., None], lse

    out, lse = jax.lax.map(attend, rows)  # [T / R, R, K, G, D], [T / R, R, K, G]
    return out.reshape(-1, h, d)[:t].astype(q.dtype), lse.reshape(-1, h)[:t]


def gather_blocks(
    segments: Sequence[jax.Array],  # each [NB_i, L, 2, BS, K, D]; block ids run base-then-extension
    ids: jax.Array,  # [..., MB] int32 block ids
    layer: jax.Array,  # [] int32
) -> jax.Array:  # [..., MB, 2, BS, K, D]
    """One layer of the given blocks, read from whichever segment holds each id (one row gather per segment on
    the flattened [NB * L] axis, cheaper than a two-index gather)."""
    out, base = None, 0
    for seg in segments:
        nb, n_layers = seg.shape[:2]
        local = ids - base

        def read(seg=seg, local=local, nb=nb, n_layers=n_layers):
            return seg.reshape(nb * n_layers, *seg.shape[2:])[jnp.clip(local, 0, nb - 1) * n_layers + layer]

        if out is None:
            out = read()
        else:
            inside = (local >= 0) & (local < nb)

            def pick(prev, read=read, inside=inside):
                return jnp.where(inside.reshape(*inside.shape, 1, 1, 1, 1), read(), prev)

            # Most rows read one segment only: skip this segment's gather when no id falls in it.
            out = jax.lax.cond(jnp.any(inside), pick, lambda prev: prev, out)
        base += nb
    return out


def merge_attention_states(
    outs: jax.Array,  # [P, T, H, D] partial outputs, each normalised over its own keys
    lses: jax.Array,  # [P, T, H] float32 log-sum-exp of each part (-inf for an empty part)
) -> tuple[jax.Array, jax.Array]:
    """Combine partial attention results over disjoint key sets; returns `(out [T, H, D], lse [T, H])`."""
    m = jnp.max(lses, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m_safe)  # [P, T, H]
    total = jnp.sum(w, axis=0)
    safe_total = jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("pth,pthd->thd", w, outs.astype(jnp.float32)) / safe_total[..., None]
    lse = jnp.where(total > 0, m_safe + jnp.log(safe_total), -jnp.inf)
    return out.astype(outs.dtype), lse
