"""Ragged paged attention as a TPU (Mosaic) Pallas kernel: same signature and semantics as `reference.py`.

What it owns: one `pallas_call` that reads the paged pool in place (HBM, never gathered) and attends a ragged
batch of prefill chunks and decodes, plus the thin host-side-shaped (but jittable) wrapper that plans the work.
It never writes the pool: the caller scatters this step's K/V after the layer scan, as for the reference.

Structure
* Grid: one program per query tile of `q_tile` consecutive rows (`"parallel"`: megacore/dual-TC chips split the
  tiles). A tile keeps, per KV head, an online-softmax state (m, l, acc) in VMEM scratch for its `q_tile * G`
  query rows (G = H / K query heads per KV head; the rows of one KV head are its GQA group, laid out
  `(token, group)` so one MXU matmul serves the whole group).
* Work items, planned by the wrapper and scalar-prefetched into SMEM (`PrefetchScalarGridSpec`): for each
  distinct sequence in the tile, the range of its cached positions any of the tile's rows can see
  (`[max(context_start, min_pos - window + 1), min(context_len, MB * BS))`) and the range of `k_new` rows that
  hold its new tokens. The kernel walks them as one flat loop per phase: history items then new-token items.
* History phase: an item is `blocks_per_item` consecutive block-table entries of one sequence. Each needed block
  `pool[id, layer]` (`[2, BS * K, D]`, contiguous) is DMA'd from the pool left in `pl.ANY` (HBM) into a
  double-buffered VMEM slot while the previous item computes. Per KV head the keys/values are a strided
  sublane load `buf[0|1, h::K, :]` (the pool is token-major, heads interleaved), as tpu-inference's ragged paged
  attention does for its combined-KV layout.
* Segments: the kernel takes every segment as its own `pl.ANY` operand and picks the source per block id
  (base-then-extension, like `reference.gather_blocks`, including its clip of out-of-range ids into the base
  segment). No second pass, no merge.
* New tokens: handled in the same kernel and the same softmax state (no lse merge). An item is a chunk of
  `new_tile` rows of `k_new`/`v_new` (DMA'd from `pl.ANY`, double-buffered), masked by sequence, causality,
  validity and window from a small `[3, T]` key-metadata block held in VMEM.
* An optional logit soft-cap (`soft_cap * tanh(s / soft_cap)`, Gemma-2 style) is applied to the scaled scores
  before masking, as in the reference.
* Masking uses -inf with guards exactly as the reference: a row with nothing to attend gets out 0, lse -inf.
  As in the reference, `valid` gates only the new keys: a padding row still sees the cached history of the
  sequence its `seq_ids` entry names (callers point padding at an empty sequence, or ignore those rows).
  Blocks outside the visible range are not fetched; their (stale, possibly NaN) VMEM is masked out of the
  scores and zeroed out of V before the P @ V matmul.

Tiles and TPU generations (rationale)
* `blocks_per_item * BS` (keys per item) defaults to 128 keys: the score tile `[q_tile * G, 128]` fills the
  128 lanes of a vreg and the 128-wide MXU of v5e (4x128^2), and is half a pass of the 256-wide MXU of
  v6e/v7x. A slot is `2 * 128 * K * D` elements: 256 KiB at K=8, D=128 in bf16; two slots for the pool and two
  for the new tokens are ~1 MiB of VMEM, far inside the 16 MiB (v5e) / 32 MiB (v6e, v7x) default scoped limit
  (v7x has 64 MiB VMEM per core, v5e/v6e 128 MiB).
* `q_tile` defaults to 16 rows: a decode-heavy batch puts up to 16 sequences in one tile, so every KV byte is
  read once while the tile's other rows are masked (the MXU work is then ~q_tile x the useful work, still under
  the ridge point of v5e/v6e for G <= 8 since decode is bandwidth bound). For prefill-heavy batches 64-128 rows
  cut the number of times a long history is re-read (once per tile) and fill the MXU better; `q_tile * G` must
  be a multiple of 8 (f32 sublanes; 16 for bf16 packing) on hardware.
* `new_tile` defaults to 128 rows: the new-token score tile is then also 128 lanes wide and the dynamic lane
  offset into the key metadata is 128-aligned, which Mosaic requires.

Wrapper cost outside the kernel: q is transposed to `[K, T * G, D]` and the output back (one copy of q and of
the output each, O(T * H * D), small next to the KV reads); k_new/v_new are padded to a multiple of the tile
(a copy of O(T * K * D)); the pool is only reshaped `[NB, L, 2, BS, K, D] -> [NB, L, 2, BS * K, D]` (free). The
plan is O(T + S) integer ops.

Limits: tested on CPU in TPU interpret mode (`interpret=pltpu.InterpretParams()`), not on TPU hardware. On
hardware the strided sublane load of bf16 (packed two rows per sublane) may need the bitcast-and-shift trick that
tpu-inference uses; fp32 strided loads are supported by Mosaic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

DEFAULT_Q_TILE = 16  # query rows per grid program
DEFAULT_KEYS_PER_ITEM = 128  # pool keys per history work item (lanes of the score tile)
DEFAULT_NEW_TILE = 128  # k_new rows per new-token work item


def segment_sources(gid: jax.Array, seg_sizes: Sequence[int]) -> list[tuple[int, jax.Array, jax.Array]]:
    """Where block id `gid` ([] int32, base-then-extension) lives, as `(segment, selected [] bool, local id)` per
    segment, exactly one selected; an id in no segment reads the base, clipped, like `reference.gather_blocks`.
    Used inside kernels to pick the DMA source of a block."""
    base, in_later, sources = seg_sizes[0], jnp.bool_(False), []
    for si in range(1, len(seg_sizes)):
        local = gid - base
        inside = (local >= 0) & (local < seg_sizes[si])
        sources.append((si, inside, jnp.clip(local, 0, seg_sizes[si] - 1)))
        in_later |= inside
        base += seg_sizes[si]
    return [(0, ~in_later, jnp.clip(gid, 0, seg_sizes[0] - 1)), *sources]


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
    soft_cap: float | None = None,  # scores become soft_cap * tanh(s / soft_cap) before masking
    q_tile: int = DEFAULT_Q_TILE,
    blocks_per_item: int | None = None,  # default: DEFAULT_KEYS_PER_ITEM // BS (at least 1)
    new_tile: int = DEFAULT_NEW_TILE,
    interpret: pltpu.InterpretParams | None = None,  # TPU interpret mode (CPU tests); None on TPU
) -> tuple[jax.Array, jax.Array]:
    """Returns `(out [T, H, D] in q.dtype, lse [T, H] float32)`, as `reference.paged_attention`."""
    segments = (kv_pool,) if isinstance(kv_pool, jax.Array) else tuple(kv_pool)
    t, h, d = q.shape
    kh = k_new.shape[1]
    g = h // kh
    bs = segments[0].shape[3]
    n_seqs, mb = block_tables.shape
    npb = blocks_per_item or max(1, DEFAULT_KEYS_PER_ITEM // bs)
    kb = npb * bs  # keys per history item
    tq, tk = q_tile, new_tile
    t_pad = -(-t // math.lcm(tq, tk)) * math.lcm(tq, tk)
    n_tiles = t_pad // tq
    pad = t_pad - t

    # Row metadata; padding rows get sequence -1, which matches no sequence.
    sid = jnp.pad(seq_ids.astype(jnp.int32), (0, pad), constant_values=-1)  # [Tp]
    pos = jnp.pad(positions.astype(jnp.int32), (0, pad))  # [Tp]
    ok = jnp.pad(valid, (0, pad))  # [Tp] bool
    starts = jnp.zeros((n_seqs,), jnp.int32) if context_starts is None else context_starts.astype(jnp.int32)
    lens = context_lens.astype(jnp.int32)
    plan = _plan(sid, pos, ok, starts, lens, tq=tq, tk=tk, kb=kb, hist_end=mb * bs, sliding_window=sliding_window)

    # Layouts the kernel wants (see the module docstring for the cost).
    qk = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(t_pad, kh, g, d)
    qk = jnp.transpose(qk, (1, 0, 2, 3)).reshape(kh, t_pad * g, d)  # [K, Tp * G, D]
    row_meta = jnp.repeat(jnp.stack([sid, pos, ok.astype(jnp.int32)], axis=1), g, axis=0)  # [Tp * G, 3]
    key_meta = jnp.stack([sid, pos, ok.astype(jnp.int32)], axis=0)  # [3, Tp]
    k_flat = jnp.pad(k_new, ((0, pad), (0, 0), (0, 0))).reshape(t_pad * kh, d)  # [Tp * K, D]
    v_flat = jnp.pad(v_new, ((0, pad), (0, 0), (0, 0))).reshape(t_pad * kh, d)
    segs = tuple(s.reshape(s.shape[0], s.shape[1], 2, bs * kh, d) for s in segments)  # [NB_i, L, 2, BS * K, D]
    seg_sizes = tuple(s.shape[0] for s in segments)

    scalars = (
        jnp.reshape(layer, (1,)).astype(jnp.int32),  # [1]
        block_tables.astype(jnp.int32).reshape(-1),  # [S * MB], 1-D: SMEM pads 2-D arrays
        *plan,  # the work items; context starts/lengths and the window are folded into them
    )
    kernel = functools.partial(
        _kernel,
        n_segments=len(segs),
        seg_sizes=seg_sizes,
        kh=kh,
        tq=tq,
        g=g,
        bs=bs,
        mb=mb,
        npb=npb,
        tk=tk,
        scale=scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    row_map = lambda i, *_: (0, i, 0)
    compute_dtype = jnp.promote_types(q.dtype, segments[0].dtype)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(n_tiles,),
            in_specs=[
                pl.BlockSpec((kh, tq * g, d), row_map),  # q
                pl.BlockSpec((tq * g, 3), lambda i, *_: (i, 0)),  # row metadata
                pl.BlockSpec((3, t_pad), lambda i, *_: (0, 0)),  # key metadata, whole
                any_spec,  # k_new rows
                any_spec,  # v_new rows
                *([any_spec] * len(segs)),  # pool segments, left in HBM
            ],
            out_specs=[
                pl.BlockSpec((kh, tq * g, d), row_map),
                pl.BlockSpec((kh, tq * g, 1), row_map),
            ],
            scratch_shapes=[
                pltpu.VMEM((2, npb, 2, bs * kh, d), segments[0].dtype),  # pool blocks, double-buffered
                pltpu.VMEM((2, 2, tk * kh, d), k_new.dtype),  # new K/V chunks, double-buffered
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.VMEM((kh, tq * g, d), compute_dtype),  # scaled q
                pltpu.VMEM((kh, tq * g, 1), jnp.float32),  # m
                pltpu.VMEM((kh, tq * g, 1), jnp.float32),  # l
                pltpu.VMEM((kh, tq * g, d), jnp.float32),  # acc
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((kh, t_pad * g, d), q.dtype),
            jax.ShapeDtypeStruct((kh, t_pad * g, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret if interpret is not None else False,
        name="kunjax_paged_attention",
    )(*scalars, qk, row_meta, key_meta, k_flat, v_flat, *segs)
    out = jnp.transpose(out.reshape(kh, t_pad, g, d), (1, 0, 2, 3)).reshape(t_pad, h, d)[:t]
    lse = jnp.transpose(lse.reshape(kh, t_pad, g), (1, 0, 2)).reshape(t_pad, h)[:t]
    return out, lse


def _plan(sid, pos, ok, starts, lens, *, tq, tk, kb, hist_end, sliding_window):
    """Per query tile, the work items as flat int32 arrays for SMEM (each `[n_tiles * tq]` or `[n_tiles]`).

    Slot j of tile i is the tile's j-th distinct sequence (slots with no work are compacted to the end):
    `*_seq` its id, `*_first` its first item (history: first key-group; new: first k_new chunk), `*_off` the
    exclusive prefix sum of item counts, and `*_total` the tile's item count. History slots also carry the
    visible position range `[hist_lo, hist_hi)`.
    """
    t_pad = sid.shape[0]
    n_tiles = t_pad // tq
    n_seqs = starts.shape[0]
    tsid = sid.reshape(n_tiles, tq)
    tpos = pos.reshape(n_tiles, tq)
    tok = ok.reshape(n_tiles, tq)

    # Distinct sequences of each tile (sorted; -1 padding sorts first and is dropped).
    srt = jnp.sort(tsid, axis=1)
    first = jnp.concatenate([jnp.ones((n_tiles, 1), bool), srt[:, 1:] != srt[:, :-1]], axis=1) & (srt >= 0)
    order = jnp.argsort(~first, axis=1, stable=True)
    seq = jnp.take_along_axis(srt, order, axis=1)  # [NT, TQ]
    has = jnp.take_along_axis(first, order, axis=1)  # [NT, TQ]
    seq_c = jnp.clip(seq, 0, n_seqs - 1)
    mine = tsid[:, None, :] == seq[:, :, None]  # [NT, TQ slot, TQ row]

    # History: the cached positions any of the tile's rows of this sequence can see.
    lo = starts[seq_c]
    if sliding_window is not None:
        min_pos = jnp.min(jnp.where(mine, tpos[:, None, :], jnp.iinfo(jnp.int32).max), axis=2)
        lo = jnp.maximum(lo, min_pos - sliding_window + 1)
    hi = jnp.minimum(lens[seq_c], hist_end)
    n_hist = jnp.where(has & (hi > lo), -(-hi // kb) - lo // kb, 0)

    # New tokens: the k_new rows holding this sequence's valid tokens (only if the tile has a valid row of it).
    key_row = jnp.arange(t_pad, dtype=jnp.int32)
    key_seq = jnp.where(ok & (sid >= 0), sid, n_seqs)  # invalid keys go to a dropped segment
    kmin = jax.ops.segment_min(key_row, key_seq, num_segments=n_seqs + 1)[seq_c]
    kmax = jax.ops.segment_max(key_row, key_seq, num_segments=n_seqs + 1)[seq_c]
    row_valid = jnp.any(mine & tok[:, None, :], axis=2)
    n_new = jnp.where(has & row_valid & (kmax >= kmin), kmax // tk - kmin // tk + 1, 0)

    def compact(n, *cols):
        idx = jnp.argsort(n == 0, axis=1, stable=True)
        n = jnp.take_along_axis(n, idx, axis=1)
        off = jnp.cumsum(n, axis=1) - n
        cols = [jnp.take_along_axis(c, idx, axis=1) for c in cols]
        return [c.astype(jnp.int32).reshape(-1) for c in (*cols, off)] + [jnp.sum(n, axis=1).astype(jnp.int32)]

    hist = compact(n_hist, seq_c, lo // kb, lo, hi)
    new = compact(n_new, seq_c, kmin // tk)
    return (*hist, *new)


def _kernel(
    # scalar prefetch (SMEM)
    layer_ref,  # [1]
    tables_ref,  # [S * MB]
    h_seq_ref,  # [NT * TQ]
    h_first_ref,  # [NT * TQ] first key-group of the slot
    h_lo_ref,  # [NT * TQ] first visible cached position
    h_hi_ref,  # [NT * TQ] end of the visible cached positions
    h_off_ref,  # [NT * TQ] exclusive prefix sum of items
    h_total_ref,  # [NT]
    n_seq_ref,  # [NT * TQ]
    n_first_ref,  # [NT * TQ] first k_new chunk of the slot
    n_off_ref,  # [NT * TQ]
    n_total_ref,  # [NT]
    # blocked inputs (VMEM) and HBM refs
    q_ref,  # [K, TQ * G, D]
    row_ref,  # [TQ * G, 3] int32 (seq, pos, valid)
    key_meta_ref,  # [3, Tp] int32 (seq, pos, valid)
    k_new_hbm,  # [Tp * K, D]
    v_new_hbm,  # [Tp * K, D]
    *rest,
    n_segments,
    seg_sizes,
    kh,
    tq,
    g,
    bs,
    mb,
    npb,
    tk,
    scale,
    sliding_window,
    soft_cap,
):
    segs = rest[:n_segments]  # each [NB_i, L, 2, BS * K, D] in HBM
    out_ref, lse_ref = rest[n_segments : n_segments + 2]  # [K, TQ * G, D], [K, TQ * G, 1]
    pool_buf, new_buf, pool_sem, new_sem, qs_ref, m_ref, l_ref, acc_ref = rest[n_segments + 2 :]
    tile = pl.program_id(0)
    base = tile * tq
    kb = npb * bs
    layer = layer_ref[0]
    rows = row_ref[...]
    row_sid, row_pos, row_ok = rows[:, 0:1], rows[:, 1:2], rows[:, 2:3] != 0  # [TQ * G, 1] each

    qs_ref[...] = (q_ref[...].astype(jnp.float32) * scale).astype(qs_ref.dtype)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update(hd, s, v):
        """One online-softmax step for KV head `hd`: masked scores `s` [R, N] (-inf off), values `v` [N, D]."""
        m_prev = m_ref[hd]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe)  # exp(-inf) = 0 on masked entries
        l_ref[hd] = alpha * l_ref[hd] + jnp.sum(p, axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_ref[hd] = alpha * acc_ref[hd] + pv
        m_ref[hd] = m_new

    def scores(hd, k):
        s = jax.lax.dot_general(
            qs_ref[hd], k.astype(qs_ref.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)  # q is already scaled

    def run_phase(total, off_ref, slot_of, start, wait_and_compute):
        """Walk the tile's `total` items of one phase, item n+1's DMAs in flight while item n computes.
        `slot_of(j, n)` gives item n's arguments from its work slot j; the slot advances when n reaches the
        next slot's offset (slots with items are contiguous after compaction, empty ones have offset total)."""

        def off_end(j):
            return jnp.where(j + 1 < tq, off_ref[base + jnp.minimum(j + 1, tq - 1)], total)

        @pl.when(total > 0)
        def _():
            start(*slot_of(0, 0), 0)

            def body(n, j):
                buf = n % 2
                j_next = jnp.minimum(jnp.where(n + 1 >= off_end(j), j + 1, j), tq - 1)

                @pl.when(n + 1 < total)
                def _():
                    start(*slot_of(j_next, n + 1), 1 - buf)

                wait_and_compute(*slot_of(j, n), buf)
                return j_next

            jax.lax.fori_loop(0, total, body, jnp.int32(0))

    # ---- history phase: blocks of the paged pool ----
    def hist_slot(j, n):
        k = base + j
        return h_seq_ref[k], h_first_ref[k] + n - h_off_ref[k], h_lo_ref[k], h_hi_ref[k]

    def item_blocks(seq, grp, lo, hi):
        """(table entry jb of the item, is it needed, its global block id) for each block of a history item."""
        for jb in range(npb):
            e = grp * npb + jb
            needed = (e < mb) & (e * bs < hi) & ((e + 1) * bs > lo)
            yield jb, needed, tables_ref[seq * mb + jnp.minimum(e, mb - 1)]

    def hist_start(seq, grp, lo, hi, buf):
        for jb, needed, gid in item_blocks(seq, grp, lo, hi):
            for si, use, local in segment_sources(gid, seg_sizes):

                @pl.when(needed & use)
                def _(si=si, local=local, jb=jb):
                    pltpu.make_async_copy(segs[si].at[local, layer], pool_buf.at[buf, jb], pool_sem.at[buf]).start()

    def hist_compute(seq, grp, lo, hi, buf):
        for jb, needed, _ in item_blocks(seq, grp, lo, hi):

            @pl.when(needed)
            def _(jb=jb):
                # Every source of a block moves the same bytes into the same slot: wait with the base's shape.
                pltpu.make_async_copy(segs[0].at[0, layer], pool_buf.at[buf, jb], pool_sem.at[buf]).wait()

        key_pos = grp * kb + jax.lax.broadcasted_iota(jnp.int32, (1, kb), 1)  # [1, KB]
        mask = (row_sid == seq) & (key_pos >= lo) & (key_pos < hi)  # [R, KB]
        if sliding_window is not None:
            mask &= key_pos > row_pos - sliding_window
        col_pos = grp * kb + jax.lax.broadcasted_iota(jnp.int32, (kb, 1), 0)  # [KB, 1]
        fetched = (col_pos >= lo) & (col_pos < hi)  # unfetched VMEM may hold NaN: keep it out of P @ V
        for hd in range(kh):
            k = pool_buf[buf, :, 0, pl.ds(hd, bs, stride=kh), :].reshape(kb, -1)  # [KB, D]
            v = pool_buf[buf, :, 1, pl.ds(hd, bs, stride=kh), :].reshape(kb, -1)
            s = jnp.where(mask, scores(hd, k), -jnp.inf)
            update(hd, s, jnp.where(fetched, v, jnp.zeros_like(v)))

    run_phase(h_total_ref[tile], h_off_ref, hist_slot, hist_start, hist_compute)

    # ---- new-token phase: this step's own keys, same softmax state ----
    def new_slot(j, n):
        k = base + j
        return n_seq_ref[k], n_first_ref[k] + n - n_off_ref[k]

    def new_copies(chunk, buf):
        rows_ = pl.ds(chunk * (tk * kh), tk * kh)
        return (
            pltpu.make_async_copy(k_new_hbm.at[rows_], new_buf.at[buf, 0], new_sem.at[buf]),
            pltpu.make_async_copy(v_new_hbm.at[rows_], new_buf.at[buf, 1], new_sem.at[buf]),
        )

    def new_start(seq, chunk, buf):
        for cp in new_copies(chunk, buf):
            cp.start()

    def new_compute(seq, chunk, buf):
        for cp in new_copies(chunk, buf):
            cp.wait()
        meta = key_meta_ref[:, pl.ds(pl.multiple_of(chunk * tk, tk), tk)]  # [3, TK]
        k_sid, k_pos, k_ok = meta[0:1], meta[1:2], meta[2:3] != 0
        mask = (row_sid == seq) & (k_sid == seq) & k_ok & row_ok & (k_pos <= row_pos)  # [R, TK]
        if sliding_window is not None:
            mask &= k_pos > row_pos - sliding_window
        for hd in range(kh):
            k = new_buf[buf, 0, pl.ds(hd, tk, stride=kh), :]  # [TK, D]
            v = new_buf[buf, 1, pl.ds(hd, tk, stride=kh), :]
            update(hd, jnp.where(mask, scores(hd, k), -jnp.inf), v)

    run_phase(n_total_ref[tile], n_off_ref, new_slot, new_start, new_compute)

    # ---- finalise ----
    denom = l_ref[...]
    m = m_ref[...]
    safe = jnp.where(denom > 0, denom, 1.0)
    out_ref[...] = (acc_ref[...] / safe).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(denom > 0, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(safe), -jnp.inf)
