"""The router (`kunjax.routing`): the global prompt tree against the units' own indexes, the three modes, and
outputs that do not depend on where a request ran (the arithmetic executor's oracle)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from kunjax import routing as routing_module
from kunjax.config import ConfigError
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.policies.base import FuseUnits
from kunjax.sampling_params import SamplingParams
from tests.helpers import SPLIT

MODEL = dataclasses.replace(SPLIT, num_layers=8)
CONFIG = dict(num_instances=4, block_size=8, num_blocks=200, max_num_seqs=16, max_num_batched_tokens=128,
              max_model_len=128, min_token_bucket=16, enable_prefix_caching=True)


def conversations(n: int, seed: int, vocab: int, sessions: int = 12) -> list[tuple[float, str, list[int], int]]:
    """`n` requests over 2 s, each a turn of one of `sessions` conversations: its system prompt and history so far
    (block-aligned, so whole blocks are shared) plus a new user turn; (arrival, session, prompt, max_tokens)."""
    rng = random.Random(seed)
    history = {f"s{i}": [rng.randrange(1, vocab) for _ in range(8 * rng.randint(2, 4))] for i in range(sessions)}
    out = []
    for k in range(n):
        s = f"s{rng.randrange(sessions)}"
        turn = [rng.randrange(1, vocab) for _ in range(rng.randint(3, 12))]
        prompt = history[s] + turn
        if len(prompt) < 88:  # the conversation grows by a block now and then, within the context
            history[s] = history[s] + turn[:8] if len(turn) >= 8 else history[s]
        out.append((2.0 * k / n, s, prompt, rng.randint(4, 16)))
    return out


def run(engine: LLMEngine, arrivals, check: bool = True) -> tuple[dict[str, list[int]], int]:
    """Open loop on the virtual clock, sessions passed; returns outputs by request id and cached prompt tokens."""
    clock, out, cached, i = engine.clock, {}, 0, 0
    ids = []
    while True:
        while i < len(arrivals) and arrivals[i][0] <= clock.now():
            _, s, prompt, n = arrivals[i]
            ids.append(engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                                          session_id=s))
            i += 1
        if engine.has_requests():
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
                    cached += o.num_cached_tokens
            if check:
                engine.check_books()
        elif i < len(arrivals):
            clock.advance_to(arrivals[i][0])
        else:
            return {rid: out[rid] for rid in ids}, cached


def test_every_mode_gives_the_oracles_tokens_and_prompt_tree_reuses_the_most():
    """The same conversations under each mode, side by side: identical tokens (the oracle's), books and prompt
    tree balanced after every step, and the most prompt tokens served from cache under prompt-tree."""
    arrivals = conversations(300, seed=2, vocab=MODEL.vocab_size)
    cached = {}
    for routing in ("prompt-tree", "least-load", "session"):
        engine = LLMEngine(MODEL, config_from_kwargs(**CONFIG, routing=routing), executor="arith")
        got, cached[routing] = run(engine, arrivals)
        assert list(got.values()) == [engine.executor.expected_greedy(p, n) for _, _, p, n in arrivals], routing
        assert (engine.router.tree is not None) == (routing == "prompt-tree")
    assert cached["prompt-tree"] >= cached["session"] > cached["least-load"] > 0, cached


def test_the_prompt_tree_follows_the_indexes_through_a_fuse_and_a_restore():
    """check_books compares the tree with every unit's index after each step: through replicas caching, a fuse
    (stale nodes, not in the tree until healed or exchanged), and the restore handing the cache back."""
    cfg = config_from_kwargs(**{**CONFIG, "num_instances": 2, "policy": "kunserve", "restore_window_steps": 100_000,
                                "min_group_steps": 4, "exchange_blocks_per_step": 4})
    engine = LLMEngine(MODEL, cfg, executor="arith")
    arrivals = conversations(60, seed=4, vocab=MODEL.vocab_size, sessions=4)
    run(engine, arrivals)
    tree = engine.router.tree
    assert tree.placed[0] and tree.placed[1] and tree.applied > 0
    g = engine.units[engine.transition(FuseUnits((0, 1), "test")).unit]
    assert set(tree.placed) == {g.uid} and not tree.placed[g.uid]  # all stale: nothing matchable yet
    later = [(t + engine.clock.now(), s, p, n) for t, s, p, n in conversations(60, seed=5, vocab=MODEL.vocab_size,
                                                                               sessions=4)]
    run(engine, later)
    for _ in range(30):  # idle steps: the exchange localizes what nobody healed
        engine.step()
        engine.check_books()
    assert len(tree.placed[g.uid]) == len(g.index) > 0
    engine.policy.begin_restore(g)
    while engine.groups:
        engine.step()
        engine.check_books()
    assert set(tree.placed) == {0, 1} and sum(map(len, tree.placed.values())) > 0


def test_session_routing_keeps_a_session_on_its_unit_and_follows_it_into_a_group():
    cfg = config_from_kwargs(**{**CONFIG, "num_instances": 2, "policy": "kunserve", "routing": "session",
                                "restore_window_steps": 100_000})
    engine = LLMEngine(MODEL, cfg, executor="arith")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = [engine.add_request([1 + i] * 20, params, session_id=f"s{i}") for i in range(4)]
    homes = {f"s{i}": engine.requests[r].unit for i, r in enumerate(first)}
    assert len(set(homes.values())) == 2  # new sessions spread by load
    again = [engine.add_request([1 + i] * 30, params, session_id=f"s{i}") for i in range(4)]
    assert [engine.requests[r].unit for r in again] == list(homes.values())
    assert engine.router.session_hits == 4
    g = engine.units[engine.transition(FuseUnits((0, 1), "test")).unit]
    third = engine.add_request([9] * 20, params, session_id="s0")
    assert engine.requests[third].unit == g.uid


def test_the_prompt_tree_is_at_most_routing_sync_steps_behind():
    cfg = config_from_kwargs(**{**CONFIG, "num_instances": 2, "routing_sync_steps": 4})
    engine = LLMEngine(MODEL, cfg, executor="arith")
    prompt = list(range(1, 41))  # 5 blocks
    engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    tree, steps = engine.router.tree, 0
    while engine.has_requests():
        engine.step()
        steps += 1
        if tree.pending:
            assert engine.step_no % 4 != 0  # synced on every 4th step
    while tree.pending:
        engine.step()
    assert engine.step_no % 4 == 0
    tree.check((u.uid, u.index) for u in engine.units.values())
    assert max(tree.match(prompt + [7]).values()) == 5



def test_a_sync_checks_a_bounded_number_of_expectations_and_forgets_the_settled(monkeypatch):
    """Each routed request is expected where it went until it computed its prompt; a sync looks at no more than
    EXPECTATIONS_PER_SYNC of them beyond twice those made since the last, whatever the queue holds, and once the
    requests are done the syncs forget every expectation and prune the nodes they alone kept."""
    cfg = config_from_kwargs(**{**CONFIG, "num_instances": 2, "routing_sync_steps": 1})
    engine = LLMEngine(MODEL, cfg, executor="arith")
    tree = engine.router.tree
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for i in range(120):  # distinct 3-block prompts: three nodes each, only expected, nothing cached yet
        engine.add_request([1 + i % 50, 2 + i // 50] * 12 + [5], params)
    assert len(tree.expectations) == 120 and tree.routed == 120
    checked = []
    real = routing_module._computing
    monkeypatch.setattr(routing_module, "_computing", lambda req, uid: checked.append(req) or real(req, uid))
    tree.sync()
    assert len(checked) == 120 and len(tree.expectations) == 120  # all still queued: all kept
    checked.clear()
    tree.sync()  # nothing routed since: a bounded look, not the whole queue
    assert len(checked) == routing_module.EXPECTATIONS_PER_SYNC
    while engine.has_requests():
        engine.step()
    for _ in range(10):
        tree.sync()
    assert not tree.expectations
    tree.check((u.uid, u.index) for u in engine.units.values())
    stack = list(tree.root.children.values())
    while stack:
        t = stack.pop()
        assert not t.expected and t.holders, "a node kept by a settled expectation alone"
        stack.extend(t.children.values())


@pytest.mark.parametrize("options, message", [
    ({"routing": "random"}, "--routing must be one of prompt-tree, least-load, session"),
    ({"routing_sync_steps": 0}, "--routing-sync-steps must be positive"),
])
def test_bad_routing_options_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        config_from_kwargs(**CONFIG, **options)
