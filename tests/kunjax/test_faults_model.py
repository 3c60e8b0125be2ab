"""Injected faults with the real model on 2 CPU devices: a drop and a restore that fail half-way through the
weights roll back bit-identically, and a failed tick or block copy in a group changes no output.

Oracles: the weights before the first drop (bit-identical after every rollback and restore) and the naive
full-recompute loop (greedy outputs token-identical whatever failed).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.memory import flatten_params
from kunjax.policies.base import FuseUnits
from tests.kunjax.test_elastic import GREEDY, model_dir, oracle, prompts_for, run_until_done, step  # noqa: F401

OPTIONS = dict(num_instances=2, policy="kunserve", num_blocks=64, block_size=4, max_num_seqs=8,
               max_num_batched_tokens=32, max_model_len=128, exchange_blocks_per_step=1, remote_rows=8,
               restore_window_steps=1000)  # transitions are driven by the tests


def engine_with(model_dir, spec: str) -> LLMEngine:  # noqa: F811
    eng = LLMEngine(model_dir, config_from_kwargs(faults=spec, **OPTIONS), devices=jax.devices()[:2])
    eng.warmup()
    return eng


def weights(eng) -> list[dict[str, np.ndarray]]:
    return [{p: np.array(a) for p, a in flatten_params(rep.params).items()} for rep in eng.executor.replicas]


def assert_same_weights(a, b) -> None:
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for p in ra:
            np.testing.assert_array_equal(ra[p], rb[p], err_msg=p)


def restore(eng, outputs) -> None:
    for g in eng.groups:
        eng.policy.begin_restore(g)
    for _ in range(100):
        if not eng.groups:
            return
        step(eng, outputs)
    pytest.fail("the group did not restore")


def test_a_drop_and_a_restore_failing_half_way_roll_back(model_dir, oracle):  # noqa: F811
    eng = engine_with(model_dir, "fuse:after=3,split:after=3")
    assert len(flatten_params(eng.executor.replicas[0].params)) > 3, "half-way needs more than 3 leaves"
    before = weights(eng)
    prompts = prompts_for(11, 6)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    outputs: dict[str, list[int]] = {}
    for _ in range(3):
        step(eng, outputs)

    assert eng.transition(FuseUnits((0, 1), "test")) is None, "the injected drop did not fail"
    assert not eng.groups and not eng.executor.groups
    assert_same_weights(weights(eng), before)
    assert [e.kind for e in eng.policy.events] == ["fuse_failed"]
    step(eng, outputs)
    eng.check_books()

    outcome = eng.transition(FuseUnits((0, 1), "test"))  # the fault fired once: this one goes through
    assert outcome is not None and eng.groups
    for _ in range(2):
        step(eng, outputs)
    restore(eng, outputs)  # the first restore fails half-way, the group serves on, the second one succeeds
    kinds = [e.kind for e in eng.policy.events]
    assert kinds.count("split_failed") == 1 and kinds[-1] == "restore", kinds
    assert eng.failures["split"] == 1
    assert_same_weights(weights(eng), before)
    run_until_done(eng, outputs)
    assert [outputs[i] for i in ids] == oracle(prompts)


def test_a_failed_tick_and_a_failed_exchange_copy_in_a_group_change_no_output(model_dir, oracle):  # noqa: F811
    eng = engine_with(model_dir, "copy:after=1,step@0:after=12")
    before = weights(eng)
    prompts = prompts_for(12, 8, lo=10, hi=30)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    outputs: dict[str, list[int]] = {}
    for _ in range(4):
        step(eng, outputs)
    eng.transition(FuseUnits((0, 1), "test"))  # running requests keep their history home: the exchange copies it
    for _ in range(12):
        step(eng, outputs)
    assert eng.failures["memory"] == 1 and eng.failures["step"] == 1, eng.failures
    restore(eng, outputs)
    run_until_done(eng, outputs)
    assert [outputs[i] for i in ids] == oracle(prompts)
    assert_same_weights(weights(eng), before)


def test_a_pool_lost_to_a_failed_step_is_remade_and_serving_goes_on(model_dir, oracle):  # noqa: F811
    """A real device failure can leave a unit's pool deleted (a donated input of the failed call): recovering the
    unit remakes it (`JaxExecutor.recover`), and its requests, recomputed, still give the oracle's tokens."""
    eng = engine_with(model_dir, "")
    prompts = prompts_for(13, 4)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    outputs: dict[str, list[int]] = {}
    for _ in range(3):
        step(eng, outputs)
    lost = next(u for u in eng.units.values() if u.running)
    eng.executor.replicas[lost.uid].pool.delete()  # what a failed donated call leaves behind
    eng._lose_unit(lost, "step", "test: the pool is gone")
    assert not eng.executor.replicas[lost.uid].pool.is_deleted()
    run_until_done(eng, outputs)
    assert [outputs[i] for i in ids] == oracle(prompts)
    assert eng.failures["step"] == 1
