"""The demo model through the whole engine: exact recitation on 8 instances, stop strings, streaming, bf16."""

from __future__ import annotations

import jax
import pytest

from kunjax import LLM, SamplingParams
from kunjax.demo import ensure_demo_model, recitation_prompts

GREEDY = SamplingParams(max_tokens=160, temperature=0.0)


@pytest.fixture(scope="module")
def demo_llm():
    return LLM(ensure_demo_model(), num_instances=8, max_num_seqs=8, max_num_batched_tokens=64, min_token_bucket=64,
               max_model_len=256)


def test_demo_recites_every_passage_on_eight_instances(demo_llm):
    assert demo_llm.engine.num_instances == 8 == len(jax.devices())
    pairs = recitation_prompts()
    outs = demo_llm.generate([p for p, _ in pairs], GREEDY)
    for (prompt, expected), out in zip(pairs, outs, strict=True):
        assert out.text == expected, f"{prompt!r} recited wrongly"
        assert out.outputs[0].finish_reason == "stop"  # ended on <eos>
    served = [demo_llm.engine.units[i].ticks for i in range(8)]
    assert all(n > 0 for n in served), f"the router left instances idle: steps per instance {served}"
    demo_llm.engine.check_books()


def test_stop_string_truncates_text_and_streamed_deltas_add_up(demo_llm):
    prompt, expected = recitation_prompts()[2]
    stop = expected.split()[5]  # a word in the middle of the continuation
    cut = expected.index(" " + stop)
    params = SamplingParams(max_tokens=160, temperature=0.0, stop=[" " + stop])
    streamed, final = "", None
    for out in demo_llm.stream(prompt, params):
        streamed += out.outputs[0].delta_text
        final = out
    assert final.finished and final.text == expected[:cut] == streamed
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == " " + stop
    with_stop = demo_llm.generate(prompt, SamplingParams(max_tokens=160, temperature=0.0, stop=[" " + stop],
                                                         include_stop_str_in_output=True))[0]
    assert with_stop.text == expected[:cut + len(stop) + 1]


def test_bfloat16_weights_and_kv_recite_too():
    llm = LLM(ensure_demo_model(), devices=jax.devices()[:1], dtype="bfloat16", max_num_seqs=8,
              max_num_batched_tokens=64, min_token_bucket=64, max_model_len=256)
    assert llm.engine.executor.replicas[0].pool.dtype == jax.numpy.bfloat16
    pairs = recitation_prompts()[:6]
    outs = llm.generate([p for p, _ in pairs], GREEDY)
    assert [o.text for o in outs] == [e for _, e in pairs]
