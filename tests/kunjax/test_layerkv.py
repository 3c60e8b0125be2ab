"""`layerkv`: a request is admitted with only some layer groups on device when full admission does not fit, its
offloaded groups go through the host tier every step, it is promoted to whole blocks when they free up, the SLO
gate can refuse it, and an abort frees everything — with greedy outputs equal to the naive oracle and the books of
both tiers balanced after every step (DESIGN.md §5, §7, §10).

The scenario, on one instance of 16 blocks (4 reserved for staging, so 11 usable) of 4 tokens, 2 layer groups:
A (32-token prompt, 3 new tokens) holds 9 blocks once decoding; B (14-token prompt) arrives next and needs 4
whole blocks, but 2 blocks (4 slots) hold one of its two groups.
"""

from __future__ import annotations

import random

import jax
import pytest

from kunjax import SamplingParams
from kunjax.config import ConfigError
from kunjax.engine import LLMEngine, config_from_kwargs
from tests.helpers import TINY, load_single_device_params, naive_greedy, write_tiny_model

CONFIG = dict(num_instances=1, block_size=4, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=32,
              max_model_len=64, min_token_bucket=16, policy="layerkv", layerkv_layer_groups=2,
              layerkv_staging_blocks=4)
A = [(7 * i) % TINY.vocab_size + 1 for i in range(32)]
B = [(5 * i + 3) % TINY.vocab_size + 1 for i in range(14)]
A_PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
B_PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def expected(tiny_dir):
    params = load_single_device_params(tiny_dir, TINY)
    return naive_greedy(TINY, params, [A, B], A_PARAMS.max_tokens)[0], naive_greedy(TINY, params, [B], 6)[0]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    engine = LLMEngine(tiny_dir, config_from_kwargs(**CONFIG), devices=jax.devices()[6:7])
    engine.warmup()
    return engine


@pytest.fixture
def fresh(engine):
    """The shared engine, idle, with the policy's knobs and counters as configured."""
    rt = engine.policy
    rt.min_resident_groups, rt.tpot_slo_s = CONFIG.get("layerkv_min_resident_groups", 1), 1.0
    yield engine
    for rid in list(engine.requests):
        engine.abort(rid)
    engine.check_books()
    assert not engine.has_requests()


def serve(engine: LLMEngine, watch=None) -> dict[str, tuple[int, list[int]]]:
    """A at step 0, B after A's prefill; returns (step of the first token, tokens) per request, checking the books
    of both tiers after every step; `watch(step)` runs after each step. Nothing is cached when it starts: the same
    two prompts build the same memory pressure every time."""
    for unit in engine.units.values():
        unit.index.clear()
    engine.add_request(A, A_PARAMS, request_id="A")
    first: dict[str, int] = {}
    done: dict[str, list[int]] = {}
    for step in range(200):
        if step == 1:
            engine.add_request(B, B_PARAMS, request_id="B")
        for out in engine.step():
            first.setdefault(out.request_id, step)
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_books()
        if watch is not None:
            watch(step)
        if not engine.has_requests():
            break
    assert sorted(done) == ["A", "B"], "a request was lost"
    return {rid: (first[rid], done[rid]) for rid in done}


def test_partial_admission_gives_an_earlier_first_token_and_matches_the_oracle(fresh, expected):
    rt = fresh.policy
    before = rt.stats()
    layered_steps = []
    got = serve(fresh, lambda step: layered_steps.append(step) if rt.units[0].layered else None)
    stats = rt.stats()
    assert stats["partial_admissions"] - before["partial_admissions"] == 1
    assert got["A"][1] == expected[0] and got["B"][1] == expected[1]
    assert layered_steps and layered_steps[0] == got["B"][0] == 1, "B was admitted layered at once"
    # Offload and reload traffic: B's offloaded group (4 blocks of KV) went to host, and came back for its decodes.
    assert stats["slots_offloaded"] - before["slots_offloaded"] >= 4
    assert stats["slots_reloaded"] - before["slots_reloaded"] >= 4
    # Promoted to whole blocks once A finished: layered for a few steps only, and nothing left on the host.
    assert stats["promotions"] - before["promotions"] == 1
    assert layered_steps[-1] < got["B"][0] + 4
    assert stats["host_used"] == 0 and stats["layered"] == 0

    # The same requests without partial admission: B waits for A's blocks.
    rt.min_resident_groups = rt.num_groups
    waited = serve(fresh)
    assert waited["B"][1] == expected[1]
    assert waited["B"][0] > got["B"][0] + 1, f"TTFT in steps: {got['B'][0]} layered vs {waited['B'][0]} waiting"


def test_the_slo_gate_refuses_when_the_projected_step_time_is_over(fresh, expected):
    rt = fresh.policy
    if rt.model_time.project(4, 8) is None:
        serve(fresh)  # the step-time model learns from measured steps first
    assert rt.model_time.project(4, 8) > 0
    rt.tpot_slo_s = 1e-9  # any step is slower than this: a partial admission would break the running decodes' SLO
    before = rt.stats()
    got = serve(fresh)
    stats = rt.stats()
    assert stats["slo_refusals"] > before["slo_refusals"]
    assert stats["partial_admissions"] == before["partial_admissions"]
    assert got["B"][1] == expected[1]
    assert got["B"][0] > 2, "B queued until A's blocks were free"


def test_a_burst_parks_layered_requests_and_promotes_groups_with_oracle_outputs(fresh, tiny_dir):
    """Ten short requests, one a step: several are admitted layered, the staging region cannot hold all of them in
    one step (some are parked for a step), and offloaded groups move into freed slots."""
    rng = random.Random(5)
    prompts = [[rng.randrange(1, TINY.vocab_size) for _ in range(rng.randint(4, 20))] for _ in range(10)]
    expected = naive_greedy(TINY, load_single_device_params(tiny_dir, TINY), prompts, 8)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    before = fresh.policy.stats()
    ids, done = [], {}
    for step in range(500):
        if step < len(prompts):
            ids.append(fresh.add_request(prompts[step], params))
        for out in fresh.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        fresh.check_books()
        if not fresh.has_requests():
            break
    assert [done[i] for i in ids] == expected
    stats = fresh.policy.stats()
    for name in ("partial_admissions", "parks", "group_promotions", "promotions"):
        assert stats[name] > before[name], f"no {name} in the burst"


def test_aborting_a_partially_resident_request_frees_both_tiers(fresh):
    rt = fresh.policy
    hooks = rt.units[0]
    fresh.add_request(A, A_PARAMS, request_id="A")
    fresh.step()
    fresh.add_request(B, B_PARAMS, request_id="B")
    fresh.step()
    fresh.check_books()
    assert "B" in hooks.layered and rt.stats()["host_used"] > 0 and hooks.book.owner
    a_blocks = len(fresh.requests["A"].blocks)
    fresh.abort("B")
    fresh.check_books()
    assert not hooks.layered and not hooks.book.owner and not hooks.book.split
    assert rt.stats()["host_used"] == 0 and hooks.host_reserved == 0
    assert fresh.units[0].stages[0].num_used == a_blocks
    fresh.abort("A")
    fresh.check_books()
    assert fresh.units[0].stages[0].num_used == 0


def test_bad_layerkv_flags_are_named(tiny_dir):
    with pytest.raises(ConfigError, match="--layerkv-min-resident-groups"):
        config_from_kwargs(policy="layerkv", layerkv_layer_groups=2, layerkv_min_resident_groups=3)
    with pytest.raises(ConfigError, match="--layerkv-tpot-slo-s"):
        config_from_kwargs(policy="layerkv", layerkv_tpot_slo_s=0.0)
    with pytest.raises(ConfigError, match="--layerkv-staging-blocks"):
        config_from_kwargs(policy="layerkv", layerkv_staging_blocks=0)
    with pytest.raises(ConfigError, match="--layerkv-layer-groups"):
        LLMEngine(tiny_dir, config_from_kwargs(**{**CONFIG, "layerkv_layer_groups": 3}), devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match="--layerkv-staging-blocks"):
        LLMEngine(tiny_dir, config_from_kwargs(**{**CONFIG, "layerkv_staging_blocks": 15}), devices=jax.devices()[:1])


def test_the_step_time_model_recovers_its_coefficients_and_follows_recent_steps():
    from kunjax.policies.layerkv import StepTimeModel

    m, rng = StepTimeModel(), random.Random(0)
    assert m.project(1, 1) is None  # nothing projected before min_obs steps
    for _ in range(100):
        t, r = rng.randint(1, 500), rng.randint(0, 50)
        m.observe(t, r, 0.002 + 1e-5 * t + 3e-4 * r)
    assert m.project(100, 10) == pytest.approx(0.002 + 1e-3 + 3e-3, rel=1e-6)
    for _ in range(200):  # the steps got twice as slow: the decayed fit forgets the old ones
        t, r = rng.randint(1, 500), rng.randint(0, 50)
        m.observe(t, r, 2 * (0.002 + 1e-5 * t + 3e-4 * r))
    assert m.project(100, 10) == pytest.approx(2 * 0.006, rel=1e-6)
