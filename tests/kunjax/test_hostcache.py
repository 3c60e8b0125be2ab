"""Cached prefix blocks on the host tier (`kunjax.hostcache`): spilled under device pressure instead of dropped,
swapped back in on a hit when that is cheaper than recomputing, dropped first when the host tier needs room.

Oracles: the arithmetic executor's formula (a wrong or missing swap changes the tokens), the books of both tiers
after every step (`check_books` also matches the cache's host entries with the spilled nodes, and the router's
tree with every index), the naive full-recompute loop for the real model, and the cost comparison's two sides.
"""

from __future__ import annotations

import dataclasses
import random

import jax

from kunjax.checkpoint import load_config
from kunjax.cost_model import CostModel
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.hardware import load_profile
from kunjax.hostcache import HostCache
from kunjax.model_shapes import model_shape
from kunjax.sampling_params import SamplingParams
from tests.helpers import (
    SPLIT,
    burst,
    load_single_device_params,
    naive_greedy,
    one_at_a_time,
    run_open_loop,
    write_tiny_model,
)

MODEL = dataclasses.replace(SPLIT, num_layers=8)
# 2 replicas of 40 blocks; 10 prompt families of 6 blocks each do not fit the devices' caches together
CONFIG = dict(num_instances=2, block_size=8, num_blocks=40, max_num_seqs=8, max_num_batched_tokens=128,
              max_model_len=128, min_token_bucket=16, enable_prefix_caching=True)
H100 = load_profile("h100")
SLOW_HOST = dataclasses.replace(H100, host_bytes_per_s=1e5)
LLAMA_8B = model_shape("llama-3-8b")


def revisits(n: int, seed: int, families: int = 10) -> list[tuple[float, list[int], int]]:
    """`n` requests over `n / 4` seconds, each one of `families` 48-token prefixes plus its own 2-9 tokens, so
    every family comes back after the others have pushed it out of the device cache."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, MODEL.vocab_size) for _ in range(48)] for _ in range(families)]
    return [(i / 4, prefixes[(i * 7) % families] + [rng.randrange(1, MODEL.vocab_size)
                                                    for _ in range(rng.randint(2, 9))], rng.randint(2, 6))
            for i in range(n)]


def run(arrivals, profile=None, **options):
    eng = LLMEngine(MODEL, config_from_kwargs(**{**CONFIG, **options}), executor="arith", profile=profile,
                    time_shape=LLAMA_8B if profile is not None else None)
    eng.warmup()
    seen = []
    add = eng.add_request

    def counting(prompt, params=None, request_id=None, **kw):
        rid = add(prompt, params, request_id, **kw)
        seen.append(eng.requests[rid])
        return rid

    eng.add_request = counting
    out = run_open_loop(eng, arrivals)
    wrong = [rid for (_, p, n), (rid, toks) in zip(arrivals, out.items(), strict=True)
             if toks != eng.executor.expected_greedy(p, n)]
    assert not wrong, f"{len(wrong)} requests differ from the oracle: {wrong[:5]}"
    return eng, sum(r.num_cached_tokens for r in seen)


def test_evicted_prefixes_spill_to_the_host_and_come_back_without_changing_a_token():
    arrivals = revisits(80, seed=1)
    dropped, cached_dropped = run(arrivals, prefix_cache_host=False)
    eng, cached = run(arrivals)
    assert dropped.hostcache is None and not dropped.mempool.host
    s = eng.hostcache.stats()
    assert s["cache_blocks_spilled"] > 0 and s["cache_swap_ins"] > 0, s
    assert s["cache_blocks_swapped_in"] >= s["cache_swap_ins"]
    assert cached > cached_dropped, (cached, cached_dropped)  # the host tier served hits the device had dropped
    assert s["cache_host_blocks"] == sum(t.num_used for t in eng.mempool.host)
    assert all(a.num_used == 0 for u in eng.units.values() for a in u.stages)


def test_a_full_host_tier_drops_the_least_recently_spilled_leaves():
    block_bytes = 2 * MODEL.num_layers * MODEL.num_kv_heads * MODEL.head_dim * 4 * CONFIG["block_size"]
    eng, _ = run(revisits(80, seed=2), host_kv_bytes=24 * block_bytes)
    s = eng.hostcache.stats()
    assert all(t.total == 24 for t in eng.mempool.host)
    assert s["cache_host_dropped"] > 0 and s["cache_swap_ins"] > 0, s
    assert s["cache_host_blocks"] <= 48


def test_swap_in_is_taken_only_when_cheaper_than_recomputing():
    class Unit:
        members = (0,)

    for profile, cheaper in ((H100, True), (SLOW_HOST, False)):
        cache = HostCache(None, 16, CostModel(LLAMA_8B, profile, dtype="bfloat16", tp=1, block_size=16))
        assert cache._cheaper(Unit(), 8) is cheaper, profile.name
    assert HostCache(None, 16)._cheaper(Unit(), 8)  # no profile: the real model; a host copy beats recomputing

    arrivals = revisits(60, seed=3)
    taken, _ = run(arrivals, profile=H100)
    declined, _ = run(arrivals, profile=SLOW_HOST)
    assert taken.hostcache.stats()["cache_swap_ins"] > 0 and not taken.hostcache.stats()["cache_swap_ins_declined"]
    s = declined.hostcache.stats()
    assert s["cache_swap_ins"] == 0 and s["cache_swap_ins_declined"] > 0, s
    assert s["cache_host_dropped"] > 0  # the recomputed blocks replaced their host copies


def test_the_swap_policy_s_victims_take_the_host_room_from_cached_context():
    block_bytes = 2 * MODEL.num_layers * MODEL.num_kv_heads * MODEL.head_dim * 4 * CONFIG["block_size"]
    later = [(11 + t, p, n) for t, p, n in burst(40, seed=4, vocab=MODEL.vocab_size)]  # once the host is full
    eng, _ = run(revisits(40, seed=4) + later, policy="swap", num_blocks=16, host_kv_bytes=16 * block_bytes)
    s = eng.hostcache.stats()
    assert eng.policy.swap_outs > 0 and s["cache_blocks_spilled"] > 0, (eng.policy.swap_outs, s)
    assert eng.mempool.host_reclaimed > 0  # the host was full of cached context when a victim needed it


def test_spilled_nodes_are_parked_over_a_fuse_and_taken_back_at_the_restore():
    """The books (both tiers, parked entries included) hold after every step through drops and restores; the
    spilled nodes a replica had when it fused come back to its index when the pipeline splits."""
    later = [(40 + t, p, n) for t, p, n in revisits(40, seed=7, families=16)]  # after the restores
    eng, _ = run(revisits(120, seed=5, families=16) + burst(60, seed=6, vocab=MODEL.vocab_size) + later,
                 num_instances=4, policy="kunserve", restore_window_steps=8, min_group_steps=4,
                 kunserve_max_group=2, exchange_blocks_per_step=4)
    drops = [e for e in eng.policy.events if e.kind == "drop"]
    assert drops and sum(e.detail["spilled_blocks_parked"] for e in drops) > 0, [e.detail for e in drops]
    assert any(e.kind == "restore" for e in eng.policy.events) and not eng.groups
    s = eng.hostcache.stats()
    assert s["cache_host_kept_over_fuse"] > 0 and s["cache_host_parked"] == 0, s


def test_the_real_model_reads_a_swapped_in_prefix_exactly(tmp_path):
    path = write_tiny_model(tmp_path)
    cfg = load_config(path)
    eng = LLMEngine(path, config_from_kwargs(num_instances=1, block_size=8, num_blocks=24, max_num_seqs=4,
                                             max_num_batched_tokens=64, max_model_len=128, enable_prefix_caching=True),
                    devices=jax.devices()[:1])
    eng.warmup()
    rng = random.Random(7)
    prefix = [rng.randrange(1, cfg.vocab_size) for _ in range(40)]
    fillers = [[rng.randrange(1, cfg.vocab_size) for _ in range(60)] for _ in range(3)]
    prompts = [prefix + [5, 6, 7], *fillers, prefix + [9, 10, 11, 12]]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs, cached_tokens = one_at_a_time(eng, prompts, greedy)  # the fillers push the prefix's 5 blocks out
    s = eng.hostcache.stats()
    assert cached_tokens[-1] == 40 and s["cache_blocks_swapped_in"] == 5, (cached_tokens, s)
    assert outputs == naive_greedy(cfg, load_single_device_params(path, cfg), prompts, 8)


def test_a_failed_fuse_gives_the_replicas_their_spilled_nodes_back():
    eng = LLMEngine(MODEL, config_from_kwargs(**{**CONFIG, "policy": "kunserve", "faults": "fuse"}), executor="arith")
    eng.warmup()
    run_open_loop(eng, revisits(60, seed=8))
    before = {i: eng.units[i].index.num_host for i in (0, 1)}
    assert sum(before.values()) > 0
    assert eng.fuse((0, 1)) is None and eng.failures["fuse"] == 1
    assert {i: eng.units[i].index.num_host for i in (0, 1)} == before
    assert eng.hostcache.stats()["cache_host_parked"] == 0
    eng.check_books()
