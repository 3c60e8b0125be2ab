"""Paged-attention kernels side by side: achieved KV bytes/s and FLOP/s, as a fraction of the device's copy
bandwidth measured in the same run, for kunjax's backends and for JAX's shipped kernels on the same logical KV.

    python benchmarks/kernels/paged_attention.py --out kernels.json            # GPU (H100/H200) or TPU: full sets
    python benchmarks/kernels/paged_attention.py --shapes decode --batches 32 --contexts 2048   # acceptance row
    JAX_PLATFORMS=cpu python benchmarks/kernels/paged_attention.py --quick --out quick.json    # CPU smoke run
    JAX_PLATFORMS=cpu python benchmarks/kernels/paged_attention.py --quick --backends reference,tpu-interpret

Kernels (`--backends`, comma-separated; default by platform):

* kunjax's own backends, by their `pallas_kernels.BACKENDS` name, read at run time: GPU `gpu,reference`,
  TPU `tpu,reference`, CPU `cpu,reference` (`tpu-interpret`, `gpu-interpret` on request, with `--quick` only: tiny
  shapes). A name the installed `pallas_kernels` does not offer is skipped with a note.
* `shipped-gpu` / `shipped-tpu`: JAX's `jax.experimental.pallas.ops.{gpu,tpu}.paged_attention` (decode only),
  fed the same pool converted to their `[K, pages, page_size, D]` layout outside the timed region, with q
  pre-scaled (they take no scale). `shipped-gpu-interpret` runs the GPU one in Pallas interpret mode (CPU).
* `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only) on a dense copy of the same KV:
  decode `q [B, 1, H, D]` over `[B, ctx, K, D]`; a prefill chunk as two calls, over the prefix (no mask) and
  causal over the chunk itself, merged by their log-sum-exp (cuDNN's causal mask is top-left aligned).
  `xla-sdpa` runs the same code with `implementation="xla"` (the CPU stand-in for that path).

Shapes: decode rows attend `context` keys each (`context - 1` cached in the pool plus the row's own new key;
the shipped and dense kernels get that new key in their copy of the KV, so every kernel attends exactly the same
keys); prefill rows are causal chunks over a cached prefix. Block tables are a seeded random permutation of the
pool's blocks. A shape whose buffers would not fit the device budget is skipped and listed with the reason.
When one layer's KV is smaller than `--rotate-bytes`, the pool gets several layers and successive timed calls
read successive layers, so a small shape is not timed out of the last-level cache.

Before timing, each kernel's output on the shape is checked against the pure-JAX reference (max |err| / max
|ref| under 2e-2 in bf16/fp16, 2e-3 in fp32); a mismatch or an error is marked in the table and its speed is
not reported as valid. Accounting and timing conventions: `benchmarks/kernels/common.py`.

On an H100/H200 the acceptance row (decode batch 32 x 2048 context, 8 KV heads, head dim 128, bf16) is judged
for the `gpu` backend: >= 80% of the copy bandwidth and >= 1.3x the KV bytes/s of `shipped-gpu`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.kernels.common import (  # noqa: E402
    AttentionShape,
    GiB,
    device_info,
    format_table,
    is_target_gpu,
    measure_copy_bandwidth,
    memory_budget,
    time_calls,
    write_json,
)

DECODE_BATCHES = (1, 8, 32, 64, 128, 256)
DECODE_CONTEXTS = (512, 2048, 8192, 32768)
PREFILL_CHUNKS = (512, 2048, 8192)
PREFILL_PREFIXES = (2048,)
QUICK = dict(batches=(3,), contexts=(40,), chunks=(24,), prefixes=(16,), heads=4, kv_heads=2, head_dim=32,
             block_size=8, copy_mib=16, rotate_mib=0, min_layers=2, runs=3, target_run_s=0.01)
ACCEPT_BATCH, ACCEPT_CONTEXT = 32, 2048
TARGET_FRACTION, TARGET_VS_SHIPPED = 0.80, 1.3
EXTERNAL = ("shipped-gpu", "shipped-gpu-interpret", "shipped-tpu", "cudnn", "xla-sdpa")
OURS_FOR = {"gpu": "gpu", "tpu": "tpu"}  # the backend the acceptance row judges
MAX_LAYERS = 64


def default_backends(platform: str, quick: bool) -> list[str]:
    if platform == "gpu":
        return ["gpu", "reference", "shipped-gpu", "cudnn"]
    if platform == "tpu":
        return ["tpu", "reference", "shipped-tpu"]
    # kunjax's interpret-mode kernels take ~15 s a shape on CPU: opt in with --backends (their parity tests
    # live in tests/pallas_kernels); the shipped one in interpret mode is cheap and covers its layout path.
    return ["cpu", "reference", *(["shipped-gpu-interpret", "xla-sdpa"] if quick else [])]


def usable_backends(requested: list[str], platform: str, quick: bool, ours: tuple[str, ...]) -> list[str]:
    """Keep what can run here; print a note for each dropped name."""
    out = []
    for name in requested:
        if name == "auto":
            print("note: skipping 'auto' (an alias of a concrete backend; name that one)")
        elif name in EXTERNAL:
            why = _external_unavailable(name, platform)
            if why:
                print(f"note: skipping {name}: {why}")
            else:
                out.append(name)
        elif name not in ours:
            print(f"note: skipping backend {name!r}: not in pallas_kernels.BACKENDS {ours}")
        elif name.endswith("-interpret") and not quick:
            print(f"note: skipping {name}: interpret mode is for --quick's tiny shapes")
        elif name in ("gpu", "tpu") and platform != name:
            print(f"note: skipping backend {name!r}: this device is {platform}")
        else:
            out.append(name)
    return out


def _external_unavailable(name: str, platform: str) -> str | None:
    if name in ("shipped-gpu", "cudnn") and platform != "gpu":
        return f"needs a GPU (this device is {platform})"
    if name == "shipped-tpu" and platform != "tpu":
        return f"needs a TPU (this device is {platform})"
    try:
        if name.startswith("shipped-gpu"):
            from jax.experimental.pallas.ops.gpu import paged_attention  # noqa: F401
        elif name == "shipped-tpu":
            from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention  # noqa: F401, F811
    except Exception as e:  # moved or removed in this JAX version
        return f"cannot import JAX's kernel ({type(e).__name__}: {e})"
    return None


# ---- one shape's inputs ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One shape's arrays on the device, shared by every kernel (each converts what it needs untimed)."""

    shape: AttentionShape
    layers: int  # L of the pool; timed calls cycle through the layers
    blocks_per_seq: int  # pool blocks holding each sequence's keys
    scale: float
    pool: Any  # [NB, L, 2, BS, K, D]; decode: the rows' new K/V also sit at slot context - 1
    q: Any  # [T, H, D]
    k_new: Any  # [T, K, D]
    v_new: Any  # [T, K, D]
    block_tables: Any  # [S, MB] int32, MB a power of two (padding -> block 0)
    context_lens: Any  # [S] int32 cached tokens (decode: context - 1)
    seq_ids: Any  # [T] int32
    positions: Any  # [T] int32
    valid: Any  # [T] bool
    layer_ids: list  # [] int32 each, one per layer

    def meta(self, layer: int) -> tuple:
        return (self.q, self.k_new, self.v_new, self.pool, self.layer_ids[layer], self.block_tables,
                self.context_lens, self.seq_ids, self.positions, self.valid)


def pool_tokens(shape: AttentionShape) -> int:
    """Tokens each sequence has in the pool: decode keeps its new token there too (for the other layouts)."""
    return shape.context if shape.kind == "decode" else shape.prefix


def plan_layers(shape: AttentionShape, itemsize: int, block_size: int, rotate_bytes: int, min_layers: int,
                budget: int) -> tuple[int, int, str | None]:
    """(layers, estimated peak bytes, reason to skip or None)."""
    nblk = max(math.ceil(pool_tokens(shape) / block_size), 1)
    mb = 1 << (nblk - 1).bit_length()
    layer_bytes = (1 + shape.batch * nblk) * 2 * block_size * shape.kv_heads * shape.head_dim * itemsize
    layers = min(max(math.ceil(rotate_bytes / layer_bytes), min_layers, 1), MAX_LAYERS)

    def peak(n: int) -> int:
        pool = n * layer_bytes
        converted = pool  # the shipped / dense copy of every layer
        gather_rows = min(shape.rows, 16)  # the reference's row chunk
        ref_scratch = gather_rows * mb * block_size * shape.kv_heads * shape.head_dim * 2 * (itemsize + 4) * 2
        small = shape.rows * (shape.heads + 2 * shape.kv_heads) * shape.head_dim * 4 * 8
        return pool + converted + ref_scratch + small

    if peak(layers) > budget:
        layers = max(min_layers, 1)
    need = peak(layers)
    if need > budget:
        return layers, need, f"needs ~{need / GiB:.1f} GiB, budget {budget / GiB:.1f} GiB"
    return layers, need, None


def build_case(shape: AttentionShape, dtype, block_size: int, layers: int, device, seed: int) -> Case:
    import jax
    import numpy as np
    from jax.sharding import SingleDeviceSharding

    s, t, k, d = shape.batch, shape.rows, shape.kv_heads, shape.head_dim
    nblk = max(math.ceil(pool_tokens(shape) / block_size), 1)
    mb = 1 << (nblk - 1).bit_length()
    nb = 1 + s * nblk
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, nb, dtype=np.int32)).reshape(s, nblk)
    tables = np.zeros((s, mb), np.int32)
    tables[:, :nblk] = ids
    if shape.kind == "decode":
        seq_ids = np.arange(s, dtype=np.int32)
        positions = np.full(s, shape.context - 1, np.int32)
    else:
        seq_ids = np.repeat(np.arange(s, dtype=np.int32), shape.chunk)
        positions = (shape.prefix + np.tile(np.arange(shape.chunk, dtype=np.int32), s)).astype(np.int32)
    on_dev = SingleDeviceSharding(device)
    keys = jax.random.split(jax.random.key(seed), 4)
    pool_shape = (nb, layers, 2, block_size, k, d)
    pool = jax.jit(lambda key: jax.random.normal(key, pool_shape, dtype), out_shardings=on_dev)(keys[0])
    q = jax.jit(lambda key: jax.random.normal(key, (t, shape.heads, d), dtype), out_shardings=on_dev)(keys[1])
    k_new, v_new = jax.jit(lambda key: jax.random.normal(key, (2, t, k, d), dtype), out_shardings=on_dev)(keys[2])
    if shape.kind == "decode":  # the new key/value also in the pool, at slot context - 1 of every layer
        slot = shape.context - 1
        last = jax.device_put(ids[:, slot // block_size], on_dev)

        def put(pool, kn, vn, blocks):  # kn, vn [S, K, D] -> pool[blocks, :, 0|1, slot % BS]: [S, L, K, D]
            pool = pool.at[blocks, :, 0, slot % block_size].set(kn[:, None])
            return pool.at[blocks, :, 1, slot % block_size].set(vn[:, None])

        pool = jax.jit(put, donate_argnums=0)(pool, k_new, v_new, last)
    return Case(shape=shape, layers=layers, blocks_per_seq=nblk, scale=1.0 / math.sqrt(d), pool=pool, q=q,
                k_new=k_new, v_new=v_new, block_tables=jax.device_put(tables, on_dev),
                context_lens=jax.device_put(np.full(s, shape.cached, np.int32), on_dev),
                seq_ids=jax.device_put(seq_ids, on_dev), positions=jax.device_put(positions, on_dev),
                valid=jax.device_put(np.ones(t, bool), on_dev),
                layer_ids=[jax.device_put(np.int32(i), on_dev) for i in range(layers)])


# ---- kernels: (jitted fn, one argument tuple per layer) -------------------------------------------------------

Prepared = tuple[Callable, list[tuple]]


def prepare(name: str, case: Case) -> Prepared | None:
    """The kernel's jitted function and its inputs (layout conversions happen here, untimed); None when the
    kernel does not apply to the shape."""
    if name in EXTERNAL:
        if name.startswith("shipped"):
            return _prepare_shipped(name, case) if case.shape.kind == "decode" else None
        return _prepare_dense("cudnn" if name == "cudnn" else "xla", case)
    return _prepare_ours(name, case)


def _prepare_ours(backend: str, case: Case) -> Prepared:
    return _ours_fn(backend, case.scale), [case.meta(i) for i in range(case.layers)]


@functools.cache
def _ours_fn(backend: str, scale: float) -> Callable:
    """One jitted function per backend (the reference serves as both a row and the check of every row)."""
    import jax

    import pallas_kernels

    @jax.jit
    def fn(*meta):
        return pallas_kernels.paged_attention(*meta, scale=scale, backend=backend)[0]  # [T, H, D]

    return fn


def _to_pages(case: Case) -> list[tuple]:
    """Each layer's K and V in the shipped kernels' layout: `[K, NB, BS, D]` each."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def convert(pool, layer):
        kv = jax.lax.dynamic_index_in_dim(pool, layer, axis=1, keepdims=False)  # [NB, 2, BS, K, D]
        return jnp.transpose(kv[:, 0], (2, 0, 1, 3)), jnp.transpose(kv[:, 1], (2, 0, 1, 3))

    return [convert(case.pool, case.layer_ids[i]) for i in range(case.layers)]


def _prepare_shipped(name: str, case: Case) -> Prepared:
    import jax
    import jax.numpy as jnp

    sh = case.shape
    q = (case.q.astype(jnp.float32) * case.scale).astype(case.q.dtype)  # they apply no scale
    lengths = jnp.full((sh.batch,), sh.context, jnp.int32)
    mb = case.block_tables.shape[1]
    if name == "shipped-tpu":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as shipped

        per_block = min(mb, max(1, 512 // case.pool.shape[3]))  # ~512 keys per compute block
        fn = jax.jit(lambda q, kp, vp, lens, bt: shipped(q, kp, vp, lens, bt, pages_per_compute_block=per_block))
    else:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as shipped

        # Its defaults (k_splits 16, 8 pages per compute block), cut down where the block table is narrower.
        fn = jax.jit(functools.partial(shipped, block_h=16, pages_per_compute_block=8, k_splits=min(16, mb),
                                       interpret=name == "shipped-gpu-interpret"))
        fn = _reorder(fn)
    return fn, [(q, kp, vp, lengths, case.block_tables) for kp, vp in _to_pages(case)]


def _reorder(gpu_fn):
    """The GPU kernel takes (q, k_pages, v_pages, block_tables, lengths); present the TPU one's order."""
    return lambda q, kp, vp, lens, bt: gpu_fn(q, kp, vp, bt, lens)


def _prepare_dense(impl: str, case: Case) -> Prepared:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import merge_attention_states

    sh = case.shape
    s, k, d, bs = sh.batch, sh.kv_heads, sh.head_dim, case.pool.shape[3]
    n_tok = pool_tokens(sh)
    nblk = case.blocks_per_seq

    @jax.jit
    def densify(pool, tables, layer):  # -> K, V [S, n_tok, K, D]
        kv = pool[tables[:, :nblk], layer]  # [S, nblk, 2, BS, K, D], gathered without a copy of the layer
        kv = jnp.moveaxis(kv, 2, 1).reshape(s, 2, nblk * bs, k, d)[:, :, :n_tok]  # [S, 2, n_tok, K, D]
        return kv[:, 0], kv[:, 1]

    dense = [densify(case.pool, case.block_tables, case.layer_ids[i]) for i in range(case.layers)]
    sdpa = functools.partial(jax.nn.dot_product_attention, scale=case.scale, implementation=impl)
    if sh.kind == "decode":
        q = case.q[:, None]  # [B, 1, H, D]

        @jax.jit
        def fn(q, kd, vd):
            return sdpa(q, kd, vd)[:, 0]  # [B, H, D]

        return fn, [(q, kd, vd) for kd, vd in dense]

    c = sh.chunk
    q = case.q.reshape(s, c, sh.heads, d)  # [B, C, H, D]
    kc, vc = case.k_new.reshape(s, c, k, d), case.v_new.reshape(s, c, k, d)

    @jax.jit
    def fn(q, kp, vp, kc, vc):
        o_new, l_new = sdpa(q, kc, vc, is_causal=True, return_residual=True)  # [B, C, H, D], [B, C, H]
        if sh.prefix == 0:
            return o_new.reshape(s * c, sh.heads, d)
        o_hist, l_hist = sdpa(q, kp, vp, return_residual=True)
        outs = jnp.stack([o_hist, o_new]).reshape(2, s * c, sh.heads, d)
        lses = jnp.stack([l_hist, l_new]).astype(jnp.float32).reshape(2, s * c, sh.heads)
        return merge_attention_states(outs, lses)[0]

    return fn, [(q, kd, vd, kc, vc) for kd, vd in dense]


# ---- the run ------------------------------------------------------------------------------------------------

def check(out, ref, dtype, *, merged_lse: bool = False) -> tuple[bool, float]:
    """(within tolerance, max |out - ref| / max |ref|). `merged_lse`: the output merges two partial results by
    a log-sum-exp that `jax.nn.dot_product_attention` returns in the input dtype; a bf16 lse (~8, spacing
    2^-5) alone moves the merge weights by up to ~1.6%, so that path gets 5e-2 instead of 2e-2."""
    import jax.numpy as jnp

    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    rel = err / max(float(jnp.max(jnp.abs(ref.astype(jnp.float32)))), 1e-30)
    tol = 2e-3 if jnp.dtype(dtype) == jnp.float32 else (5e-2 if merged_lse else 2e-2)
    return bool(math.isfinite(rel) and rel <= tol), rel


def run_shape(case: Case, kernels: list[str], args, dtype, copy_bw: float) -> list[dict[str, Any]]:
    """Every kernel on one shape: checked against the reference, then timed; plus the ratio to the shipped one."""
    import jax

    sh = case.shape
    ref_fn, ref_args = _prepare_ours("reference", case)
    ref = jax.block_until_ready(ref_fn(*ref_args[0]))  # [T, H, D]
    rows = []
    for name in kernels:
        row: dict[str, Any] = {"kernel": name, "shape": sh.label(), **dataclasses.asdict(sh), "layers": case.layers,
                               "kv_bytes": sh.kv_bytes(dtype.itemsize), "flops": sh.flops()}
        t0 = time.perf_counter()
        try:
            if not measure(name, case, ref, row, args, dtype, copy_bw):
                continue
        except Exception as e:  # a kernel that fails on a shape is reported, the run goes on
            first = (str(e).splitlines() or [""])[0]
            row.update(check="error", valid=False, error=f"{type(e).__name__}: {first[:160]}")
        gc.collect()  # the kernel's converted copy of the KV goes before the next one is made
        row["wall_s"] = time.perf_counter() - t0  # conversion, compile, check and timing of this row
        rows.append(row)
    shipped = next((r for r in rows if r["kernel"].startswith("shipped") and r.get("valid")), None)
    for r in rows:
        if r.get("valid") and shipped is not None:
            r["vs_shipped"] = r["kv_bytes_per_s"] / shipped["kv_bytes_per_s"]
    return rows


def measure(name: str, case: Case, ref, row: dict[str, Any], args, dtype, copy_bw: float) -> bool:
    """Fill `row` with one kernel's check and speed on `case`; False when the kernel does not apply."""
    import jax

    sh = case.shape
    prepared = prepare(name, case)
    if prepared is None:
        return False
    fn, arg_sets = prepared
    out = jax.block_until_ready(fn(*arg_sets[0]))
    merged = name in ("cudnn", "xla-sdpa") and sh.kind == "prefill" and sh.prefix > 0
    ok, rel = check(out, ref, dtype, merged_lse=merged)
    row.update(check="ok" if ok else "MISMATCH", max_rel_err=rel, valid=ok)
    out_bytes = out.size * out.dtype.itemsize
    del out
    t = time_calls(lambda i: fn(*arg_sets[i % len(arg_sets)]), warmup=1, runs=args.runs,
                   target_run_s=args.target_run_s, max_calls=max(1, min(200, 2**29 // max(out_bytes, 1))))
    kv_bytes, flops = row["kv_bytes"], row["flops"]
    row.update(time_s=t.median_s, min_time_s=t.min_s, calls=t.calls, kv_bytes_per_s=kv_bytes / t.median_s,
               flops_per_s=flops / t.median_s, fraction_of_copy=kv_bytes / t.median_s / copy_bw)
    return True


def acceptance(rows: list[dict[str, Any]], info: dict[str, Any], dtype_name: str) -> dict[str, Any]:
    ours = OURS_FOR.get(info["platform"])
    res: dict[str, Any] = {"shape": f"decode b{ACCEPT_BATCH} ctx{ACCEPT_CONTEXT} K8 D128 bfloat16", "kernel": ours,
                           "target_fraction_of_copy": TARGET_FRACTION, "target_vs_shipped": TARGET_VS_SHIPPED,
                           "applies": is_target_gpu(info), "pass": None}
    row = next((r for r in rows if r["kernel"] == ours and r["kind"] == "decode" and r["batch"] == ACCEPT_BATCH
                and r["context"] == ACCEPT_CONTEXT and r["kv_heads"] == 8 and r["head_dim"] == 128), None)
    if row is None or dtype_name != "bfloat16":
        res["note"] = "acceptance shape (bf16) not in this run"
        res["applies"] = False
        return res
    row["accept"] = "*"
    frac, ratio = row.get("fraction_of_copy"), row.get("vs_shipped")
    res.update(fraction_of_copy=frac, vs_shipped=ratio, check=row["check"])
    if res["applies"]:
        res["pass_fraction"] = bool(row.get("valid") and frac is not None and frac >= TARGET_FRACTION)
        res["pass_vs_shipped"] = bool(row.get("valid") and ratio is not None and ratio >= TARGET_VS_SHIPPED)
        res["pass"] = res["pass_fraction"] and res["pass_vs_shipped"]
    else:
        res["note"] = "the targets apply on an H100 or H200 only"
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=("decode", "prefill", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and short timings (CPU smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    ap.add_argument("--backends", default=None, help="comma-separated kernels (default: by platform, see above)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--batches", default=None, help=f"decode batch sizes (default {DECODE_BATCHES})")
    ap.add_argument("--contexts", default=None, help=f"decode contexts (default {DECODE_CONTEXTS})")
    ap.add_argument("--chunks", default=None, help=f"prefill chunk lengths (default {PREFILL_CHUNKS})")
    ap.add_argument("--prefixes", default=None, help=f"prefill cached prefix lengths (default {PREFILL_PREFIXES})")
    ap.add_argument("--prefill-batch", type=int, default=1, help="sequences per prefill shape")
    ap.add_argument("--heads", type=int, default=None, help="query heads H (default 32)")
    ap.add_argument("--kv-heads", type=int, default=None, help="KV heads K (default 8)")
    ap.add_argument("--head-dim", type=int, default=None, help="head dim D (default 128)")
    ap.add_argument("--block-size", type=int, default=None, help="tokens per pool block (default 16)")
    ap.add_argument("--copy-mib", type=int, default=None, help="array copied to measure bandwidth (default 1024)")
    ap.add_argument("--rotate-mib", type=int, default=None,
                    help="spread small shapes over enough layers to read this many MiB between repeats (default 256)")
    ap.add_argument("--min-layers", type=int, default=None, help="fewest pool layers (default 1)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per kernel and shape (default 5)")
    ap.add_argument("--target-run-s", type=float, default=None, help="length of one timed run (default 0.05)")
    ap.add_argument("--memory-fraction", type=float, default=0.85, help="share of the device memory limit to use")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    q = QUICK if args.quick else {}

    def ints(text: str | None, default) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",")) if text else tuple(default)

    batches = ints(args.batches, q.get("batches", DECODE_BATCHES))
    contexts = ints(args.contexts, q.get("contexts", DECODE_CONTEXTS))
    chunks = ints(args.chunks, q.get("chunks", PREFILL_CHUNKS))
    prefixes = ints(args.prefixes, q.get("prefixes", PREFILL_PREFIXES))
    heads = args.heads or q.get("heads", 32)
    kv_heads = args.kv_heads or q.get("kv_heads", 8)
    head_dim = args.head_dim or q.get("head_dim", 128)
    block_size = args.block_size or q.get("block_size", 16)
    copy_bytes = (args.copy_mib or q.get("copy_mib", 1024)) * 2**20
    rotate_bytes = (args.rotate_mib if args.rotate_mib is not None else q.get("rotate_mib", 256)) * 2**20
    min_layers = args.min_layers or q.get("min_layers", 1)
    args.runs = args.runs or q.get("runs", 5)
    args.target_run_s = args.target_run_s or q.get("target_run_s", 0.05)

    import jax
    import jax.numpy as jnp

    import pallas_kernels

    device = jax.devices()[0]
    info = device_info(device)
    platform = info["platform"]
    requested = args.backends.split(",") if args.backends else default_backends(platform, args.quick)
    unknown = [n for n in requested if n not in EXTERNAL and n not in pallas_kernels.BACKENDS
               and n not in ("gpu", "gpu-interpret", "tpu", "tpu-interpret", "reference")]
    if unknown:
        ap.error(f"unknown --backends {unknown}: use pallas_kernels.BACKENDS {pallas_kernels.BACKENDS} or {EXTERNAL}")
    kernels = usable_backends(requested, platform, args.quick, tuple(pallas_kernels.BACKENDS))
    dtype = jnp.dtype(args.dtype)

    shapes = []
    if args.shapes in ("decode", "all"):
        shapes += [AttentionShape("decode", b, heads, kv_heads, head_dim, context=c)
                   for c in contexts for b in batches]
    if args.shapes in ("prefill", "all"):
        shapes += [AttentionShape("prefill", args.prefill_batch, heads, kv_heads, head_dim, prefix=p, chunk=c)
                   for p in prefixes for c in chunks]

    print(f"device: {info['device_kind']} ({platform}), jax {info['jax']}; dtype {args.dtype}, H={heads} "
          f"K={kv_heads} D={head_dim}, block size {block_size}; kernels: {', '.join(kernels) or 'none'}")
    bw = measure_copy_bandwidth(device, copy_bytes)
    print(f"copy bandwidth: {bw.bytes_per_s / 1e9:.1f} GB/s (read + write, x + 1 over "
          f"{bw.array_bytes / 2**20:.0f} MiB, median of 7 runs)")
    budget = memory_budget(device, args.memory_fraction)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for i, sh in enumerate(shapes):
        layers, need, why = plan_layers(sh, dtype.itemsize, block_size, rotate_bytes, min_layers, budget)
        if why:
            print(f"skip {sh.label()}: {why}")
            skipped.append({"shape": sh.label(), "reason": why})
            continue
        try:
            case = build_case(sh, dtype, block_size, layers, device, args.seed + i)
        except Exception as e:  # e.g. out of memory despite the estimate: skip the shape, keep going
            why = f"building its inputs failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
            print(f"skip {sh.label()}: {why}")
            skipped.append({"shape": sh.label(), "reason": why})
            gc.collect()
            continue
        rows += run_shape(case, kernels, args, dtype, bw.bytes_per_s)
        del case
        gc.collect()

    verdict = acceptance(rows, info, args.dtype)
    for r in rows:
        r["time_us"] = r["time_s"] * 1e6 if r.get("valid") else None
        r["kv_gbps"] = r["kv_bytes_per_s"] / 1e9 if r.get("valid") else None
        r["tflops"] = r["flops_per_s"] / 1e12 if r.get("valid") else None
        r["pct_copy"] = 100 * r["fraction_of_copy"] if r.get("valid") else None
        r.setdefault("accept", "")
        r["status"] = r["check"] if r["check"] != "MISMATCH" else f"MISMATCH {r['max_rel_err']:.1e}"
    print()
    print(format_table(rows, [("kernel", "kernel", ""), ("shape", "shape", ""), ("L", "layers", "d"),
                              ("time us", "time_us", ".1f"), ("KV GB/s", "kv_gbps", ".1f"),
                              ("TFLOP/s", "tflops", ".3f"), ("% copy", "pct_copy", ".1f"),
                              ("vs shipped", "vs_shipped", ".2f"), ("check", "status", ""), ("", "accept", "")]))
    for r in rows:
        if r["check"] == "error":
            print(f"error: {r['kernel']} on {r['shape']}: {r['error']}")
    print("(* = acceptance row; speeds of a mismatched or failed kernel are not reported)")
    if verdict.get("fraction_of_copy") is not None and verdict["applies"]:
        mark = {True: "PASS", False: "FAIL"}
        print(f"acceptance {verdict['shape']} [{verdict['kernel']}]: "
              f"{100 * verdict['fraction_of_copy']:.1f}% of copy bandwidth (target >= {TARGET_FRACTION:.0%}): "
              f"{mark[verdict['pass_fraction']]}; "
              f"{verdict.get('vs_shipped') or float('nan'):.2f}x shipped (target >= {TARGET_VS_SHIPPED}x): "
              f"{mark[verdict['pass_vs_shipped']]}")
    else:
        print(f"acceptance: {verdict.get('note', 'not measured')}")
    if args.out:
        for r in rows:
            r.pop("status", None)
            r.pop("accept", None)
        write_json(args.out, {"device": info, "dtype": args.dtype, "block_size": block_size,
                              "copy_bandwidth": bw.to_dict(), "kernels": kernels, "results": rows,
                              "skipped": skipped, "acceptance": verdict, "quick": args.quick})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
