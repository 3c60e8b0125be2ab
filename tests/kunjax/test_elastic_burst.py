"""KunServe end to end on 8 CPU devices: a burst under a device budget drops weights, is served, and restores.

The device budget makes weights ~45% of each device's memory. A burst that needs about twice the free KV
capacity must trigger drops on its own (monitor + planner), every request must finish with greedy outputs equal
to the naive full-recompute oracle, the freed memory must be visible in the live arrays, the remote-attention
path must be used and drained by the exchange, and after the burst every group must restore with balanced books
and the per-device bytes back where they started.
"""

from __future__ import annotations

import random

import pytest

from kunjax.config import EngineConfig
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.executor.jax_executor import tree_bytes_per_device
from kunjax.memory import kv_block_bytes
from kunjax.sampling_params import SamplingParams
from sharding.reshard import live_bytes_per_device
from tests.helpers import SPLIT, fp32_weight_bytes, load_single_device_params, naive_greedy, write_tiny_model

BS = 8
KV_BLOCKS = 24  # per instance, from the budget below


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("split"), SPLIT, seed=3)


@pytest.fixture(scope="module")
def oracle_params(model_dir):
    return load_single_device_params(model_dir, SPLIT)


def burst_config() -> EngineConfig:
    weights = fp32_weight_bytes(SPLIT)
    device = int(weights / 0.45)  # weights are 45% of each device
    kv = KV_BLOCKS * kv_block_bytes(SPLIT, BS, "float32")
    return config_from_kwargs(num_instances=8, policy="kunserve", device_memory_bytes=device,
                              activation_reserve_bytes=device - weights - kv, block_size=BS, max_num_seqs=8,
                              max_num_batched_tokens=32, max_model_len=128, restore_window_steps=4, min_group_steps=4,
                              exchange_blocks_per_step=4, remote_rows=8)


def test_burst_drops_serves_every_request_and_restores(model_dir, oracle_params):
    ecfg = burst_config()
    eng = LLMEngine(model_dir, ecfg)
    eng.warmup()
    assert eng.executor.num_blocks == KV_BLOCKS
    weights = eng.executor.weight_bytes
    device_budget = ecfg.device_memory_bytes
    assert 0.40 < weights / device_budget < 0.50
    before = live_bytes_per_device()

    # The burst: prompts and outputs whose KV needs ~2x the instances' free capacity, all at once.
    rng = random.Random(7)
    capacity_tokens = 8 * (KV_BLOCKS - 1) * BS
    prompts, need = [], 0
    while need < 2 * capacity_tokens:
        p = [rng.randrange(1, SPLIT.vocab_size) for _ in range(rng.randint(24, 56))]
        prompts.append(p)
        need += len(p) + 40
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in prompts]
    outputs: dict[str, list[int]] = {}
    saw_group = False
    max_steps = 2000
    for _ in range(max_steps):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        eng.check_books()
        for g in eng.groups:
            saw_group = True
            # Freed memory is real: the group's arrays per device, measured from their shards.
            k = g.k
            arrays = eng.executor.group_arrays(g.uid)
            per_dev_weights = tree_bytes_per_device(arrays.params)
            assert per_dev_weights <= weights // k + 4 * SPLIT.hidden_size  # the final norm stays replicated
            assert tree_bytes_per_device(arrays.ext) == g.shape.num_ext * kv_block_bytes(SPLIT, BS, "float32") // k
            assert g.total_blocks > k * (KV_BLOCKS - 1)  # more KV than the members had
    else:
        pytest.fail("the burst did not finish")
    # Quiet time after the burst: the groups restore.
    opts = ecfg.policy_options
    for _ in range(opts.restore_window_steps + opts.min_group_steps + 8):
        if not eng.groups:
            break
        eng.step()
        eng.check_books()
    stats = eng.policy.stats()
    kinds = [e.kind for e in eng.policy.events]
    assert saw_group and stats["drops"] >= 1, kinds
    assert stats["restores"] == stats["drops"] and not eng.groups, kinds
    assert "exchange_done" in kinds and stats["remote_dependent"] == 0
    assert stats["blocks_exchanged"] > 0 and stats["remote_ticks"] > 0  # remote attention served stale rows
    assert all(u.k == 1 for u in eng.units.values()) and len(eng.units) == 8
    eng.check_books()
    assert live_bytes_per_device() == before  # nothing leaked, weights and pools back in place

    assert set(outputs) == set(ids)
    expected = naive_greedy(SPLIT, oracle_params, prompts, params.max_tokens)
    mismatched = [i for i, rid in enumerate(ids) if outputs[rid] != expected[i]]
    assert not mismatched, f"{len(mismatched)} of {len(ids)} requests differ from the oracle"
