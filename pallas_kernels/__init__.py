"""Attention kernels over the paged KV pool, behind one API. Every backend has the signature and semantics of
`paged_attention.reference.paged_attention`; `paged_attention` here picks one by name:

* `reference` — pure JAX (gather the history, attend); the contract and the CPU backend.
* `tpu` — the Pallas Mosaic kernel (`paged_attention/tpu.py`); `tpu-interpret` runs it in TPU interpret mode,
  which is how it is tested on CPU.
* `auto` — the reference on every platform today: the TPU kernel passes its parity tests in interpret mode but
  has not run on TPU hardware yet, so it is opt-in (`--attention-backend tpu`) until it has. GPU kernels are
  issue #5's next step.
"""

from __future__ import annotations

from pallas_kernels.paged_attention import reference
from pallas_kernels.paged_attention.reference import gather_blocks, merge_attention_states

BACKENDS = ("auto", "reference", "tpu", "tpu-interpret")


def paged_attention(*args, backend: str = "auto", **kwargs):
    """`reference.paged_attention(*args, **kwargs)` on the chosen backend; returns `(out [T, H, D], lse [T, H])`.
    The choice is made in Python at trace time, so it costs nothing in the compiled step."""
    if backend in ("auto", "reference"):
        return reference.paged_attention(*args, **kwargs)
    if backend in ("tpu", "tpu-interpret"):
        from jax.experimental.pallas import tpu as pltpu

        from pallas_kernels.paged_attention import tpu

        interpret = pltpu.InterpretParams() if backend == "tpu-interpret" else None
        return tpu.paged_attention(*args, interpret=interpret, **kwargs)
    raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")


__all__ = ["BACKENDS", "gather_blocks", "merge_attention_states", "paged_attention"]
