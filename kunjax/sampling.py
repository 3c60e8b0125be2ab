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

The host side (`kunjax.sampling_params.pack_sampling`, `seed_to_uint32`) turns `SamplingParams` into the [S]
arrays; which rows are in a step, and their counters, are the scheduler's business.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Candidate tokens per row examined before falling back to a bisection over the whole vocabulary.
CANDIDATES = 128


def sample(
    logits: jax.Array,  # [S, V] float32 (other float dtypes are upcast)
    temperature: jax.Array,  # [S] float32, 0 => greedy (argmax)
    top_k: jax.Array,  # [S] int32, <= 0 => disabled
    top_p: jax.Array,  # [S] float32, >= 1 => disabled
    min_p: jax.Array,  # [S] float32, 0 => disabled
    seeds: jax.Array,  # [S] uint32
    counters: jax.Array,  # [S] int32
    num_logprobs: int,  # static N
    top_wanted: jax.Array | None = None,  # [] bool: some row reports top logprobs (None: always compute them)
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One token per row.

    Returns (tokens [S] int32, token_logprobs [S] float32, top_ids [S, N] int32, top_logprobs [S, N] float32);
    top ids are sorted by descending logprob (ties: lowest id first).

    With `top_wanted` False the top ids and logprobs are zeros (no row asked for them).

    Filters apply in order — temperature, top-k, top-p (smallest prefix of the sorted distribution whose mass
    is >= top_p, at least one token), min-p (probability >= min_p * the largest probability) — each on the
    distribution renormalized after the previous one; then a Gumbel-max draw on what survives. Each filter is
    a threshold on the scaled logits, so tokens tied with the last kept one are kept too.
    """
    logits = logits.astype(jnp.float32)
    greedy_ids = first_argmax(logits)  # [S]; first maximal id
    # The filtered draw runs only when some row samples: all-greedy steps (the common serving case for
    # evaluation and the tests) cost an argmax.
    tokens = jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: jnp.where(temperature > 0, _filtered_draw(logits, temperature, top_k, top_p, min_p, seeds,
                                                          counters), greedy_ids),
        lambda: greedy_ids)

    # Raw logprobs without materializing log_softmax over [S, V]: logprob = logit - logsumexp.
    lse = jax.nn.logsumexp(logits, axis=-1)  # [S]
    token_logprobs = jnp.take_along_axis(logits, tokens[:, None], axis=1)[:, 0] - lse
    if num_logprobs:
        def top():
            top_vals, ids = jax.lax.top_k(logits, num_logprobs)  # [S, N]; ties: lowest id first
            return ids, top_vals - lse[:, None]

        def skipped():  # no row reads them: a top-k over [S, V] is a full sort on XLA CPU (~3 ms at [64, 32k])
            return jnp.zeros((logits.shape[0], num_logprobs), jnp.int32), jnp.zeros(
                (logits.shape[0], num_logprobs), jnp.float32)

        top_ids, top_logprobs = top() if top_wanted is None else jax.lax.cond(top_wanted, top, skipped)
    else:
        s = logits.shape[0]
        top_logprobs, top_ids = jnp.zeros((s, 0), jnp.float32), jnp.zeros((s, 0), jnp.int32)
    return tokens.astype(jnp.int32), token_logprobs, top_ids, top_logprobs


def _filtered_draw(
    logits: jax.Array,  # [S, V] float32
    temperature: jax.Array,  # [S]
    top_k: jax.Array,  # [S]
    top_p: jax.Array,  # [S]
    min_p: jax.Array,  # [S]
    seeds: jax.Array,  # [S] uint32
    counters: jax.Array,  # [S] int32
) -> jax.Array:  # [S] int32 sampled ids (meaningless on greedy rows; the caller selects)
    vocab = logits.shape[1]
    # No full sort: a full [S, V] sort costs ~0.6 s on CPU at S=64, V=32k. The C best tokens (lax.top_k:
    # descending, ties lowest id first) decide every threshold in the common case; a bisection over the
    # whole row runs only when some row's top-k or top-p cut falls beyond them.
    c = min(vocab, CANDIDATES)
    # Each top-k's outputs are used whole (masked reductions, no slices or gathers): XLA CPU decomposes top-k
    # into sort + slice, and any further slice of it keeps the full [S, V] sort (~0.5 s at S=64, V=32k).
    top_vals = jax.lax.top_k(logits, c)[0]  # [S, C] values only
    rank = jnp.arange(c, dtype=jnp.int32)[None, :]  # [1, C]
    # Temperature, shifted so the best token sits at 0: no overflow for tiny temperatures, and exp() of a
    # scaled logit is directly its probability relative to the best token (what min-p compares).
    safe_t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    row_max = jnp.max(logits, axis=-1, keepdims=True)  # [S, 1] (not top_vals[:, :1]: see above)
    scaled = (logits - row_max) / safe_t  # [S, V], max 0
    cand = (top_vals - row_max) / safe_t  # [S, C], descending

    k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)  # [S]
    t_k = jnp.where(k <= c, jnp.min(jnp.where(rank < k[:, None], cand, jnp.inf), axis=-1), -jnp.inf)
    need_k = (k > c) & (k < vocab)

    def top_p_cut(t_k):  # -> (threshold [S], found within the candidates [S])
        z = jnp.sum(jnp.where(scaled >= t_k[:, None], jnp.exp(scaled), 0.0), axis=-1)  # [S]
        probs = jnp.where(cand >= t_k[:, None], jnp.exp(cand), 0.0) / z[:, None]  # [S, C]
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better candidates
        n_keep = jnp.sum(before < top_p[:, None], axis=-1)  # >= 1: the best token is always kept
        cut = jnp.min(jnp.where(rank < n_keep[:, None], cand, jnp.inf), axis=-1)
        # top_p >= 1 is off explicitly: float cumsum can reach 1.0 early and would drop the tail.
        off = top_p >= 1.0
        found = off | (jnp.sum(probs, axis=-1) >= top_p) | (n_keep < c)
        return jnp.where(off, -jnp.inf, cut), found, z

    t_p, found_p, _ = top_p_cut(t_k)

    def full_row_cuts(_):
        lo0 = jnp.min(scaled, axis=-1)
        tk = jnp.where(need_k, _bisect(lambda t: jnp.sum(scaled >= t[:, None], axis=-1) >= k, lo0), t_k)
        tp, found, z = top_p_cut(tk)
        mass = lambda t: jnp.sum(jnp.where((scaled >= t[:, None]) & (scaled >= tk[:, None]),  # noqa: E731
                                           jnp.exp(scaled), 0.0), axis=-1) >= top_p * z
        return tk, jnp.where(found, tp, _bisect(mass, lo0))

    t_k, t_p = jax.lax.cond(jnp.any(need_k | ~found_p), full_row_cuts, lambda _: (t_k, t_p), None)
    t_min = jnp.where(min_p > 0, jnp.log(jnp.maximum(min_p, 1e-38)), -jnp.inf)
    keep = scaled >= jnp.maximum(jnp.maximum(t_k, t_p), t_min)[:, None]  # [S, V]; the best token always

    noise = _gumbel(seeds, counters, vocab)  # [S, V]
    return first_argmax(jnp.where(keep, scaled + noise, -jnp.inf))  # [S]


def first_argmax(x: jax.Array, tile: int = 128) -> jax.Array:  # [S, V] float -> [S] int32
    """`jnp.argmax(x, axis=-1)` (the first maximal id) in two short passes: the maximum of each tile of `tile`
    ids, the first tile reaching the row's maximum, the first id in it that does. XLA CPU lowers an argmax over
    the whole row to a slow variadic (value, index) reduction: 9 ms at [64, 32000] on two cores, this 0.3 ms."""
    s, v = x.shape
    pad = -v % tile
    xt = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf).reshape(s, -1, tile)  # [S, V/tile, tile]
    best = jnp.argmax(jnp.max(xt, axis=-1), axis=-1)  # [S] first tile holding the maximum
    inside = jnp.take_along_axis(xt, best[:, None, None], axis=1)[:, 0]  # [S, tile]
    return (best * tile + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def _bisect(pred, lo: jax.Array, iters: int = 40) -> jax.Array:
    """Largest t in [lo, 0] with pred(t) (pred monotone: true at lo, false above the answer); [S] -> [S]."""
    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    hi = jnp.full_like(lo, 1e-6)
    lo, _ = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return lo


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
