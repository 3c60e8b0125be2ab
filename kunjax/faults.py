"""Fault injection: failures at the executor seam, to show what the engine does when a device misbehaves.

Off by default (no wrapper at all). `--faults SPEC` (`EngineConfig.faults`) or the environment variable
`KUNJAX_FAULTS` (used when the option is empty) names the faults, comma separated, each
`POINT[@INSTANCE][:after=N][:times=N][:seconds=S]`:

* `step` — collecting a tick raises (the tick was dispatched and may have written KV; its tokens are lost);
* `copy` — a `CopyBlocks` (the live KV exchange's, a restore's move home) fails part-way: half of its copies are
  applied, then it raises;
* `fuse` / `split` — a drop or a restore fails half-way. The JAX executor raises after a weight leaf has been
  resharded (or gathered), leaf `after + 1`, and rolls back; other executors raise before changing anything;
* `slow` — the unit's ticks take `seconds` longer (slept on the wall clock, advanced on a virtual one).

`@INSTANCE` limits a fault to the unit holding that instance; `after=N` lets the first N matching events pass
(for `fuse` and `split` on the JAX executor an event is a weight leaf); `times=N` fires N times (default 1; 0:
every time).
For example `KUNJAX_FAULTS=step@1:after=20,copy:after=2,split` makes the 21st tick of instance 1's unit fail, the
third block copy fail half-way, and the first restore fail.

The executor wrapper that injects them is `kunjax.executor.faulty`. What the engine does about each
(`kunjax.engine`, `docs/reliability.md`): every request whose KV the failure may have touched is
recomputed from its tokens (a retry that changes no output: sampling is keyed by the request's seed and token
count), at most `--step-retries` times, then it ends with an error (gRPC `INTERNAL`); a failed drop leaves the
replicas as they were; a failed restore leaves the group serving; the books balance afterwards.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

POINTS = ("step", "copy", "fuse", "split", "slow")
ENV = "KUNJAX_FAULTS"


class InjectedFault(RuntimeError):
    """A failure `--faults` asked for."""


@dataclasses.dataclass
class Fault:
    point: str
    instance: int | None = None  # only the unit holding this instance; None: any
    after: int = 0  # matching events that pass before it fires
    times: int = 1  # how often it fires (0: every time after `after`)
    seconds: float = 0.0  # `slow`: added to each tick
    seen: int = 0  # matching events so far
    fired: int = 0

    def hit(self, point: str, members: Sequence[int]) -> bool:
        """One matching event: True when the fault fires on it."""
        if point != self.point or (self.instance is not None and self.instance not in members):
            return False
        self.seen += 1
        if self.seen <= self.after or (self.times and self.fired >= self.times):
            return False
        self.fired += 1
        return True


def parse(spec: str) -> list[Fault]:
    """The faults of a `--faults` spec (module docstring); ValueError naming the bad part."""
    faults = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        head, *options = part.split(":")
        point, _, inst = head.partition("@")
        if point not in POINTS:
            raise ValueError(f"--faults: unknown fault {point!r} in {part!r} (known: {', '.join(POINTS)})")
        f = Fault(point)
        try:
            if inst:
                f.instance = int(inst)
            for opt in options:
                key, eq, value = opt.partition("=")
                if not eq or key not in ("after", "times", "seconds"):
                    raise ValueError(f"unknown option {opt!r} (after=N, times=N, seconds=S)")
                setattr(f, key, float(value) if key == "seconds" else int(value))
        except ValueError as e:
            raise ValueError(f"--faults: bad fault {part!r}: {e}") from e
        if f.after < 0 or f.times < 0 or f.seconds < 0 or (f.instance is not None and f.instance < 0):
            raise ValueError(f"--faults: bad fault {part!r}: values must be >= 0")
        if point == "slow" and f.seconds <= 0:
            raise ValueError(f"--faults: {part!r}: a slow unit needs seconds=S > 0")
        faults.append(f)
    return faults


def resolve(spec: str) -> list[Fault]:
    """The faults of `spec`, or of `$KUNJAX_FAULTS` when `spec` is empty."""
    return parse(spec or os.environ.get(ENV, ""))
