"""The whole engine on the arithmetic executor: every policy, drops, exchanges and restores, no model.

Oracle: the executor's own formula (`ArithmeticExecutor.expected_greedy`) gives each prompt's tokens when every
block is right; the engine's output must equal it while the books balance after every step. The sensitivity
tests show the oracle notices a wrong block table and a lost copy.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

import kunjax.unit as unit_mod
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.plan import DropHost, SwapIn, SwapOut
from kunjax.policies.base import FuseUnits
from kunjax.sampling_params import SamplingParams
from tests.helpers import SPLIT, burst, check_tick_work, run_open_loop

# 8 layers, so pipelines of 2, 4 and 8 stages split them evenly.
MODEL = dataclasses.replace(SPLIT, num_layers=8)


CONFIG = dict(num_instances=8, block_size=8, num_blocks=48, max_num_seqs=16, max_num_batched_tokens=128,
              max_model_len=128, min_token_bucket=16)
KUNSERVE = dict(CONFIG, policy="kunserve", restore_window_steps=8, min_group_steps=4, kunserve_max_group=4,
                exchange_blocks_per_step=4)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["serial", "overlapped"])
@pytest.mark.parametrize("policy", ["recompute", "swap", "migrate", "layerkv", "kunserve"])
def test_a_thousand_request_burst_under_every_policy(policy, async_scheduling):
    """Also: every tick's counts (`TickWork`, what the cost model charges) are what its arrays imply. Overlapped
    (`--async-scheduling`): the same tokens, the steps where a policy acts (preemption, swaps, a pipeline) run
    serially, the others overlapped."""
    options = KUNSERVE if policy == "kunserve" else dict(CONFIG, policy=policy)
    engine = LLMEngine(MODEL, config_from_kwargs(**options, async_scheduling=async_scheduling), executor="arith")
    engine.warmup()
    launch = engine.executor.launch

    def checked(uid, work, inputs):
        check_tick_work(work, inputs)
        return launch(uid, work, inputs)

    engine.executor.launch = checked
    arrivals = burst(1000, seed=3, vocab=MODEL.vocab_size)
    got = run_open_loop(engine, arrivals)
    assert len(got) == 1000, "a request was lost"
    expected = [engine.executor.expected_greedy(p, n) for _, p, n in arrivals]
    wrong = [i for i, (g, e) in enumerate(zip(got.values(), expected, strict=True)) if g != e]
    assert not wrong, f"{policy}: {len(wrong)} requests differ from the oracle, first {wrong[:5]}"
    assert sum(u.num_preemptions for u in engine.units.values()) > 0 or policy == "kunserve", "not overloaded"
    stats = engine.policy.stats()
    if policy == "swap":
        assert stats["swap_outs"] > 0 and stats["host_used"] == engine.hostcache.stats()["cache_host_blocks"]
    elif policy == "migrate":
        assert stats["migrations"] + stats["migrations_cancelled"] > 0
    elif policy == "layerkv":
        assert stats["partial_admissions"] > 0 and stats["host_used"] == 0
    elif policy == "kunserve":
        while engine.groups:  # idle steps: the restore window passes
            engine.step()
            engine.check_books()
        kinds = [e.kind for e in engine.policy.events]
        assert stats["drops"] >= 1 and engine.policy.stats()["restores"] == engine.policy.stats()["drops"], kinds
        assert engine.policy.stats()["blocks_exchanged"] > 0 and "exchange_done" in kinds
    assert engine.clock.now() > 1.0  # the virtual clock moved with the modelled steps
    if async_scheduling:
        ov = engine.overlap
        if policy in ("migrate", "layerkv"):  # never overlapped: the policy does not declare it safe
            assert ov.overlapped == 0 and ov.never is not None
        else:
            assert ov.overlapped > 0 and ov.reasons["a unit may have to preempt"] > 0, (ov.overlapped, ov.reasons)
            if policy == "kunserve":
                assert ov.reasons["a pipeline unit exists"] > 0
    assert all(a.num_used == 0 for u in engine.units.values() for a in u.stages)


def test_the_oracle_notices_a_wrong_block_table(monkeypatch):
    engine = LLMEngine(MODEL, config_from_kwargs(policy="recompute", **CONFIG), executor="arith")
    real = unit_mod.ServingUnit.tick_inputs

    def shifted(self):
        inp = real(self)
        inp.block_tables[:, :, 0] = inp.block_tables[:, :, 1]  # every sequence reads its second block first
        return inp

    monkeypatch.setattr(unit_mod.ServingUnit, "tick_inputs", shifted)
    arrivals = burst(20, seed=4, vocab=MODEL.vocab_size)
    got = run_open_loop(engine, arrivals)
    expected = [engine.executor.expected_greedy(p, n) for _, p, n in arrivals]
    assert sum(g != e for g, e in zip(got.values(), expected, strict=True)) > 10


def test_the_oracle_notices_a_lost_swap_in(monkeypatch):
    engine = LLMEngine(MODEL, config_from_kwargs(policy="swap", **{**CONFIG, "num_blocks": 12}), executor="arith")
    real = engine.executor.apply
    swapped_out: dict[str, tuple[int, ...]] = {}
    moved = []  # swap-ins whose blocks are not the ones the request left (so their data must really move)

    def without_swap_ins(ops):
        for op in ops:
            if isinstance(op, SwapOut):
                swapped_out[op.key] = op.blocks
            elif isinstance(op, SwapIn) and op.blocks != swapped_out[op.key]:
                moved.append(op.key)
        # The copy back is lost; only the host entry is dropped.
        real([DropHost(op.instance, op.key) if isinstance(op, SwapIn) else op for op in ops])

    monkeypatch.setattr(engine.executor, "apply", without_swap_ins)
    arrivals = burst(200, seed=5, vocab=MODEL.vocab_size)
    got = run_open_loop(engine, arrivals)
    expected = [engine.executor.expected_greedy(p, n) for _, p, n in arrivals]
    assert moved, "every swap-in happened to land in the blocks it left"
    assert sum(g != e for g, e in zip(got.values(), expected, strict=True)) > 0


def test_an_eight_stage_pipeline_with_remote_attention_the_exchange_and_a_restore():
    cfg = config_from_kwargs(**{**KUNSERVE, "kunserve_max_group": 8, "exchange_blocks_per_step": 1, "remote_rows": 4,
                                "restore_window_steps": 10_000})
    engine = LLMEngine(MODEL, cfg, executor="arith")
    arrivals = burst(120, seed=6, vocab=MODEL.vocab_size)
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
           for _, p, n in arrivals]
    out: dict[str, list[int]] = {}

    def step():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
        engine.check_books()

    for _ in range(3):
        step()
    for g in engine.groups:  # whatever the monitor fused on its own goes back first
        engine.policy.begin_restore(g)
    while engine.groups:
        step()
    unit = engine.units[engine.transition(FuseUnits(tuple(range(8)), "test")).unit]
    assert unit.k == 8 and unit.num_remote_dependent > 0
    while engine.requests:
        step()
    assert unit.remote_ticks > 0 and unit.blocks_exchanged > 0
    engine.policy.begin_restore(unit)
    while engine.groups:
        step()
    assert [out[i] for i in ids] == [engine.executor.expected_greedy(p, n) for _, p, n in arrivals]


def test_prefix_caching_across_a_drop_and_a_restore():
    """Prompts sharing prefixes in waves around a manual fuse and a restore: the replicas' cached blocks become the
    pipeline's (stale, then healed or exchanged), the pipeline's go home at the restore, every wave reuses them,
    and every output equals the oracle with the books balanced after every step."""
    cfg = config_from_kwargs(**{**KUNSERVE, "enable_prefix_caching": True, "num_instances": 2, "num_blocks": 400,
                                "restore_window_steps": 100_000})
    engine = LLMEngine(MODEL, cfg, executor="arith")
    rng = random.Random(1)
    heads = [[rng.randrange(1, MODEL.vocab_size) for _ in range(24)] for _ in range(5)]
    prompts: dict[str, tuple[list[int], int]] = {}
    out: dict[str, list[int]] = {}

    def wave(n: int) -> None:
        for _ in range(n):
            p = heads[rng.randrange(5)] + [rng.randrange(1, MODEL.vocab_size) for _ in range(rng.randint(1, 20))]
            m = rng.randint(4, 24)
            prompts[engine.add_request(p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))] = (p, m)

    def drain() -> None:
        while engine.has_requests():
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
            engine.check_books()

    wave(30)
    drain()
    assert not engine.groups and all(len(u.index) > 0 for u in engine.units.values())
    g = engine.units[engine.transition(FuseUnits((0, 1), "test")).unit]
    stale = sum(1 for n in g.index.nodes() if n.stale is not None)
    assert stale > 0 and stale == len(g.index)
    wave(30)
    drain()
    for _ in range(20):  # idle steps: the exchange moves what nobody healed
        engine.step()
    assert not any(n.stale is not None for n in g.index.nodes()) and g.index.hits > 0
    engine.policy.begin_restore(g)
    while engine.groups:
        engine.step()
        engine.check_books()
    restore = next(e for e in engine.policy.events if e.kind == "restore")
    assert restore.detail["cached_blocks_kept"] == sum(len(u.index) for u in engine.units.values()) > 0
    before = sum(u.index.hits for u in engine.units.values())
    wave(20)
    drain()
    assert sum(u.index.hits for u in engine.units.values()) > before
    assert {rid: out[rid] for rid in prompts} == {rid: engine.executor.expected_greedy(p, m)
                                                  for rid, (p, m) in prompts.items()}


def test_a_fuse_and_a_split_cost_modelled_time_on_the_virtual_clock():
    """A transition stops the engine: the arithmetic executor charges it on the virtual clock at once (a fixed
    cost; a split also gathers back the weights each device dropped), and the policy's events report that time,
    not the host's wall time."""
    cfg = config_from_kwargs(**{**KUNSERVE, "num_instances": 2, "restore_window_steps": 1, "min_group_steps": 1})
    engine = LLMEngine(MODEL, cfg, executor="arith")
    ex, clock = engine.executor, engine.clock
    t0 = clock.now()
    engine.transition(FuseUnits((0, 1), "test"))
    assert clock.now() - t0 == pytest.approx(ex.cost.transition_s)
    for _ in range(50):  # idle: the restore watch sees no demand and splits
        engine.step()
        engine.check_books()
        if not engine.groups:
            break
    assert not engine.groups
    drop, restore = [(e.kind, e.seconds) for e in engine.policy.events if e.kind in ("drop", "restore")]
    assert drop == ("drop", pytest.approx(ex.cost.transition_s))
    gathered = ex.weight_bytes / 2 * ex.cost.weight_byte_s
    assert gathered > 0 and restore == ("restore", pytest.approx(ex.cost.transition_s + gathered))
