"""Specification of `SamplingParams` (host) and `sample` (device).

The oracle for the filters is `reference_distribution` below: a per-row numpy transcription of the documented
order (temperature, top-k, top-p, min-p, each renormalized), checked against 4000 draws of the jitted sampler.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kunjax.sampling import first_argmax, sample
from kunjax.sampling_params import SamplingArrays, SamplingParams, pack_sampling, seed_to_uint32

N_LOGPROBS = 3
sample_jit = jax.jit(sample, static_argnames="num_logprobs")

# A small crafted distribution, with the probabilities scattered over the vocabulary so that rank != id.
BASE_PROBS = np.array([0.3, 0.25, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01])
PERM = np.array([5, 2, 7, 0, 3, 6, 1, 4])  # BASE_PROBS[r] sits at token PERM[r]
CRAFTED_LOGITS = np.empty(8, np.float32)
CRAFTED_LOGITS[PERM] = np.log(BASE_PROBS)


def run(logits: np.ndarray, params: list[SamplingParams], seeds: list[int], counters: list[int],
        num_logprobs: int = N_LOGPROBS) -> tuple[np.ndarray, ...]:
    arrays = pack_sampling(params, seeds, counters, num_rows=logits.shape[0])
    out = sample_jit(jnp.asarray(logits, jnp.float32), *arrays, num_logprobs=num_logprobs)
    return tuple(np.asarray(x) for x in out)


def reference_distribution(logits: np.ndarray, t: float, k: int, p: float, min_p: float) -> np.ndarray:
    """The target distribution of one row, written the slow and obvious way."""
    order = np.argsort(-logits, kind="stable")
    z = logits[order].astype(np.float64) / t
    probs = np.exp(z - z.max())
    keep = np.ones(len(z), bool)

    def renorm() -> np.ndarray:
        q = np.where(keep, probs, 0.0)
        return q / q.sum()

    if k > 0:
        keep[k:] = False
    if p < 1.0:
        q, mass = renorm(), 0.0
        for r in range(len(z)):
            if mass >= p:
                keep[r:] = False
                break
            mass += q[r]
    if min_p > 0.0:
        q = renorm()
        keep &= q >= min_p * q.max()
    out = np.zeros(len(z))
    out[order] = renorm()
    return out


# ---------------------------------------------------------------------------------------------------------------
# SamplingParams


def test_params_defaults_and_normalization():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (16, 1.0, 0, 1.0, 0.0)
    assert p.stop == () and p.stop_token_ids == () and not p.greedy
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    hash(SamplingParams(stop=["x"], stop_token_ids=[1]))  # frozen and hashable after normalization


def test_params_greedy():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.1}, "min_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logprobs": -1}, "logprobs"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
])
def test_params_reject_out_of_range(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_accept_edges():
    SamplingParams(temperature=0.0, top_p=1.0, min_p=1.0, top_k=-1, max_tokens=None, min_tokens=3,
                   logprobs=0, seed=2**63 - 1)
    SamplingParams(max_tokens=4, min_tokens=4)


def test_params_validate_for_model():
    SamplingParams(stop_token_ids=[0, 99], logprobs=20).validate_for(vocab_size=100, max_logprobs=20)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[100]).validate_for(vocab_size=100, max_logprobs=20)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21).validate_for(vocab_size=100, max_logprobs=20)


# ---------------------------------------------------------------------------------------------------------------
# Host packing and seeds


def test_seed_to_uint32_mixes_high_bits():
    for s in (0, 1, 12345, 2**31, 2**62 + 7):
        v = seed_to_uint32(s)
        assert 0 <= v < 2**32 and v == seed_to_uint32(s)
    assert seed_to_uint32(1) != seed_to_uint32(1 + 2**32)
    assert seed_to_uint32(7) != seed_to_uint32(7 << 32)
    assert len({seed_to_uint32(s << 32) for s in range(1000)}) == 1000


def test_pack_sampling_rows_and_padding():
    arrays = pack_sampling([SamplingParams(temperature=0.5, top_k=-1, top_p=0.9, min_p=0.1),
                            SamplingParams(temperature=0.9, top_k=1)], seeds=[3, 2**40], counters=[0, 17],
                           num_rows=4)
    assert isinstance(arrays, SamplingArrays)
    np.testing.assert_allclose(arrays.temperature, [0.5, 0.0, 0.0, 0.0])  # top_k=1 and padding: greedy
    assert arrays.top_k.tolist() == [0, 1, 0, 0]
    np.testing.assert_allclose(arrays.top_p, [0.9, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(arrays.min_p, [0.1, 0.0, 0.0, 0.0])
    assert arrays.seeds.dtype == np.uint32 and arrays.seeds[1] == seed_to_uint32(2**40)
    assert arrays.counters.tolist() == [0, 17, 0, 0]
    with pytest.raises(ValueError):
        pack_sampling([SamplingParams()] * 3, [0] * 3, [0] * 3, num_rows=2)


# ---------------------------------------------------------------------------------------------------------------
# Greedy


def test_greedy_is_argmax_with_lowest_index_on_ties():
    logits = np.array([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [0.0, -1.0, 2.0, 2.0]], np.float32)
    tokens, *_ = run(logits, [SamplingParams(temperature=0.0)] * 3, [1, 2, 3], [0, 0, 0])
    assert tokens.tolist() == [1, 0, 2]


@pytest.mark.parametrize("vocab", [1, 5, 128, 129, 1000, 32000])
def test_first_argmax_is_argmax_with_ties_across_tiles(vocab):
    rng = np.random.default_rng(vocab)
    x = rng.integers(-3, 3, size=(12, vocab)).astype(np.float32)  # many ties, in and across 128-id tiles
    x[0] = -np.inf  # nothing finite: id 0, as argmax
    x[1, -1] = 10.0  # the maximum in the last, partial tile
    x[2, :] = 1.0
    got = jax.jit(first_argmax)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), x.argmax(-1))
    assert got.dtype == jnp.int32


def test_top_k_one_is_greedy():
    logits = np.array([[1.0, 3.0, 3.0, 2.0], [0.0, -1.0, 2.0, 2.0]], np.float32)
    for counter in range(20):
        tokens, *_ = run(logits, [SamplingParams(temperature=1.3, top_k=1)] * 2, [5, 6], [counter] * 2)
        assert tokens.tolist() == [1, 2]


def test_greedy_rows_ignore_the_other_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    params = [SamplingParams(temperature=0.0) if i % 2 == 0 else
              SamplingParams(temperature=1.5, top_p=0.5, min_p=0.05) for i in range(6)]
    tokens, *_ = run(logits, params, list(range(6)), list(range(6)))
    np.testing.assert_array_equal(tokens[::2], logits.argmax(-1)[::2])


# ---------------------------------------------------------------------------------------------------------------
# Reproducibility


def test_draw_depends_only_on_seed_and_counter():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    params = [SamplingParams(temperature=1.0 + 0.1 * i, top_k=10 * i) for i in range(6)]
    seeds, counters = [11, 22, 2**40, 44, 55, 66], [0, 3, 9, 1, 100, 7]
    tokens, *_ = run(logits, params, seeds, counters)

    # Same rows, reversed, with every other row's logits and seed changed: row i's draw must not move.
    for i in range(6):
        other = rng.normal(size=(6, 50)).astype(np.float32)
        other_seeds = [int(s) for s in rng.integers(0, 2**32, size=6)]
        j = 5 - i
        other[j] = logits[i]
        ps, ss, cs = [SamplingParams()] * 6, other_seeds, [5] * 6
        ps, ss, cs = list(ps), list(ss), list(cs)
        ps[j], ss[j], cs[j] = params[i], seeds[i], counters[i]
        moved, *_ = run(other, ps, ss, cs)
        assert moved[j] == tokens[i], f"row {i} changed when moved to {j}"

    # And the counter does drive the randomness: a flat distribution gives different tokens over counters.
    flat = np.zeros((6, 50), np.float32)
    draws = {int(run(flat, [SamplingParams()] * 6, [9] * 6, [c, 0, 0, 0, 0, 0])[0][0]) for c in range(30)}
    assert len(draws) > 10


# ---------------------------------------------------------------------------------------------------------------
# Filters: support and distribution

NUM_DRAWS = 4000
# Max |empirical - target| per token; the standard error of one frequency over 4000 draws is <= 0.008.
TOLERANCE = 0.03


@pytest.mark.parametrize("t, k, p, min_p, support_size", [
    (1.0, 0, 1.0, 0.0, 8),
    (0.5, -1, 1.0, 0.0, 8),
    (2.0, 0, 1.0, 0.0, 8),
    (1.0, 3, 1.0, 0.0, 3),
    (1.0, 0, 0.7, 0.0, 3),  # mass 0.3, 0.55, 0.75: the third token reaches 0.7
    (1.0, 0, 1.0, 0.3, 4),  # 0.1 >= 0.3 * 0.3 > 0.08
    (0.8, 5, 0.82, 0.0, 3),  # top-k's renormalization is what makes top-p cut the fourth token
    (0.8, 5, 0.82, 0.7, 2),
])
def test_filters_match_reference_distribution(t, k, p, min_p, support_size):
    target = reference_distribution(CRAFTED_LOGITS, t, k, p, min_p)
    assert np.count_nonzero(target) == support_size  # the case tests what its comment says

    # One request's 4000 consecutive tokens: same seed, counters 0..3999, laid out as rows of one batch.
    logits = np.broadcast_to(CRAFTED_LOGITS, (NUM_DRAWS, 8))
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=min_p)] * NUM_DRAWS
    tokens, *_ = run(logits, params, [2024] * NUM_DRAWS, list(range(NUM_DRAWS)))

    freq = np.bincount(tokens, minlength=8) / NUM_DRAWS
    assert np.all(freq[target == 0] == 0), f"sampled a filtered token: {freq} vs {target}"
    assert np.max(np.abs(freq - target)) < TOLERANCE, f"{freq} vs {target}"


def test_top_p_keeps_the_best_token_however_small_p():
    logits = np.broadcast_to(CRAFTED_LOGITS, (64, 8))
    tokens, *_ = run(logits, [SamplingParams(top_p=1e-6)] * 64, [1] * 64, list(range(64)))
    assert set(tokens.tolist()) == {PERM[0]}


def test_min_p_one_keeps_only_the_best_tokens():
    logits = np.array([[0.0, 2.0, 2.0, 1.0]] * 64, np.float32)
    tokens, *_ = run(logits, [SamplingParams(min_p=1.0)] * 64, [3] * 64, list(range(64)))
    assert set(tokens.tolist()) == {1, 2}


# ---------------------------------------------------------------------------------------------------------------
# Logprobs


def test_logprobs_are_the_raw_model_distribution():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 40)).astype(np.float32)
    logits[0, 7] = logits[0, 3] = logits[0].max() + 1.0  # a tie at the top: lower id first
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.3, top_k=5),
              SamplingParams(temperature=2.0, top_p=0.5), SamplingParams(min_p=0.2)]
    tokens, token_lp, top_ids, top_lp = run(logits, params, [1, 2, 3, 4], [0, 1, 2, 3], num_logprobs=5)
    expected = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))

    assert tokens.dtype == np.int32 and top_ids.dtype == np.int32
    assert token_lp.dtype == np.float32 and top_lp.dtype == np.float32
    assert top_ids.shape == top_lp.shape == (4, 5)
    np.testing.assert_allclose(token_lp, expected[np.arange(4), tokens], rtol=1e-6)
    np.testing.assert_array_equal(top_ids, np.argsort(-logits, axis=-1, kind="stable")[:, :5])
    np.testing.assert_allclose(top_lp, np.take_along_axis(expected, top_ids, axis=-1), rtol=1e-6)
    assert np.all(np.diff(top_lp, axis=-1) <= 0)
    assert top_ids[0, :2].tolist() == [3, 7]


def test_zero_logprobs_gives_empty_top_arrays():
    tokens, token_lp, top_ids, top_lp = run(np.zeros((2, 8), np.float32), [SamplingParams()] * 2, [0, 1],
                                            [0, 0], num_logprobs=0)
    assert top_ids.shape == top_lp.shape == (2, 0)
    np.testing.assert_allclose(token_lp, np.log(1 / 8), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Compilation


def test_new_values_do_not_recompile():
    compiles: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    fn = jax.jit(sample, static_argnames="num_logprobs")
    rng = np.random.default_rng(3)

    def call(params: list[SamplingParams], seed: int, counter: int) -> None:
        arrays = pack_sampling(params, [seed] * 4, [counter] * 4, num_rows=4)
        logits = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
        jax.block_until_ready(fn(logits, *arrays, num_logprobs=2))

    call([SamplingParams()] * 4, 0, 0)
    warm = fn._cache_size()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        call([SamplingParams(temperature=0.0)] * 4, 1, 5)
        call([SamplingParams(temperature=0.3, top_k=3, top_p=0.4, min_p=0.2, seed=9)] * 4, 2**40, 1000)
        call([SamplingParams(top_k=-1), SamplingParams(top_k=1), SamplingParams(), SamplingParams(min_p=1)],
             7, 2)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert fn._cache_size() == warm  # jit caches are per function, so `warm` counts other tests' shapes too
    assert compiles == []


def test_no_full_vocabulary_sort_is_compiled():
    """Thresholds come from top-k candidates; a full [S, V] sort (0.5 s at S=64, V=32k on CPU) must not return."""
    s, v = 8, 4096
    args = (jnp.zeros((s, v)), jnp.ones(s), jnp.zeros(s, jnp.int32), jnp.full(s, 0.9), jnp.zeros(s),
            jnp.zeros(s, jnp.uint32), jnp.zeros(s, jnp.int32))
    text = jax.jit(functools.partial(sample, num_logprobs=5)).lower(*args).compile().as_text()
    assert " sort(" not in text


def test_top_logprobs_only_when_a_row_wants_them():
    """`top_wanted` False skips the top-N (zeros, no sort); True gives exactly what the unconditional call gives."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(4, 300)), jnp.float32)
    arrays = pack_sampling([SamplingParams(temperature=0.0)] * 4, [1, 2, 3, 4], [0] * 4, num_rows=4)
    always = sample_jit(logits, *arrays, num_logprobs=N_LOGPROBS)
    wanted = sample_jit(logits, *arrays, num_logprobs=N_LOGPROBS, top_wanted=jnp.bool_(True))
    skipped = sample_jit(logits, *arrays, num_logprobs=N_LOGPROBS, top_wanted=jnp.bool_(False))
    for a, b in zip(always, wanted, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(skipped[0]), np.asarray(always[0]))  # tokens and their logprobs
    np.testing.assert_array_equal(np.asarray(skipped[1]), np.asarray(always[1]))
    assert np.asarray(skipped[2]).shape == (4, N_LOGPROBS) and not np.asarray(skipped[2]).any()
    assert not np.asarray(skipped[3]).any()
