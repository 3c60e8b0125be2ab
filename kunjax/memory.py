"""Memory arithmetic on the host: parameter shapes, bytes per device, KV blocks per pool, and what a drop frees.

Pure Python over shapes and ints, so the host side (books, policies, the arithmetic executor) and the JAX executor
size everything the same way (DESIGN.md §5: `capacity = weights + kv_pool + extension + activation_reserve`).
On GPU/TPU the executor passes the device's `bytes_limit`; on CPU a configured budget stands in for it, which is
how CPU runs create memory pressure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kunjax.config import EngineConfig, ModelConfig
from sharding.layouts import param_specs, replica_spec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GPU_ACTIVATION_RESERVE = 256 * 2**20  # kept free for activations of the largest bucket when sizing from stats
CPU_DEFAULT_KV_BYTES = 64 * 2**20


def dtype_bytes(dtype: Any) -> int:
    name = getattr(dtype, "name", None) or str(dtype)
    return DTYPE_BYTES[name]


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """Expected shape of every leaf, for validating checkpoints before anything is placed on devices."""
    L, E, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    layers = {"attn_norm": (L, E), "wq": (L, E, cfg.q_size), "wk": (L, E, cfg.kv_size),
              "wv": (L, E, cfg.kv_size), "wo": (L, cfg.q_size, E), "mlp_norm": (L, E),
              "w_gate": (L, E, F), "w_up": (L, E, F), "w_down": (L, F, E)}
    if cfg.qkv_bias:
        layers.update(bq=(L, cfg.q_size), bk=(L, cfg.kv_size), bv=(L, cfg.kv_size))
    if cfg.o_bias:
        layers["bo"] = (L, E)
    out: dict[str, Any] = {"embed": (V, E), "final_norm": (E,), "layers": layers}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = (E, V)
    return out


def flatten_params(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'layers': {'wq': x}} -> {'layers/wq': x}; leaves are whatever is not a dict."""
    out: dict[str, Any] = {}
    for name, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_params(v, f"{prefix}{name}/"))
        else:
            out[f"{prefix}{name}"] = v
    return out


def unflatten_params(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten_params`."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: Any, tp: int = 1) -> int:
    """Bytes of one KV block (all L layers, K and V) on one device of a `tp`-way instance."""
    return cfg.num_layers * 2 * block_size * (cfg.num_kv_heads // tp) * cfg.head_dim * dtype_bytes(dtype)


def split_vocab(cfg: ModelConfig, k: int) -> bool:
    """A k-stage group splits the embedding and the LM head over its stages when k divides the vocabulary."""
    return k > 1 and cfg.vocab_size % k == 0


def weight_bytes_per_device(cfg: ModelConfig, dtype: Any, tp: int, k: int = 1) -> int:
    """Weight bytes one device holds: a replica's (k = 1), or one stage's of a k-stage group."""
    shapes = flatten_params(param_shapes(cfg))
    specs = flatten_params(param_specs(param_shapes(cfg), split_vocab(cfg, k)))
    sizes = {"stage": k, "tp": tp}
    total = 0
    for path, shape in shapes.items():
        spec = specs[path] if k > 1 else replica_spec(specs[path])
        n = int(np.prod(shape)) * dtype_bytes(dtype)
        for axis in spec:
            if axis is not None:
                n //= sizes[axis]
        total += n
    return total


def num_kv_blocks(cfg: ModelConfig, ecfg: EngineConfig, weight_bytes: int, bytes_limit: int | None) -> int:
    """Blocks of an instance's pool: explicit (`--num-blocks`), from a CPU byte budget (`--kv-cache-bytes`, or
    `--device-memory-bytes` minus the weights and the activation reserve), or from the device's `bytes_limit`."""
    if ecfg.num_blocks is not None:
        return ecfg.num_blocks
    block = kv_block_bytes(cfg, ecfg.block_size, ecfg.dtype, ecfg.tp)
    budget = ecfg.kv_cache_bytes
    if budget is None and ecfg.device_memory_bytes is not None:
        # A simulated device (CPU): the pool gets what the weights and the activation reserve leave.
        budget = ecfg.device_memory_bytes - weight_bytes - ecfg.activation_reserve_bytes
    if budget is None:
        if bytes_limit is not None:
            budget = int(bytes_limit * ecfg.kv_memory_fraction) - weight_bytes - GPU_ACTIVATION_RESERVE
        else:
            budget = CPU_DEFAULT_KV_BYTES  # a configured budget is how CPU runs create memory pressure
    n = budget // block
    if n < 2:
        raise ValueError(f"KV budget of {budget} bytes per device holds {n} blocks of {block} bytes: "
                         f"raise --kv-cache-bytes or lower --block-size")
    return int(n)


def extension_blocks(cfg: ModelConfig, ecfg: EngineConfig, k: int, microbatch_tokens: int) -> int:
    """Pipeline blocks (L/k layers each) per device that a drop to k stages frees: the weights each device stops
    holding, minus the group's activation buffer; 0 when k does not divide the layers or nothing is left."""
    if k < 2 or cfg.num_layers % k:
        return 0
    freed = (weight_bytes_per_device(cfg, ecfg.dtype, ecfg.tp) - weight_bytes_per_device(cfg, ecfg.dtype, ecfg.tp, k))
    acts = microbatch_tokens * cfg.hidden_size * dtype_bytes(ecfg.dtype)
    pblock = kv_block_bytes(cfg, ecfg.block_size, ecfg.dtype, ecfg.tp) // k
    return max(0, (freed - acts) // pblock)
