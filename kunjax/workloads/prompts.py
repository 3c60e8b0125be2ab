"""Prompts of a workload's token counts, synthesized as token ids of the served model's vocabulary.

Traces carry token counts, not text (the services' tokenizers and prompts are private), so a replay sends
prompts of random token ids of exactly `prompt_tokens` each and asks for `output_tokens` with EOS ignored.
Owns the mapping from (seed, request index) to ids: the i-th request's ids come from a generator seeded by
`(seed, i)` alone (not from one stream shared by all requests), so the same workload and seed give the same
prompts whatever else happens, and every policy of a comparison gets identical prompts. Shared prefixes
(`TraceRequest.prefix_ids`, Mooncake hash ids) become shared token blocks: hash id h is always the same
`prefix_block_tokens` ids (seeded by `(seed, prefix stream, h)`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from kunjax.workloads.trace import Workload

_PREFIX_STREAM = 0x50524546  # separates prefix-block generators from per-request ones


def allowed_ids(vocab_size: int, excluded_ids: Iterable[int] = ()) -> np.ndarray:  # [V'] int64
    excluded = set(int(i) for i in excluded_ids)
    ids = np.array([i for i in range(vocab_size) if i not in excluded], dtype=np.int64)
    if not len(ids):
        raise ValueError(f"no token id left in a vocabulary of {vocab_size} after excluding {len(excluded)}")
    return ids


def synthesize_prompts(workload: Workload, vocab_size: int, excluded_ids: Iterable[int] = (),
                       seed: int = 0) -> list[list[int]]:
    """One list of token ids per request, of exactly its `prompt_tokens`, none of them in `excluded_ids`."""
    ids = allowed_ids(vocab_size, excluded_ids)
    block = workload.prefix_block_tokens
    blocks: dict[int, np.ndarray] = {}
    out: list[list[int]] = []
    for i, r in enumerate(workload.requests):
        parts: list[np.ndarray] = []
        have = 0
        if block:
            for h in r.prefix_ids:
                if have >= r.prompt_tokens:
                    break
                if h not in blocks:
                    blocks[h] = ids[np.random.default_rng([seed, _PREFIX_STREAM, h]).integers(0, len(ids), block)]
                parts.append(blocks[h])
                have += block
        rng = np.random.default_rng([seed, i])
        if have < r.prompt_tokens:
            parts.append(ids[rng.integers(0, len(ids), r.prompt_tokens - have)])
        out.append(np.concatenate(parts)[:r.prompt_tokens].tolist())
    return out
