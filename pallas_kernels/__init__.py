"""Attention kernels over the paged KV pool. Every kernel has a pure-JAX `reference` twin with the same
signature; `paged_attention` here dispatches to the backend chosen for the platform (today: the reference)."""

from pallas_kernels.paged_attention.reference import gather_blocks, merge_attention_states, paged_attention

__all__ = ["gather_blocks", "merge_attention_states", "paged_attention"]
