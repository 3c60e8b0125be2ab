"""The Llama-family decoder (Llama 2/3, Qwen2, Mistral): GQA, RMSNorm, SwiGLU, RoPE (default/linear/llama3).

Weights are layer-stacked: every per-layer weight has a leading `[L, ...]` axis and the layers run as a
`lax.scan`, so a pipeline stage is a scan over its local slice and dropping parameters is resharding that axis
(DESIGN.md §4). The parameters are defined by the Flax `nnx` module `LlamaDecoder`; serving uses its pure
state (`nnx.split` → a plain dict) with the pure functions below under `jax.jit` (`nnx.jit` costs ~7 ms a
step). Two forwards share the same layer code:

* `forward_dense(params, tokens [B, T])` — full causal forward, for training and the naive reference loop;
* `run_layers` + `write_kv` — the layer scan and the one KV write of a serving unit's step
  (`kunjax.executor.step`), one stage's L/k layers of a pipeline or all L of a replica, over the paged pool.

Param tree (shapes; E hidden, F ffn, H/K query/kv heads, D head dim, V vocab):
  embed [V, E]; final_norm [E]; lm_head [E, V] (absent when tied);
  layers: attn_norm [L, E], wq [L, E, H*D], wk/wv [L, E, K*D], wo [L, H*D, E], bq [L, H*D], bk/bv [L, K*D]
  (qkv_bias), bo [L, E] (o_bias), mlp_norm [L, E], w_gate/w_up [L, E, F], w_down [L, F, E].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kunjax.config import ModelConfig

Params = dict[str, Any]


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:  # [D/2] float32
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position
        low_wavelen, high_wavelen = old_len / lo, old_len / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(
    x: jax.Array,  # [..., T, N, D]
    positions: jax.Array,  # [..., T] int32
    inv_freq: jax.Array,  # [D/2] float32
) -> jax.Array:
    """Rotate-half RoPE, as in HF Llama (q/k projections in HF layout)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [..., T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [..., T, 1, D]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:  # x [..., E], w [E]
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


# Attention over one layer: (q [.., T, H, D], k [.., T, K, D], v [.., T, K, D], layer []) -> out [.., T, H, D]
AttnFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def _layer(cfg: ModelConfig, inv_freq: jax.Array, attn: AttnFn, h: jax.Array, lp: Params,
           positions: jax.Array, layer: jax.Array, tp_axis: str | None
           ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One decoder layer on h [..., T, E]; returns (h, (k [..., T, K, D], v [..., T, K, D])).

    Under a manual `tp` axis (`tp_axis`, inside `shard_map`) the weights are this device's tensor-parallel shards
    (its H/tp query heads, K/tp KV heads, F/tp of the MLP): the two row-parallel products are summed over `tp`,
    and head counts come from the shards' shapes."""
    x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    q = x @ lp["wq"]
    k = x @ lp["wk"]
    v = x @ lp["wv"]
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    lead = h.shape[:-1]
    d = cfg.head_dim
    q = apply_rope(q.reshape(*lead, -1, d), positions, inv_freq)
    k = apply_rope(k.reshape(*lead, -1, d), positions, inv_freq)
    v = v.reshape(*lead, -1, d)
    o = attn(q, k, v, layer)
    o = o.reshape(*lead, o.shape[-2] * d) @ lp["wo"]
    if tp_axis is not None:
        o = jax.lax.psum(o, tp_axis)
    if cfg.o_bias:
        o = o + lp["bo"]
    h = h + o
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    mlp = (jax.nn.silu(x @ lp["w_gate"]) * (x @ lp["w_up"])) @ lp["w_down"]
    if tp_axis is not None:
        mlp = jax.lax.psum(mlp, tp_axis)
    return h + mlp, (k, v)


def run_layers(cfg: ModelConfig, params: Params, h: jax.Array, positions: jax.Array, attn: AttnFn,
               tp_axis: str | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Scan the stacked layers (all L, or a stage's L/k); returns the final hidden (pre-norm) and the stacked
    (k, v) [L, ..., T, K, D]. `attn` gets the layer's index within `params` (a stage's local index)."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]

    def body(carry, xs):
        lp, idx = xs
        return _layer(cfg, inv_freq, attn, carry, lp, positions, idx, tp_axis)

    return jax.lax.scan(body, h, (layers, jnp.arange(n, dtype=jnp.int32)))


def logits_from_hidden(cfg: ModelConfig, params: Params, h: jax.Array) -> jax.Array:  # [..., V] fp32
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return (h @ head).astype(jnp.float32)


def forward_dense(cfg: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Full causal forward: tokens [B, T] int32 -> logits [B, T, V] float32."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    scale = 1.0 / math.sqrt(cfg.head_dim)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    if cfg.sliding_window is not None:
        causal &= ~jnp.tril(jnp.ones((t, t), dtype=bool), -cfg.sliding_window)

    def attn(q, k, v, layer):  # q [B, T, H, D], k/v [B, T, K, D]
        g = cfg.num_heads // cfg.num_kv_heads
        qf = q.astype(jnp.float32).reshape(b, t, cfg.num_kv_heads, g, cfg.head_dim) * scale
        s = jnp.einsum("btkgd,bukd->bkgtu", qf, k.astype(jnp.float32))
        s = jnp.where(causal, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bkgtu,bukd->btkgd", p, v.astype(jnp.float32))
        return o.reshape(b, t, cfg.num_heads, cfg.head_dim).astype(q.dtype)

    h = params["embed"][tokens]
    h, _ = run_layers(cfg, params, h, positions, attn)
    return logits_from_hidden(cfg, params, h)


def slot_view(kv_pool: jax.Array, num_groups: int) -> jax.Array:
    """The pool as layer-group slots: `[NB, L, 2, BS, K, D]` -> `[NB * G, L/G, 2, BS, K, D]`, a reshape (no copy).

    Slot `v = p * G + s` is layers `s*L/G .. (s+1)*L/G - 1` of block `p`; any slot may hold any layer group of
    any logical block, so a request can keep some groups of its KV on device in free slots (layerkv).
    """
    nb, n_layers = kv_pool.shape[:2]
    return kv_pool.reshape(nb * num_groups, n_layers // num_groups, *kv_pool.shape[2:])


def write_kv(
    segments: tuple[jax.Array, ...],  # ([NB, L, 2, BS, K, D] pool, optionally [NE, L, 2, BS, K, D] extension)
    new_kv: jax.Array,  # [L, T, 2, K, D] this step's keys and values, L the layers these segments hold
    slot_mapping: jax.Array,  # [T] int32 block * BS + offset, block ids base-then-extension; or [G, T] per layer
    # group, slot * BS + offset in the pool's slot view (`slot_view`); padding points at null block 0
) -> tuple[jax.Array, ...]:
    """The one KV write of every step: this step's K/V scattered into the donated segments after the layer scan
    (DESIGN.md §11: carrying the cache through the scan is ~2x slower on GPU)."""
    pool = segments[0]
    bs = pool.shape[3]
    vals = jnp.moveaxis(new_kv, 1, 0)  # [T, L, 2, K, D]
    if slot_mapping.ndim == 2:  # per layer group, one segment
        n_layers, n_groups = pool.shape[1], slot_mapping.shape[0]
        lg = n_layers // n_groups
        layers = jnp.arange(n_layers, dtype=jnp.int32)  # [L]
        flat = slot_mapping[layers // lg].T  # [T, L] flat slot of each token at each layer
        view = slot_view(pool, n_groups).at[flat // bs, (layers % lg)[None, :], :, flat % bs].set(vals)
        return (view.reshape(pool.shape),)
    blocks, offsets = slot_mapping // bs, slot_mapping % bs
    out = []
    first = 0
    for seg in segments:  # a block id outside this segment goes to an index past its end: dropped
        n = seg.shape[0]
        local = jnp.where((blocks >= first) & (blocks < first + n), blocks - first, n)
        # Advanced indices separated by slices put the T axis first: values are [T, L, 2, K, D].
        out.append(seg.at[local, :, :, offsets].set(vals, mode="drop"))
        first += n
    return tuple(out)


class _Stacked(nnx.Module):
    """The L decoder layers as stacked parameters (one nnx.Param per weight, leading axis L)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype: jnp.dtype):
        L, E, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size

        def dense(shape, fan_in):
            return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype)
                             / math.sqrt(fan_in))

        self.attn_norm = nnx.Param(jnp.ones((L, E), dtype))
        self.wq = dense((L, E, cfg.q_size), E)
        self.wk = dense((L, E, cfg.kv_size), E)
        self.wv = dense((L, E, cfg.kv_size), E)
        self.wo = dense((L, cfg.q_size, E), cfg.q_size * 2 * L)
        if cfg.qkv_bias:
            self.bq = nnx.Param(jnp.zeros((L, cfg.q_size), dtype))
            self.bk = nnx.Param(jnp.zeros((L, cfg.kv_size), dtype))
            self.bv = nnx.Param(jnp.zeros((L, cfg.kv_size), dtype))
        if cfg.o_bias:
            self.bo = nnx.Param(jnp.zeros((L, E), dtype))
        self.mlp_norm = nnx.Param(jnp.ones((L, E), dtype))
        self.w_gate = dense((L, E, F), E)
        self.w_up = dense((L, E, F), E)
        self.w_down = dense((L, F, E), F * 2 * L)


class LlamaDecoder(nnx.Module):
    """Flax definition of the decoder's parameters; `__call__` is the dense causal forward."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.cfg = cfg
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size))
                               .astype(dtype) * 0.02)
        self.layers = _Stacked(cfg, rngs, dtype)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size))
                                     .astype(dtype) / math.sqrt(cfg.hidden_size))

    def params(self) -> Params:
        _, state = nnx.split(self, nnx.Param)
        return nnx.to_pure_dict(state)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, V]
        return forward_dense(self.cfg, self.params(), tokens)


def init_params(cfg: ModelConfig, seed: int = 0, dtype: jnp.dtype = jnp.float32) -> Params:
    return LlamaDecoder(cfg, rngs=nnx.Rngs(seed), dtype=dtype).params()
