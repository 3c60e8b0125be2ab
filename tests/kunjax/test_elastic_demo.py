"""The memorized demo model recites every passage exactly through a 4-stage drop, the exchange and a restore.

The demo vocabulary (1024) divides over 4 stages, so this also covers the split embedding and LM head; the
recitations are the oracle (DESIGN.md §10), independent of any reference implementation.
"""

from __future__ import annotations

import jax

import kunjax.demo as demo
from kunjax.config import EngineConfig
from kunjax.engine import LLMEngine
from kunjax.policies.base import FuseUnits
from kunjax.sampling_params import SamplingParams


def test_demo_recites_through_a_four_stage_drop_exchange_and_restore():
    cfg = EngineConfig(num_instances=4, policy="kunserve", kunserve_max_group=4, num_blocks=48, block_size=16,
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
