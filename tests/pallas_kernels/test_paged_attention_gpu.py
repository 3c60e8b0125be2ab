"""The Mosaic GPU paged-attention kernel matches the pure-JAX reference in Pallas GPU interpret mode on CPU, and
lowers for CUDA (Mosaic GPU's layout, wgmma, TMA and shared-memory checks) at the benchmark and a prefill shape.

Batches (`paged_batches.make_batch`) are random and ragged: prefill chunks, decodes and padding rows of several
sequences, cached lengths that are not multiples of the block size (zero included), block tables with garbage
past each sequence's blocks, pools split in a base and an extension segment. Small pipeline settings (two slots,
stages of 32 keys, forced context splits) drive the slot-reuse and split-merge paths with few keys.
Interpreter failures look like hangs, hence the timeouts; interpret mode is slow, hence the small shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import gpu, reference
from tests.pallas_kernels.paged_batches import BF16_ATOL, assert_parity, make_batch

# Measured in interpret mode (the matmuls are dots of the SMEM tiles there): fp32 out <= 5.4e-7 absolute (2.4e-7
# of max |out|), lse <= 4.8e-7 absolute, against FP32_RTOL = 1e-5; bf16 (bf16 MMA inputs, P rounded to bf16
# before P V, out rounded to bf16 like the reference's) 7.8e-3 absolute on out (one bf16 rounding step at
# |out| ~ 2), 4.8e-7 on lse, against BF16_ATOL = 2e-2.
KERNEL_OPTS = ("keys_per_stage", "stages", "num_splits")


def run_both(args, *, scale, **kw):
    opts = {k: kw.pop(k) for k in KERNEL_OPTS if k in kw}
    ref = jax.jit(functools.partial(reference.paged_attention, scale=scale, **kw))
    ker = jax.jit(functools.partial(gpu.paged_attention, scale=scale, interpret=gpu.interpret_params(), **opts, **kw))
    return ref(*args), ker(*args)


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "opts"),
    [
        # GQA 1, two segments, shuffled rows, stages of four blocks cycling through two slots.
        (4, 4, 32, 8, {"segments": (20, 12), "shuffle": True, "keys_per_stage": 32, "stages": 2}),
        # GQA 4, soft-cap, the cached history split over three programs (one empty) and merged by log-sum-exp.
        (8, 2, 64, 8, {"soft_cap": 1.5, "num_splits": 3, "keys_per_stage": 32}),
        # GQA 8, a 19-token chunk spread over three tiles of 8 tokens, history restricted to [start, len) and
        # cut by a window.
        (8, 1, 32, 16, {"context_starts": True, "sliding_window": 20, "new_tokens": (5, 1, 1, 19, 1),
                        "num_splits": 2}),
    ],
)
def test_matches_reference_fp32(heads, kv_heads, head_dim, block_size, opts):
    kw = dict(opts)
    batch = {k: kw.pop(k) for k in ("shuffle", "new_tokens") if k in kw}
    args, facts = make_batch(heads * 10 + head_dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                             block_size=block_size, segment_blocks=kw.pop("segments", (48,)), **batch)
    if kw.pop("context_starts", False):
        kw["context_starts"] = jnp.asarray(facts["ctx"] // 2 + 1, jnp.int32)
    ref, got = run_both(args, scale=head_dim**-0.5, **kw)
    assert_parity(ref, got)
    # The two padding rows attend nothing.
    np.testing.assert_array_equal(np.asarray(got[0][-2:]), 0.0)
    assert np.all(np.isneginf(np.asarray(got[1][-2:])))


@pytest.mark.timeout(150)
def test_matches_reference_bf16_two_segments():
    args, _ = make_batch(3, heads=8, kv_heads=2, head_dim=64, block_size=16, dtype=jnp.bfloat16,
                         segment_blocks=(24, 24))
    ref, got = run_both(args, scale=0.125, sliding_window=40)
    assert got[0].dtype == jnp.bfloat16
    assert_parity(ref, got, rtol=0.0, atol=BF16_ATOL)


@pytest.mark.timeout(150)
def test_decode_only_batch():
    """One row per sequence (the decode case the kernel is built for), empty sequences included, default tiles."""
    args, _ = make_batch(11, heads=8, kv_heads=2, head_dim=32, block_size=16)
    q, k_new, v_new, pool, layer, tables, ctx, _, _, _ = args
    decode_seqs = jnp.asarray([4, 2, 0, 3], jnp.int32)
    sub = (q[:4], k_new[:4], v_new[:4], pool, layer, tables, ctx, decode_seqs, ctx[decode_seqs], jnp.ones(4, bool))
    assert_parity(*run_both(sub, scale=0.2))


def test_unsupported_layouts_fall_back_to_the_reference():
    """Block sizes off the 8-row SMEM tile (and fp32 pools on hardware) are served by the reference, exactly."""
    args, _ = make_batch(5, heads=4, kv_heads=2, head_dim=32, block_size=4)
    ref = reference.paged_attention(*args, scale=0.3)
    got = gpu.paged_attention(*args, scale=0.3, interpret=gpu.interpret_params())
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
    assert not gpu.kernel_supported(jnp.float32, 16, 128, interpret=False)
    assert gpu.kernel_supported(jnp.bfloat16, 16, 128, interpret=False)


def _lower_for_cuda(t: int, seqs: int, context: int, *, heads=32, kv_heads=8, head_dim=128, block_size=16) -> str:
    mb = context // block_size
    s = jax.ShapeDtypeStruct
    dt, i32 = jnp.bfloat16, jnp.int32
    block = (4, 2, block_size, kv_heads, head_dim)  # 4 layers
    args = (s((t, heads, head_dim), dt), s((t, kv_heads, head_dim), dt), s((t, kv_heads, head_dim), dt),
            [s((seqs * mb, *block), dt), s((64, *block), dt)],
            s((), i32), s((seqs, mb), i32), s((seqs,), i32), s((t,), i32), s((t,), i32), s((t,), jnp.bool_))
    fn = jax.jit(functools.partial(gpu.paged_attention, scale=head_dim**-0.5, sliding_window=4096, soft_cap=30.0))
    return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.timeout(120)
def test_lowers_for_cuda_at_the_decode_benchmark_shape(monkeypatch):
    """Decode batch 32 x context 2048, 8 KV heads, head dim 128, bf16, block size 16, two pool segments; within
    113 KiB of shared memory, so two programs fit on an H100 SM (228 KiB, 1 KiB reserved per program)."""
    from jax.experimental.mosaic.gpu import core as mgpu_core

    if hasattr(mgpu_core, "_SMEM_SIZE_BOUND"):  # a private knob of Mosaic GPU's SMEM check (jax 0.10)
        monkeypatch.setattr(mgpu_core, "_SMEM_SIZE_BOUND", 113 * 1024)
    assert "mosaic_gpu" in _lower_for_cuda(t=32, seqs=32, context=2048)


@pytest.mark.timeout(120)
def test_lowers_for_cuda_at_a_prefill_shape():
    """A 512-token step (chunks of up to 64 / G tokens per tile) over 4 sequences of up to 4096 cached tokens."""
    assert "mosaic_gpu" in _lower_for_cuda(t=512, seqs=4, context=4096)
