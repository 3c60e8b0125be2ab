"""A replica's tick inputs built incrementally (`kunjax.packing.DecodeInputs`) equal the ones built fresh from the
micro-batch, over random steps with admissions, finishes, aborts, preemptions, block boundaries and cached blocks
shared at a boundary; and the vectorised micro-batch arrays equal the per-item definition."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

import kunjax.packing as packing
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.plan import StepInputs
from kunjax.sampling_params import SamplingParams
from kunjax.unit import ServingUnit
from tests.kunjax.test_arith_executor import MODEL

# One replica, small blocks (a boundary every 4 tokens), few of them (preemptions), prefix caching on.
OPTIONS = dict(num_instances=1, block_size=4, num_blocks=40, max_num_seqs=12, max_num_batched_tokens=64,
               max_model_len=96, min_token_bucket=16, policy="recompute", enable_prefix_caching=True)


def assert_same(got: StepInputs, want: StepInputs) -> None:
    for f in dataclasses.fields(StepInputs):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert a.shape == b.shape and a.dtype == b.dtype, f.name
        np.testing.assert_array_equal(a, b, err_msg=f.name)


@pytest.fixture
def checked_inputs(monkeypatch):
    """Every replica tick's inputs compared with a fresh build; returns counters of the paths taken."""
    seen = {"ticks": 0, "incremental": 0, "refreshed_rows": 0}
    tick_inputs, step_next = ServingUnit.tick_inputs, packing.DecodeInputs._next

    def checked(unit: ServingUnit) -> StepInputs:
        inp = tick_inputs(unit)
        assert_same(inp, unit._fresh_inputs())
        seen["ticks"] += 1
        return inp

    def counted(self, prev, mb, tables, lens):
        inp = step_next(self, prev, mb, tables, lens)
        if inp is not None:
            seen["incremental"] += 1
            seen["refreshed_rows"] += int((inp.block_tables != prev.block_tables).any(axis=-1).sum())
        return inp

    monkeypatch.setattr(ServingUnit, "tick_inputs", checked)
    monkeypatch.setattr(packing.DecodeInputs, "_next", counted)
    return seen


def drive(engine: LLMEngine, seed: int, steps: int = 400) -> dict[str, list[int]]:
    """Random arrivals (some prompts repeated, so equal blocks are computed twice and shared), random lengths,
    random aborts; returns the finished requests' tokens."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, MODEL.vocab_size) for _ in range(rng.randint(3, 30))] for _ in range(12)]
    out: dict[str, list[int]] = {}
    expected: dict[str, tuple[list[int], int]] = {}
    for _ in range(steps):
        if rng.random() < 0.3:
            for _ in range(rng.randint(1, 4)):
                prompt, n = rng.choice(prompts), rng.randint(1, 40)
                rid = engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
                expected[rid] = (prompt, n)
        running = [r for r in engine.requests if r not in out]
        if running and rng.random() < 0.03:
            rid = rng.choice(running)
            engine.abort(rid)
            expected.pop(rid)
        if engine.has_requests():
            for o in engine.step():
                if o.finished and o.request_id in expected:
                    out[o.request_id] = o.outputs[0].token_ids
            engine.check_books()
    while engine.has_requests():
        for o in engine.step():
            if o.finished and o.request_id in expected:
                out[o.request_id] = o.outputs[0].token_ids
    for rid, toks in out.items():  # and the tokens are the oracle's
        prompt, n = expected[rid]
        assert toks == engine.executor.expected_greedy(prompt, n), rid
    return out


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["serial", "overlapped"])
@pytest.mark.parametrize("seed", [0, 1])
def test_incremental_decode_inputs_equal_fresh_ones(checked_inputs, seed, async_scheduling):
    engine = LLMEngine(MODEL, config_from_kwargs(**OPTIONS, async_scheduling=async_scheduling), executor="arith")
    engine.warmup()
    finished = drive(engine, seed)
    assert len(finished) > 30
    unit = next(iter(engine.units.values()))
    assert unit.num_preemptions > 0, "not overloaded: no preemption was exercised"
    seen = checked_inputs
    assert seen["incremental"] > seen["ticks"] // 4, seen  # the fast path is what ran most decode ticks
    assert seen["refreshed_rows"] > 0, seen  # rows crossed block boundaries on the fast path


def test_the_comparison_notices_a_row_not_refreshed(checked_inputs, monkeypatch):
    """Sensitivity: an incremental build that forgot the rows entering a new block is caught."""
    monkeypatch.setattr(packing, "rows_to_refresh", lambda *args: np.zeros(0, np.int64))
    engine = LLMEngine(MODEL, config_from_kwargs(**OPTIONS), executor="arith")
    engine.warmup()
    with pytest.raises(AssertionError):
        drive(engine, 0)


def test_pack_microbatch_matches_the_per_item_definition():
    """Mixed prefill chunks and decodes: tokens, positions and rows as each item defines them."""
    engine = LLMEngine(MODEL, config_from_kwargs(**OPTIONS), executor="arith")
    rng = random.Random(5)
    for _ in range(6):
        engine.add_request([rng.randrange(1, MODEL.vocab_size) for _ in range(rng.randint(2, 20))],
                           SamplingParams(max_tokens=8, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05,
                                          seed=rng.randrange(100), min_tokens=2))
    unit = next(iter(engine.units.values()))
    for _ in range(6):
        mb = unit.schedule()
        if mb is None:
            break
        arr = packing.pack_microbatch(mb)
        tokens, positions, rows = [], [], []
        for i, it in enumerate(mb.items):
            tokens += it.req.token_ids[it.start:it.start + it.num_tokens]
            positions += range(it.start, it.start + it.num_tokens)
            rows += [i] * it.num_tokens
        assert arr.tokens.tolist() == tokens and arr.positions.tolist() == positions
        assert arr.seq_ids.tolist() == rows
        assert arr.logits_indices[:len(mb.items)].tolist() == (np.cumsum([it.num_tokens for it in mb.items]) - 1
                                                                ).tolist()
        for i, it in enumerate(mb.items):
            p = it.req.params
            assert arr.sampling.temperature[i] == np.float32(p.temperature) and arr.sampling.top_k[i] == p.top_k
            assert arr.sampling.seeds[i] == it.req.seed32
        for it in mb.items:  # let the requests advance as if the tick ran
            it.req.in_flight = False
            it.req.num_computed = it.start + it.num_tokens
            if it.sample:
                it.req.token_ids.append(3)
