"""Ragged paged attention as a Mosaic GPU (Hopper) Pallas kernel: same signature and semantics as `reference.py`.

What it owns: one Mosaic GPU kernel that streams the paged pool in place (TMA from HBM into shared memory, never
gathered into a dense array) and attends a ragged batch of prefill chunks and decodes, plus the jittable wrapper
that plans the work and merges split-context partials. It never writes the pool.

Structure
* Rows are sorted by (sequence, position) in the wrapper, so each sequence's rows are contiguous. A *tile* is up
  to `64 // G` consecutive rows of one sequence (G = H / K query heads per KV head); its `(token, group)` query
  rows are the M = 64 rows of one warpgroup MMA (wgmma), so the whole GQA group of a KV head is served by one
  program and each KV byte is read once per tile. Decode tiles use G of the 64 rows: decode is bound by HBM, and
  the idle MMA rows cost tensor-core time the stream leaves unused.
* Grid `(tiles, K, splits)` (a static bound on the tiles; empty ones write out 0 / lse -inf). A small work plan
  per program (int32, from O(T + S) integer ops in the wrapper) gives the tile's sequence, its history stages
  and the range of this step's new keys. With `splits > 1` (flash-decoding) the history stages are divided
  among the splits, each writes a partial (out, lse) in f32, and the wrapper merges them by log-sum-exp; the new
  keys go to the last split. By default `splits` gives about two programs per SM (decode batch 32 x 8 KV heads
  = 256 tiles x heads: 2 splits on 132 SMs), and at most one split per 4 stages of the longest history.
* One loop per program walks *stages*: `keys_per_stage` keys of the sequence, either history (that many
  consecutive block-table entries' blocks) or new keys (rows of this step's `k_new`/`v_new`, in the same online
  softmax: no second pass, no merge). Each pool block is its own TMA copy `pool[id, layer, k|v, :, head, :]`
  ([BS, D], rows strided by K * D) straight from the segment that holds the id (base-then-extension; ids in no
  segment are clipped into the base like `reference.gather_blocks`). `stages` slots rotate: stage i + stages is
  issued into slot i % stages as soon as stage i is consumed; one mbarrier per slot for K (plus the new keys'
  positions) and one for V, so QK starts before V lands. The block-table row is copied to SMEM while Q loads, so
  the issue path does no global loads.
* Per stage: S = Q K^T by wgmma (Q in registers, K transposed in SMEM, f32 accumulate), times `scale`, optional
  soft-cap `c * tanh(S / c)`, masks (history: `[max(context_start, pos - window + 1), context_len)` per row; new
  keys: same sequence, valid, causal, window), online softmax in registers, then P (in the pool dtype) V by
  wgmma. -inf masks with guards: a row that sees nothing gets out 0 and lse -inf, as the reference. Stages copy
  whole blocks (positions past the visible range come from clipped, finite ids and are masked), so no stale SMEM
  reaches an MMA.

Tile sizes (Hopper: 228 KiB SMEM per SM, at most 227 KiB per program; wgmma M = 64 per warpgroup; TMA boxes of
at most 256 rows, 128-byte swizzle)
* 64 query rows: the wgmma M granularity.
* `keys_per_stage` 64 (or BS if larger): N of the QK wgmma and K of the PV wgmma, which must be a multiple of
  one swizzle width of V rows (64 for bf16, D >= 64). A stage of K and V is 32 KiB at D = 128 in bf16: 4 blocks
  of 16 tokens, i.e. 8 copies of [16, 128] (16 TMA boxes after the swizzle split).
* `stages` 3: 96 KiB of K/V slots + the table row + barriers = 100 KiB at the benchmark shape (Q lives in
  registers; its SMEM is reused), so two programs fit per SM: six stages (~192 KiB) in flight or computing per
  SM, against the ~50 KiB that 25 GB/s per SM (3.35 TB/s / 132) times 1-2 us of HBM latency needs, and one
  program's prologue/epilogue overlaps the other's stream. Compute per stage (two 64 x 64 x 128 wgmmas, a
  64 x 64 softmax) is well under the ~1.3 us a stage takes to stream. First choices, to be profiled on H100.

Outside the kernel (O(T * H * D) or O(T + S), small next to the KV bytes): a sort of the rows, q/k_new/v_new
gathered into head-major `[K, rows, D]` (one copy each), the plan (`work [tiles, splits, 8]`, row metadata
`[tiles, 4, 64]`, key positions), the block tables padded to `[S, MB / 32, 32]`, and the output gathered back to
token order. With splits the partial outputs (f32, 64 rows per tile) are written and read once more and merged:
~4 MiB at decode batch 32 x 8 heads x 2 splits, against 256 MiB of KV per layer. The plan depends only on the
step's metadata (not on the layer), so XLA can hoist it out of a layer loop; on GPU its dozen small ops still
cost launches per call, which the decode benchmark should measure.

Limits
* Not yet run on GPU hardware. Validated on CPU by parity in GPU interpret mode and by lowering for CUDA
  (`lowering_platforms=('cuda',)`: Mosaic GPU's layout, wgmma, TMA and SMEM-size checks, not ptxas). In interpret
  mode the two matmuls are dots of the SMEM tiles, as jax 0.10's interpreter's wgmma takes neither transposed
  nor register operands, and `layout_cast` is skipped (that interpreter cannot run it; it changes no values);
  the TMA copies, barriers, plan, masks and softmax are interpreted as written. Program ids come from
  `lax.axis_index` because that interpreter returns 0 for `pl.program_id`.
* Served by the reference instead (decided statically in the wrapper): float32 pools on hardware (Hopper's
  tensor cores have no f32 mode; tf32 keeps 10 mantissa bits, too few for the 1e-5 parity, and Mosaic GPU's
  tf32 wgmma cannot transpose K; a bf16x3 split would need K/V re-written to SMEM per stage; interpret mode runs
  the kernel in f32 so the tests check its logic at 1e-5), block sizes that are not a multiple of 8 (the SMEM
  tile of a wgmma operand), rows of fewer than or not a multiple of 32 bytes (the smallest swizzle), and
  G > 64. Queries are cast to the pool dtype for the MMA.
* Prefill-heavy batches are correct but less tuned: a tile holds at most 64 / G tokens and re-reads its
  sequence's visible history, each tile reads its sequence's new keys up to its last row, and there is no warp
  specialisation or ping-pong of two consumer warpgroups as in FlashAttention 3. The table row in SMEM grows
  with the longest sequence (4 bytes per block: 16 KiB at 64K tokens of 16-token blocks, where two programs no
  longer fit per SM).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_attention import reference

ROWS = 64  # query rows per program: the wgmma M of one warpgroup
DEFAULT_KEYS_PER_STAGE = 64  # keys per pipeline stage (at least one block)
DEFAULT_STAGES = 3  # pipeline slots
TABLE_COLS = 32  # block-table rows are copied as [MBp / 32, 32] int32 (TMA boxes are at most 256 wide)
BIG = 1 << 30  # key position of an invalid key: never <= a row's position
H100_SMS = 132
GRID_NAMES = ("tile", "head", "split")

# Columns of the per-program work plan `[tiles, splits, WORK]`.
W_SEQ, W_QROW, W_HFIRST, W_NHIST, W_NNEW, W_KEY0, W_KEND = range(7)
WORK = 8  # one spare column keeps a program's row 32 bytes
# Rows of the per-tile row metadata `[tiles, 4, ROWS]`.
R_HLO, R_HHI, R_NLO, R_NHI = range(4)


def interpret_params():
    """GPU interpret-mode parameters (public as `plgpu.InterpretGPUParams` from jax 0.11)."""
    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    return cls()


def kernel_supported(dtype, block_size: int, head_dim: int, *, interpret: bool) -> bool:
    """Whether this kernel serves a pool of `dtype` with these block and head sizes (else: the reference)."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and not (interpret and dtype == jnp.float32):
        return False
    return block_size % 8 == 0 and (head_dim * dtype.itemsize) % 32 == 0


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
    keys_per_stage: int | None = None,  # default: max(BS, DEFAULT_KEYS_PER_STAGE)
    stages: int = DEFAULT_STAGES,
    num_splits: int | None = None,  # default: enough programs for ~2 waves of the SMs
    interpret=None,  # GPU interpret mode (`interpret_params()`, CPU tests); None on GPU
) -> tuple[jax.Array, jax.Array]:
    """Returns `(out [T, H, D] in q.dtype, lse [T, H] float32)`, as `reference.paged_attention`."""
    segments = (kv_pool,) if isinstance(kv_pool, jax.Array) else tuple(kv_pool)
    t, h, d = q.shape
    kh = k_new.shape[1]
    g = h // kh
    n_seqs, mb = block_tables.shape
    n_layers, bs = segments[0].shape[1], segments[0].shape[3]
    dtype = segments[0].dtype
    if not kernel_supported(dtype, bs, d, interpret=interpret is not None) or g > ROWS:
        return reference.paged_attention(q, k_new, v_new, kv_pool, layer, block_tables, context_lens, seq_ids,
                                         positions, valid, scale=scale, sliding_window=sliding_window,
                                         context_starts=context_starts, soft_cap=soft_cap)
    bkv = keys_per_stage or max(bs, DEFAULT_KEYS_PER_STAGE)
    k_step = max(16, _swizzle(d * jnp.dtype(dtype).itemsize) // jnp.dtype(dtype).itemsize)
    if bkv % bs or bkv % k_step or bkv > 256:
        raise ValueError(f"keys_per_stage ({bkv}) must be a multiple of the block size ({bs}) and of {k_step} (the "
                         "P V wgmma's K step: one swizzle width of V rows), and at most 256 (a TMA box)")
    tq = ROWS // g  # tokens per tile
    nt = min(t, -(-t // tq) + min(n_seqs, t))  # static bound on the number of tiles
    max_stages = -(-(mb * bs) // bkv)
    if num_splits is None:
        num_splits = max(1, min(16, max_stages // 4, -(-2 * _num_sms() // (nt * kh))))
    ns = num_splits

    starts = jnp.zeros((n_seqs,), jnp.int32) if context_starts is None else context_starts.astype(jnp.int32)
    plan = _plan(seq_ids.astype(jnp.int32), positions.astype(jnp.int32), valid, context_lens.astype(jnp.int32),
                 starts, n_seqs=n_seqs, hist_end=mb * bs, bkv=bkv, g=g, tq=tq,
                 nt=nt, ns=ns, window=sliding_window)

    # Operands in the layouts the kernel copies from (see the module docstring for their cost).
    order = plan["order"]
    # Row counts are padded to whole 8-row SMEM tiles (a TMA source is tiled like its destination) and so that
    # the last tile's 64 query rows and the last stage's BKV new keys stay in bounds.
    q_rows = jnp.transpose(q[order].astype(dtype).reshape(t, kh, g, d), (1, 0, 2, 3)).reshape(kh, t * g, d)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, _round8(t * g + ROWS) - t * g), (0, 0)))  # [K, ~T * G + 64, D]
    kv_pad = ((0, 0), (0, _round8(t + bkv) - t), (0, 0))
    k_rows = jnp.pad(jnp.transpose(k_new[order].astype(dtype), (1, 0, 2)), kv_pad)  # [K, ~T + BKV, D]
    v_rows = jnp.pad(jnp.transpose(v_new[order].astype(dtype), (1, 0, 2)), kv_pad)
    mbp = -(-mb // TABLE_COLS) * TABLE_COLS
    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, mbp - mb)))
    tables = tables.reshape(n_seqs, mbp // TABLE_COLS, TABLE_COLS)  # [S, MBp / 32, 32]
    segs = tuple(s.reshape(s.shape[0] * n_layers * 2, bs, kh, d) for s in segments)  # [NB_i * L * 2, BS, K, D]
    seg_sizes = tuple(s.shape[0] for s in segments)

    out_dtype = jnp.float32 if ns > 1 else q.dtype
    kernel = functools.partial(
        _kernel, seg_sizes=seg_sizes, n_layers=n_layers, bs=bs, bkv=bkv, stages=stages, scale=scale,
        soft_cap=soft_cap, interpret=interpret is not None)
    out_p, lse_p = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((ns, kh, nt * ROWS, d), out_dtype),
            jax.ShapeDtypeStruct((ns, kh, nt * ROWS), jnp.float32),
        ),
        grid=(nt, kh, ns),
        grid_names=GRID_NAMES,
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), plan["work"], plan["rows"], tables, plan["key_pos"], q_rows, k_rows,
      v_rows, *segs)

    # Back to token order: query head j of sorted token i's group is output row tile_row[i] + j.
    rows = (plan["tile_row"][:, None] + jnp.arange(g, dtype=jnp.int32)[None, :]).reshape(-1)  # [T * G]
    out_p = out_p[:, :, rows].reshape(ns, kh, t, g, d)
    lse_p = lse_p[:, :, rows].reshape(ns, kh, t, g)
    if ns > 1:
        out_s, lse_s = reference.merge_attention_states(out_p.reshape(ns, kh, t * g, d),
                                                        lse_p.reshape(ns, kh, t * g))
    else:
        out_s, lse_s = out_p[0], lse_p[0]
    out_s = jnp.transpose(out_s.reshape(kh, t, g, d), (1, 0, 2, 3)).reshape(t, h, d)
    lse_s = jnp.transpose(lse_s.reshape(kh, t, g), (1, 0, 2)).reshape(t, h)
    inv = jnp.argsort(order)
    return out_s[inv].astype(q.dtype), lse_s[inv]


def _num_sms() -> int:
    for dev in jax.devices():
        if dev.platform == "gpu":
            return int(getattr(dev, "core_count", H100_SMS))
    return H100_SMS


def _plan(sid, pos, ok, lens, starts, *, n_seqs, hist_end, bkv, g, tq, nt, ns, window):
    """The work plan, as jittable int32 arrays: `work [NT, NS, WORK]`, `rows [NT, 4, ROWS]`, `key_pos [T + BKV]`,
    `tile_row [T]` (first output row of each sorted token) and `order [T]` (the sort of the rows)."""
    t = sid.shape[0]
    sid = jnp.clip(sid, 0, n_seqs - 1)  # like the reference's indexing of per-sequence arrays
    order = jnp.lexsort((pos, sid))
    s_sid, s_pos, s_ok = sid[order], pos[order], ok[order]
    idx = jnp.arange(t, dtype=jnp.int32)
    new_group = jnp.concatenate([jnp.ones((1,), bool), s_sid[1:] != s_sid[:-1]])
    group_start = jax.lax.cummax(jnp.where(new_group, idx, 0))
    rank = idx - group_start
    tile = jnp.cumsum((rank % tq == 0).astype(jnp.int32)) - 1  # [T] tile of each sorted row
    # Last sorted index of each run of equal (sequence, position): a tile's new keys end after its last row's run.
    run_last = jnp.concatenate([(s_sid[1:] != s_sid[:-1]) | (s_pos[1:] != s_pos[:-1]), jnp.ones((1,), bool)])
    run_end = jax.lax.cummin(jnp.where(run_last, idx, t), reverse=True)

    hist_lo = starts[s_sid]  # [T] first visible cached position of each row
    if window is not None:
        hist_lo = jnp.maximum(hist_lo, s_pos - window + 1)
    t_first = jax.ops.segment_min(idx, tile, num_segments=nt)  # empty tiles: int32 max
    t_last = jax.ops.segment_max(idx, tile, num_segments=nt)  # empty tiles: int32 min
    has = t_last >= 0
    t_first_c, t_last_c = jnp.clip(t_first, 0, t - 1), jnp.clip(t_last, 0, t - 1)
    t_seq = s_sid[t_first_c]
    t_lo = jax.ops.segment_min(hist_lo, tile, num_segments=nt)
    t_hi = jnp.minimum(lens[t_seq], hist_end)
    n_hist = jnp.where(has & (t_hi > t_lo), -(-t_hi // bkv) - t_lo // bkv, 0)
    key0 = group_start[t_first_c]
    kend = run_end[t_last_c] + 1
    any_ok = jax.ops.segment_max(s_ok.astype(jnp.int32), tile, num_segments=nt) > 0
    n_new = jnp.where(has & any_ok & (kend > key0), -(-(kend - key0) // bkv), 0)

    per = -(-n_hist // ns)  # [NT] history stages per split
    sp = jnp.arange(ns, dtype=jnp.int32)[None, :]
    cols = [None] * WORK
    cols[W_SEQ] = jnp.broadcast_to(t_seq[:, None], (nt, ns))
    cols[W_QROW] = jnp.broadcast_to((t_first_c * g)[:, None], (nt, ns))
    cols[W_HFIRST] = (t_lo // bkv)[:, None] + sp * per[:, None]
    cols[W_NHIST] = jnp.clip(n_hist[:, None] - sp * per[:, None], 0, per[:, None])
    cols[W_NNEW] = jnp.where(sp == ns - 1, n_new[:, None], 0)
    cols[W_KEY0] = jnp.broadcast_to(key0[:, None], (nt, ns))
    cols[W_KEND] = jnp.broadcast_to(kend[:, None], (nt, ns))
    work = jnp.stack([c.astype(jnp.int32) for c in cols[:W_KEND + 1]], axis=-1)  # [NT, NS, W_KEND + 1]
    work = jnp.pad(work, ((0, 0), (0, 0), (0, WORK - W_KEND - 1)))  # [NT, NS, WORK]

    # Row r of a tile is token r // G of it; rows past the tile's tokens see nothing.
    r = jnp.arange(ROWS, dtype=jnp.int32)
    tok = t_first_c[:, None] + r[None, :] // g  # [NT, ROWS]
    inside = has[:, None] & (r[None, :] < tq * g) & (tok <= t_last[:, None])
    tok = jnp.clip(tok, 0, t - 1)
    r_pos = s_pos[tok]
    rows = [None] * 4
    rows[R_HLO] = hist_lo[tok]
    rows[R_HHI] = jnp.where(inside, t_hi[:, None], 0)
    rows[R_NLO] = r_pos - window + 1 if window is not None else jnp.full_like(r_pos, -BIG)
    rows[R_NHI] = jnp.where(inside & s_ok[tok], r_pos + 1, 0)
    rows = jnp.stack(rows, axis=1).astype(jnp.int32)  # [NT, 4, ROWS]

    key_pos = jnp.pad(jnp.where(s_ok, s_pos, BIG), (0, _key_copy(bkv)), constant_values=BIG)  # [T + KPW]
    tile_row = tile * ROWS + (rank % tq) * g  # [T]
    return {"order": order, "work": work, "rows": rows, "key_pos": key_pos, "tile_row": tile_row}


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def _key_copy(bkv: int) -> int:
    """Key positions copied per stage: at least 32 int32, as a Mosaic GPU copy moves a multiple of 128 bytes."""
    return max(bkv, 32)


def _swizzle(row_bytes: int) -> int:
    return next(s for s in (128, 64, 32) if row_bytes % s == 0)


def _kernel(
    layer_ref,  # [1] int32
    work_ref,  # [NT, NS, WORK] int32
    rows_ref,  # [NT, 4, ROWS] int32
    tables_ref,  # [S, MBp / 32, 32] int32
    key_pos_ref,  # [T + BKV] int32
    q_ref,  # [K, T * G + ROWS, D]
    k_ref,  # [K, T + BKV, D]
    v_ref,  # [K, T + BKV, D]
    *rest,  # pool segments [NB_i * L * 2, BS, K, D], then out [NS, K, NT * ROWS, D], lse [NS, K, NT * ROWS]
    seg_sizes,
    n_layers,
    bs,
    bkv,
    stages,
    scale,
    soft_cap,
    interpret,
):
    n_seg = len(seg_sizes)
    segs = rest[:n_seg]
    out_ref, lse_ref = rest[n_seg:]
    # `lax.axis_index`, not `pl.program_id`: jax 0.10's GPU interpreter returns 0 for every program id.
    tile, head, split = (jax.lax.axis_index(name) for name in GRID_NAMES)
    d = q_ref.shape[-1]
    dtype = q_ref.dtype
    nbs = bkv // bs  # pool blocks per stage
    kpw = _key_copy(bkv)
    tab_shape = tables_ref.shape[1:]

    def lay(x, layout):
        return x if interpret else plgpu.layout_cast(x, layout)

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)

    def w(col):
        return work_ref[tile, split, col]

    seq, q_row, h_first, n_hist, n_new = w(W_SEQ), w(W_QROW), w(W_HFIRST), w(W_NHIST), w(W_NNEW)
    key0, kend, layer = w(W_KEY0), w(W_KEND), layer_ref[0]
    n_items = n_hist + n_new
    swz = _swizzle(d * jnp.dtype(dtype).itemsize)
    tr = (plgpu.TilingTransform((8, swz // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swz))

    def load_tile(q_smem, rows_smem, bar):
        """Q (into registers: it is the wgmma A operand) and the row metadata; their SMEM is freed after."""
        plgpu.copy_gmem_to_smem(q_ref.at[head, pl.ds(q_row, ROWS)], q_smem, bar.at[0])
        plgpu.copy_gmem_to_smem(rows_ref.at[tile], rows_smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        return (lay(q_smem[...], plgpu.Layout.WGMMA),
                *(lay(rows_smem[r], row_layout) for r in (R_HLO, R_HHI, R_NLO, R_NHI)))

    def stream(tab_smem, tab_bar):
        """The block-table row is copied while Q loads; Q's SMEM is reused by the K/V slots."""
        plgpu.copy_gmem_to_smem(tables_ref.at[seq], tab_smem, tab_bar.at[0])
        q_tile, h_lo, h_hi, n_lo, n_hi = pl.run_scoped(
            load_tile,
            plgpu.SMEM((ROWS, d), dtype, transforms=tr),
            plgpu.SMEM((4, ROWS), jnp.int32),
            plgpu.Barrier(num_arrivals=2, num_barriers=1),  # explicit: the default shape changed in jax 0.11
        )
        plgpu.barrier_wait(tab_bar.at[0])
        return pl.run_scoped(
            functools.partial(main, tab_smem, q_tile, h_lo, h_hi, n_lo, n_hi),
            plgpu.SMEM((stages, bkv, d), dtype, transforms=tr),  # K slots
            plgpu.SMEM((stages, bkv, d), dtype, transforms=tr),  # V slots
            plgpu.SMEM((stages, kpw), jnp.int32),  # new keys' positions (BKV of them used)
            plgpu.Barrier(num_arrivals=nbs + 1, num_barriers=stages),
            plgpu.Barrier(num_arrivals=nbs, num_barriers=stages),
        )

    def main(tab_smem, q_tile, h_lo, h_hi, n_lo, n_hi, k_smem, v_smem, kp_smem, k_bar, v_bar):

        def issue(i, slot):
            is_new = i >= n_hist
            k_dst, v_dst = k_smem.at[slot], v_smem.at[slot]

            @pl.when(jnp.logical_not(is_new))
            def _():
                base_e = (h_first + i) * nbs
                for j in range(nbs):
                    e = jnp.minimum(base_e + j, tab_shape[0] * tab_shape[1] - 1)
                    gid = tab_smem[e // tab_shape[1], e % tab_shape[1]]
                    # The segment that holds the id (base-then-extension); ids in none read the base, clipped.
                    sources, seg_base, in_later = [], seg_sizes[0], None
                    for si in range(1, n_seg):
                        local = gid - seg_base
                        inside = (local >= 0) & (local < seg_sizes[si])
                        sources.append((si, inside, jnp.clip(local, 0, seg_sizes[si] - 1)))
                        in_later = inside if in_later is None else in_later | inside
                        seg_base += seg_sizes[si]
                    base_ok = True if in_later is None else jnp.logical_not(in_later)
                    sources.insert(0, (0, base_ok, jnp.clip(gid, 0, seg_sizes[0] - 1)))
                    rows_ = pl.ds(j * bs, bs)
                    for si, use, local in sources:

                        def copy(si=si, local=local, rows_=rows_):
                            kv_row = (local * n_layers + layer) * 2
                            plgpu.copy_gmem_to_smem(segs[si].at[kv_row, :, head, :], k_dst.at[rows_], k_bar.at[slot])
                            plgpu.copy_gmem_to_smem(segs[si].at[kv_row + 1, :, head, :], v_dst.at[rows_],
                                                    v_bar.at[slot])

                        copy() if use is True else pl.when(use)(copy)

            @pl.when(is_new)
            def _():
                r0 = key0 + (i - n_hist) * bkv
                for j in range(nbs):
                    rows_ = pl.ds(j * bs, bs)
                    plgpu.copy_gmem_to_smem(k_ref.at[head, pl.ds(r0 + j * bs, bs)], k_dst.at[rows_], k_bar.at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[head, pl.ds(r0 + j * bs, bs)], v_dst.at[rows_], v_bar.at[slot])

            # The new keys' positions (history stages copy a dummy slice so every stage arrives the same number
            # of times on the K barrier).
            kp0 = jnp.where(is_new, key0 + (i - n_hist) * bkv, 0)
            plgpu.copy_gmem_to_smem(key_pos_ref.at[pl.ds(kp0, kpw)], kp_smem.at[slot], k_bar.at[slot])

        def prologue(i, carry):
            issue(i, i)
            return carry

        jax.lax.fori_loop(0, jnp.minimum(n_items, stages), prologue, 0)

        col = lay(jax.lax.broadcasted_iota(jnp.int32, (bkv,), 0), col_layout)

        def step(i, carry):
            acc, m_prev, l_prev = carry
            slot = jax.lax.rem(i, stages)
            is_new = i >= n_hist
            plgpu.barrier_wait(k_bar.at[slot])
            s = _qk(q_tile, k_smem.at[slot], interpret) * scale  # [ROWS, BKV] f32
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            # Key positions of this stage: history stages count up from the stage start; new keys carry their
            # own (BIG when invalid or past the sequence's range).
            kidx = key0 + (i - n_hist) * bkv + col
            kp_new = jnp.where(kidx < kend, lay(kp_smem[slot, pl.ds(0, bkv)], col_layout), BIG)
            kp = jnp.where(is_new, kp_new, (h_first + i) * bkv + col)
            lo = jnp.where(is_new, n_lo, h_lo)
            hi = jnp.where(is_new, n_hi, h_hi)
            kp2 = jax.lax.broadcast_in_dim(kp, s.shape, [1])
            mask = (kp2 >= jax.lax.broadcast_in_dim(lo, s.shape, [0])) & (kp2 < jax.lax.broadcast_in_dim(hi, s.shape,
                                                                                                          [0]))
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - jax.lax.broadcast_in_dim(m_safe, s.shape, [0]))  # exp(-inf) = 0 on masked keys
            l_new = alpha * l_prev + jnp.sum(p, axis=1)
            acc = acc * jax.lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(v_bar.at[slot])
            acc = _pv(acc, p.astype(dtype), v_smem.at[slot], interpret)

            @pl.when(i + stages < n_items)
            def _():
                issue(i + stages, slot)

            return acc, m_new, l_new

        acc0 = lay(jnp.zeros((ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
        m0 = lay(jnp.full((ROWS,), -jnp.inf, jnp.float32), row_layout)
        l0 = lay(jnp.zeros((ROWS,), jnp.float32), row_layout)
        return jax.lax.fori_loop(0, n_items, step, (acc0, m0, l0))

    acc, m, denom = pl.run_scoped(
        stream, plgpu.SMEM(tab_shape, jnp.int32), plgpu.Barrier(num_arrivals=1, num_barriers=1))
    safe = jnp.where(denom > 0, denom, 1.0)
    out = acc / jax.lax.broadcast_in_dim(safe, acc.shape, [0])
    lse = jnp.where(denom > 0, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(safe), -jnp.inf)

    def store(o_smem, l_smem):
        o_smem[...] = out.astype(o_smem.dtype)
        l_smem[...] = lse
        plgpu.commit_smem()
        rows_ = pl.ds(tile * ROWS, ROWS)
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[split, head, rows_])
        plgpu.copy_smem_to_gmem(l_smem, lse_ref.at[split, head, rows_])
        plgpu.wait_smem_to_gmem(0)

    o_swz = _swizzle(d * jnp.dtype(out_ref.dtype).itemsize)
    o_tr = (plgpu.TilingTransform((8, o_swz // jnp.dtype(out_ref.dtype).itemsize)), plgpu.SwizzleTransform(o_swz))
    pl.run_scoped(store, plgpu.SMEM((ROWS, d), out_ref.dtype, transforms=o_tr), plgpu.SMEM((ROWS,), jnp.float32))


def _qk(q, k_slot, interpret: bool) -> jax.Array:  # q [ROWS, D] (registers) x K [BKV, D] -> [ROWS, BKV] f32
    if interpret:
        return jax.lax.dot_general(q, k_slot[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def run(acc_ref):
        plgpu.wgmma(acc_ref, q, k_slot.transpose((1, 0)))
        return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC((q.shape[0], k_slot.shape[0]), jnp.float32))


def _pv(acc, p, v_slot, interpret: bool) -> jax.Array:  # [ROWS, D] f32 + [ROWS, BKV] @ [BKV, D]
    if interpret:
        return acc + jnp.dot(p, v_slot[...], preferred_element_type=jnp.float32)

    def run(acc_ref):
        plgpu.wgmma(acc_ref, p, v_slot)

    return pl.run_state(run)(plgpu.ACC.init(acc))


__all__ = ["interpret_params", "kernel_supported", "paged_attention"]
