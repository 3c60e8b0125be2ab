"""Drop and restore triggers: the release rule at its thresholds, the restore window, and no flapping."""

import dataclasses
import random

import pytest

from kunjax.policies.kunserve.monitor import RestoreWatch, Thresholds, needs_drop
from kunjax.policies.kunserve.planner import InstanceLoad

TH = Thresholds()  # the engine config's defaults: 0.95 / 0.5 / 16 steps / 8 steps
BASE = 100  # KV blocks of one instance's own pool
GAIN = 40  # extra blocks the drop gives it


def load(demand: int, queued: int, free: int, total: int = BASE) -> InstanceLoad:
    return InstanceLoad(0, total, free, demand, queued)


def test_thresholds_reject_a_missing_hysteresis_gap():
    with pytest.raises(ValueError, match="hysteresis"):
        Thresholds(drop_demand_ratio=0.5, restore_demand_ratio=0.5)
    with pytest.raises(ValueError, match="hysteresis"):
        Thresholds(drop_demand_ratio=1.1)
    with pytest.raises(ValueError, match="restore_window_steps"):
        Thresholds(restore_window_steps=0)
    with pytest.raises(ValueError, match="min_group_steps"):
        Thresholds(min_group_steps=-1)


def test_drop_rule_at_and_around_its_thresholds():
    assert needs_drop(load(demand=95, queued=5, free=5), TH)  # exactly at both marks
    assert not needs_drop(load(demand=94, queued=5, free=6), TH)  # demand one block short
    assert not needs_drop(load(demand=95, queued=4, free=5), TH)  # the queue still fits in the free blocks
    assert needs_drop(load(demand=96, queued=6, free=5), TH)
    assert needs_drop(load(demand=150, queued=50, free=0), TH)
    assert not needs_drop(load(demand=100, queued=0, free=0), TH)  # full but nothing waits: it flows
    assert not needs_drop(load(demand=10, queued=10, free=0, total=100), TH)  # a queue alone is not overload
    lower = Thresholds(drop_demand_ratio=0.8, restore_demand_ratio=0.4)
    assert needs_drop(load(demand=80, queued=20, free=20), lower)
    assert not needs_drop(load(demand=79, queued=20, free=21), lower)


def test_restore_only_after_the_full_window():
    watch = RestoreWatch(TH, created_step=0)
    for step in range(TH.restore_window_steps - 1):
        assert not watch.observe(step + 1, demand_blocks=10, base_capacity_blocks=BASE, waiting=0)
        assert watch.low_streak == step + 1
    assert watch.observe(TH.restore_window_steps, demand_blocks=10, base_capacity_blocks=BASE, waiting=0)
    assert watch.low_streak == TH.restore_window_steps


def test_demand_at_the_low_mark_is_not_low():
    watch = RestoreWatch(TH, created_step=0)
    for step in range(1, 40):
        assert not watch.observe(step, demand_blocks=50, base_capacity_blocks=BASE, waiting=0)
    assert watch.low_streak == 0


@pytest.mark.parametrize("spike", [dict(demand_blocks=51, waiting=0), dict(demand_blocks=10, waiting=1)])
def test_a_single_spike_resets_the_window(spike):
    watch = RestoreWatch(TH, created_step=0)
    for step in range(1, 11):
        assert not watch.observe(step, 10, BASE, 0)
    assert not watch.observe(11, base_capacity_blocks=BASE, **spike)
    assert watch.low_streak == 0
    for step in range(12, 12 + TH.restore_window_steps - 1):
        assert not watch.observe(step, 10, BASE, 0)
    assert watch.observe(12 + TH.restore_window_steps - 1, 10, BASE, 0)


def test_min_group_steps_is_respected():
    th = Thresholds(restore_window_steps=2, min_group_steps=8)
    watch = RestoreWatch(th, created_step=100)
    for step in range(100, 108):
        assert not watch.observe(step, 0, BASE, 0), step
    assert watch.low_streak == 8
    assert watch.observe(108, 0, BASE, 0)


def test_observations_come_once_per_step_in_order():
    watch = RestoreWatch(TH, created_step=5)
    watch.observe(6, 10, BASE, 0)
    with pytest.raises(ValueError, match="in order"):
        watch.observe(6, 10, BASE, 0)
    with pytest.raises(ValueError, match="base_capacity_blocks"):
        watch.observe(7, 10, 0, 0)


def simulate(demand_pct: list[int], th: Thresholds = TH) -> list[tuple[str, int]]:
    """A toy engine: one instance drops when `needs_drop` says so and restores when its watch says so.

    Demand is in percent of the instance's own pool. Unfused, what does not fit is queued; fused, the pool has
    GAIN more blocks and only demand beyond that waits. Returns the transitions as (what, step).
    """
    transitions: list[tuple[str, int]] = []
    watch: RestoreWatch | None = None
    for step, pct in enumerate(demand_pct):
        demand = pct * BASE // 100
        if watch is None:
            held = min(demand, BASE)
            if needs_drop(InstanceLoad(0, BASE, BASE - held, demand, demand - held), th):
                watch = RestoreWatch(th, created_step=step)
                transitions.append(("drop", step))
        elif watch.observe(step, demand, BASE, waiting=int(demand > BASE + GAIN)):
            watch = None
            transitions.append(("restore", step))
    return transitions


def test_the_toy_loop_drops_and_restores_on_a_real_burst():
    trace = [30] * 10 + [120] * 20 + [20] * 40 + [130] * 5
    # Restores after 16 low steps (the burst's last step was 29), drops again on the next burst.
    assert simulate(trace) == [("drop", 10), ("restore", 30 + 15), ("drop", 70)]


def test_demand_oscillating_between_60_and_90_percent_never_flaps():
    oscillation = [60, 90] * 150
    assert simulate(oscillation) == []  # never reaches the drop mark
    assert simulate([120] * 5 + oscillation) == [("drop", 0)]  # once fused, never below the low mark
    slow = ([60] * 7 + [90] * 7) * 20
    assert simulate([120] * 5 + slow) == [("drop", 0)]


def test_demand_oscillating_around_one_threshold_never_flaps():
    assert simulate([94, 110] * 100) == [("drop", 1)]  # around the drop mark: fused once, stays fused
    assert simulate([120] * 5 + [45, 55] * 100) == [("drop", 0)]  # around the low mark: every 55 resets
    assert simulate([120] * 5 + [10] * 15 + [55] + [10] * 15) == [("drop", 0)]  # one spike per window
    # A square wave between idle and overload, faster than the window, fuses once.
    assert simulate([20, 20, 20, 120, 120, 120] * 50) == [("drop", 3)]


@pytest.mark.parametrize("seed", range(5))
def test_random_demand_never_restores_early(seed):
    rng = random.Random(seed)
    th = Thresholds(restore_window_steps=rng.choice([4, 16]), min_group_steps=rng.choice([0, 8, 24]))
    trace: list[int] = []
    while len(trace) < 2000:
        trace += [rng.choice([10, 40, 49, 60, 90, 96, 120, 150])] * rng.randint(1, 30)
    transitions = simulate(trace, th)
    assert any(what == "restore" for what, _ in transitions)
    for (what, dropped), (after, restored) in zip(transitions, transitions[1:], strict=False):
        if what != "drop":
            continue
        assert after == "restore"
        # The group lived its minimum, and the whole window before the restore was low and queue-free.
        assert restored - dropped >= max(th.min_group_steps, th.restore_window_steps)
        window = trace[restored - th.restore_window_steps + 1:restored + 1]
        assert all(pct < 100 * th.restore_demand_ratio for pct in window)
    # So no drop/restore/drop/restore within a window: two restores lie at least a window apart.
    restores = [step for what, step in transitions if what == "restore"]
    assert all(b - a > th.restore_window_steps for a, b in zip(restores, restores[1:], strict=False))


def test_a_queue_held_back_by_sequence_slots_does_not_drop():
    th = Thresholds()
    memory_bound = InstanceLoad(0, total_blocks=100, free_blocks=2, demand_blocks=140, queued_blocks=40,
                                seats_free=3)
    seat_bound = dataclasses.replace(memory_bound, seats_free=0)
    assert needs_drop(memory_bound, th)
    assert not needs_drop(seat_bound, th)
