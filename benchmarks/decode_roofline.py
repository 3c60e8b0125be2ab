"""The engine's decode step for an 8B-shaped Llama against the memory roofline, on one device, in one run.

    python benchmarks/decode_roofline.py --out roofline.json                 # GPU (H100/H200): 8B, batch 64 x 2048
    python benchmarks/decode_roofline.py --attention-backend reference      # the same with the pure-JAX attention
    JAX_PLATFORMS=cpu python benchmarks/decode_roofline.py --quick          # CPU smoke run, tiny model

What is timed is the engine's own compiled step: the one-stage unit tick the JAX executor compiles for a replica
(`kunjax.executor.step.compile_tick`, one token bucket of `--batch` rows) on one device with random weights and a
pool sized for `--batch` sequences of `--context` cached tokens, called as the executor calls it, with the
`kunjax.plan.StepInputs` a serving unit builds for a decode batch: every sequence has `--context` tokens cached
(block tables a seeded random permutation of the pool's blocks) and decodes one token at position `--context`.
Filling 64 x 2048 tokens through the scheduler would mean a long prefill first, so the step's inputs are written
directly; the function is the engine's.

Weights (Llama-3-8B shape: hidden 4096, 32 layers, 32 heads, 8 KV heads, head dim 128, FFN 14336, vocab
128256, untied head) are random bf16 generated on the device one leaf at a time (`jax.jit` with the engine's
parameter shardings as `out_shardings`), so nothing model-sized passes through the host. The pool is random too.

Roofline: the bytes a decode step must move at least once, divided by the device's copy bandwidth measured in
the same run (`benchmarks/kernels/common.py`: read + write bytes of a large `x + 1`, counted as is, not
halved). The bytes: every weight except the embedding table, plus the `--batch` embedding rows gathered; every
sequence's cached K and V in every layer; the new tokens' K and V written. The figure with the whole embedding
table counted (as DESIGN.md §11's 11.5 ms estimate does) is printed too. Ratio = roofline / measured step time;
the target on an H100/H200 is >= 0.70 (on the first figure, the stricter one).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernels.common import (  # noqa: E402
    GiB,
    device_info,
    is_target_gpu,
    measure_copy_bandwidth,
    memory_budget,
    time_calls,
    write_json,
)

TARGET_RATIO = 0.70
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=32, max_position_embeddings=1024)


def random_params(cfg, dtype, mesh, seed: int) -> dict[str, Any]:
    """Random weights in the engine's param tree, generated on the mesh one leaf at a time."""
    import jax
    import jax.numpy as jnp

    from kunjax.memory import flatten_params, param_shapes, unflatten_params
    from sharding.layouts import param_shardings

    shapes = param_shapes(cfg)
    shardings = flatten_params(param_shardings(mesh, shapes))
    out = {}
    for i, (name, shape) in enumerate(sorted(flatten_params(shapes).items())):
        leaf = name.rsplit("/", 1)[-1]
        if leaf.endswith("norm"):
            gen = lambda key, shape=shape: jnp.ones(shape, dtype)  # noqa: E731
        elif leaf.startswith("b"):  # biases
            gen = lambda key, shape=shape: jnp.zeros(shape, dtype)  # noqa: E731
        else:
            std = 0.02 if leaf == "embed" else 1.0 / math.sqrt(shape[-2])
            gen = lambda key, shape=shape, std=std: (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)  # noqa: E731
        out[name] = jax.jit(gen, out_shardings=shardings[name])(jax.random.key(seed * 1000 + i))
    return unflatten_params(out)


@dataclasses.dataclass(frozen=True)
class RooflineBytes:
    """Bytes one decode step must move at least once."""

    weights: int  # every weight but the embedding table (an untied table is only gathered from)
    embedding_rows: int  # the rows of the table gathered for this step's tokens
    embedding_table: int  # the whole table: counted only in the "full embedding" variant
    kv_read: int  # every sequence's cached K and V, all layers
    kv_written: int  # this step's new K and V, all layers

    @property
    def total(self) -> int:
        return self.weights + self.embedding_rows + self.kv_read + self.kv_written

    @property
    def total_full_embedding(self) -> int:
        return self.weights + self.embedding_table + self.kv_read + self.kv_written


def roofline_bytes(cfg, batch: int, context: int, itemsize: int) -> RooflineBytes:
    """The accounting above for `batch` sequences of `context` cached tokens, weights and KV of `itemsize`."""
    from kunjax.memory import flatten_params, param_shapes

    shapes = flatten_params(param_shapes(cfg))
    weights = sum(math.prod(s) for s in shapes.values()) * itemsize
    table = math.prod(shapes["embed"]) * itemsize
    rows = batch * cfg.hidden_size * itemsize
    if cfg.tie_word_embeddings:  # the table is also the LM head, read whole
        table, rows = 0, 0
    per_token = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * itemsize
    return RooflineBytes(weights=weights - table, embedding_rows=rows, embedding_table=table,
                         kv_read=batch * context * per_token, kv_written=batch * per_token)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3f} {unit}"
    return f"{n:.0f} B"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and shapes (CPU smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    ap.add_argument("--attention-backend", default="auto", help="EngineConfig.attention_backend (default auto)")
    ap.add_argument("--batch", type=int, default=None, help="decoding sequences (default 64; quick 4)")
    ap.add_argument("--context", type=int, default=None, help="cached tokens per sequence (default 2048; quick 64)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="weights and KV (default bfloat16; quick float32, which is faster on CPU)")
    ap.add_argument("--max-logprobs", type=int, default=None, help="top logprobs the step computes (engine default)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs (median reported)")
    ap.add_argument("--target-run-s", type=float, default=None, help="length of one timed run (default 0.5)")
    ap.add_argument("--copy-mib", type=int, default=None, help="array copied to measure bandwidth (default 1024)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    batch = args.batch or (4 if args.quick else 64)
    context = args.context or (64 if args.quick else 2048)
    dtype_name = args.dtype or ("float32" if args.quick else "bfloat16")
    copy_bytes = (args.copy_mib or (16 if args.quick else 1024)) * 2**20
    target_run_s = args.target_run_s or (0.05 if args.quick else 0.5)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import pallas_kernels
    from kunjax.config import ConfigError, ModelConfig
    from kunjax.engine import config_from_kwargs
    from kunjax.executor.step import compile_tick
    from kunjax.memory import flatten_params, param_shapes
    from kunjax.plan import StepInputs, UnitShape
    from sharding.layouts import instance_meshes, kv_pool_sharding

    device = jax.devices()[0]
    info = device_info(device)
    cfg = ModelConfig(**(TINY if args.quick else LLAMA_8B))
    bs = args.block_size
    blocks_per_seq = math.ceil((context + 1) / bs)  # the cached tokens and the one being decoded
    extra = {} if args.max_logprobs is None else {"max_logprobs": args.max_logprobs}
    try:
        ecfg = config_from_kwargs(num_instances=1, dtype=dtype_name, block_size=bs,
                                  num_blocks=1 + batch * blocks_per_seq,
                                  max_num_seqs=batch, max_num_batched_tokens=batch, min_token_bucket=batch,
                                  max_model_len=blocks_per_seq * bs, attention_backend=args.attention_backend, **extra)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = jnp.dtype(dtype_name)
    resolved = pallas_kernels.resolve_backend(args.attention_backend, [device])  # as the JAX executor does

    # Bytes before allocating anything: weights + pool must fit the device.
    n_params = sum(math.prod(s) for s in flatten_params(param_shapes(cfg)).values())
    pool_bytes = ecfg.num_blocks * cfg.num_layers * 2 * bs * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
    budget = memory_budget(device, 0.95)
    if n_params * dtype.itemsize + pool_bytes > budget:
        print(f"error: weights ({n_params * dtype.itemsize / GiB:.1f} GiB) + KV pool ({pool_bytes / GiB:.1f} GiB) "
              f"exceed this device's budget ({budget / GiB:.1f} GiB)", file=sys.stderr)
        return 1

    print(f"device: {info['device_kind']} ({info['platform']}), jax {info['jax']}")
    print(f"model: {'tiny' if args.quick else '8B-shaped'} Llama, {n_params / 1e6:.1f}M params, {dtype_name}; "
          f"decode batch {batch} x {context} cached tokens, block size {bs}; attention backend "
          f"{args.attention_backend} -> {resolved}")
    bw = measure_copy_bandwidth(device, copy_bytes)
    print(f"copy bandwidth: {bw.bytes_per_s / 1e9:.1f} GB/s (read + write, x + 1 over "
          f"{bw.array_bytes / 2**20:.0f} MiB, median of 7 runs)")

    t0 = time.perf_counter()
    mesh = instance_meshes([device], 1, 1)[0]
    params = random_params(cfg, dtype, mesh, args.seed)
    pool_shape = (ecfg.num_blocks, cfg.num_layers, 2, bs, cfg.num_kv_heads, cfg.head_dim)
    state = {"pool": jax.jit(lambda key: jax.random.normal(key, pool_shape, dtype),
                             out_shardings=kv_pool_sharding(mesh))(jax.random.key(args.seed + 1))}
    jax.block_until_ready((params, state["pool"]))
    init_s = time.perf_counter() - t0
    shape = UnitShape(k=1, tp=1, tokens=batch, buckets=(batch,), seqs=batch, max_blocks=ecfg.max_blocks_per_seq(cfg),
                      num_base=ecfg.num_blocks)
    t0 = time.perf_counter()
    compiled = compile_tick(cfg, shape, mesh, params, (state["pool"],), StepInputs.empty(shape, batch), False,
                            num_logprobs=ecfg.max_logprobs, backend=resolved, transport=shape.remote_transport)
    compile_s = time.perf_counter() - t0
    inp = decode_inputs(shape, cfg.vocab_size, bs, batch, context, np.random.default_rng(args.seed))

    def step(_: int):
        state["pool"], outputs = compiled(params, state["pool"], inp)  # as the JAX executor launches a tick
        return state["pool"], outputs

    timing = time_calls(step, warmup=3, runs=args.runs, target_run_s=target_run_s, max_calls=1000,
                        keep_outputs=False)
    rb = roofline_bytes(cfg, batch, context, dtype.itemsize)
    roofline_s = rb.total / bw.bytes_per_s
    full_s = rb.total_full_embedding / bw.bytes_per_s
    ratio = roofline_s / timing.median_s
    # The target is for the stated configuration: the 8B shape, batch 64 x 2048, bf16, on an H100/H200.
    applies = is_target_gpu(info) and not args.quick and (batch, context, dtype_name) == (64, 2048, "bfloat16")
    figures = {
        "device": info, "model": {k: v for k, v in cfg.to_dict().items() if k in LLAMA_8B}, "params": n_params,
        "dtype": dtype_name, "batch": batch, "context": context, "block_size": bs,
        "attention_backend": args.attention_backend, "attention_backend_resolved": str(resolved),
        "max_logprobs": ecfg.max_logprobs, "copy_bandwidth": bw.to_dict(), "init_s": init_s, "compile_s": compile_s,
        "step_time_s": timing.median_s, "step_time_min_s": timing.min_s, "steps_per_run": timing.calls,
        "tokens_per_s": batch / timing.median_s, "bytes": dataclasses.asdict(rb), "roofline_bytes": rb.total,
        "roofline_s": roofline_s, "ratio": ratio, "roofline_full_embedding_s": full_s,
        "ratio_full_embedding": full_s / timing.median_s, "target_ratio": TARGET_RATIO, "applies": applies,
        "pass": (ratio >= TARGET_RATIO) if applies else None, "quick": args.quick,
    }
    print(f"bytes per step: weights {fmt_bytes(rb.weights)} + {batch} embedding rows {fmt_bytes(rb.embedding_rows)} "
          f"+ KV read {fmt_bytes(rb.kv_read)} + KV written {fmt_bytes(rb.kv_written)} = {fmt_bytes(rb.total)}")
    print(f"step time: {timing.median_s * 1e3:.3f} ms (median of {args.runs} runs x {timing.calls} steps; "
          f"{batch / timing.median_s:.0f} tokens/s); compile {compile_s:.1f} s")
    print(f"roofline: {roofline_s * 1e3:.3f} ms (bytes / copy bandwidth); ratio roofline / step = {ratio:.3f}")
    print(f"  (with the whole embedding table counted: roofline {full_s * 1e3:.3f} ms, "
          f"ratio {full_s / timing.median_s:.3f})")
    if applies:
        print(f"target ratio >= {TARGET_RATIO:.2f}: {'PASS' if figures['pass'] else 'FAIL'}")
    else:
        print(f"target ratio >= {TARGET_RATIO:.2f} applies to the 8B shape, batch 64 x 2048, bf16, on an H100 or "
              f"H200 only")
    if args.out:
        write_json(args.out, figures)
        print(f"wrote {args.out}")
    return 0


def decode_inputs(shape, vocab_size: int, bs: int, batch: int, context: int, rng):
    """The `StepInputs` a replica unit builds (`ServingUnit.tick_inputs`) for `batch` sequences that each have
    `context` tokens cached and decode the next one, greedily."""
    import numpy as np

    from kunjax.blocks import NULL_BLOCK
    from kunjax.plan import StepInputs

    inp = StepInputs.empty(shape, batch)
    per_seq = shape.max_blocks
    blocks = rng.permutation(np.arange(NULL_BLOCK + 1, shape.num_base, dtype=np.int32))[:batch * per_seq]
    inp.block_tables[0, :, :per_seq] = blocks.reshape(batch, per_seq)
    rows = np.arange(batch, dtype=np.int32)
    inp.tokens_in[:] = rng.integers(0, vocab_size, batch, dtype=np.int32)
    inp.positions[0] = context
    inp.seq_ids[0] = rows
    inp.valid[0] = True
    inp.slot_mapping[0] = inp.block_tables[0, rows, context // bs] * bs + context % bs
    inp.context_lens[0] = context
    inp.logits_indices[:] = rows
    return inp  # sampling fields keep their greedy defaults (temperature 0, top_p 1, nothing suppressed)


if __name__ == "__main__":
    sys.exit(main())
