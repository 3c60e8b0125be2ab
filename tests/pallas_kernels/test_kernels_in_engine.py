"""The engine on the Pallas kernels (interpret mode on CPU): greedy outputs equal the naive oracle, for replica
instances on the TPU and the GPU kernel, and through a kunserve drop on the TPU kernel (two pool segments and
remote attention go through the kernel)."""

from __future__ import annotations

import jax
import pytest

from kunjax import LLM
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.policies.base import FuseUnits
from kunjax.sampling_params import SamplingParams
from tests.helpers import SPLIT, TINY, load_single_device_params, naive_greedy, write_tiny_model

PROMPTS = [[1, 5, 9, 13, 2, 7, 30, 31, 32, 33, 34, 35], [4, 4, 8], list(range(60, 78)), [3, 9, 27]]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SMALL = dict(block_size=8, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, min_token_bucket=32,
             attention_backend="tpu-interpret")


@pytest.mark.timeout(300)
def test_replicas_on_the_tpu_kernel_match_the_oracle(tmp_path):
    path = write_tiny_model(tmp_path / "tiny", TINY)
    llm = LLM(path, num_instances=1, num_blocks=32, **SMALL)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == naive_greedy(TINY, load_single_device_params(path, TINY),
                                                                  PROMPTS, GREEDY.max_tokens)


@pytest.mark.timeout(300)
def test_replicas_on_the_gpu_kernel_match_the_oracle(tmp_path):
    """Smaller than the TPU case: the GPU interpreter costs ~0.3 s per program and layer on CPU."""
    path = write_tiny_model(tmp_path / "tiny", TINY)
    prompts, greedy = PROMPTS[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm = LLM(path, num_instances=1, num_blocks=32, **{**SMALL, "attention_backend": "gpu-interpret",
                                                       "max_num_seqs": 2, "max_num_batched_tokens": 16,
                                                       "min_token_bucket": 16})
    outs = llm.generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in outs] == naive_greedy(TINY, load_single_device_params(path, TINY),
                                                                  prompts, greedy.max_tokens)


@pytest.mark.timeout(600)
def test_a_pipeline_group_on_the_tpu_kernel_matches_the_oracle(tmp_path):
    path = write_tiny_model(tmp_path / "split", SPLIT, seed=5)
    cfg = config_from_kwargs(num_instances=2, policy="kunserve", num_blocks=32, exchange_blocks_per_step=1,
                             remote_rows=8, restore_window_steps=1000, **SMALL)
    eng = LLMEngine(path, cfg, devices=jax.devices()[:2])
    eng.executor.warmup([(u.uid, u.members, u.shape) for u in eng.units.values()], [])  # the group: at its drop
    ids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    out: dict[str, list[int]] = {}

    def step():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids

    step()
    step()
    g = eng.units[eng.transition(FuseUnits((0, 1))).unit]
    while eng.requests:
        step()
    assert g.remote_ticks > 0 and g.blocks_exchanged > 0
    assert [out[i] for i in ids] == naive_greedy(SPLIT, load_single_device_params(path, SPLIT), PROMPTS,
                                                 GREEDY.max_tokens)
