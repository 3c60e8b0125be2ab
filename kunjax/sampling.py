"""Token sampling on device: one pure, jittable function over a step's rows, plus its host-side packing.

`sample` owns turning a step's last-position logits into one token per row, with per-row temperature, top-k,
top-p and min-p, and the logprobs the API reports. It is called inside the engine's jitted step, so it has
fixed shapes ([S, V] in, [S] and [S, N] out, N static), no Python control flow on values, and it never
recompiles when the sampling values change.

Invariants:
* A greedy row (temperature 0) returns exactly `argmax(logits)` (ties: lowest id), whatever the other rows
  are.
* A sampled row's randomness depends only on (its seed, how many tokens it has generated), never on its row
  index, the batch's other rows, or how often it was preempted and recomputed: the draw is the Gumbel-max
  trick with noise from a counter-based integer hash of (seed, counter, rank). The hash compiles to a few
  integer ops (threefry `jax.random.categorical` added ~0.8 s to every step compile on CPU, per bucket and
  per instance).
* Logprobs are of the raw model distribution (`log_softmax` of the unmodified logits), as vLLM reports by
  default — temperature and the filters change what is sampled, not what is reported.

The host side (`pack_sampling`, `seed_to_uint32`) turns `SamplingParams` into the [S] arrays; which rows are
in a step, and their counters, are the scheduler's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kunjax.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def seed_to_uint32(seed: int) -> int:
    """The 32-bit device seed of a request seed in [0, 2**63).

    A splitmix64 finalizer, then high half XOR low half: every bit of the 64-bit seed reaches the result, so
    seeds that differ only above bit 31 (e.g. `s` and `s + 2**32`) do not collide trivially.
    """
    z = seed & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z ^ (z >> 32)) & 0xFFFFFFFF


class SamplingArrays(NamedTuple):
    """A step's per-row sampling inputs, in `sample`'s argument order (`sample(logits, *arrays, ...)`).

    A NamedTuple, so it is a pytree and can be passed to a jitted step as one argument.
    """

    temperature: np.ndarray  # [S] float32, 0 => greedy
    top_k: np.ndarray  # [S] int32, 0 => disabled
    top_p: np.ndarray  # [S] float32, 1 => disabled
    min_p: np.ndarray  # [S] float32, 0 => disabled
    seeds: np.ndarray  # [S] uint32, seed_to_uint32(request seed)
    counters: np.ndarray  # [S] int32, tokens the request has generated so far


def pack_sampling(params: Sequence[SamplingParams], seeds: Sequence[int], counters: Sequence[int],
                  num_rows: int) -> SamplingArrays:
    """Host arrays for one step; rows past `len(params)` are padding and decode greedily.

    `seeds` are the resolved request seeds (the user's, or one the engine drew); `counters[i]` is the number
    of tokens request i has generated before this step's token.
    """
    n = len(params)
    if not (len(seeds) == len(counters) == n <= num_rows):
        raise ValueError(f"pack_sampling: {n} params, {len(seeds)} seeds, {len(counters)} counters "
                         f"for {num_rows} rows")
    out = SamplingArrays(
        temperature=np.zeros(num_rows, np.float32),
        top_k=np.zeros(num_rows, np.int32),
        top_p=np.ones(num_rows, np.float32),
        min_p=np.zeros(num_rows, np.float32),
        seeds=np.zeros(num_rows, np.uint32),
        counters=np.zeros(num_rows, np.int32),
    )
    for i, (p, seed, counter) in enumerate(zip(params, seeds, counters, strict=True)):
        out.temperature[i] = 0.0 if p.greedy else p.temperature
        out.top_k[i] = max(p.top_k, 0)
        out.top_p[i] = p.top_p
        out.min_p[i] = p.min_p
        out.seeds[i] = seed_to_uint32(seed)
        out.counters[i] = counter
    return out


def sample(
    logits: jax.Array,  # [S, V] float32 (other float dtypes are upcast)
    temperature: jax.Array,  # [S] float32, 0 => greedy (argmax)
    top_k: jax.Array,  # [S] int32, <= 0 => disabled
    top_p: jax.Array,  # [S] float32, >= 1 => disabled
    min_p: jax.Array,  # [S] float32, 0 => disabled
    seeds: jax.Array,  # [S] uint32
    counters: jax.Array,  # [S] int32
    num_logprobs: int,  # static N
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One token per row.

    Returns (tokens [S] int32, token_logprobs [S] float32, top_ids [S, N] int32, top_logprobs [S, N] float32);
    top ids are sorted by descending logprob (ties: lowest id first).

    Filters apply in order — temperature, top-k, top-p (smallest prefix of the sorted distribution whose mass
    is >= top_p, at least one token), min-p (probability >= min_p * the largest probability) — each on the
    distribution renormalized after the previous one; then a Gumbel-max draw on what survives.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[1]
    logprobs = jax.nn.log_softmax(logits, axis=-1)  # [S, V]
    greedy_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [S]; first maximal id

    # The one sort per row: descending and stable, so equal logits keep ascending id order. Everything
    # below works by rank in this order; `sorted_ids` maps a rank back to a token id.
    ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), logits.shape)
    neg_sorted, sorted_ids = jax.lax.sort((-logits, ids), dimension=1, is_stable=True, num_keys=1)
    sorted_logits = -neg_sorted  # [S, V], column 0 is the row max
    rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]  # [1, V]

    # Temperature, shifted so the best token sits at 0: no overflow for tiny temperatures, and exp() of a
    # scaled logit is directly its probability relative to the best token (what min-p compares).
    safe_t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = (sorted_logits - sorted_logits[:, :1]) / safe_t  # [S, V]

    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)[:, None]
    keep = rank < k  # [S, V] bool

    probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
    # `mass_before < top_p` keeps rank 0 always; top_p >= 1 is checked explicitly because float cumsum can
    # reach 1.0 before the tail and would otherwise drop tokens with the filter disabled.
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)

    # Renormalizing after top-k / top-p does not change ratios to the best token, which is always kept.
    keep &= jnp.exp(scaled) >= min_p[:, None]

    noise = _gumbel(seeds, counters, vocab)  # [S, V]
    sampled_rank = jnp.argmax(jnp.where(keep, scaled + noise, -jnp.inf), axis=-1)  # [S]
    sampled_ids = jnp.take_along_axis(sorted_ids, sampled_rank[:, None].astype(jnp.int32), axis=1)[:, 0]
    tokens = jnp.where(temperature > 0, sampled_ids, greedy_ids).astype(jnp.int32)

    token_logprobs = jnp.take_along_axis(logprobs, tokens[:, None], axis=1)[:, 0]
    top_ids = sorted_ids[:, :num_logprobs]
    top_logprobs = jnp.take_along_axis(logprobs, top_ids, axis=1)
    return tokens, token_logprobs, top_ids, top_logprobs


def _fmix32(h: jax.Array) -> jax.Array:  # uint32 -> uint32, murmur3's finalizer (full avalanche)
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _gumbel(seeds: jax.Array, counters: jax.Array, vocab: int) -> jax.Array:
    """Standard Gumbel noise [S, V] float32, a pure function of (seed, counter, column)."""
    row = _fmix32(_fmix32(seeds.astype(jnp.uint32) ^ jnp.uint32(0x9E3779B9))
                  ^ (counters.astype(jnp.uint32) * jnp.uint32(0x27D4EB2F)))  # [S]
    col = jnp.arange(vocab, dtype=jnp.uint32) * jnp.uint32(0x165667B1) + jnp.uint32(0xD3A2646C)  # [V]
    bits = _fmix32(_fmix32(row[:, None] ^ col[None, :]) + row[:, None])  # [S, V]
    u = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))  # (0, 1), 24 random bits
    return -jnp.log(-jnp.log(u))
