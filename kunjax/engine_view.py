"""What a memory policy sees of the engine (`kunjax.policies.base.PolicyView`): its configs, memory pool, clock
and units, and the few actions a policy may take on them (an exchange round, moving a running request)."""

from __future__ import annotations

from typing import Any, Protocol

from kunjax.config import EngineConfig, ModelConfig
from kunjax.memory import weight_bytes_per_device
from kunjax.mempool import MemoryPool
from kunjax.plan import UnitShape
from kunjax.request import Request
from kunjax.unit import ServingUnit


class ViewedEngine(Protocol):
    """What the view reads of `kunjax.engine.LLMEngine` (a protocol: the engine module imports this one)."""

    config: EngineConfig
    model_config: ModelConfig
    mempool: MemoryPool
    clock: Any
    executor: Any
    step_no: int
    units: dict[int, ServingUnit]
    replica_blocks: int

    @property
    def num_instances(self) -> int: ...

    def group_shape(self, members: tuple[int, ...]) -> UnitShape | None: ...

    def plan_home(self, unit: ServingUnit) -> dict[Request, tuple[int, list[int]]] | None: ...


class EngineView:
    """What a policy sees of the engine (`kunjax.policies.base.PolicyView`)."""

    def __init__(self, engine: ViewedEngine):
        self._engine = engine
        self.config = engine.config
        self.model = engine.model_config
        self.mempool = engine.mempool
        self.clock = engine.clock
        self.instances_per_host: int | None = getattr(engine.executor, "instances_per_host", None)

    @property
    def step_no(self) -> int:
        return self._engine.step_no

    @property
    def num_instances(self) -> int:
        return self._engine.num_instances

    @property
    def units(self) -> list[ServingUnit]:
        return list(self._engine.units.values())

    @property
    def replica_total_blocks(self) -> int:
        """Usable blocks of one replica's own pool (what a restore must fit into, per member)."""
        return self._engine.replica_blocks - 1

    def freed_bytes(self, members: tuple[int, ...]) -> int:
        """Weight bytes per device a fuse of `members` releases (from the shapes)."""
        cfg, ecfg = self.model, self.config
        return (weight_bytes_per_device(cfg, ecfg.dtype, ecfg.tp)
                - weight_bytes_per_device(cfg, ecfg.dtype, ecfg.tp, len(members)))

    def replica(self, instance: int) -> ServingUnit | None:
        u = self._engine.units.get(instance)
        return u if u is not None and u.k == 1 else None

    def group_shape(self, members: tuple[int, ...]) -> UnitShape | None:
        return self._engine.group_shape(members)

    def can_split(self, unit: ServingUnit) -> bool:
        return self._engine.plan_home(unit) is not None

    def exchange_round(self, unit: ServingUnit) -> int:
        """One bounded batch of a pipeline unit's live KV exchange (its copies queued); returns blocks moved."""
        copies = unit.plan_exchange(unit.shape.copy_blocks)
        self.mempool.copy_blocks(unit, copies)
        unit.commit_exchange()
        return len(copies)

    def move_running(self, req: Request, src: ServingUnit, dst: ServingUnit, tables: list[list[int]]) -> None:
        """`req` leaves `src` (its blocks there freed) and runs on `dst` with `tables` (already filled with all
        of its computed KV, which it keeps: nothing is recomputed)."""
        computed = req.num_computed
        src.running.remove(req)
        src.release(req)  # (which forgets what was computed: that was on src's blocks)
        req.tables, req.num_computed = tables, computed
        dst.take_running(req)
