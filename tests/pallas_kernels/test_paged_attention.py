"""The TPU paged-attention kernel matches the pure-JAX reference, run on CPU in Pallas TPU interpret mode.

Batches (`paged_batches.make_batch`) are random and ragged: prefill chunks, decodes and padding rows of several
sequences, cached lengths that are not multiples of the block size (zero included), block tables with garbage
past each sequence's blocks, and pools split in a base and an extension segment. Interpreter failures look like
hangs, hence the timeouts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention import reference, tpu
from tests.pallas_kernels.paged_batches import BF16_ATOL, assert_parity, make_batch


def run_both(args, *, scale, **kw):
    tiles = {k: kw.pop(k) for k in ("q_tile", "new_tile", "blocks_per_item") if k in kw}
    ref = jax.jit(functools.partial(reference.paged_attention, scale=scale, **kw))
    ker = jax.jit(functools.partial(tpu.paged_attention, scale=scale, interpret=pltpu.InterpretParams(), **tiles, **kw))
    return ref(*args), ker(*args)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "opts"),
    [
        (4, 4, 32, 4, {}),  # MHA, small blocks, history items of many blocks
        (8, 2, 64, 8, {"sliding_window": 6}),  # GQA 4, window cutting history and the chunk
        (8, 1, 128, 8, {"context_starts": True}),  # GQA 8 (MQA), history restricted to [start, len)
        (8, 2, 32, 8, {"soft_cap": 1.5, "sliding_window": 20}),  # logit soft-cap (|s| often > 1.5 here)
    ],
)
def test_matches_reference_fp32(heads, kv_heads, head_dim, block_size, opts):
    args, facts = make_batch(
        heads * 10 + head_dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size
    )
    kw = dict(opts)
    if kw.pop("context_starts", False):
        kw["context_starts"] = jnp.asarray(facts["ctx"] // 2 + 1, jnp.int32)
    ref, got = run_both(args, scale=head_dim**-0.5, q_tile=8, new_tile=8, blocks_per_item=2, **kw)
    assert_parity(ref, got)
    # The two padding rows attend nothing.
    np.testing.assert_array_equal(np.asarray(got[0][-2:]), 0.0)
    assert np.all(np.isneginf(np.asarray(got[1][-2:])))


@pytest.mark.timeout(120)
def test_two_segments_shuffled_rows_and_default_tiles():
    """Block ids index base-then-extension; rows of one sequence need not be adjacent; default tile sizes."""
    args, _ = make_batch(7, heads=8, kv_heads=2, head_dim=32, block_size=8, segment_blocks=(20, 12), shuffle=True)
    ref, got = run_both(args, scale=0.3, sliding_window=20)
    assert_parity(ref, got)


@pytest.mark.timeout(120)
def test_matches_reference_bf16():
    args, _ = make_batch(3, heads=8, kv_heads=2, head_dim=64, block_size=8, dtype=jnp.bfloat16, segment_blocks=(24, 24))
    ref, got = run_both(args, scale=0.125, q_tile=8, new_tile=8)
    assert got[0].dtype == jnp.bfloat16
    assert_parity(ref, got, rtol=0.0, atol=BF16_ATOL)


@pytest.mark.timeout(120)
def test_single_token_rows_and_all_padding():
    """Decode-only batch (one row per sequence), then a batch where every row is padding."""
    args, _ = make_batch(11, heads=4, kv_heads=1, head_dim=32, block_size=4)
    q, k_new, v_new, pool, layer, tables, ctx, _, _, _ = args
    decode_seqs = jnp.asarray([4, 2, 0, 3], jnp.int32)
    pos = ctx[decode_seqs]
    sub = (q[:4], k_new[:4], v_new[:4], pool, layer, tables, ctx, decode_seqs, pos, jnp.ones(4, bool))
    assert_parity(*run_both(sub, scale=0.2, q_tile=8, new_tile=8))

    empty = int(np.flatnonzero(np.asarray(ctx) == 0)[0])
    pad = (
        q[:3],
        k_new[:3],
        v_new[:3],
        pool,
        layer,
        tables,
        ctx,
        jnp.full(3, empty, jnp.int32),
        jnp.zeros(3, jnp.int32),
        jnp.zeros(3, bool),
    )
    ref, got = run_both(pad, scale=0.2, q_tile=8, new_tile=8)
    assert_parity(ref, got)
    np.testing.assert_array_equal(np.asarray(got[0]), 0.0)
    assert np.all(np.isneginf(np.asarray(got[1])))
