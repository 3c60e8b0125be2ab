"""Synthetic workloads: seeded arrivals and lengths, for when no trace is at hand.

Owns the arrival processes and the length distributions. Arrivals are a renewal process whose inter-arrival
gaps are Gamma-distributed with mean `1 / rate` and coefficient of variation `burstiness`: CV 1 is a Poisson
process (exponential gaps), CV > 1 is burstier (clumps of arrivals and long silences), CV < 1 is smoother.
Everything is drawn from one `numpy` generator seeded by `seed`, so the same arguments give the same workload.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kunjax.workloads.trace import TraceRequest, Workload

ARRIVALS = ("poisson", "gamma")
LENGTH_KINDS = ("fixed", "uniform", "lognormal", "exponential")


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A token-count distribution; samples are rounded and at least 1.

    `fixed:N`; `uniform:LO:HI` (inclusive); `lognormal:MEAN:CV` (mean and coefficient of variation of the
    lengths); `exponential:MEAN`.
    """

    kind: str
    a: float
    b: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"unknown length distribution {self.kind!r} (one of {', '.join(LENGTH_KINDS)})")
        if not self.a >= 1:
            raise ValueError(f"{self.kind}:{self.a:g}: the first parameter must be >= 1")
        if self.kind == "uniform" and self.b < self.a:
            raise ValueError(f"uniform:{self.a:g}:{self.b:g}: need LO <= HI")
        if self.kind == "lognormal" and self.b <= 0:
            raise ValueError(f"lognormal:{self.a:g}:{self.b:g}: the CV must be > 0")

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """'fixed:128', 'uniform:32:256', 'lognormal:200:1.0', 'exponential:100'; ValueError says what is wrong."""
        kind, *params = text.strip().split(":")
        need = {"fixed": 1, "uniform": 2, "lognormal": 2, "exponential": 1}.get(kind)
        if need is None:
            raise ValueError(f"unknown length distribution {kind!r} in {text!r} "
                             f"(fixed:N, uniform:LO:HI, lognormal:MEAN:CV, exponential:MEAN)")
        if len(params) != need:
            raise ValueError(f"{text!r}: {kind} takes {need} parameter(s)")
        try:
            values = [float(p) for p in params]
        except ValueError:
            raise ValueError(f"{text!r}: parameters must be numbers") from None
        return cls(kind, *values)

    def __str__(self) -> str:
        return f"{self.kind}:{self.a:g}" + (f":{self.b:g}" if self.kind in ("uniform", "lognormal") else "")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:  # [n] int64, each >= 1
        if self.kind == "fixed":
            x = np.full(n, self.a)
        elif self.kind == "uniform":
            x = rng.integers(round(self.a), round(self.b), endpoint=True, size=n)
        elif self.kind == "exponential":
            x = rng.exponential(self.a, size=n)
        else:  # lognormal with the given mean and CV
            sigma2 = math.log1p(self.b**2)
            x = rng.lognormal(math.log(self.a) - sigma2 / 2, math.sqrt(sigma2), size=n)
        return np.maximum(np.rint(x), 1).astype(np.int64)


def synthetic(*, num_requests: int | None = None, duration_s: float | None = None, rate: float = 4.0,
              arrival: str = "poisson", burstiness: float = 1.0,
              prompt_len: LengthDist | str = "uniform:32:256", output_len: LengthDist | str = "uniform:16:128",
              seed: int = 0) -> Workload:
    """`num_requests` requests, or all arrivals within `duration_s` seconds, at `rate` requests/s on average.

    `arrival="poisson"` draws exponential gaps (burstiness must be 1); `"gamma"` draws Gamma gaps whose CV is
    `burstiness`. The first request arrives at 0.
    """
    if (num_requests is None) == (duration_s is None):
        raise ValueError("give exactly one of num_requests or duration_s")
    if num_requests is not None and num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {arrival!r}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if arrival == "poisson" and burstiness != 1.0:
        raise ValueError("poisson arrivals have burstiness 1; use arrival='gamma' for another CV")
    p_dist = LengthDist.parse(prompt_len) if isinstance(prompt_len, str) else prompt_len
    o_dist = LengthDist.parse(output_len) if isinstance(output_len, str) else output_len
    rng = np.random.default_rng(seed)
    shape = 1.0 / burstiness**2  # Gamma(k, theta): CV = 1/sqrt(k), mean = k * theta
    scale = 1.0 / (rate * shape)

    def gaps(n: int) -> np.ndarray:
        return rng.gamma(shape, scale, size=n)

    if num_requests is not None:
        arrivals = np.concatenate([[0.0], np.cumsum(gaps(num_requests - 1))])
    else:
        chunks, t = [np.zeros(1)], 0.0
        while t < duration_s:
            c = t + np.cumsum(gaps(max(16, int(rate * duration_s))))
            chunks.append(c)
            t = float(c[-1])
        arrivals = np.concatenate(chunks)
        arrivals = arrivals[arrivals < duration_s]
    n = len(arrivals)
    prompts, outputs = p_dist.sample(rng, n), o_dist.sample(rng, n)
    reqs = tuple(TraceRequest(float(t), int(p), int(o)) for t, p, o in zip(arrivals, prompts, outputs, strict=True))
    how = "Poisson" if arrival == "poisson" else f"Gamma (CV {burstiness:g})"
    source = (f"synthetic: {how} arrivals at {rate:g} req/s, prompt {p_dist}, output {o_dist}, seed {seed}")
    return Workload(requests=reqs, source=source, notes=(f"generated {n} requests over {arrivals[-1]:.1f}s",))
