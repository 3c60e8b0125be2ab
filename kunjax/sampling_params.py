"""Per-request sampling options (host side), shaped like vLLM's `SamplingParams`.

This module owns the user-facing knobs and their validation: a `SamplingParams` that exists is valid on its
own, and `validate_for` adds the checks that need the model and engine (vocabulary size, `--max-logprobs`). It
never touches device arrays; `pack_sampling` turns a batch of these into the step's [S]
arrays, and `kunjax.detokenizer` applies the stop strings.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

MAX_SEED = 2**63  # seeds live in [0, MAX_SEED)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each generated token and when to stop.

    `stop` and `stop_token_ids` are normalized to tuples (empty when not given), so instances are hashable
    and the engine never sees a list it could mutate.
    """

    max_tokens: int | None = 16  # None: until the model context (max_model_len) is full
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0  # 1: disabled
    min_p: float = 0.0  # 0: disabled; relative to the most likely token's probability
    seed: int | None = None  # None: the engine draws one
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    min_tokens: int = 0  # EOS, stop tokens and stop strings are ignored before this many tokens
    logprobs: int | None = None  # top logprobs per generated token; 0: only the sampled token's
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        else:
            stop = tuple(stop)
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must be strings, got {type(s).__name__} {s!r}")
            if not s:
                raise ValueError("stop strings must be non-empty")
        object.__setattr__(self, "stop", stop)

        stop_ids = () if self.stop_token_ids is None else tuple(self.stop_token_ids)
        for t in stop_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stop_ids))

        if not _is_real(self.temperature) or not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = disabled), got {self.top_p!r}")
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = disabled), got {self.min_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 = disabled), got {self.top_k!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be an integer >= 0 or None, got {self.logprobs!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """The token is the argmax: no randomness, seed irrelevant."""
        return self.temperature == 0 or self.top_k == 1

    def validate_for(self, vocab_size: int, max_logprobs: int) -> None:
        """Checks that depend on the served model and engine; raises `ValueError` naming the limit."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise ValueError(f"stop_token_ids must be in [0, vocab_size={vocab_size}), got {t}")
        if self.logprobs is not None and self.logprobs > max_logprobs:
            raise ValueError(f"logprobs must be in [0, max_logprobs={max_logprobs}] (engine --max-logprobs), "
                             f"got {self.logprobs}")


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


_MASK64 = (1 << 64) - 1
@functools.lru_cache(maxsize=1 << 16)  # a request's seed is packed again every step it runs
def seed_to_uint32(seed: int) -> int:
    """The 32-bit device seed of a request seed in [0, 2**63).

    A splitmix64 finalizer, then high half XOR low half: every bit of the 64-bit seed reaches the result, so
    seeds that differ only above bit 31 (e.g. `s` and `s + 2**32`) do not collide trivially.
    """
    z = seed & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z ^ (z >> 32)) & 0xFFFFFFFF


class SamplingArrays(NamedTuple):
    """A step's per-row sampling inputs, in `sample`'s argument order (`sample(logits, *arrays, ...)`).

    A NamedTuple, so it is a pytree and can be passed to a jitted step as one argument.
    """

    temperature: np.ndarray  # [S] float32, 0 => greedy
    top_k: np.ndarray  # [S] int32, 0 => disabled
    top_p: np.ndarray  # [S] float32, 1 => disabled
    min_p: np.ndarray  # [S] float32, 0 => disabled
    seeds: np.ndarray  # [S] uint32, seed_to_uint32(request seed)
    counters: np.ndarray  # [S] int32, tokens the request has generated so far


def pack_sampling(params: Sequence[SamplingParams], seeds: Sequence[int], counters: Sequence[int],
                  num_rows: int) -> SamplingArrays:
    """Host arrays for one step; rows past `len(params)` are padding and decode greedily.

    `seeds` are the resolved request seeds (the user's, or one the engine drew); `counters[i]` is the number
    of tokens request i has generated before this step's token.
    """
    n = len(params)
    if not (len(seeds) == len(counters) == n <= num_rows):
        raise ValueError(f"pack_sampling: {n} params, {len(seeds)} seeds, {len(counters)} counters "
                         f"for {num_rows} rows")
    out = SamplingArrays(
        temperature=np.zeros(num_rows, np.float32),
        top_k=np.zeros(num_rows, np.int32),
        top_p=np.ones(num_rows, np.float32),
        min_p=np.zeros(num_rows, np.float32),
        seeds=np.zeros(num_rows, np.uint32),
        counters=np.zeros(num_rows, np.int32),
    )
    if n:  # one conversion per array (a row at a time costs a numpy call per value)
        fill_sampling(out, [sampling_row(p) for p in params], [seed_to_uint32(seed) for seed in seeds], counters)
    return out


def sampling_row(p: SamplingParams) -> tuple[float, int, float, float]:
    """`(temperature, top_k, top_p, min_p)` of one request as the step reads them (a request caches it)."""
    return (0.0 if p.greedy else p.temperature, max(p.top_k, 0), p.top_p, p.min_p)


def fill_sampling(out: SamplingArrays, rows: Sequence[tuple[float, int, float, float]], seeds32: Sequence[int],
                  counters: Sequence[int]) -> None:
    """Write the first `len(rows)` rows of `out`: each row's `sampling_row`, device seed and counter."""
    n = len(rows)
    table = np.array(rows, np.float64)  # [n, 4]: one conversion for four arrays
    out.temperature[:n] = table[:, 0]
    out.top_k[:n] = table[:, 1]
    out.top_p[:n] = table[:, 2]
    out.min_p[:n] = table[:, 3]
    out.seeds[:n] = seeds32
    out.counters[:n] = counters
