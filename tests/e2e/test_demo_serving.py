"""The demo model recites its memorized passages exactly through the engine, on 8 instances."""

from __future__ import annotations

import jax

from kunjax import LLM, SamplingParams
from kunjax.demo import ensure_demo_model, recitation_prompts


def test_demo_recites_every_passage_on_eight_instances():
    llm = LLM(ensure_demo_model(), num_instances=8, max_num_seqs=8, max_num_batched_tokens=64,
              min_token_bucket=64, max_model_len=256)
    assert len(llm.engine.instances) == 8 == len(jax.devices())
    pairs = recitation_prompts()
    outs = llm.generate([p for p, _ in pairs], SamplingParams(max_tokens=160, temperature=0.0))
    for (prompt, expected), out in zip(pairs, outs, strict=True):
        assert out.text == expected, f"{prompt!r} recited wrongly"
        assert out.outputs[0].finish_reason == "stop"  # ended on <eos>
    served = [inst.steps for inst in llm.engine.instances]
    assert all(n > 0 for n in served), f"the router left instances idle: steps per instance {served}"
    llm.engine.check_books()
