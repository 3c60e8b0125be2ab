"""An executor with faults injected at its seam (`kunjax.faults` parses them; `docs/reliability.md`).

Wraps any executor: a `step` fault raises after the inner collect (the tick ran), a `copy` fault applies the
operations before a `CopyBlocks` and half of its copies, then raises; `fuse` and `split` fire between the weight
leaves of an executor that offers `set_transition_hook` (the JAX executor, which rolls back), else before the
transition changes anything; `slow` lets the clock pass before the tick.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kunjax.clock import Clock
from kunjax.executor import Executor, TickResult
from kunjax.faults import ENV, Fault, InjectedFault
from kunjax.plan import CopyBlocks, Fuse, MemoryOp, Split, StepInputs, TickWork, UnitShape


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
        done = 0  # ops[:done] went to the inner executor
        for i, op in enumerate(ops):
            if isinstance(op, CopyBlocks) and self._fire("copy", self.members[op.unit]):
                self.inner.apply(list(ops[done:i]))
                half = op.copies[:len(op.copies) // 2]
                if half:
                    self.inner.apply([CopyBlocks(op.unit, half)])
                self._raise("copy", self.members[op.unit], f"{len(half)} of {len(op.copies)} block copies done")
            elif isinstance(op, Fuse | Split):
                self.inner.apply(list(ops[done:i]))
                self._fuse_or_split(op)
                done = i + 1
        self.inner.apply(list(ops[done:]))

    def _fuse_or_split(self, op: Fuse | Split) -> None:
        point = "fuse" if isinstance(op, Fuse) else "split"
        members = op.members
        if getattr(self.inner, "set_transition_hook", None) is not None:
            self._in_transition = (point, members)  # fires between leaves, inside the inner executor
            try:
                self.inner.apply([op])
            finally:
                self._in_transition = None
        elif self._fire(point, members):
            self._raise(point, members, "before anything changed")
        else:
            self.inner.apply([op])
        if isinstance(op, Fuse):
            self.members[op.unit] = members
        else:
            self.members.pop(op.unit, None)

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
