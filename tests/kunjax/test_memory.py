"""Memory arithmetic: KV capacity from the CPU byte budget or the device limit, weights per device, the drop's gain."""

from __future__ import annotations

import pytest

from kunjax.engine import config_from_kwargs
from kunjax.memory import extension_blocks, kv_block_bytes, num_kv_blocks, weight_bytes_per_device
from tests.helpers import SPLIT, TINY, fp32_weight_bytes


def test_block_bytes_counts_all_layers_k_and_v_per_tp_shard():
    assert kv_block_bytes(TINY, 16, "float32") == TINY.num_layers * 2 * 16 * TINY.num_kv_heads * TINY.head_dim * 4
    assert kv_block_bytes(TINY, 16, "bfloat16", tp=2) == kv_block_bytes(TINY, 16, "float32") // 4


def test_cpu_budget_decides_the_block_count():
    ecfg = config_from_kwargs(block_size=16, kv_cache_bytes=10 * kv_block_bytes(TINY, 16, "float32") + 5)
    assert num_kv_blocks(TINY, ecfg, weight_bytes=123, bytes_limit=None) == 10


def test_device_memory_stats_minus_weights_and_reserve():
    block = kv_block_bytes(TINY, 16, "float32")
    limit = 2**30
    ecfg = config_from_kwargs(block_size=16, kv_memory_fraction=0.5)
    weights = 100 * 2**20
    n = num_kv_blocks(TINY, ecfg, weight_bytes=weights, bytes_limit=limit)
    assert n == (limit // 2 - weights - 256 * 2**20) // block


def test_a_budget_too_small_for_two_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="--kv-cache-bytes"):
        num_kv_blocks(TINY, config_from_kwargs(kv_cache_bytes=100), weight_bytes=0, bytes_limit=None)


def test_weights_per_device_of_a_replica_and_of_a_stage():
    assert weight_bytes_per_device(SPLIT, "float32", tp=1) == fp32_weight_bytes(SPLIT)
    # A 2-stage group of a vocabulary both stages divide keeps half of every weight but the final norm.
    half = weight_bytes_per_device(SPLIT, "float32", tp=1, k=2)
    assert half == (fp32_weight_bytes(SPLIT) - 4 * SPLIT.hidden_size) // 2 + 4 * SPLIT.hidden_size
    assert weight_bytes_per_device(SPLIT, "float32", tp=2) < fp32_weight_bytes(SPLIT)


def test_the_extension_is_the_freed_weights_minus_the_activations_in_pipeline_blocks():
    ecfg = config_from_kwargs(block_size=4)
    freed = weight_bytes_per_device(SPLIT, "float32", 1) - weight_bytes_per_device(SPLIT, "float32", 1, k=2)
    acts = 32 * SPLIT.hidden_size * 4
    assert extension_blocks(SPLIT, ecfg, 2, 32) == (freed - acts) // (kv_block_bytes(SPLIT, 4, "float32") // 2)
    assert extension_blocks(SPLIT, ecfg, 3, 32) == 0  # 3 does not divide the 4 layers
