"""Prefix transfers between replicas (`kunjax.transfers`, `--prefix-transfer-blocks`): a prompt prefix cached on
one replica is copied to the replica that admits the request instead of being recomputed there.

Oracles: the arithmetic executor's formula (a wrong or missing copy changes the tokens), the books after every
step, the naive full-recompute loop for the real model, and the cost comparison against its two sides.
"""

from __future__ import annotations

import dataclasses
import random

import jax

from kunjax.checkpoint import load_config
from kunjax.cost_model import CostModel
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.hardware import load_profile
from kunjax.model_shapes import model_shape
from kunjax.sampling_params import SamplingParams
from kunjax.transfers import PrefixPuller
from tests.helpers import SPLIT, load_single_device_params, naive_greedy, one_at_a_time, run_open_loop, write_tiny_model

MODEL = dataclasses.replace(SPLIT, num_layers=8)
CONFIG = dict(num_instances=4, block_size=8, num_blocks=200, max_num_seqs=16, max_num_batched_tokens=128,
              max_model_len=128, min_token_bucket=16, enable_prefix_caching=True, routing="least-load")


def families(n: int, seed: int) -> list[tuple[float, list[int], int]]:
    """`n` requests within a second, each one of 3 shared 48-token prefixes plus its own 4-20 tokens."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, MODEL.vocab_size) for _ in range(48)] for _ in range(3)]
    return sorted((rng.random(), rng.choice(prefixes) + [rng.randrange(1, MODEL.vocab_size)
                                                         for _ in range(rng.randint(4, 20))], rng.randint(4, 12))
                  for _ in range(n))


def run(transfer_blocks: int, arrivals):
    eng = LLMEngine(MODEL, config_from_kwargs(prefix_transfer_blocks=transfer_blocks, **CONFIG), executor="arith")
    eng.warmup()
    hits = {}
    add = eng.add_request

    def counting(prompt, params=None, request_id=None, **kw):
        rid = add(prompt, params, request_id, **kw)
        hits[rid] = eng.requests[rid]
        return rid

    eng.add_request = counting
    out = run_open_loop(eng, arrivals)
    return eng, out, sum(r.num_cached_tokens for r in hits.values())


def test_a_prefix_cached_elsewhere_is_copied_not_recomputed_and_no_token_changes():
    arrivals = families(120, seed=5)
    base, out_base, cached_base = run(0, arrivals)
    eng, out, cached_tokens = run(1, arrivals)
    expected = [eng.executor.expected_greedy(p, n) for _, p, n in arrivals]
    assert list(out.values()) == expected, "a copied prefix changed the tokens"
    assert list(out_base.values()) == expected
    stats = eng.puller.stats()
    assert stats["prefix_pulls"] > 0 and stats["prefix_blocks_pulled"] >= stats["prefix_pulls"]
    assert base.puller is None
    assert cached_tokens > cached_base, (cached_tokens, cached_base)
    assert all(a.num_used == 0 for u in eng.units.values() for a in u.stages)


def test_the_copy_is_taken_only_when_cheaper_than_recomputing():
    cfg = model_shape("llama-3-8b")
    h100 = load_profile("h100")
    slow_link = dataclasses.replace(h100, link_bytes_per_s=1e6, network_bytes_per_s=1e6)

    class Unit:
        def __init__(self, i):
            self.members = (i,)

    for profile, cheaper in ((h100, True), (slow_link, False)):
        puller = PrefixPuller(None, list, 16, cost=CostModel(cfg, profile, dtype="bfloat16", tp=1, block_size=16))
        assert puller._cheaper(Unit(0), Unit(1), 8) is cheaper, profile.name


def test_the_real_model_reads_a_copied_prefix_exactly(tmp_path):
    path = write_tiny_model(tmp_path)
    cfg = load_config(path)
    eng = LLMEngine(path, config_from_kwargs(num_instances=2, block_size=8, num_blocks=64, max_num_seqs=4,
                                             max_num_batched_tokens=64, max_model_len=128, enable_prefix_caching=True,
                                             routing="least-load", prefix_transfer_blocks=1),
                    devices=jax.devices()[:2])
    eng.warmup()
    rng = random.Random(3)
    prefix = [rng.randrange(1, cfg.vocab_size) for _ in range(40)]
    prompts = [prefix + [5, 6, 7], prefix + [9, 10, 11, 12]]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs, cached_tokens = one_at_a_time(eng, prompts, greedy, targets=[0, 1])
    assert cached_tokens == [0, 40], cached_tokens  # the second, on instance 1, got instance 0's 5 blocks
    assert eng.puller.stats()["prefix_blocks_pulled"] == 5
    assert outputs == naive_greedy(cfg, load_single_device_params(path, cfg), prompts, 12)


def test_a_prefix_spilled_to_another_replica_s_host_tier_is_pulled_through_it(tmp_path):
    """Instance 0 computes a prefix, fillers push it to its host tier; a request on instance 1 pulls it from
    there (a `SwapIn` from instance 0's host, which keeps its copy) instead of recomputing it."""
    path = write_tiny_model(tmp_path)
    cfg = load_config(path)
    eng = LLMEngine(path, config_from_kwargs(num_instances=2, block_size=8, num_blocks=24, max_num_seqs=4,
                                             max_num_batched_tokens=64, max_model_len=128, routing="least-load",
                                             prefix_transfer_blocks=1),
                    devices=jax.devices()[:2])
    eng.warmup()
    rng = random.Random(11)
    prefix = [rng.randrange(1, cfg.vocab_size) for _ in range(40)]
    fillers = [[rng.randrange(1, cfg.vocab_size) for _ in range(60)] for _ in range(3)]
    prompts = [prefix + [5, 6, 7], *fillers, prefix + [9, 10, 11, 12]]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs, cached_tokens = one_at_a_time(eng, prompts, greedy, targets=[0, 0, 0, 0, 1])
    stats = eng.puller.stats()
    assert eng.hostcache.stats()["cache_blocks_spilled"] >= 5
    assert cached_tokens[-1] == 40 and stats["prefix_blocks_pulled_from_host"] == 5, (cached_tokens, stats)
    assert eng.hostcache.stats()["cache_host_blocks"] >= 5  # instance 0 kept its copies
    assert outputs == naive_greedy(cfg, load_single_device_params(path, cfg), prompts, 8)
