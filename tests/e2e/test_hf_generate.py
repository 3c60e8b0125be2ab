"""Greedy generation through `kunjax.LLM` on an HF checkpoint equals `transformers`' own `generate`."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kunjax import LLM, SamplingParams  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llm_greedy_equals_transformers_generate(tmp_path, arch):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    model.eval().save_pretrained(tmp_path, safe_serialization=True)

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 128) for _ in range(rng.randint(2, 20))] for _ in range(6)]
    llm = LLM(tmp_path, num_instances=2, block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
              max_model_len=64, min_token_bucket=16)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.inference_mode():
            ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)
        expected = ref[0, len(prompt):].tolist()
        assert out.token_ids == expected
        assert out.outputs[0].finish_reason == ("stop" if expected[-1] == 2 else "length")
