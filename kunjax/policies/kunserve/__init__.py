"""`kunserve` (KunServe, EuroSys'26): when a burst outgrows the KV memory, drop replicated weights — replicas fuse
into pipeline units, each keeping a slice of the layers — and restore the replicas when the burst has passed.

The mechanics are the engine's, generic to any pipeline unit (`kunjax.fusion`, `kunjax.unit`, the executor's
`Fuse`/`Split`): resharding the weights, reinterpreting the pools in place, the extension segment, adopting
running requests with their history left in place (remote attention until the live exchange copies it), and
moving every request home at the end. This policy decides when and what, after every engine step
(`after_step`, DESIGN.md §6):

1. **Restore watch** (`monitor.RestoreWatch`) — a pipeline unit whose demand stayed below the low-water mark of
   its members' own capacity, with nothing queued, for the window (or whose restore was asked for,
   `begin_restore`) stops admitting and drains its pipe (at most k-1 ticks) — but only once its requests' KV fits
   the members' own pools, since a drain costs every request a step; then its remaining remote history is
   exchanged and the engine splits it (`SplitUnit`). When it does not fit yet, the restore is deferred (logged
   once per window).
2. **Drop** — replicas whose KV demand crossed KunServe's release rule (`monitor.needs_drop`) go to the planner
   (`planner.plan_drop`, aligned power-of-two blocks priced by `planner.PipelineCostModel`); each planned block is
   fused at this step boundary (`FuseUnits`).

Every transition is logged with its timing and kept as an event (drop, restore, exchange_done,
restore_deferred) for the runtime's status and metrics.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, ClassVar

from kunjax.config import ConfigError, Options
from kunjax.policies.base import (
    Capabilities,
    FuseUnits,
    MemoryPolicy,
    PipelineOptions,
    PolicyView,
    SplitUnit,
    Transition,
    TransitionOutcome,
)
from kunjax.policies.kunserve.monitor import RestoreWatch, Thresholds, needs_drop
from kunjax.policies.kunserve.planner import InstanceLoad, PipelineCostModel, candidate_groups, plan_drop
from kunjax.unit import ServingUnit
from pallas_kernels.remote_attention import TRANSPORTS as REMOTE_TRANSPORTS

if TYPE_CHECKING:
    from kunjax.config import EngineConfig, ModelConfig

log = logging.getLogger("kunjax.kunserve")


def group_sizes(num_instances: int, num_layers: int, max_group: int) -> list[int]:
    out, k = [], 2
    while k <= min(max_group, num_instances):
        if num_layers % k == 0:
            out.append(k)
        k *= 2
    return out


def _opt(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class KunServeOptions(Options):
    concern: ClassVar[str] = "policy kunserve"
    kunserve_max_group: int = _opt(2, "largest pipeline group (instances fused); groups are aligned power-of-two "
                                      "blocks of instances, compiled ahead of time")
    drop_demand_ratio: float = _opt(0.95, "drop when KV demand / capacity reaches this and the queued blocks are "
                                          "at least the free blocks")
    restore_demand_ratio: float = _opt(0.5, "restore a group when its demand stays below this share of the "
                                            "replicas' own capacity (and nothing is queued)")
    restore_window_steps: int = _opt(16, "engine steps the low demand must last before a restore")
    min_group_steps: int = _opt(8, "fewest engine steps a group lives before it may restore")
    exchange_blocks_per_step: int = _opt(16, "KV blocks moved per step by the live KV exchange")
    remote_rows: int = _opt(16, "query rows per stage and destination sent to remote attention per tick")
    remote_transport: str = _opt("all_to_all", "how query rows reach their KV's home device and results come "
                                               "back: all_to_all (one collective each way), ppermute (k-1 shifts "
                                               "each way), tpu-fused (one Pallas kernel with remote DMA; TPU only, "
                                               "not yet measured on hardware) or tpu-fused-interpret")
    microbatch_tokens: int | None = _opt(None, "padded tokens of one pipeline micro-batch (one tick); default: "
                                               "--max-num-batched-tokens")

    def __post_init__(self) -> None:
        k = self.kunserve_max_group
        if k < 2 or k & (k - 1):
            raise ConfigError(f"--kunserve-max-group must be a power of two >= 2, got {k}")
        if not 0.0 < self.restore_demand_ratio < self.drop_demand_ratio <= 1.0:
            raise ConfigError(f"need 0 < --restore-demand-ratio ({self.restore_demand_ratio}) < --drop-demand-ratio "
                              f"({self.drop_demand_ratio}) <= 1 (the gap is the hysteresis)")
        for name in ("restore_window_steps", "exchange_blocks_per_step", "remote_rows", "microbatch_tokens"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.min_group_steps < 0:
            raise ConfigError(f"--min-group-steps must be >= 0, got {self.min_group_steps}")
        if self.remote_transport not in REMOTE_TRANSPORTS:
            raise ConfigError(f"--remote-transport must be one of {', '.join(REMOTE_TRANSPORTS)}, "
                              f"got {self.remote_transport!r}")


@dataclasses.dataclass
class GroupState:
    """What the policy keeps about one pipeline unit."""

    watch: RestoreWatch
    created: float  # the engine clock at the drop
    exchange_done: bool = False
    restore_requested: bool = False  # restore as soon as the KV fits home (`begin_restore`)
    deferred_at: int | None = None  # engine step of the last logged restore deferral


class KunServe(MemoryPolicy):
    name = "kunserve"
    Options = KunServeOptions

    def __init__(self, config: EngineConfig, model: ModelConfig, *, num_instances: int, num_blocks: int,
                 block_bytes: int):
        super().__init__(config, model, num_instances=num_instances, num_blocks=num_blocks, block_bytes=block_bytes)
        o = self.options
        self.th = Thresholds(o.drop_demand_ratio, o.restore_demand_ratio, o.restore_window_steps, o.min_group_steps)
        self.num_instances = num_instances
        self.sizes = group_sizes(num_instances, model.num_layers, o.kunserve_max_group)
        budget = config.scheduler.max_num_batched_tokens
        self.pipeline = PipelineOptions(microbatch_tokens=o.microbatch_tokens or budget, remote_rows=o.remote_rows,
                                        exchange_blocks=o.exchange_blocks_per_step,
                                        remote_transport=o.remote_transport)
        self.cost_model = PipelineCostModel(num_layers=model.num_layers, hidden_size=model.hidden_size,
                                            microbatch_tokens=budget)
        self.groups: dict[int, GroupState] = {}
        self.counts = dict(drops=0, restores=0, blocks_exchanged_done=0, remote_ticks_done=0)
        self.no_drop_until = 0  # step before which no drop is planned (after a failed one)

    def attach(self, view) -> None:
        super().attach(view)
        hosts = view.instances_per_host
        if hosts is not None:  # a multi-host group: hops between hosts go over the network
            self.cost_model = dataclasses.replace(self.cost_model, instances_per_host=hosts)

    def capabilities(self) -> Capabilities:
        return Capabilities(pipeline=self.pipeline, overlap=True)

    def candidates(self) -> list[tuple[int, ...]]:
        view = self.view
        return [m for m in candidate_groups(self.num_instances, self.sizes) if view.group_shape(m) is not None]

    def gain_blocks(self, k: int) -> int:
        """Logical blocks a drop to k stages adds (the extension segment), 0 when no group of k can fuse."""
        shape = next((self.view.group_shape(m) for m in self.candidates() if len(m) == k), None)
        return shape.num_ext if shape is not None else 0

    def settings(self) -> dict[str, Any]:
        return {"group_sizes": tuple(self.sizes), "drop_demand_ratio": self.th.drop_demand_ratio,
                "restore_demand_ratio": self.th.restore_demand_ratio,
                "restore_window_steps": self.th.restore_window_steps}

    # ---- the policy, after every step ---------------------------------------------------------------
    def begin_restore(self, unit: ServingUnit) -> None:
        """Ask for `unit` to restore as soon as its requests' KV fits the members' own pools (an operator's or a
        test's request; the restore watch asks by itself when the burst is over)."""
        self.groups[unit.uid].restore_requested = True

    def after_step(self, view: PolicyView) -> list[Transition]:
        out: list[Transition] = []
        for unit in [u for u in view.units if u.k > 1]:
            split = self._watch(view, unit)
            if split is not None:
                out.append(split)
        replicas = [u for u in view.units if u.k == 1]
        if view.step_no < self.no_drop_until:
            return out
        if not any(u.waiting for u in replicas):  # no queue, no drop (`needs_drop`): the common step, kept cheap
            return out
        loads = {u.uid: InstanceLoad(u.uid, u.total_blocks, u.num_allocatable, u.demand_blocks(), u.queued_blocks(),
                                     u.shape.seqs - len(u.running)) for u in replicas}
        if not any(needs_drop(ld, self.th) for ld in loads.values()):
            return out
        all_loads = [loads.get(i) or InstanceLoad(i, 1, 0, 0, 0) for i in range(self.num_instances)]
        plan = plan_drop(all_loads, available=set(loads), group_sizes=self.sizes, gain_blocks=self.gain_blocks,
                         cost_model=self.cost_model)
        candidates = set(self.candidates())
        for gp in plan.groups:
            if gp.members in candidates:
                out.append(FuseUnits(gp.members, f"deficit {gp.deficit_blocks} blocks, gain {gp.gain_blocks}"))
        return out

    def _drain(self, unit: ServingUnit) -> None:
        unit.admitting = False  # nothing new enters the pipe, and the extension stops growing
        for s in unit.stages:
            s.ext_open = False

    def _defer(self, view: PolicyView, unit: ServingUnit, reason: str) -> None:
        """Serve on; a restore is tried again later. Logged once per window, not every step."""
        g = self.groups[unit.uid]
        unit.admitting = True
        for s in unit.stages:
            s.ext_open = True
        g.watch = RestoreWatch(self.th, view.step_no)
        if g.deferred_at is None or view.step_no - g.deferred_at >= self.th.restore_window_steps:
            g.deferred_at = view.step_no
            self._event("restore_deferred", unit, 0.0, {"reason": reason, "running": len(unit.running),
                                                        "remote_dependent": unit.num_remote_dependent})

    def _watch(self, view: PolicyView, unit: ServingUnit) -> SplitUnit | None:
        g = self.groups[unit.uid]
        if not g.exchange_done and not unit.num_remote_dependent:
            g.exchange_done = True
            self._event("exchange_done", unit, view.clock.now() - g.created,
                        {"blocks_exchanged": unit.blocks_exchanged, "remote_ticks": unit.remote_ticks})
        if unit.admitting:
            base = unit.k * view.replica_total_blocks  # the members' own pools, without the extension
            wants = g.watch.observe(view.step_no, unit.demand_blocks(), base, len(unit.waiting))
            if wants or g.restore_requested:
                # Drain only when the move home can succeed: a drain costs every request of the unit a step.
                if view.can_split(unit):
                    self._drain(unit)
                elif wants:
                    self._defer(view, unit, "KV does not fit whole free blocks yet")
            return None
        if unit.in_flight:
            return None
        while unit.num_remote_dependent:  # finish the exchange: the move home reads each stage's own blocks
            if not view.exchange_round(unit):
                break
        if unit.num_remote_dependent:
            self._defer(view, unit, "exchange blocked")
        elif not view.can_split(unit):
            self._defer(view, unit, "KV does not fit whole free blocks yet")
        else:
            return SplitUnit(unit.uid, "restore")
        return None

    def transition_failed(self, kind: str, unit: ServingUnit | None, members: tuple[int, ...], error: str) -> None:
        super().transition_failed(kind, unit, members, error)
        log.error("kunserve %s of instances %s failed: %s", "drop" if kind == "fuse" else "restore", list(members),
                  error)
        if unit is not None:  # a failed restore: serve on as a group and try again after a restore window
            self._defer(self.view, unit, f"restore failed: {error}")
        else:  # a failed drop: no new drop for a restore window (a fault that persists is not retried each step)
            self.no_drop_until = self.view.step_no + self.th.restore_window_steps

    def transition_done(self, outcome: TransitionOutcome) -> None:
        view = self.view
        if outcome.kind == "fuse":
            self.counts["drops"] += 1
            self.groups[outcome.unit] = GroupState(RestoreWatch(self.th, view.step_no), view.clock.now())
            unit = next(u for u in view.units if u.uid == outcome.unit)
            detail = {**outcome.detail, "freed_bytes_per_device": view.freed_bytes(outcome.members)}
            self._event("drop", unit, outcome.seconds, detail)
        else:
            del self.groups[outcome.unit]
            self.counts["restores"] += 1
            self.counts["blocks_exchanged_done"] += outcome.detail["blocks_exchanged"]
            self.counts["remote_ticks_done"] += outcome.detail["remote_ticks"]
            self.record("restore", outcome.unit, outcome.members, outcome.seconds, outcome.detail)
            log.info("kunserve restore: group %d members %s in %.1f ms %s", outcome.unit, list(outcome.members),
                     outcome.seconds * 1e3, outcome.detail)

    # ---- visibility ---------------------------------------------------------------------------------
    def _event(self, kind: str, unit: ServingUnit, seconds: float, detail: dict[str, Any]) -> None:
        self.record(kind, unit.uid, unit.members, seconds, detail)
        log.info("kunserve %s: group %d members %s in %.1f ms %s", kind, unit.uid, list(unit.members),
                 seconds * 1e3, detail)

    def unit_state(self, unit: ServingUnit) -> dict[str, Any]:
        g = self.groups.get(unit.uid)
        if g is None:
            return {}
        return {"admitting": unit.admitting, "remote_dependent": unit.num_remote_dependent,
                "blocks_exchanged": unit.blocks_exchanged, "remote_ticks": unit.remote_ticks,
                "restore_low_streak": g.watch.low_streak}

    def stats(self) -> dict[str, int]:
        groups = [u for u in self.view.units if u.k > 1]
        return {"drops": self.counts["drops"], "restores": self.counts["restores"], "groups": len(groups),
                "remote_dependent": sum(u.num_remote_dependent for u in groups),
                "blocks_exchanged": self.counts["blocks_exchanged_done"] + sum(u.blocks_exchanged for u in groups),
                "remote_ticks": self.counts["remote_ticks_done"] + sum(u.remote_ticks for u in groups)}
