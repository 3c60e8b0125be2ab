"""Specification of the device tick's head and sampling over only the rows that can leave (`kunjax.executor.step`).

The oracle is the same computation over all S rows (`sizes=(S,)`): for every row of the micro-batch the narrow
branch must give exactly what the full one gives, greedy and sampled rows, banned ids and top logprobs included.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kunjax.executor.step import head_and_sample
from kunjax.model import init_params
from kunjax.plan import StepInputs, leaving_row_sizes
from kunjax.sampling_params import SamplingParams, pack_sampling
from tests.helpers import TINY

S, E, N_LOGPROBS = 64, TINY.hidden_size, 4
CFG = dataclasses.replace(TINY, vocab_size=300)  # more than two 128-id tiles of the two-pass argmax


def test_leaving_row_sizes():
    assert leaving_row_sizes(64, 256) == (16, 32, 64)
    assert leaving_row_sizes(64, 64) == (16, 32, 64)
    assert leaving_row_sizes(64, 16) == (8, 16)  # a tick of 16 tokens has at most 16 sequences
    assert leaving_row_sizes(8, 256) == (8,)
    for seqs in (1, 3, 8, 16, 64, 256):
        for tokens in (1, 16, 32, 256):
            sizes = leaving_row_sizes(seqs, tokens)
            assert sizes == tuple(sorted(set(sizes))) and sizes[-1] == min(seqs, tokens)


def _inputs(rng: np.random.Generator) -> StepInputs:
    params = [SamplingParams(temperature=0.0, logprobs=2) if i % 3 == 0 else
              SamplingParams(temperature=0.8, top_k=20 if i % 2 else 0, top_p=0.9, seed=i, logprobs=N_LOGPROBS)
              for i in range(S)]
    arrays = pack_sampling(params, list(range(S)), list(rng.integers(0, 50, S)), S)
    suppress = np.full((S, 16), -1, np.int32)
    suppress[5, :3] = (7, 11, 13)  # a row below its min_tokens may not sample these
    inp = dataclasses.replace(_empty(), suppress_ids=suppress,
                              temperature=arrays.temperature, top_k=arrays.top_k, top_p=arrays.top_p,
                              min_p=arrays.min_p, seeds=arrays.seeds, counters=arrays.counters,
                              top_n=np.asarray(N_LOGPROBS, np.int32))
    return jax.tree.map(jnp.asarray, inp)


def _empty() -> StepInputs:
    i32 = np.int32
    none = np.zeros((1, 1), i32)
    return StepInputs(positions=none, seq_ids=none, valid=none.astype(bool), slot_mapping=none, block_tables=none,
                      context_lens=none, context_starts=none, send_rows=none, recv_tables=none, recv_lens=none,
                      recv_pos=none, tokens_in=np.zeros(1, i32), logits_indices=np.zeros(S, i32),
                      suppress_ids=np.full((S, 16), -1, i32), temperature=np.zeros(S, np.float32),
                      top_k=np.zeros(S, i32), top_p=np.ones(S, np.float32), min_p=np.zeros(S, np.float32),
                      seeds=np.zeros(S, np.uint32), counters=np.zeros(S, i32), top_n=np.zeros((), i32))


def test_narrow_head_equals_the_full_head_on_every_row_of_the_micro_batch():
    rng = np.random.default_rng(0)
    params = init_params(CFG, seed=1)
    exit_rows = jnp.asarray(rng.normal(size=(S, E)) * 3, jnp.float32)  # [S, E]
    inp = _inputs(rng)
    sizes = leaving_row_sizes(S, 256)
    run = jax.jit(lambda p, x, n, sizes: head_and_sample(CFG, p, x, n, inp, split=False, num_logprobs=N_LOGPROBS,
                                                         sizes=sizes), static_argnums=3)
    for n in (0, 1, 9, 16, 17, 32, 33, 64):
        narrow = [np.asarray(x) for x in run(params, exit_rows, jnp.int32(n), sizes)]
        full = [np.asarray(x) for x in run(params, exit_rows, jnp.int32(n), (S,))]
        tokens, logprobs, top_ids, top_lps = narrow
        np.testing.assert_array_equal(tokens[:n], full[0][:n])
        np.testing.assert_array_equal(top_ids[:n], full[2][:n])
        np.testing.assert_allclose(logprobs[:n], full[1][:n], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(top_lps[:n], full[3][:n], rtol=1e-6, atol=1e-6)
        if n > 5:
            assert tokens[5] not in (7, 11, 13)  # its banned ids
        # The narrow branch really ran: past the smallest size holding the micro-batch, its rows are zeros.
        size = next(z for z in sizes if z >= n)
        assert (logprobs[size:] == 0).all() and (top_ids[size:] == 0).all()
        if size < S:
            assert (full[1][size:] != 0).all()
