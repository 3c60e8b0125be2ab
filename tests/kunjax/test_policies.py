"""Every memory policy on the same tight pool: greedy outputs equal the naive oracle, no request is lost, and the
books of both tiers balance after every step (DESIGN.md §5, §7)."""

from __future__ import annotations

import random

import jax
import pytest

from kunjax import SamplingParams
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.request import RequestStatus
from tests.helpers import TINY, load_single_device_params, naive_greedy, write_tiny_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# Two instances whose pools hold ~2 of the 24 concurrent prompts' worth of KV each: every policy must act.
TIGHT = dict(num_instances=2, block_size=4, num_blocks=20, max_num_seqs=8, max_num_batched_tokens=32,
             max_model_len=64, min_token_bucket=8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def prompts_and_expected(tiny_dir):
    rng = random.Random(7)
    prompts = [[rng.randrange(1, TINY.vocab_size) for _ in range(rng.randint(8, 40))] for _ in range(24)]
    params = load_single_device_params(tiny_dir, TINY)
    return prompts, naive_greedy(TINY, params, prompts, GREEDY.max_tokens)


def make_engine(tiny_dir, policy: str, devices, **kw) -> LLMEngine:
    engine = LLMEngine(tiny_dir, config_from_kwargs(**{**TIGHT, "policy": policy, **kw}), devices=devices)
    engine.warmup()
    return engine


def run_checked(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, list[int]]:
    """Serve all prompts at once, checking both tiers' books after every step; returns outputs by request id."""
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    outputs: dict[str, list[int]] = {}
    for _ in range(5000):
        if not engine.has_requests():
            break
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.token_ids
        engine.check_books()
    assert sorted(outputs) == sorted(ids), "a request was lost"
    return [outputs[i] for i in ids]


@pytest.mark.parametrize("policy", ["recompute", "swap", "migrate", "layerkv"])
def test_every_policy_matches_the_oracle_with_balanced_books(tiny_dir, prompts_and_expected, policy):
    prompts, expected = prompts_and_expected
    engine = make_engine(tiny_dir, policy, jax.devices()[:2])
    got = run_checked(engine, prompts)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"{policy}: prompt {i} diverged from the oracle"
    assert sum(u.num_preemptions for u in engine.units.values()) > 0, "the pool was not tight"
    for u in engine.units.values():
        assert u.stages[0].num_used == 0
    if policy == "swap":
        stats = engine.mempool.stats()
        assert engine.policy.swap_outs > 0 and stats["blocks_swapped_in"] == stats["blocks_swapped_out"] > 0
        assert swapped_host_blocks(engine) == 0
    if policy == "layerkv":
        stats = engine.policy.stats()
        assert stats["partial_admissions"] > 0 and stats["slots_offloaded"] > 0, "no request was admitted layered"
        assert stats["host_used"] == 0 and stats["layered"] == 0


def test_swap_with_prefix_caching_keeps_shared_blocks_intact(tiny_dir):
    """Prompts that share 3-block prefixes: shared, refcounted blocks are copied out by swaps (their other holders
    keep them) and come back as private blocks, without corrupting anyone's KV or the books."""
    rng = random.Random(11)
    heads = [[rng.randrange(1, TINY.vocab_size) for _ in range(12)] for _ in range(3)]
    prompts = [heads[i % 3] + [rng.randrange(1, TINY.vocab_size) for _ in range(rng.randint(1, 24))]
               for i in range(24)]
    expected = naive_greedy(TINY, load_single_device_params(tiny_dir, TINY), prompts, GREEDY.max_tokens)
    engine = make_engine(tiny_dir, "swap", jax.devices()[:2], enable_prefix_caching=True)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    cached = {}
    while engine.has_requests():
        for out in engine.step():
            if out.finished:
                cached[out.request_id] = (out.token_ids, out.num_cached_tokens)
        engine.check_books()
    assert [cached[i][0] for i in ids] == expected
    assert sum(n for _, n in cached.values()) > 0, "no prefix was reused"
    assert engine.policy.stats()["swap_outs"] > 0
    assert sum(u.num_preemptions for u in engine.units.values()) > 0, "the pool was not tight"
    assert all(u.stages[0].num_used == 0 for u in engine.units.values())


def swapped_host_blocks(engine) -> int:
    """Host blocks the swap policy's victims hold (the host tier also keeps spilled prefix blocks)."""
    return engine.mempool.stats()["host_used"] - engine.hostcache.stats()["cache_host_blocks"]


def test_swap_falls_back_to_recompute_when_the_host_tier_is_full(tiny_dir, prompts_and_expected):
    prompts, expected = prompts_and_expected
    block_bytes = TINY.num_layers * 2 * 4 * TINY.num_kv_heads * TINY.head_dim * 4
    engine = make_engine(tiny_dir, "swap", jax.devices()[2:4], host_kv_bytes=3 * block_bytes,
                         swap_blocks_per_step=4)
    assert engine.mempool.host[0].total == 3
    assert run_checked(engine, prompts) == expected
    preemptions = sum(u.num_preemptions for u in engine.units.values())
    assert 0 < engine.policy.swap_outs < preemptions, "expected both swaps and recompute fallbacks"


def test_aborting_a_swapped_request_frees_its_host_blocks(tiny_dir, prompts_and_expected):
    prompts, _ = prompts_and_expected
    engine = make_engine(tiny_dir, "swap", jax.devices()[4:6])
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    swapped = None
    for _ in range(200):
        engine.step()
        swapped = next((r for u in engine.units.values() for r in u.swapped), None)
        if swapped is not None:
            break
    assert swapped is not None and swapped.status is RequestStatus.SWAPPED
    used = swapped_host_blocks(engine)
    engine.abort(swapped.request_id)
    assert swapped_host_blocks(engine) < used
    engine.check_books()
    for i in ids:
        engine.abort(i)
    engine.check_books()
    assert swapped_host_blocks(engine) == 0
    assert all(u.stages[0].num_used == 0 for u in engine.units.values())


def test_bad_policy_flags_are_named():
    from kunjax.config import ConfigError

    with pytest.raises(ConfigError, match="--host-kv-bytes"):
        config_from_kwargs(policy="swap", host_kv_bytes=0)
    with pytest.raises(ConfigError, match="--swap-blocks-per-step"):
        config_from_kwargs(policy="swap", swap_blocks_per_step=0)
    with pytest.raises(ConfigError, match="--policy"):
        config_from_kwargs(policy="lru")
