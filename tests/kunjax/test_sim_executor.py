"""The engine on simulated time: the cost-model executor (no model, durations from a hardware profile) runs every
policy with the books balanced after every step, deterministically; the JAX executor with modelled time gives the
real tokens on the profiled device's schedule."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from kunjax.config import ConfigError
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.hardware import load_profile
from kunjax.model_shapes import model_shape
from kunjax.plan import Fuse, Split
from kunjax.policies.base import FuseUnits
from kunjax.sampling_params import SamplingParams
from tests.helpers import SPLIT, burst, load_single_device_params, naive_greedy, run_open_loop, write_tiny_model

H100 = load_profile("h100-sxm")
MODEL = dataclasses.replace(SPLIT, num_layers=8, eos_token_ids=(3,))
CONFIG = dict(num_instances=4, block_size=8, num_blocks=48, max_num_seqs=16, max_num_batched_tokens=128,
              max_model_len=128, min_token_bucket=16)
POLICY_OPTIONS = {"kunserve": dict(restore_window_steps=8, min_group_steps=4, kunserve_max_group=4,
                                   exchange_blocks_per_step=4)}


def fast_burst(n: int, seed: int) -> list[tuple[float, list[int], int]]:
    """`burst` within a millisecond: this tiny model's steps take well under one on the modelled H100."""
    return [(t / 1000, p, m) for t, p, m in burst(n, seed=seed, vocab=MODEL.vocab_size)]


def sim_engine(policy: str, **overrides) -> LLMEngine:
    cfg = config_from_kwargs(**{**CONFIG, "policy": policy, **POLICY_OPTIONS.get(policy, {}), **overrides})
    return LLMEngine(MODEL, cfg, executor="sim", profile=H100)


@pytest.mark.parametrize("policy", ["recompute", "swap", "migrate", "layerkv", "kunserve"])
def test_a_burst_under_every_policy_on_simulated_time(policy):
    """80 requests at once, about twice what 4 small pools hold: books after every step, every request ends at its
    max_tokens with no EOS, and simulated time moved by modelled durations only."""
    engine = sim_engine(policy)
    arrivals = fast_burst(80, seed=2)
    out = run_open_loop(engine, arrivals)
    assert [len(t) for t in out.values()] == [n for _, _, n in arrivals]
    assert not any(3 in t for t in out.values())
    assert engine.clock.now() > arrivals[-1][0] and engine.executor.time.ticks > 0
    if policy == "kunserve":
        kinds = [e.kind for e in engine.policy.events]
        assert kinds.count("drop") >= 1 and kinds.count("drop") == kinds.count("restore")


def test_the_same_run_twice_is_identical():
    def once():
        engine = sim_engine("kunserve")
        out = run_open_loop(engine, fast_burst(80, seed=9))
        events = [(e.kind, e.step, e.seconds, e.members) for e in engine.policy.events]
        return out, engine.clock.now(), events

    a, b = once(), once()
    assert a == b and a[2]


def test_the_cost_model_executor_never_builds_host_arrays_and_still_serves_logprobs(monkeypatch):
    """The executor reads each tick's counts (`TickWork`) only: the padded arrays (most of the host time of a
    simulated tick) are never built, even through drops and restores. A request asking for logprobs still gets
    its top-N (the sampled id first), and one that does not gets none."""
    import kunjax.unit as unit_mod

    def refuse(self):
        raise AssertionError("StepInputs built for an executor that does not read them")

    monkeypatch.setattr(unit_mod.ServingUnit, "tick_inputs", refuse)
    engine = sim_engine("kunserve")
    out = run_open_loop(engine, fast_burst(80, seed=5))
    assert len(out) == 80 and [e.kind for e in engine.policy.events].count("drop") >= 1
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, logprobs=3), request_id="lp")
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=4), request_id="plain")
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    lps = final["lp"].outputs[0].logprobs
    assert len(lps) == 4 and all(len(e) == 3 and next(iter(e)) == t
                                 for e, t in zip(lps, final["lp"].outputs[0].token_ids, strict=True))
    assert final["plain"].outputs[0].logprobs is None


def test_fuse_and_split_charge_the_cost_models_transition_time():
    engine = sim_engine("kunserve", num_instances=2, restore_window_steps=1, min_group_steps=1)
    cost, clock = engine.executor.cost, engine.clock
    t0 = clock.now()
    engine.transition(FuseUnits((0, 1), "test"))
    fuse = cost.transition_seconds(Fuse(2, (0, 1), engine.units[2].shape), 2)
    assert clock.now() - t0 == pytest.approx(fuse)
    for _ in range(50):
        engine.step()
        engine.check_books()
        if not engine.groups:
            break
    restore = [e.seconds for e in engine.policy.events if e.kind == "restore"]
    assert restore == [pytest.approx(cost.transition_seconds(Split(2, (0, 1)), 2))]


def test_a_70b_model_on_32_gpus_sizes_its_pools_from_the_profile():
    cfg = config_from_kwargs(num_instances=8, tp=4, dtype="bfloat16", max_num_seqs=64, max_num_batched_tokens=512,
                             max_model_len=4096)
    engine = LLMEngine(model_shape("llama-3-70b"), cfg, executor="sim", profile=H100)
    # 141 GB of weights over 4 GPUs leave about 37.5 GB of 85% of 80 GiB per GPU for KV, at 80 layers x K and V x
    # 2 of the 8 KV heads x 128 x 2 bytes = 81,920 bytes per token per GPU: about 4.6e5 tokens per instance
    tokens = engine.executor.num_blocks * 16
    assert 4.0e5 < tokens < 4.7e5
    out = run_open_loop(engine, [(0.0, list(range(1, 600)), 20), (0.01, list(range(5, 300)), 10)])
    assert [len(t) for t in out.values()] == [20, 10]
    assert 0.05 < engine.clock.now() < 1.0  # a 600-token prefill and 20 decode steps of a 70B model on TP4
    with pytest.raises(ConfigError, match="raise --tp"):
        LLMEngine(model_shape("llama-3-70b"), config_from_kwargs(tp=1, dtype="bfloat16"), executor="sim",
                  profile=H100)


def test_the_jax_executor_on_modelled_time_gives_real_tokens_on_the_profiles_schedule(tmp_path):
    model_dir = write_tiny_model(tmp_path, SPLIT, seed=3)
    params = load_single_device_params(model_dir, SPLIT)
    cfg = config_from_kwargs(num_instances=2, num_blocks=64, block_size=4, max_num_seqs=8,
                             max_num_batched_tokens=32, max_model_len=96)
    prompts = [[5, 9, 2, 44, 7], [3, 3, 8, 1, 90, 17, 6, 2], [11, 12]]

    def once():
        engine = LLMEngine(model_dir, cfg, devices=jax.devices()[:2], profile=H100,
                           time_shape=model_shape("llama-3-8b"))
        engine.warmup()
        out = run_open_loop(engine, [(0.1 * i, p, 12) for i, p in enumerate(prompts)])
        return list(out.values()), engine.clock.now()

    (tokens, t1), (_, t2) = once(), once()
    assert tokens == naive_greedy(SPLIT, params, prompts, 12)
    assert t1 == t2  # modelled, not measured: identical however loaded the machine is
    assert 12 * 0.005 < t1 < 1.0  # an 8B model's decode steps on an H100 (about 6 ms each), not the CPU's
    with pytest.raises(ConfigError, match="unknown executor"):
        LLMEngine(MODEL, cfg, executor="gpu-sim")
