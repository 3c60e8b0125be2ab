"""KV capacity: from the CPU byte budget, or from device memory stats on GPU/TPU."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest

from kunjax.config import EngineConfig
from kunjax.instance import kv_block_bytes, num_kv_blocks
from tests.helpers import TINY


@dataclasses.dataclass
class FakeDevice:
    """Stands in for a GPU whose allocator reports its limit (what `Device.memory_stats()` returns there)."""

    stats: dict | None

    def memory_stats(self):
        return self.stats


@dataclasses.dataclass
class FakeMesh:
    devices: object


def mesh_with(stats):
    import numpy as np

    return FakeMesh(np.array([FakeDevice(stats)], dtype=object))


def test_block_bytes_counts_all_layers_k_and_v_per_tp_shard():
    assert kv_block_bytes(TINY, 16, jnp.float32) == TINY.num_layers * 2 * 16 * TINY.num_kv_heads * TINY.head_dim * 4
    assert kv_block_bytes(TINY, 16, jnp.bfloat16, tp=2) == kv_block_bytes(TINY, 16, jnp.float32) // 4


def test_cpu_budget_decides_the_block_count():
    ecfg = EngineConfig(block_size=16, kv_cache_bytes=10 * kv_block_bytes(TINY, 16, jnp.float32) + 5)
    assert num_kv_blocks(TINY, ecfg, mesh_with(None), weight_bytes=123) == 10


def test_device_memory_stats_minus_weights_and_reserve():
    block = kv_block_bytes(TINY, 16, jnp.float32)
    limit = 2**30
    ecfg = EngineConfig(block_size=16, kv_memory_fraction=0.5)
    weights = 100 * 2**20
    n = num_kv_blocks(TINY, ecfg, mesh_with({"bytes_limit": limit}), weight_bytes=weights)
    assert n == (limit // 2 - weights - 256 * 2**20) // block


def test_a_budget_too_small_for_two_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="--kv-cache-bytes"):
        num_kv_blocks(TINY, EngineConfig(kv_cache_bytes=100), mesh_with(None), weight_bytes=0)
