"""The engine against the naive oracle: continuous batching, paging, chunked prefill, preemption, instances."""

from __future__ import annotations

import gc
import random

import jax
import numpy as np
import pytest

from kunjax import LLM, SamplingParams
from kunjax.checkpoint import load_params
from kunjax.memory import param_shapes
from sharding.layouts import instance_meshes, param_shardings
from tests.helpers import TINY, naive_greedy, write_tiny_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_params(tiny_dir):
    mesh = instance_meshes(jax.devices()[:1], 1, 1)[0]
    return load_params(tiny_dir, TINY, param_shardings(mesh, param_shapes(TINY)), "float32")


@pytest.fixture(scope="module")
def tight_llm(tiny_dir):
    """Two instances with a pool so small that 32 concurrent prompts force preemption."""
    return LLM(tiny_dir, num_instances=2, block_size=4, num_blocks=16, max_num_seqs=8, max_num_batched_tokens=32,
               max_model_len=64, min_token_bucket=8)


def random_prompts(n: int, seed: int, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, TINY.vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_greedy_equals_naive_reference_under_chunking_and_preemption(tight_llm, tiny_params):
    prompts = random_prompts(32, seed=1)
    outs = tight_llm.generate(prompts, GREEDY)
    expected = naive_greedy(TINY, tiny_params, prompts, GREEDY.max_tokens)
    engine = tight_llm.engine
    assert sum(u.num_preemptions for u in engine.units.values()) > 0, "preemption was not exercised"
    assert all(u.ticks > 0 for u in engine.units.values()), "both instances should have served requests"
    for i, (out, exp) in enumerate(zip(outs, expected, strict=True)):
        assert out.token_ids == exp, f"prompt {i} (len {len(prompts[i])}) diverged"
        assert out.outputs[0].finish_reason == "length"
    engine.check_books()
    for u in engine.units.values():
        assert u.stages[0].num_used == 0


def test_nothing_compiles_after_warmup(tight_llm):
    compiles = []

    def listener(event: str, duration: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        params = [SamplingParams(max_tokens=n, temperature=t, top_k=k, top_p=p, seed=s, logprobs=lp)
                  for n, t, k, p, s, lp in [(3, 0.0, 0, 1.0, None, None), (9, 0.8, 5, 0.9, 7, 2),
                                            (5, 1.2, 0, 0.5, 3, 0), (17, 0.0, 0, 1.0, None, 5)]]
        for prompts in (random_prompts(4, 2, 1, 3), random_prompts(4, 3, 30, 44)):
            tight_llm.generate(prompts, params)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], f"{len(compiles)} compilations after warm-up"


def test_seeded_sampling_is_reproducible_regardless_of_batch(tight_llm):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    prompt = random_prompts(1, 4)[0]
    alone = tight_llm.generate([prompt], p)[0].token_ids
    crowd = tight_llm.generate(random_prompts(7, 5) + [prompt], [GREEDY] * 7 + [p])[-1].token_ids
    assert alone == crowd
    other = tight_llm.generate([prompt], SamplingParams(max_tokens=10, temperature=1.0, seed=99,
                                                        ignore_eos=True))[0].token_ids
    assert other != alone


def test_stop_token_ids_max_tokens_and_logprobs(tight_llm):
    prompt = random_prompts(1, 6)[0]
    full = tight_llm.generate([prompt], GREEDY)[0].token_ids
    stop_at = full[4]
    first = full.index(stop_at)
    out = tight_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at],
                                                      logprobs=3))[0]
    assert out.token_ids == full[:first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    lps = out.outputs[0].logprobs
    assert len(lps) == len(out.token_ids)
    for tok, entry in zip(out.token_ids, lps, strict=True):
        assert tok in entry and len(entry) >= 3
        assert max(entry.values()) == pytest.approx(entry[tok])  # greedy picks the most likely token
        assert all(v <= 0 for v in entry.values())
    total = sum(e[t] for t, e in zip(out.token_ids, lps, strict=True))
    assert out.outputs[0].cumulative_logprob == pytest.approx(total)


def test_streaming_yields_deltas_and_abort_on_close_frees_blocks(tight_llm):
    prompts = random_prompts(3, 7)
    # To the end: the deltas add up to the final output, which alone carries the whole output.
    deltas, final = [], None
    for out in tight_llm.stream(prompts[0], GREEDY):
        deltas.extend(out.outputs[0].delta_token_ids)
        if out.finished:
            final = out
        else:
            assert out.token_ids == [] and out.text == ""  # no copy of the whole output per token
    assert final is not None and deltas == final.token_ids == tight_llm.generate(prompts[0], GREEDY)[0].token_ids
    # Closed early: the unfinished requests are aborted and free their blocks.
    seen: dict[str, list[int]] = {}
    stream = tight_llm.stream(prompts, GREEDY)
    for out in stream:
        seen.setdefault(out.request_id, []).extend(out.outputs[0].delta_token_ids)
        if len(seen[out.request_id]) == 5:
            break
    stream.close()
    engine = tight_llm.engine
    assert not engine.has_unfinished()
    engine.check_books()
    assert all(u.stages[0].num_used == 0 for u in engine.units.values())


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"),
    ([5, 500], "outside the vocabulary"),
    (list(range(1, 65)), "no room to generate"),
])
def test_bad_input_is_refused_with_a_message(tight_llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        tight_llm.generate([[3, 4], prompt], GREEDY)
    assert not tight_llm.engine.has_unfinished(), "a rejected call must not leave requests behind"


def live_bytes_per_device() -> dict:
    """Bytes of every live array shard per device, deduplicated by buffer (DESIGN.md §11)."""
    per_device: dict = {}
    seen = set()
    for arr in jax.live_arrays():
        for shard in arr.addressable_shards:
            key = (shard.device, shard.data.unsafe_buffer_pointer())
            if key not in seen:
                seen.add(key)
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device


def test_kv_books_agree_with_live_device_arrays(tiny_dir):
    """Per device, live bytes == the instance's weights + num_blocks * block bytes (devices 6-7 are this test's)."""
    llm = LLM(tiny_dir, devices=jax.devices()[6:8], num_instances=2, block_size=4, kv_cache_bytes=100_000,
              max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, min_token_bucket=16)
    llm.generate(random_prompts(6, 9), GREEDY)
    gc.collect()
    live = live_bytes_per_device()
    ex = llm.engine.executor
    for i, rep in enumerate(ex.replicas):
        a = llm.engine.units[i].stages[0]
        dev = ex.devices_of(i)[0]
        block_bytes = int(np.prod(rep.pool.shape[1:])) * rep.pool.dtype.itemsize
        assert ex.num_blocks == 100_000 // block_bytes  # the CPU byte budget decides the pool size
        assert a.num_free + a.num_used + a.num_cached == a.total == ex.num_blocks - 1
        assert a.num_used == 0
        # The device holds exactly this instance's weights and its pool of num_blocks blocks, and (a CPU device
        # has no pinned host memory) the host tier's copies of spilled prefix blocks.
        host = sum(part.nbytes for parts in rep.host.values() for part in parts)
        assert host == llm.engine.mempool.host[i].num_used * block_bytes
        assert live[dev] == ex.weight_bytes + ex.num_blocks * block_bytes + host


def test_tensor_parallel_instance_matches_reference(tiny_dir, tiny_params):
    llm = LLM(tiny_dir, devices=jax.devices()[2:6], num_instances=2, tp=2, block_size=8, max_num_seqs=4,
              max_num_batched_tokens=32, max_model_len=64, min_token_bucket=32)
    rep = llm.engine.executor.replicas[0]
    assert rep.pool.sharding.shard_shape(rep.pool.shape)[4] == TINY.num_kv_heads // 2
    wq = rep.params["layers"]["wq"]
    assert wq.sharding.shard_shape(wq.shape)[2] == TINY.q_size // 2
    prompts = random_prompts(8, seed=11)
    outs = llm.generate(prompts, GREEDY)
    expected = naive_greedy(TINY, tiny_params, prompts, GREEDY.max_tokens)
    assert [o.token_ids for o in outs] == expected


def test_min_tokens_masks_stop_ids_until_reached(tight_llm):
    prompt = random_prompts(1, 8)[0]
    full = tight_llm.generate([prompt], GREEDY)[0].token_ids
    first = full[0]
    out = tight_llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[first],
                                                      min_tokens=3))[0]
    assert first not in out.token_ids[:3]
    assert len(out.token_ids) >= 3


def test_prefix_caching_reuses_blocks_and_keeps_outputs(tiny_dir, tiny_params):
    llm = LLM(tiny_dir, devices=jax.devices()[6:7], num_instances=1, block_size=4, num_blocks=64, max_num_seqs=4,
              max_num_batched_tokens=16, max_model_len=64, min_token_bucket=16, enable_prefix_caching=True)
    shared = random_prompts(1, 12, 20, 20)[0]
    prompts = [shared + tail for tail in random_prompts(3, 13, 1, 6)]
    first = llm.generate(prompts[:1], GREEDY)[0]
    rest = llm.generate(prompts[1:], GREEDY)
    assert first.num_cached_tokens == 0
    assert all(o.num_cached_tokens == 20 for o in rest)  # five full blocks of the shared prefix
    expected = naive_greedy(TINY, tiny_params, prompts, GREEDY.max_tokens)
    assert [o.token_ids for o in [first, *rest]] == expected
    a = llm.engine.units[0].stages[0]
    assert a.num_cached > 0 and a.num_used == 0
    llm.engine.check_books()
