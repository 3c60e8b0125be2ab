"""Fault injection: failures at the executor seam, to show what the engine does when a device misbehaves.

Off by default (no wrapper at all). `--faults SPEC` (`EngineConfig.faults`) or the environment variable
`KUNJAX_FAULTS` (used when the option is empty) names the faults, comma separated, each
`POINT[@INSTANCE][:after=N][:times=N][:seconds=S]`:

* `step` — collecting a tick raises (the tick was dispatched and may have written KV; its tokens are lost);
* `copy` — a `CopyBlocks` (the live KV exchange's, a restore's move home) fails part-way: half of its copies are
  applied, then it raises;
* `fuse` / `split` — a drop or a restore fails half-way. The JAX executor raises after `after` weight leaves have
  been resharded (or gathered) and rolls back; other executors raise before changing anything;
* `slow` — the unit's ticks take `seconds` longer (slept on the wall clock, advanced on a virtual one).

`@INSTANCE` limits a fault to the unit holding that instance; `after=N` lets the first N matching events pass
(for `fuse` and `split` on the JAX executor: N weight leaves); `times=N` fires N times (default 1; 0: every time).
For example `KUNJAX_FAULTS=step@1:after=20,copy:after=2,split` makes the 21st tick of instance 1's unit fail, the
third block copy fail half-way, and the first restore fail.

What the engine does about each (`kunjax.engine`): every request whose KV the failure may have touched is
recomputed from its tokens (a retry that changes no output: sampling is keyed by the request's seed and token
count), at most `--step-retries` times, then it ends with an error (gRPC `INTERNAL`); a failed drop leaves the
replicas as they were; a failed restore leaves the group serving; the books balance afterwards.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from kunjax.clock import Clock
from kunjax.executor import Executor, TickResult
from kunjax.plan import CopyBlocks, Fuse, MemoryOp, Split, StepInputs, TickWork, UnitShape

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


class FaultyExecutor:
    """Another executor with `faults` injected at its seam (see the module docstring)."""

    def __init__(self, inner: Executor, faults: list[Fault], clock: Clock):
        self.inner, self.faults, self.clock = inner, faults, clock
        self.num_instances, self.num_blocks = inner.num_instances, inner.num_blocks
        self.weight_bytes, self.load_seconds = inner.weight_bytes, inner.load_seconds
        self.needs_arrays = inner.needs_arrays
        self.members: dict[int, tuple[int, ...]] = {i: (i,) for i in range(inner.num_instances)}
        self.injected: list[str] = []  # what fired, in order (for tests and the log)
        hook = getattr(inner, "set_transition_hook", None)
        if hook is not None:  # the JAX executor: fail between weight leaves, half-way through the reshard
            hook(self._transition_leaf)
        self._in_transition: tuple[str, tuple[int, ...]] | None = None

    def __getattr__(self, name: str) -> Any:  # the inner executor's own API
        return getattr(self.inner, name)

    def _fire(self, point: str, members: Sequence[int]) -> Fault | None:
        for f in self.faults:
            if f.hit(point, members):
                self.injected.append(f"{point}@{list(members)}")
                return f
        return None

    def _raise(self, point: str, members: Sequence[int], what: str) -> None:
        raise InjectedFault(f"injected fault ({ENV} / --faults): {point} on instances {list(members)}: {what}")

    def describe(self, instance: int) -> str:
        return self.inner.describe(instance)

    def warmup(self, units: Sequence[tuple[int, tuple[int, ...], UnitShape]],
               candidates: Sequence[tuple[tuple[int, ...], UnitShape]]) -> None:
        self.inner.warmup(units, candidates)

    def apply(self, ops: Sequence[MemoryOp]) -> None:
        for i, op in enumerate(ops):
            if isinstance(op, CopyBlocks) and self._fire("copy", self.members[op.unit]):
                self.inner.apply(list(ops[:i]))
                half = op.copies[:len(op.copies) // 2]
                if half:
                    self.inner.apply([CopyBlocks(op.unit, half)])
                self._raise("copy", self.members[op.unit], f"{len(half)} of {len(op.copies)} block copies done")
            if isinstance(op, Fuse | Split) and self._fuse_or_split(op, ops[:i]):
                return
        self.inner.apply(ops)

    def _fuse_or_split(self, op: Fuse | Split, before: Sequence[MemoryOp]) -> bool:
        point = "fuse" if isinstance(op, Fuse) else "split"
        members = op.members
        if getattr(self.inner, "set_transition_hook", None) is not None:
            self._in_transition = (point, members)  # fires between leaves, inside the inner executor
            try:
                self.inner.apply([*before, op])
            finally:
                self._in_transition = None
        elif self._fire(point, members):
            self.inner.apply(list(before))
            self._raise(point, members, "before anything changed")
        else:
            self.inner.apply([*before, op])
        if isinstance(op, Fuse):
            self.members[op.unit] = members
        else:
            self.members.pop(op.unit, None)
        return True

    def _transition_leaf(self, leaves_done: int) -> None:
        """Called by the inner executor after each weight leaf it resharded in a fuse or split."""
        if self._in_transition is not None:
            point, members = self._in_transition
            if self._fire(point, members):
                self._raise(point, members, f"after {leaves_done} weight leaves (rolled back)")

    def launch(self, uid: int, work: TickWork, inputs: StepInputs | None) -> tuple[int, Any]:
        members = self.members[uid]
        slow = self._fire("slow", members)
        if slow is not None:
            self.clock.sleep(slow.seconds)
        return uid, self.inner.launch(uid, work, inputs)

    def collect(self, launched: tuple[int, Any], leaving: bool) -> TickResult:
        uid, handle = launched
        result = self.inner.collect(handle, leaving)
        if self._fire("step", self.members[uid]):
            self._raise("step", self.members[uid], "the tick's results could not be read")
        return result

    def end_step(self) -> None:
        self.inner.end_step()


def wrap(executor: Executor, faults: list[Fault], clock: Clock) -> Executor:
    """`executor` with `faults` injected, or `executor` itself when there are none."""
    return FaultyExecutor(executor, faults, clock) if faults else executor
