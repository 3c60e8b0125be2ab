"""Attention kernels over the paged KV pool, behind one API. Every backend has the signature and semantics of
`paged_attention.reference.paged_attention`; `paged_attention` here picks one by name:

* `reference` — pure JAX (gather the history, attend); the contract.
* `cpu` — pure JAX laid out for CPUs (`paged_attention/cpu.py`: an online softmax over the history a few blocks
  at a time, as far as the longest cached history of the step goes).
* `tpu` — the Pallas Mosaic kernel (`paged_attention/tpu.py`); `tpu-interpret` runs it in TPU interpret mode.
* `gpu` — the Pallas Mosaic GPU (Hopper) kernel (`paged_attention/gpu.py`); `gpu-interpret` runs it in GPU
  interpret mode. Both interpret modes are how the kernels are tested on CPU.
* `auto` — resolved once per process and platform by `resolve_backend`: `gpu` on GPUs, `tpu` on TPUs,
  `cpu` on CPUs. Neither kernel has run on hardware yet, so on GPU/TPU `auto` first runs a self-test of the
  kernel on that device (a small random ragged batch with two pool segments, kernel against reference in float32
  and bfloat16, at the parity tests' tolerances) and falls back to `reference`, with a logged warning, when the
  kernel fails to compile or disagrees. A backend named explicitly is used as is, without the self-test.
  `paged_attention(..., backend="auto")` without resolving is the reference.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention import reference
from pallas_kernels.paged_attention.reference import gather_blocks, merge_attention_states

BACKENDS = ("auto", "reference", "cpu", "tpu", "tpu-interpret", "gpu", "gpu-interpret")
PLATFORM_KERNELS = {"gpu": "gpu", "tpu": "tpu"}  # the kernel `auto` validates and picks on each platform
PLATFORM_PURE_JAX = {"cpu": "cpu"}  # what `auto` picks on other platforms: pure JAX, no self-test needed
SELF_TEST_FP32_RTOL = 1e-5  # as tests/pallas_kernels/test_paged_attention.py
SELF_TEST_BF16_ATOL = 2e-2

log = logging.getLogger("pallas_kernels")
_self_tests: dict[tuple[str, str], str | None] = {}  # (platform, kernel) -> None when it passed, else the reason


def paged_attention(*args, backend: str = "auto", **kwargs):
    """`reference.paged_attention(*args, **kwargs)` on the chosen backend; returns `(out [T, H, D], lse [T, H])`.
    The choice is made in Python at trace time, so it costs nothing in the compiled step."""
    if backend in ("auto", "reference"):
        return reference.paged_attention(*args, **kwargs)
    if backend == "cpu":
        from pallas_kernels.paged_attention import cpu

        return cpu.paged_attention(*args, **kwargs)
    if backend in ("tpu", "tpu-interpret"):
        from jax.experimental.pallas import tpu as pltpu

        from pallas_kernels.paged_attention import tpu

        interpret = pltpu.InterpretParams() if backend == "tpu-interpret" else None
        return tpu.paged_attention(*args, interpret=interpret, **kwargs)
    if backend in ("gpu", "gpu-interpret"):
        from pallas_kernels.paged_attention import gpu

        interpret = gpu.interpret_params() if backend == "gpu-interpret" else None
        return gpu.paged_attention(*args, interpret=interpret, **kwargs)
    raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(name: str, devices: Sequence[jax.Device] | np.ndarray) -> str:
    """The concrete backend for `name` on `devices` (one platform): `auto` becomes the platform's kernel if it
    passes its self-test on the first device (run once per process and platform), else `reference` (on CPU:
    `cpu`, pure JAX like the reference); any other name is returned unchanged."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    flat = list(np.ravel(np.asarray(devices, dtype=object)))
    platforms = {_platform(d) for d in flat}
    if len(platforms) != 1:
        raise ValueError(f"devices span several platforms {sorted(platforms)}; resolve the backend per platform")
    platform = platforms.pop()
    kernel = PLATFORM_KERNELS.get(platform)
    if kernel is None:
        return PLATFORM_PURE_JAX.get(platform, "reference")
    key = (platform, kernel)
    if key not in _self_tests:
        _self_tests[key] = _self_test(kernel, flat[0])
        if _self_tests[key] is not None:
            log.warning("attention backend auto: the %s kernel failed its self-test on %s (%s); using the reference",
                        kernel, flat[0], _self_tests[key])
    return kernel if _self_tests[key] is None else "reference"


def _platform(device) -> str:
    return device.platform


def _self_test(kernel: str, device) -> str | None:
    """Run `kernel` and the reference on `device` over a small random ragged batch (prefill chunk, decodes, an
    empty sequence, padding rows, two pool segments, a window) in float32 and bfloat16; None when they agree
    within the parity tests' tolerances, else why not (a compile error counts as a failure)."""
    try:
        for dtype, rtol, atol in ((jnp.float32, SELF_TEST_FP32_RTOL, 0.0), (jnp.bfloat16, 0.0, SELF_TEST_BF16_ATOL)):
            args = jax.device_put(_self_test_batch(np.random.default_rng(0), dtype), device)
            kw = dict(scale=0.125, sliding_window=200)
            want = jax.jit(functools.partial(reference.paged_attention, **kw))(*args)
            got = jax.jit(functools.partial(paged_attention, backend=kernel, **kw))(*args)
            why = _disagreement(want, got, rtol=rtol, atol=atol)
            if why is not None:
                return f"{jnp.dtype(dtype).name}: {why}"
    except Exception as e:  # noqa: BLE001 - any failure to compile or run rejects the kernel
        return f"{type(e).__name__}: {str(e)[:500]}"
    return None


def _self_test_batch(rng: np.random.Generator, dtype) -> tuple:
    """Five sequences (cached 0, 5, 33, 256, 509 tokens; block size 16, 32 table entries) with a 9-token prefill
    chunk, decodes and two padding rows; block ids spread over a base (96 blocks) and an extension (64) segment."""
    heads, kv_heads, head_dim, bs, mb = 8, 2, 128, 16, 32
    ctx = np.array([0, 5, 33, 256, 509], np.int32)
    new = np.array([1, 9, 1, 1, 1], np.int32)
    ids = rng.permutation(160)[: 5 * mb].reshape(5, mb)
    tables = np.where(np.arange(mb)[None] * bs < ctx[:, None], ids, -1)
    rows = [(s, int(ctx[s]) + i) for s in range(5) for i in range(new[s])] + [(0, 0), (0, 0)]
    t = len(rows)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)

    pool = [normal(n, 2, 2, bs, kv_heads, head_dim) for n in (96, 64)]
    return (normal(t, heads, head_dim), normal(t, kv_heads, head_dim), normal(t, kv_heads, head_dim), pool,
            jnp.int32(1), jnp.asarray(tables, jnp.int32), jnp.asarray(ctx), jnp.asarray([r[0] for r in rows]),
            jnp.asarray([r[1] for r in rows]), jnp.arange(t) < t - 2)


def _disagreement(want, got, *, rtol: float, atol: float) -> str | None:
    (wo, wl), (go, gl) = want, got
    if go.shape != wo.shape or gl.shape != wl.shape:
        return f"shapes {go.shape}, {gl.shape} instead of {wo.shape}, {wl.shape}"
    wo, go = np.asarray(wo, np.float32), np.asarray(go, np.float32)
    wl, gl = np.asarray(wl, np.float32), np.asarray(gl, np.float32)
    if not np.array_equal(np.isneginf(wl), np.isneginf(gl)):
        return "rows with nothing to attend differ"
    fin = np.isfinite(wl)
    out_err = float(np.max(np.abs(go - wo), initial=0.0))
    lse_err = float(np.max(np.abs(gl[fin] - wl[fin]) - rtol * np.abs(wl[fin]), initial=0.0))
    if not np.isfinite(go).all() or out_err > atol + rtol * float(np.max(np.abs(wo), initial=0.0)):
        return f"max out error {out_err:.3g}"
    if not np.isfinite(gl[fin]).all() or lse_err > atol:
        return f"lse error {lse_err:.3g} beyond tolerance"
    return None


__all__ = ["BACKENDS", "gather_blocks", "merge_attention_states", "paged_attention", "resolve_backend"]
