"""What a memory policy is (`MemoryPolicy`), what it sees (`PolicyView`), and what it may ask of the engine.

A policy is a strategy over a view of the engine, never a fork of it. It acts in two places:

* **inside scheduling**, through the `kunjax.unit.SchedulerHooks` every unit calls (what preemption does, what
  comes back before new admissions, how a request grows); `MemoryPolicy` implements them as recompute (vLLM's
  default), and a policy overrides what it changes;
* **after every engine step**, `after_step(view)` reads units, queues and books and returns transitions for the
  engine to apply (`FuseUnits`, `SplitUnit`); moves of KV (swaps, transfers, slot offloads, exchange rounds) are
  booked through the memory pool (`view.mempool`), which queues their operations for the executor.

A policy declares what it needs (`capabilities`): a host tier, per-layer-group step tables, pool blocks kept out
of the allocator, units that may fuse; the engine builds and compiles accordingly — nothing is probed. It reports
through `stats()` (counters by name), `events` (transitions with timings), `reserved_blocks` (device blocks it
references itself, for the books check) and `check()` (its own invariants).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from kunjax.config import ConfigError, Options
from kunjax.request import Request

if TYPE_CHECKING:
    from kunjax.clock import Clock
    from kunjax.config import EngineConfig, ModelConfig
    from kunjax.mempool import MemoryPool
    from kunjax.microbatch import MicroBatch, Scheduled
    from kunjax.plan import UnitShape
    from kunjax.unit import ServingUnit


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How a pipeline unit fused by the policy runs (its `kunjax.plan.UnitShape` beyond what memory decides)."""

    microbatch_tokens: int  # padded tokens of one micro-batch (one tick)
    remote_rows: int  # remote-attention rows per stage and destination per tick
    exchange_blocks: int  # blocks the live KV exchange moves per step and (source, destination) pair
    remote_transport: str = "all_to_all"  # pallas_kernels.remote_attention.TRANSPORTS


@dataclasses.dataclass(frozen=True)
class Capabilities:
    host_blocks: int = 0  # KV blocks of host memory per instance (swap, layerkv)
    layer_groups: int = 1  # G: replica steps read per-layer-group tables (layerkv)
    staging_blocks: int = 0  # blocks at the top of every pool the allocator never hands out (layerkv's staging)
    pipeline: PipelineOptions | None = None  # replicas may fuse into pipeline units (compiled ahead)
    # A replica's next tick may be scheduled while its current one runs (`--async-scheduling`, kunjax/overlap.py):
    # the policy's hooks do nothing to a replica with nothing swapped out and no preemption, and `after_step`
    # touches no running request except through a transition (the engine drains the ticks in flight first).
    overlap: bool = False


@dataclasses.dataclass(frozen=True)
class FuseUnits:
    """Drop the replicated weights of replicas `members` (an aligned block, stage order) into one pipeline."""

    members: tuple[int, ...]
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class SplitUnit:
    """Restore pipeline unit `uid` into its members' replicas (the caller checked `PolicyView.can_split`)."""

    uid: int
    reason: str = ""


Transition = FuseUnits | SplitUnit


@dataclasses.dataclass(frozen=True)
class TransitionOutcome:
    kind: str  # "fuse" | "split"
    unit: int  # the pipeline unit formed or split
    members: tuple[int, ...]
    seconds: float  # wall time of the transition
    detail: dict[str, Any]


@dataclasses.dataclass
class PolicyEvent:
    """One transition a policy made (a drop, a restore, a migration ...), kept for the runtime's status."""

    kind: str
    group: int  # the pipeline unit concerned, -1 when none
    members: tuple[int, ...]  # instances concerned
    step: int  # engine step after which it happened
    seconds: float  # how long it took
    detail: dict[str, Any]
    time_unix_s: float = 0.0  # when it happened (the engine clock's wall time)


class PolicyView(Protocol):
    """What the engine shows a policy (`kunjax.engine.EngineView` implements it)."""

    config: EngineConfig
    model: ModelConfig
    mempool: MemoryPool
    clock: Clock
    step_no: int
    instances_per_host: int | None  # instances on each host of a multi-host deployment; None: one host

    @property
    def units(self) -> Sequence[ServingUnit]: ...
    @property
    def replica_total_blocks(self) -> int: ...
    def freed_bytes(self, members: tuple[int, ...]) -> int: ...
    def replica(self, instance: int) -> ServingUnit | None: ...
    def group_shape(self, members: tuple[int, ...]) -> UnitShape | None: ...
    def can_split(self, unit: ServingUnit) -> bool: ...
    def exchange_round(self, unit: ServingUnit) -> int: ...
    def move_running(self, req: Request, src: ServingUnit, dst: ServingUnit, tables: list[list[int]]) -> None: ...


class MemoryPolicy:
    """The base of every policy: recompute preemption and nothing after the step (module docstring).

    `Options` is the policy's own options class (a `kunjax.config.Options` dataclass in its module; None when it
    has none); `self.options` is the instance the engine config carries, or its defaults."""

    name = "recompute"
    Options: ClassVar[type[Options] | None] = None

    def __init__(self, config: EngineConfig, model: ModelConfig, *, num_instances: int, num_blocks: int,
                 block_bytes: int):
        self.config = config
        self.model = model
        given = config.policy_options
        if self.Options is None:
            if given is not None:
                raise ConfigError(f"--policy {self.name} takes no options, got {type(given).__name__}")
            self.options = None
        else:
            if given is not None and not isinstance(given, self.Options):
                raise ConfigError(f"--policy {self.name} takes {self.Options.__name__}, got {type(given).__name__}")
            self.options = given if given is not None else self.Options()
        self.events: collections.deque[PolicyEvent] = collections.deque(maxlen=256)
        self.view: PolicyView | None = None

    def capabilities(self) -> Capabilities:
        return Capabilities(overlap=True)

    def attach(self, view: PolicyView) -> None:
        """Called once the engine's units and memory pool exist."""
        self.view = view

    def candidates(self) -> list[tuple[int, ...]]:
        """Instance groups this policy may fuse (compiled ahead of time)."""
        return []

    # ---- scheduling hooks (kunjax.unit.SchedulerHooks) ----------------------------------------------
    def begin_step(self, unit: ServingUnit) -> set[Request]:
        return set()

    def preempt(self, unit: ServingUnit, victim: Request) -> None:
        unit.requeue(victim)

    def resume(self, unit: ServingUnit, items: list[Scheduled], budget: int) -> int:
        return budget

    def may_admit(self, unit: ServingUnit) -> bool:
        return True

    def grow(self, unit: ServingUnit, req: Request, num_tokens: int) -> bool | None:
        return None

    def admit_fallback(self, unit: ServingUnit, req: Request, num_tokens: int) -> bool:
        return False

    def release(self, unit: ServingUnit, req: Request) -> None:
        pass

    def commit(self, unit: ServingUnit, req: Request) -> bool:
        return False

    def group_tables(self, unit: ServingUnit, req: Request) -> list[list[int]] | None:
        return None

    def after_launch(self, unit: ServingUnit, mb: MicroBatch) -> None:
        pass

    def forget(self, unit: ServingUnit, req: Request) -> None:
        pass

    # ---- engine level -------------------------------------------------------------------------------
    def observe_tick(self, unit: ServingUnit, tokens: int, seconds: float) -> None:
        """A tick of `unit` with `tokens` tokens took `seconds` (measured or modelled by the executor)."""

    def after_step(self, view: PolicyView) -> list[Transition]:
        return []

    def transition_done(self, outcome: TransitionOutcome) -> None:
        """The engine applied one of this policy's transitions."""

    def transition_failed(self, kind: str, unit: ServingUnit | None, members: tuple[int, ...], error: str) -> None:
        """A transition failed at the executor and was rolled back: `kind` "fuse" (the members serve on as
        replicas; `unit` None) or "split" (`unit` serves on as a group, its requests being recomputed)."""
        self.record(f"{kind}_failed", unit.uid if unit is not None else -1, members, 0.0, {"error": error})

    def reserved_blocks(self, unit: ServingUnit, stage: int) -> collections.Counter[int]:
        """Device blocks of `unit`'s stage the policy itself references (e.g. a migration's destination copies)."""
        return collections.Counter()

    def check(self) -> None:
        """Assert the policy's own books (called by `LLMEngine.check_books`)."""

    def stats(self) -> dict[str, int]:
        return {}

    def settings(self) -> dict[str, Any]:
        """The policy's thresholds, for `GetServerInfo`."""
        return {}

    def unit_state(self, unit: ServingUnit) -> dict[str, Any]:
        """Policy-specific facts about a unit for its status line (e.g. draining, a restore watch)."""
        return {}

    def record(self, kind: str, group: int, members: Sequence[int], seconds: float,
               detail: dict[str, Any]) -> PolicyEvent:
        """Keep an event (stamped with the engine's step and clock) for the runtime's status."""
        view = self.view
        ev = PolicyEvent(kind, group, tuple(members), view.step_no if view is not None else 0, seconds, detail,
                         time_unix_s=view.clock.wall() if view is not None else 0.0)
        self.events.append(ev)
        return ev
