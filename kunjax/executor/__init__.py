"""The executor seam (DESIGN.md §14): host code decides, an executor computes.

An executor owns whatever stands for devices — arrays, compiled functions, or nothing but arithmetic — and the
time a step takes. The engine hands it, per serving unit, the plan of each tick (`kunjax.plan.TickWork`, and the
padded host arrays `kunjax.plan.StepInputs` when the executor reads arrays) and the memory operations the host
books decided (`kunjax.plan.MemoryOp`, in order); it hands back the sampled tokens
of the micro-batch leaving the last stage and how long the tick took. Nothing else crosses: host code never sees
a device array, and an executor never decides what runs.

Executors:
* `JaxExecutor` (`jax_executor.py`) — the real model on real (or simulated CPU) devices. Owns every weight, pool,
  host-tier array and compiled function; on the wall clock.
* `ArithmeticExecutor` (`arith.py`) — no model: tokens by formula from the KV it simulates block by block, so the
  whole engine (router, scheduler, every policy with drops, exchanges and restores) runs with the same books and
  invariants in seconds, and a wrong block table or a lost copy changes the tokens. On a virtual clock it
  advances by a per-tick cost formula.
* `CostModelExecutor` (`sim.py`) — no model: durations from a hardware profile through the cost model
  (`kunjax.cost_model`), tokens synthesized, so the engine runs at any scale (70B on 32 GPUs) on a virtual
  clock; `ModelledTimeExecutor` (`sim.py`) wraps the JAX executor to keep its real tokens but the modelled time.

Protocol (`Executor`), all of it called from the engine's one thread:
* `num_instances`, `num_blocks` (KV blocks per instance pool, equal for all), `weight_bytes` (per device),
  `describe(i)` (an instance's devices, for humans); `needs_arrays`: whether `launch` reads `StepInputs` (the
  cost-model executor does not: building them would be most of its host time);
* `warmup(units, candidates)` — prepare every replica unit `(uid, members, shape)` and every group the policy
  may fuse `(members, shape)`, so nothing prepares (compiles) while serving;
* `apply(ops)` — issue memory operations in order; never waits for the device (a fuse or split may);
* `launch(uid, work, inputs)` — issue one tick (`inputs` is None unless `needs_arrays`);
  `collect(launched, leaving)` — wait for it and, when a micro-batch leaves the pipe this tick, return its
  `Sampled`; both return the tick's seconds as measured or modelled (`TickResult`);
* `end_step()` — the engine step is over (a virtual clock advances here by the step's modelled duration).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from kunjax.plan import MemoryOp, Sampled, StepInputs, TickWork, UnitShape


class ExecutorLost(Exception):
    """The executor cannot go on at all (a process of a multi-host group died or stopped answering): not one
    unit's failure to recover from, so the engine lets it through and the server stops (`kunjax.multihost`)."""


@dataclasses.dataclass
class TickResult:
    sampled: Sampled | None  # the leaving micro-batch's samples, None when nothing left the pipe this tick
    seconds: float  # the tick's duration: measured (JAX, wall clock) or modelled (virtual clock)


class Executor(Protocol):
    num_instances: int
    num_blocks: int
    weight_bytes: int
    load_seconds: float
    needs_arrays: bool

    def describe(self, instance: int) -> str: ...

    def warmup(self, units: Sequence[tuple[int, tuple[int, ...], UnitShape]],
               candidates: Sequence[tuple[tuple[int, ...], UnitShape]]) -> None: ...

    def apply(self, ops: Sequence[MemoryOp]) -> None: ...

    def launch(self, uid: int, work: TickWork, inputs: StepInputs | None) -> Any: ...

    def collect(self, launched: Any, leaving: bool) -> TickResult: ...

    def end_step(self) -> None: ...
