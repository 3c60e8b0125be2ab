"""The memorized demo model recites every passage exactly through a 4-stage drop, the exchange and a restore.

The demo vocabulary (1024) divides over 4 stages, so this also covers the split embedding and LM head; the
recitations are the oracle (DESIGN.md §10), independent of any reference implementation.
"""

from __future__ import annotations

import jax

import kunjax.demo as demo
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.policies.base import FuseUnits
from kunjax.sampling_params import SamplingParams


def test_demo_recites_through_a_four_stage_drop_exchange_and_restore():
    cfg = config_from_kwargs(num_instances=4, policy="kunserve", kunserve_max_group=4, num_blocks=48, block_size=16,
                             max_num_seqs=16, max_num_batched_tokens=128, max_model_len=256, exchange_blocks_per_step=2,
                             restore_window_steps=1000)
    eng = LLMEngine("demo", cfg, devices=jax.devices()[:4])
    # The replicas only: the group used below compiles at its drop; the others are never needed here.
    eng.executor.warmup([(u.uid, u.members, u.shape) for u in eng.units.values()], [])
    pairs = demo.recitation_prompts(8)
    params = SamplingParams(max_tokens=200, temperature=0.0)
    ids = [eng.add_request(prompt, params) for prompt, _ in pairs]
    texts: dict[str, str] = {}

    def step():
        for out in eng.step():
            if out.finished:
                texts[out.request_id] = out.outputs[0].text
        eng.check_books()

    for _ in range(3):
        step()
    g = eng.units[eng.transition(FuseUnits((0, 1, 2, 3))).unit]
    assert g.k == 4 and g.num_remote_dependent > 0
    for _ in range(4):
        step()
    assert g.remote_ticks > 0
    while g.num_remote_dependent:
        step()
    step()
    eng.policy.begin_restore(g)
    for _ in range(5):
        if not eng.groups:
            break
        step()
    assert not eng.groups and eng.policy.stats()["restores"] == 1
    assert eng.requests, "the restore should happen mid-generation"
    while eng.requests:
        step()
    wrong = [i for i, rid in enumerate(ids) if texts[rid] != pairs[i][1]]
    assert not wrong, f"passages {wrong} were not recited exactly: {texts[ids[wrong[0]]]!r}"


def recite(eng: LLMEngine, pairs) -> list[str]:
    params = SamplingParams(max_tokens=200, temperature=0.0)
    return [eng.add_request(prompt, params) for prompt, _ in pairs]


def stepper(eng: LLMEngine, texts: dict[str, str], cached: dict[str, int] | None = None):
    """One engine step that records finished texts (and prompt tokens served from the cache) and checks books."""
    def step():
        for out in eng.step():
            if out.finished:
                texts[out.request_id] = out.outputs[0].text
                if cached is not None:
                    cached[out.request_id] = out.num_cached_tokens
        eng.check_books()
    return step


def assert_recited(ids: list[str], pairs, texts: dict[str, str]) -> None:
    wrong = [i for i, rid in enumerate(ids) if texts[rid] != pairs[i][1]]
    assert not wrong, f"passages {wrong} were not recited exactly: {texts[ids[wrong[0]]]!r}"


def test_demo_recites_through_stage_by_tp_pipelines():
    """Four instances of two devices each (`--tp 2`) fuse into one 4-stage x 2-way pipeline (all 8 devices), serve
    with remote attention and the exchange, and restore; every passage exact."""
    cfg = config_from_kwargs(num_instances=4, tp=2, policy="kunserve", kunserve_max_group=4, num_blocks=48,
                             block_size=16,
                             max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, exchange_blocks_per_step=2,
                             restore_window_steps=1000)
    eng = LLMEngine("demo", cfg)
    eng.executor.warmup([(u.uid, u.members, u.shape) for u in eng.units.values()], [])
    pairs = demo.recitation_prompts(8)[:16]
    texts: dict[str, str] = {}
    step = stepper(eng, texts)
    ids = recite(eng, pairs)
    for _ in range(3):
        step()
    g = eng.units[eng.transition(FuseUnits((0, 1, 2, 3))).unit]
    mesh = eng.executor.group_arrays(g.uid).candidate.reshard.mesh
    assert mesh.devices.shape == (4, 2) and mesh.axis_names == ("stage", "tp")
    for _ in range(3):
        step()
    assert g.remote_ticks > 0
    while g.num_remote_dependent:
        step()
    eng.policy.begin_restore(g)
    while eng.groups:
        step()
    assert eng.requests, "the restore should happen mid-generation"
    while eng.requests:
        step()
    assert_recited(ids, pairs, texts)


def test_demo_recites_with_prefix_caching_and_the_cache_survives_a_drop_and_a_restore():
    """The same passages in three waves: before a drop (the cache fills), during it (the replicas' cached blocks,
    reinterpreted in pipeline format, are healed or exchanged and reused), and after the restore (the pipeline's
    cached blocks went home and are reused again). Every recitation exact."""
    cfg = config_from_kwargs(num_instances=2, policy="kunserve", num_blocks=160, block_size=16, max_num_seqs=16,
                             max_num_batched_tokens=128, max_model_len=256, exchange_blocks_per_step=4,
                             enable_prefix_caching=True, restore_window_steps=1000)
    eng = LLMEngine("demo", cfg, devices=jax.devices()[4:6])
    eng.warmup()
    pairs = demo.recitation_prompts(20)[:8]  # prompts of several full blocks
    texts: dict[str, str] = {}
    cached: dict[str, int] = {}
    step = stepper(eng, texts, cached)
    first = recite(eng, pairs)
    while eng.requests:
        step()
    assert sum(len(u.index) for u in eng.units.values()) > 0
    second = recite(eng, pairs)
    g = eng.units[eng.transition(FuseUnits((0, 1))).unit]
    assert sum(1 for n in g.index.nodes() if n.stale is not None) > 0, "the cached blocks were not carried over"
    while eng.requests:
        step()
    hits_in_group = g.index.hits
    eng.policy.begin_restore(g)
    while eng.groups:
        step()
    restore = next(e for e in eng.policy.events if e.kind == "restore")
    assert restore.detail["cached_blocks_kept"] > 0
    third = recite(eng, pairs)
    while eng.requests:
        step()
    assert hits_in_group > 0
    # The router sends each prompt to the replica whose index holds its prefix: most are served from the cache.
    assert sum(cached[i] > 0 for i in third) >= len(third) // 2, [cached[i] for i in third]
    for ids in (first, second, third):
        assert_recited(ids, pairs, texts)
