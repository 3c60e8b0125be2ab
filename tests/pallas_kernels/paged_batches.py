"""Random ragged paged-attention batches and the parity check shared by the kernel tests (TPU and GPU).

A batch is a step of five sequences: cached lengths that are not multiples of the block size (zero included),
a prefill chunk, decodes, a sequence of the table with no token in the step, two padding rows, block tables with
garbage past each sequence's blocks, and a pool that may be split in a base and an extension segment.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

FP32_RTOL = 1e-5  # relative, on out and lse; TPU kernel measured <= 4.3e-7 (out), 1.5e-6 (lse)
BF16_ATOL = 2e-2  # absolute on out (|out| <= ~3; bf16 matmul inputs vs fp32 reference); TPU kernel: 7.8e-3


def make_batch(
    seed: int,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    segment_blocks: tuple[int, ...] = (48,),
    layers: int = 2,
    dtype=jnp.float32,
    shuffle: bool = False,
    new_tokens: tuple[int, ...] = (5, 1, 1, 7, 1),
):
    """A random ragged step: returns (args for paged_attention, dict of per-sequence facts)."""
    rng = np.random.default_rng(seed)
    n_seqs, max_blocks = 5, 6
    # Cached lengths: empty, short, a block-size multiple, ragged, long; new tokens: chunk, decode, none.
    ctx = np.array([0, 3, 2 * block_size, 4 * block_size + 3, 6 * block_size - 5], np.int32)
    new = np.array(new_tokens, np.int32)  # a chunk, decodes, a chunk, a decode
    ctx = rng.permutation(ctx)
    new[rng.integers(n_seqs)] = 0  # one sequence of the table has no token in this step
    nb = sum(segment_blocks)
    ids = rng.permutation(nb)[: n_seqs * max_blocks].reshape(n_seqs, max_blocks)
    tables = np.where(np.arange(max_blocks)[None] * block_size < ctx[:, None], ids, -7)  # garbage past the end
    rows = [(s, int(ctx[s]) + i) for s in range(n_seqs) for i in range(new[s])]
    if shuffle:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    empty_seq = int(np.flatnonzero(ctx == 0)[0])
    rows += [(empty_seq, 0), (empty_seq, 0)]  # padding rows: nothing to attend (out 0, lse -inf)
    t = len(rows)
    seq_ids = np.array([r[0] for r in rows], np.int32)
    positions = np.array([r[1] for r in rows], np.int32)
    valid = np.arange(t) < t - 2

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)

    pool = [normal(n, layers, 2, block_size, kv_heads, head_dim) for n in segment_blocks]
    args = (
        normal(t, heads, head_dim),
        normal(t, kv_heads, head_dim),
        normal(t, kv_heads, head_dim),
        pool[0] if len(pool) == 1 else pool,
        jnp.int32(layers - 1),
        jnp.asarray(tables, jnp.int32),
        jnp.asarray(ctx),
        jnp.asarray(seq_ids),
        jnp.asarray(positions),
        jnp.asarray(valid),
    )
    return args, {"ctx": ctx, "new": new}


def assert_parity(ref, got, *, rtol=FP32_RTOL, atol=0.0):
    """`got` matches `ref`: same shapes and dtypes, same empty rows (lse -inf), out within `atol + rtol * max|out|`,
    finite lse within `rtol` relative (plus `atol + rtol`)."""
    (ro, rl), (go, gl) = ref, got
    assert go.shape == ro.shape and go.dtype == ro.dtype
    assert gl.shape == rl.shape and gl.dtype == jnp.float32
    ro, go = np.asarray(ro, np.float32), np.asarray(go, np.float32)
    rl, gl = np.asarray(rl), np.asarray(gl)
    np.testing.assert_array_equal(np.isneginf(gl), np.isneginf(rl))
    scale_o = np.max(np.abs(ro))
    np.testing.assert_allclose(go, ro, rtol=0, atol=atol + rtol * scale_o)
    fin = np.isfinite(rl)
    # An lse near 0 is a log of a sum near 1: its error is absolute, so rtol also floors the absolute tolerance.
    np.testing.assert_allclose(gl[fin], rl[fin], rtol=rtol, atol=atol + rtol)
