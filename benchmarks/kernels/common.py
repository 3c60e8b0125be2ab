"""Shared pieces of the kernel benchmarks and the decode roofline: the device's copy bandwidth measured in the
same run, a wall-clock timing helper, the bytes/FLOP accounting of attention, and table/JSON output.

Conventions every figure in these benchmarks follows:

* Copy bandwidth is `(bytes read + bytes written) / time` of an elementwise `x + 1` over a large on-device
  array into a new buffer (2 x the array's bytes move per call). It is reported as is, read+write, and every
  "fraction of copy bandwidth" divides by it without halving.
* A time is the median over `runs` timed runs after warm-up; a run dispatches `calls` back-to-back calls and
  waits for them (`block_until_ready`), and the per-call time is the run's time / `calls`. `calls` is chosen
  so a run lasts about `target_run_s`, which amortises the host dispatch cost of small calls.
* Attention KV bytes are the bytes the attention must read at least once: for every sequence, its attended
  keys x `kv_heads x head_dim x 2 (K and V) x dtype bytes`. FLOPs are `4 x keys x heads x head_dim` per query
  row (QK^T and PV, two FLOPs a multiply-add), summed over rows; a causal chunk row i over a prefix P attends
  `P + i + 1` keys.

Nothing here imports JAX at module import time, so the accounting can be unit-tested cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

GiB = 2**30


# ---- accounting ---------------------------------------------------------------------------------------------

def attention_kv_bytes(keys_per_seq: Sequence[int], kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of K and V the attention must read: every sequence's attended keys, once."""
    return int(sum(keys_per_seq)) * kv_heads * head_dim * 2 * itemsize


def attention_flops(keys_per_row: Sequence[int], heads: int, head_dim: int) -> int:
    """Matmul FLOPs of attention: `4 x keys x heads x head_dim` per query row (QK^T and PV)."""
    return 4 * int(sum(keys_per_row)) * heads * head_dim


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """One benchmark shape. Decode: `batch` sequences, one query row each, attending `context` keys (the
    `context - 1` cached ones and its own new key). Prefill: `batch` sequences, each a causal chunk of `chunk`
    new rows over `prefix` cached keys."""

    kind: str  # "decode" or "prefill"
    batch: int
    heads: int  # H
    kv_heads: int  # K
    head_dim: int  # D
    context: int = 0  # decode: keys attended by each row (cached + the new one)
    prefix: int = 0  # prefill: cached keys of each sequence
    chunk: int = 0  # prefill: new rows of each sequence

    def __post_init__(self) -> None:
        if self.kind not in ("decode", "prefill"):
            raise ValueError(f"shape kind must be decode or prefill, got {self.kind!r}")
        if self.kind == "decode" and self.context < 1:
            raise ValueError("a decode shape needs context >= 1")
        if self.kind == "prefill" and self.chunk < 1:
            raise ValueError("a prefill shape needs chunk >= 1")

    @property
    def rows(self) -> int:  # T, query rows of the step
        return self.batch if self.kind == "decode" else self.batch * self.chunk

    @property
    def cached(self) -> int:  # tokens of each sequence already in the pool
        return self.context - 1 if self.kind == "decode" else self.prefix

    def keys_per_seq(self) -> list[int]:
        per = self.context if self.kind == "decode" else self.prefix + self.chunk
        return [per] * self.batch

    def keys_per_row(self) -> list[int]:
        if self.kind == "decode":
            return [self.context] * self.batch
        return [self.prefix + i + 1 for i in range(self.chunk)] * self.batch

    def kv_bytes(self, itemsize: int) -> int:
        return attention_kv_bytes(self.keys_per_seq(), self.kv_heads, self.head_dim, itemsize)

    def flops(self) -> int:
        return attention_flops(self.keys_per_row(), self.heads, self.head_dim)

    def label(self) -> str:
        if self.kind == "decode":
            return f"decode b{self.batch} ctx{self.context}"
        return f"prefill b{self.batch} chunk{self.chunk} prefix{self.prefix}"


# ---- timing -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float  # per call
    min_s: float  # per call, fastest run
    calls: int  # calls per timed run
    runs: int


def time_calls(call: Callable[[int], Any], *, warmup: int = 2, runs: int = 5, target_run_s: float = 0.05,
               max_calls: int = 200, keep_outputs: bool = True) -> Timing:
    """Time `call(i)` (one dispatch, returning its output arrays) by wall clock.

    Every run waits for its outputs with `block_until_ready`. With `keep_outputs` all the run's outputs are
    held and waited for (independent calls; bound `max_calls` by their memory); without it only the last one
    is (a chain where each call consumes the previous output, so the last finishing means all did).
    """
    import jax

    i = 0
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(call(i))
        i += 1
    t0 = time.perf_counter()
    jax.block_until_ready(call(i))
    i += 1
    single = max(time.perf_counter() - t0, 1e-7)
    calls = int(min(max(math.ceil(target_run_s / single), 1), max(max_calls, 1)))
    per_call: list[float] = []
    for _ in range(runs):
        outs = []
        t0 = time.perf_counter()
        for _ in range(calls):
            out = call(i)
            i += 1
            if keep_outputs:
                outs.append(out)
            else:
                outs = [out]
        jax.block_until_ready(outs)
        per_call.append((time.perf_counter() - t0) / calls)
        del outs
    return Timing(median_s=statistics.median(per_call), min_s=min(per_call), calls=calls, runs=runs)


@dataclasses.dataclass(frozen=True)
class CopyBandwidth:
    bytes_per_s: float  # (read + written) / time, median run
    array_bytes: int  # size of the copied array; each call moves 2x this
    time_s: float  # per copy, median

    def to_dict(self) -> dict[str, Any]:
        return {"bytes_per_s": self.bytes_per_s, "array_bytes": self.array_bytes, "time_s": self.time_s,
                "counts": "bytes read + bytes written per second (x + 1 into a new buffer)"}


def measure_copy_bandwidth(device, nbytes: int, *, runs: int = 7) -> CopyBandwidth:
    """The device's copy bandwidth: `x + 1` over `nbytes` of uint32 on `device`, chained so each call reads the
    previous call's output (a new buffer each time), counted as read + write."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    n = max(nbytes // 4, 1024)
    x = jax.jit(lambda: jnp.arange(n, dtype=jnp.uint32), out_shardings=SingleDeviceSharding(device))()
    bump = jax.jit(lambda a: a + jnp.uint32(1))
    state = [x]
    del x

    def call(_: int):
        state[0] = bump(state[0])
        return state[0]

    timing = time_calls(call, warmup=3, runs=runs, target_run_s=0.1, max_calls=100, keep_outputs=False)
    moved = 2 * n * 4
    state.clear()
    return CopyBandwidth(bytes_per_s=moved / timing.median_s, array_bytes=n * 4, time_s=timing.median_s)


# ---- device facts -------------------------------------------------------------------------------------------

def device_info(device) -> dict[str, Any]:
    import jax
    import jaxlib

    stats = device.memory_stats() or {}
    return {"platform": device.platform, "device_kind": device.device_kind, "jax": jax.__version__,
            "jaxlib": getattr(jaxlib, "__version__", "?"), "memory_bytes_limit": stats.get("bytes_limit")}


def memory_budget(device, fraction: float = 0.85) -> int:
    """Bytes a benchmark may allocate on `device`: a share of its allocator limit; on CPU (no memory stats) a
    quarter of the host's physical memory."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] * fraction)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    except (ValueError, OSError, AttributeError):
        return 4 * GiB


def is_target_gpu(info: dict[str, Any]) -> bool:
    """Whether the acceptance targets apply: an H100 or H200."""
    kind = str(info.get("device_kind", "")).upper()
    return info.get("platform") == "gpu" and ("H100" in kind or "H200" in kind)


# ---- output -------------------------------------------------------------------------------------------------

Column = tuple[str, str, str]  # (header, row key, format spec; "" = str())


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A fixed-width text table: text columns (no format spec) left-aligned, numbers right-aligned; a missing,
    None or non-finite value prints as "-"."""

    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        v = row.get(key)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        return format(v, spec) if spec else str(v)

    body = [[cell(r, key, spec) for _, key, spec in columns] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, (h, _, _) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if spec else c.ljust(w)
                         for c, w, (_, _, spec) in zip(cells, widths, columns, strict=True)).rstrip()

    return "\n".join([line([h for h, _, _ in columns]), line(["-" * w for w in widths]), *map(line, body)])


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    """Write `obj` as indented JSON (numpy scalars unwrapped, non-finite floats as null)."""
    Path(path).write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
