"""Prefill/decode disaggregation (`--roles`, `kunjax.disagg`): prefill units take every new request, decode units
the requests handed over with their KV; a conversation's next turn sends only its new blocks.

Oracles: the arithmetic executor's formula (a lost or misplaced block changes the tokens), the books after every
step, and the demo model's recitation on 8 CPU devices (2 prefill + 6 decode).
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from kunjax import LLM, SamplingParams
from kunjax.config import ConfigError, parse_roles
from kunjax.cost_model import CostModel
from kunjax.demo import ensure_demo_model, recitation_prompts
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.hardware import load_profile
from kunjax.model_shapes import model_shape
from kunjax.plan import Transfer
from tests.helpers import SPLIT, run_open_loop

MODEL = dataclasses.replace(SPLIT, num_layers=8)
CONFIG = dict(num_instances=8, block_size=8, num_blocks=120, max_num_seqs=16, max_num_batched_tokens=128,
              max_model_len=128, min_token_bucket=16, roles="prefill:2,decode:6")
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def test_roles_are_parsed_and_bad_ones_named():
    assert parse_roles("", 3) == ["mixed"] * 3
    assert parse_roles("prefill:2,decode:2", 4) == ["prefill", "prefill", "decode", "decode"]
    assert parse_roles("prefill,decode,mixed", 3) == ["prefill", "decode", "mixed"]
    for spec, message in (("prefil:2", "unknown role 'prefil'"), ("prefill:x", "must be an integer"),
                          ("decode:4", "every instance decodes")):
        with pytest.raises(ConfigError, match="--roles"):
            config_from_kwargs(roles=spec)
        with pytest.raises(ValueError, match=message):
            parse_roles(spec, 4)
    with pytest.raises(ConfigError, match="gives 3 instance"):
        LLMEngine(MODEL, config_from_kwargs(**dict(CONFIG, roles="prefill,decode,decode")), executor="arith")
    with pytest.raises(ConfigError, match="needs --policy recompute"):
        config_from_kwargs(roles="prefill:1,decode:1", policy="swap")


@pytest.mark.parametrize("caching", [False, True])
def test_prefill_units_take_new_requests_and_decode_units_finish_them(caching):
    eng = LLMEngine(MODEL, config_from_kwargs(enable_prefix_caching=caching, **CONFIG), executor="arith")
    eng.warmup()
    picked = []
    pick = eng.router.pick

    def recorded(req, candidates, *args):
        unit = pick(req, candidates, *args)
        picked.append(unit.role)
        return unit

    eng.router.pick = recorded
    rng = random.Random(2)
    arrivals = sorted((rng.random(), [rng.randrange(1, MODEL.vocab_size) for _ in range(rng.randint(8, 40))],
                       rng.randint(2, 16)) for _ in range(300))
    out = run_open_loop(eng, arrivals)
    assert list(out.values()) == [eng.executor.expected_greedy(p, n) for _, p, n in arrivals]
    assert set(picked) == {"prefill"}, "a decode unit took a new request"
    stats = eng.handoff.stats()
    assert stats["pd_handoffs"] >= 250 and stats["pd_blocks_sent"] > 0
    assert stats["pd_bytes_sent"] == stats["pd_blocks_sent"] * eng.handoff.block_bytes
    decode_ticks = sum(u.ticks for u in eng.units.values() if u.role == "decode")
    assert decode_ticks > 0 and all(a.num_used == 0 for u in eng.units.values() for a in u.stages)


def test_a_conversations_next_turn_sends_only_its_new_blocks():
    eng = LLMEngine(MODEL, config_from_kwargs(enable_prefix_caching=True, **CONFIG), executor="arith")
    eng.warmup()
    rng = random.Random(4)
    turn1 = [rng.randrange(1, MODEL.vocab_size) for _ in range(37)]
    out1 = run_open_loop(eng, [(0.0, turn1, 20)])
    history = turn1 + next(iter(out1.values()))  # 57 tokens: its full blocks are on the decode unit now
    sent_before, reused_before = eng.handoff.blocks_sent, eng.handoff.blocks_reused
    turn2 = history + [rng.randrange(1, MODEL.vocab_size) for _ in range(12)]  # 69 tokens
    out2 = run_open_loop(eng, [(eng.clock.now(), turn2, 6)])
    assert list(out2.values()) == [eng.executor.expected_greedy(turn2, 6)]
    reused = eng.handoff.blocks_reused - reused_before
    sent = eng.handoff.blocks_sent - sent_before
    # the decode unit held the first turn's prompt and answer: 7 full blocks of 8; 69 computed tokens are 9 blocks
    assert reused == len(history) // 8 == 7 and sent == 9 - 7, (reused, sent)


def test_a_streamed_handoff_leaves_only_its_last_layer_group_after_the_prefill():
    shape = model_shape("llama-3-8b")
    cost = CostModel(shape, load_profile("h100"), dtype="bfloat16", tp=1, block_size=16)
    blocks = tuple(range(64))
    whole, streamed = (cost.op_seconds(Transfer(0, 8, blocks, blocks, g))[8] for g in (1, 4))
    assert whole > 3 * streamed > 0  # across hosts: 4 groups, the last one after the prefill (plus the latency)

    rng = random.Random(6)
    arrivals = sorted((rng.random(), [rng.randrange(1, MODEL.vocab_size) for _ in range(rng.randint(8, 40))],
                       rng.randint(2, 8)) for _ in range(120))
    modelled = {}
    for g in (1, 4):
        eng = LLMEngine(MODEL, config_from_kwargs(pd_stream_groups=g, **CONFIG), executor="arith",
                        profile=load_profile("h100"), time_shape=shape)
        eng.warmup()
        out = run_open_loop(eng, arrivals)
        assert list(out.values()) == [eng.executor.expected_greedy(p, n) for _, p, n in arrivals]
        modelled[g] = eng.handoff.stats()
    assert modelled[1]["pd_blocks_sent"] == modelled[4]["pd_blocks_sent"] > 0
    # in one host a handoff of a few blocks is mostly latency and the fixed cost of an operation
    assert modelled[1]["pd_transfer_us_modelled"] > modelled[4]["pd_transfer_us_modelled"] > 0, modelled
    with pytest.raises(ConfigError, match="--pd-stream-groups 9: the model has 8 layers"):
        LLMEngine(MODEL, config_from_kwargs(pd_stream_groups=9, **CONFIG), executor="arith")
    with pytest.raises(ConfigError, match="--pd-stream-groups"):
        config_from_kwargs(pd_stream_groups=0)


def test_the_demo_recites_every_passage_with_2_prefill_and_6_decode_instances():
    llm = LLM(ensure_demo_model(), num_instances=8, max_num_seqs=8, max_num_batched_tokens=64, min_token_bucket=64,
              max_model_len=256, roles="prefill:2,decode:6", enable_prefix_caching=True)
    pairs = recitation_prompts()
    outs = llm.generate([p for p, _ in pairs], SamplingParams(max_tokens=160, temperature=0.0))
    for (prompt, expected), out in zip(pairs, outs, strict=True):
        assert out.text == expected, f"{prompt!r} recited wrongly"
    eng = llm.engine
    stats = eng.handoff.stats()
    assert stats["pd_handoffs"] == len(pairs) and stats["pd_bytes_sent"] > 0
    assert stats["pd_transfer_us_measured"] > 0 and "pd_transfer_us_modelled" not in stats  # the copies, timed
    assert all(eng.units[i].ticks > 0 for i in range(8)), "an instance was left idle"
    eng.check_books()
