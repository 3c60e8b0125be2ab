"""Injected faults (`kunjax.faults`) on the arithmetic executor: a failed tick, a block copy failing part-way
through the live exchange, a drop or restore that fails, a slow unit — under every policy that can meet them.

Oracle: the arithmetic executor's `expected_greedy` (a lost or garbled block changes the tokens), the books after
every step, and every request ending: with its correct tokens, or (retries spent) with an error.
"""

from __future__ import annotations

import dataclasses

import pytest

from kunjax import faults
from kunjax.config import ConfigError
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.executor.faulty import FaultyExecutor
from tests.helpers import SPLIT, burst, run_open_loop

MODEL = dataclasses.replace(SPLIT, num_layers=8)
CONFIG = dict(num_instances=8, block_size=8, num_blocks=48, max_num_seqs=16, max_num_batched_tokens=128,
              max_model_len=128, min_token_bucket=16)
KUNSERVE = dict(CONFIG, policy="kunserve", restore_window_steps=8, min_group_steps=4, kunserve_max_group=4,
                exchange_blocks_per_step=4)


def run(engine, arrivals):
    """Open loop on the virtual clock, books checked after every step; returns each request's final output."""
    finals: dict = {}
    ids = run_open_loop(engine, arrivals, finals=finals)
    return [finals[r] for r in ids]


def drain_groups(engine) -> None:
    for _ in range(500):
        if not engine.groups:
            return
        engine.step()
        engine.check_books()
    raise AssertionError("the groups never restored")


def engine_with(spec: str, **options) -> LLMEngine:
    eng = LLMEngine(MODEL, config_from_kwargs(faults=spec, **options), executor="arith")
    eng.warmup()
    return eng


def assert_oracle(engine, arrivals, outs) -> None:
    wrong = [o.request_id for (_, p, n), o in zip(arrivals, outs, strict=True)
             if o.outputs[0].token_ids != engine.executor.expected_greedy(p, n)]
    assert not wrong, f"{len(wrong)} requests differ from the oracle: {wrong[:5]}"


# ---- the spec -----------------------------------------------------------------------------------------------
def test_the_spec_names_points_instances_and_counts():
    got = faults.parse("step@1:after=20, copy:after=2:times=0,slow@3:seconds=0.25")
    assert [(f.point, f.instance, f.after, f.times, f.seconds) for f in got] == [
        ("step", 1, 20, 1, 0.0), ("copy", None, 2, 0, 0.0), ("slow", 3, 0, 1, 0.25)]
    assert faults.parse("") == []


@pytest.mark.parametrize("spec, message", [
    ("stpe", "unknown fault 'stpe'"), ("step:after=x", "bad fault 'step:after=x'"),
    ("step:every=2", "unknown option 'every=2'"), ("slow@1", "needs seconds=S > 0"),
    ("copy:times=-1", "must be >= 0")])
def test_a_bad_spec_is_refused_naming_the_flag(spec, message):
    with pytest.raises(ConfigError, match="--faults") as e:
        config_from_kwargs(faults=spec)
    assert message in str(e.value)


def test_the_environment_variable_is_read_when_the_option_is_empty(monkeypatch):
    monkeypatch.setenv(faults.ENV, "step@2")
    eng = engine_with("", **CONFIG)
    assert isinstance(eng.executor, FaultyExecutor)
    monkeypatch.setenv(faults.ENV, "nonsense")
    with pytest.raises(ConfigError, match="unknown fault"):
        LLMEngine(MODEL, config_from_kwargs(**CONFIG), executor="arith")
    monkeypatch.delenv(faults.ENV)
    assert not isinstance(LLMEngine(MODEL, config_from_kwargs(**CONFIG), executor="arith").executor,
                          FaultyExecutor), "no faults: no wrapper"


# ---- recovering -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["recompute", "swap", "migrate", "layerkv", "kunserve"])
def test_failed_ticks_are_recomputed_and_change_no_output(policy):
    options = KUNSERVE if policy == "kunserve" else dict(CONFIG, policy=policy)
    # twice on instance 1's unit (each request there fails at most --step-retries times), once more elsewhere
    eng = engine_with("step@1:after=10:times=2,step@5:after=20", **options)
    arrivals = burst(400, seed=7, vocab=MODEL.vocab_size)
    outs = run(eng, arrivals)
    assert len(eng.executor.injected) == 3 and eng.failures["step"] == 3
    assert all(o.outputs[0].finish_reason == "length" for o in outs), "a retry within the limit failed a request"
    assert_oracle(eng, arrivals, outs)
    drain_groups(eng)
    assert all(a.num_used == 0 for u in eng.units.values() for a in u.stages)


def test_a_request_whose_retries_are_spent_ends_with_an_error_and_the_rest_are_served():
    eng = engine_with("step@0:times=0", step_retries=1, **CONFIG)  # instance 0's ticks always fail
    arrivals = burst(80, seed=8, vocab=MODEL.vocab_size)
    outs = run(eng, arrivals)
    failed = [o for o in outs if o.outputs[0].finish_reason == "error"]
    served = [(a, o) for a, o in zip(arrivals, outs, strict=True) if o.outputs[0].finish_reason != "error"]
    assert failed and len(served) >= 60
    assert all("a device step failed" in o.error and "failed 2 times" in o.error for o in failed)
    assert all(o.outputs[0].token_ids == eng.executor.expected_greedy(p, n) for (_, p, n), o in served)
    assert all(a.num_used == 0 for u in eng.units.values() for a in u.stages)


def test_a_block_copy_failing_mid_exchange_recomputes_that_group_only():
    eng = engine_with("copy:after=1:times=2", **KUNSERVE)
    arrivals = burst(1000, seed=3, vocab=MODEL.vocab_size)
    outs = run(eng, arrivals)
    assert eng.failures["memory"] >= 2 and len(eng.executor.injected) == 2
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert_oracle(eng, arrivals, outs)
    drain_groups(eng)
    stats = eng.policy.stats()
    assert stats["drops"] >= 1 and stats["restores"] == stats["drops"]


def test_a_failed_drop_leaves_the_replicas_serving_and_a_later_one_succeeds():
    eng = engine_with("fuse", **KUNSERVE)
    arrivals = burst(1000, seed=3, vocab=MODEL.vocab_size)
    outs = run(eng, arrivals)
    kinds = [e.kind for e in eng.policy.events]
    assert kinds.count("fuse_failed") == 1 and eng.failures["fuse"] == 1
    assert_oracle(eng, arrivals, outs)
    drain_groups(eng)
    stats = eng.policy.stats()
    assert stats["drops"] >= 1 and stats["restores"] == stats["drops"], kinds


def test_a_failed_restore_keeps_the_group_serving_and_restores_later():
    eng = engine_with("split", **KUNSERVE)
    arrivals = burst(1000, seed=3, vocab=MODEL.vocab_size)
    outs = run(eng, arrivals)
    assert_oracle(eng, arrivals, outs)
    drain_groups(eng)
    kinds = [e.kind for e in eng.policy.events]
    assert kinds.count("split_failed") == 1 and eng.failures["split"] == 1, kinds
    stats = eng.policy.stats()
    assert stats["restores"] == stats["drops"] >= 1


def test_a_slow_unit_only_costs_time():
    fast = engine_with("", **CONFIG)
    slow = engine_with("slow@2:seconds=0.5:times=0", **CONFIG)
    arrivals = burst(100, seed=9, vocab=MODEL.vocab_size)
    outs_fast, outs_slow = run(fast, arrivals), run(slow, arrivals)
    assert_oracle(slow, arrivals, outs_slow)
    assert [o.outputs[0].token_ids for o in outs_fast] == [o.outputs[0].token_ids for o in outs_slow]
    assert slow.clock.now() > fast.clock.now() + 1.0, "the slow unit's ticks took no longer"
