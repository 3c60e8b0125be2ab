"""Drop and restore triggers for KunServe elasticity, with hysteresis (DESIGN.md §6.1).

Owns: the rule that says an instance is overloaded enough to drop weights (`needs_drop`), and the per-group
watch that says a pipeline group may restore (`RestoreWatch`). Never plans groups (that is `planner`) and never
acts: the engine asks, then drops or restores at a step boundary.

Hysteresis, the invariant these keep: a drop needs demand at `drop_demand_ratio` of capacity *and* a queue at
least as large as the free blocks; a restore needs demand below the much lower `restore_demand_ratio` with an
empty queue for `restore_window_steps` consecutive steps, and a group that lived `min_group_steps`. Demand that
oscillates between the two marks therefore neither drops a healthy instance nor restores a fused group, and a
group restores neither before its `restore_window_steps`-th observation nor within `min_group_steps` of its drop.
All thresholds come from the caller (the engine config).
"""

from __future__ import annotations

import dataclasses

from kunjax.policies.kunserve.planner import InstanceLoad


@dataclasses.dataclass(frozen=True)
class Thresholds:
    drop_demand_ratio: float = 0.95  # drop when demand / total reaches this (and the queue outgrows the free)
    restore_demand_ratio: float = 0.5  # restore only while demand / base capacity stays below this
    restore_window_steps: int = 16  # consecutive low, queue-free observations a restore needs
    min_group_steps: int = 8  # fewest steps a group lives before it may restore

    def __post_init__(self) -> None:
        if not 0.0 < self.restore_demand_ratio < self.drop_demand_ratio <= 1.0:
            raise ValueError(f"need 0 < restore_demand_ratio ({self.restore_demand_ratio}) < drop_demand_ratio "
                             f"({self.drop_demand_ratio}) <= 1: the gap is the hysteresis")
        if self.restore_window_steps < 1:
            raise ValueError(f"restore_window_steps must be >= 1, got {self.restore_window_steps}")
        if self.min_group_steps < 0:
            raise ValueError(f"min_group_steps must be >= 0, got {self.min_group_steps}")


def needs_drop(load: InstanceLoad, th: Thresholds) -> bool:
    """KunServe's release rule: demand near capacity and a queue that the free blocks cannot absorb.

    Both halves matter: high demand alone is a full but flowing pool (requests finish and free blocks), and a
    queue alone may fit in the free blocks on the next step. And memory must be what holds the queue back: an
    instance whose sequence slots are all taken gains nothing from more KV blocks (a group has as many slots
    as its members), so it does not drop.
    """
    return (load.queued_blocks > 0 and load.queued_blocks >= load.free_blocks and load.seats_free > 0
            and load.demand_blocks >= th.drop_demand_ratio * load.total_blocks)


class RestoreWatch:
    """Per group: decides when the group may restore.

    `observe` is called once per engine step with the group's demand, the capacity its replicas have on their
    own (the base pool, without the extension the drop made) and the number of waiting requests. It returns True
    when the group has lived >= `min_group_steps`, nothing is waiting, and demand < `restore_demand_ratio` * base
    capacity has held for `restore_window_steps` consecutive observations; an observation above the mark or with
    a queue resets the window.
    """

    def __init__(self, th: Thresholds, created_step: int) -> None:
        self._th = th
        self._created_step = created_step
        self._last_step = created_step - 1
        self._low_streak = 0

    @property
    def low_streak(self) -> int:
        """Consecutive observations, up to now, with low demand and an empty queue."""
        return self._low_streak

    def observe(self, step: int, demand_blocks: int, base_capacity_blocks: int, waiting: int) -> bool:
        if step <= self._last_step:
            raise ValueError(f"observe(step={step}) after step {self._last_step}: one observation per step, in order")
        if base_capacity_blocks <= 0:
            raise ValueError(f"base_capacity_blocks must be positive, got {base_capacity_blocks}")
        self._last_step = step
        low = waiting == 0 and demand_blocks < self._th.restore_demand_ratio * base_capacity_blocks
        self._low_streak = self._low_streak + 1 if low else 0
        return (step - self._created_step >= self._th.min_group_steps
                and self._low_streak >= self._th.restore_window_steps)
