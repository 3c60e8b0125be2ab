"""The CPU paged-attention backend (`paged_attention/cpu.py`) matches the pure-JAX reference on random ragged
batches: prefill chunks, decodes, padding rows, ragged and empty histories, garbage past each table's blocks, two
pool segments, sliding windows, restricted history starts, soft caps; and with loop and chunk sizes that make
the history span several loop iterations and the rows several chunks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import cpu, reference
from tests.pallas_kernels.paged_batches import BF16_ATOL, assert_parity, make_batch


def run_both(args, *, scale, **kw):
    tiles = {k: kw.pop(k) for k in ("row_chunk", "blocks_per_step") if k in kw}
    ref = jax.jit(functools.partial(reference.paged_attention, scale=scale, **kw))
    got = jax.jit(functools.partial(cpu.paged_attention, scale=scale, **tiles, **kw))
    return ref(*args), got(*args)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "opts"),
    [
        (4, 4, 32, 4, {"blocks_per_step": 1, "row_chunk": 4}),  # MHA, one block a loop iteration, 4 row chunks
        (8, 2, 64, 8, {"sliding_window": 6, "blocks_per_step": 2}),  # GQA 4, window cutting history and chunk
        (8, 1, 128, 8, {"context_starts": True, "blocks_per_step": 4}),  # MQA, history restricted to [start, len)
        (8, 2, 32, 8, {"soft_cap": 1.5, "sliding_window": 20, "blocks_per_step": 5}),  # soft cap; 5 ∤ 6 columns
        (8, 2, 32, 4, {"blocks_per_step": 16, "row_chunk": 7}),  # one iteration covers the table; ragged chunks
    ],
)
def test_matches_reference_fp32(heads, kv_heads, head_dim, block_size, opts):
    args, facts = make_batch(heads * 10 + head_dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                             block_size=block_size)
    kw = dict(opts)
    if kw.pop("context_starts", False):
        kw["context_starts"] = jnp.asarray(facts["ctx"] // 2 + 1, jnp.int32)
    ref, got = run_both(args, scale=head_dim**-0.5, **kw)
    assert_parity(ref, got)
    np.testing.assert_array_equal(np.asarray(got[0][-2:]), 0.0)  # the padding rows attend nothing
    assert np.all(np.isneginf(np.asarray(got[1][-2:])))


def test_two_segments_shuffled_rows():
    """Block ids index base-then-extension; rows of one sequence need not be adjacent."""
    args, _ = make_batch(7, heads=8, kv_heads=2, head_dim=32, block_size=8, segment_blocks=(20, 12), shuffle=True)
    assert_parity(*run_both(args, scale=0.3, sliding_window=20, blocks_per_step=2, row_chunk=8))


def test_matches_reference_bf16():
    args, _ = make_batch(3, heads=8, kv_heads=2, head_dim=64, block_size=8, dtype=jnp.bfloat16,
                         segment_blocks=(24, 24))
    ref, got = run_both(args, scale=0.125, blocks_per_step=2)
    assert got[0].dtype == jnp.bfloat16
    assert_parity(ref, got, rtol=0.0, atol=BF16_ATOL)


def test_decode_rows_and_all_padding():
    """Decode-only batch (one row per sequence), then a batch where every row is padding (no loop iteration)."""
    args, _ = make_batch(11, heads=4, kv_heads=1, head_dim=32, block_size=4)
    q, k_new, v_new, pool, layer, tables, ctx, _, _, _ = args
    seqs = jnp.asarray([4, 2, 0, 3], jnp.int32)
    sub = (q[:4], k_new[:4], v_new[:4], pool, layer, tables, ctx, seqs, ctx[seqs], jnp.ones(4, bool))
    assert_parity(*run_both(sub, scale=0.2, blocks_per_step=3))
    empty = int(np.flatnonzero(np.asarray(ctx) == 0)[0])
    pad = (q[:3], k_new[:3], v_new[:3], pool, layer, tables, ctx, jnp.full(3, empty, jnp.int32),
           jnp.zeros(3, jnp.int32), jnp.zeros(3, bool))
    ref, got = run_both(pad, scale=0.2)
    assert_parity(ref, got)
    np.testing.assert_array_equal(np.asarray(got[0]), 0.0)
    assert np.all(np.isneginf(np.asarray(got[1])))


def test_rows_marked_invalid_still_attend_their_history():
    """`valid` masks this step's keys, not the rows: remote attention sends history-only rows with `valid` all
    False and new keys of zeros (`pallas_kernels.remote_attention`)."""
    args, facts = make_batch(5, heads=4, kv_heads=2, head_dim=32, block_size=4, segment_blocks=(30, 18))
    q, k_new, v_new, pool, layer, tables, ctx, _, _, _ = args
    n = len(facts["ctx"])
    rows = (q[:n], jnp.zeros_like(k_new[:n]), jnp.zeros_like(v_new[:n]), pool, layer, tables, ctx,
            jnp.arange(n, dtype=jnp.int32), ctx, jnp.zeros(n, bool))
    ref, got = run_both(rows, scale=0.2, blocks_per_step=2, row_chunk=2)
    assert_parity(ref, got)
    assert np.isfinite(np.asarray(got[1])).sum() == 4 * int((facts["ctx"] > 0).sum())  # every row with history
