"""The drop planner: which aligned blocks of instances fuse, by coverage, then fewest fused, then cost."""

import dataclasses
import random
import time

import pytest

from kunjax.policies.kunserve.planner import (
    DropPlan,
    InstanceLoad,
    PipelineCostModel,
    candidate_groups,
    plan_drop,
    plan_drop_exhaustive,
)

TOTAL = 100  # usable KV blocks per instance in these cases
COST = PipelineCostModel()  # the default: the fill bubble dominates, so one quad is cheaper than two pairs
LINK_BOUND = PipelineCostModel(tick_seconds=0.0)  # only transfers cost: two pairs are cheaper than one quad


def loads_of(demands: list[int], total: int = TOTAL) -> list[InstanceLoad]:
    """Instances whose running requests hold what fits and whose queue holds the rest."""
    out = []
    for i, demand in enumerate(demands):
        held = min(demand, total)
        out.append(InstanceLoad(i, total, total - held, demand, demand - held))
    return out


def weights_freed(per_instance: int):
    """Each of k instances keeps 1/k of the layers: the group frees (k - 1) weight copies."""
    return lambda k: per_instance * (k - 1)


GAIN = weights_freed(40)  # blocks of weights each instance frees per extra stage


def plan(demands, *, available=None, sizes=(2, 4), gain=GAIN, cost=COST, planner=plan_drop) -> DropPlan:
    available = range(len(demands)) if available is None else available
    return planner(loads_of(demands), available=available, group_sizes=sizes, gain_blocks=gain, cost_model=cost)


def members(p: DropPlan) -> list[tuple[int, ...]]:
    return [g.members for g in p.groups]


def check_plan(p: DropPlan, loads, available, sizes, gain, cost) -> int:
    """Asserts the plan is well formed; returns how many overloaded instances it covers."""
    fused: set[int] = set()
    for g in p.groups:
        start = g.members[0]
        assert g.k in sizes and start % g.k == 0 and g.members == tuple(range(start, start + g.k))
        assert set(g.members) <= set(available) and not fused & set(g.members)
        fused |= set(g.members)
        assert g.deficit_blocks == sum(loads[m].deficit for m in g.members)
        assert (g.gain_blocks, g.cost) == (gain(g.k), cost.step_cost(g.k))
    overloaded = {i for i in available if loads[i].deficit > 0}
    covered = {m for g in p.groups if g.covers for m in g.members} & overloaded
    assert list(p.uncovered) == sorted(overloaded - covered)
    return len(covered)


def test_candidate_groups_are_aligned_blocks_that_fit():
    assert candidate_groups(6, (4, 2)) == [(0, 1), (2, 3), (4, 5), (0, 1, 2, 3)]
    assert candidate_groups(4, (8,)) == []
    with pytest.raises(ValueError, match="powers of two"):
        candidate_groups(6, (3,))
    with pytest.raises(ValueError, match="powers of two"):
        candidate_groups(6, (1, 2))


def test_cost_model_formula_by_hand():
    m = PipelineCostModel(num_layers=2, hidden_size=10, act_bytes=1, microbatch_tokens=5, link_bytes_per_s=100.0,
                          tick_seconds=1.0, stale_rows=3)
    # bubble 1*(1/2) + activations 1*5*10*1/100 + remote 3*2*(1/2)*2*10/100
    assert m.step_cost(2) == pytest.approx(0.5 + 0.5 + 0.6)
    assert m.step_cost(4) == pytest.approx(0.75 + 1.5 + 0.9)
    assert dataclasses.replace(m, head_bytes_per_row=20).step_cost(2) == pytest.approx(0.5 + 0.5 + 1.2)
    with pytest.raises(ValueError, match="k >= 2"):
        m.step_cost(1)
    with pytest.raises(ValueError, match="link_bytes_per_s"):
        PipelineCostModel(link_bytes_per_s=0)


def test_cost_model_prices_hops_between_hosts_over_the_network():
    m = PipelineCostModel(num_layers=2, hidden_size=10, act_bytes=1, microbatch_tokens=5, link_bytes_per_s=100.0,
                          tick_seconds=1.0, stale_rows=3, network_bytes_per_s=10.0)
    # Two instances per host: a pair stays within a host and costs what it did on one host.
    hosts = dataclasses.replace(m, instances_per_host=2)
    assert hosts.step_cost(2) == pytest.approx(m.step_cost(2))
    # A quad spans two hosts: 1 of its 3 activation hops crosses (5*10 bytes at 10 B/s), and for each stage 2 of
    # the 4 stages' layers are on the other host: remote 3*2*2*10 bytes x (1/4 over the link + 2/4 the network).
    assert hosts.step_cost(4) == pytest.approx(0.75 + (2 * 50 / 100 + 50 / 10) + (120 / 4 / 100 + 120 * 2 / 4 / 10))
    assert hosts.step_cost(4) > m.step_cost(4)
    # So two pairs (one per host) cost less than the quad across hosts: the planner fuses within a host.
    assert 2 * hosts.step_cost(2) < hosts.step_cost(4)
    loads = [InstanceLoad(i, total_blocks=10, free_blocks=0, demand_blocks=14, queued_blocks=4) for i in range(4)]
    plan = plan_drop(loads, available=set(range(4)), group_sizes=(2, 4), gain_blocks=lambda k: 10 * k,
                     cost_model=hosts)
    assert [g.members for g in plan.groups] == [(0, 1), (2, 3)]
    with pytest.raises(ValueError, match="instances_per_host"):
        PipelineCostModel(instances_per_host=0)


@pytest.mark.parametrize("model", [COST, LINK_BOUND, PipelineCostModel(stale_rows=64, tick_seconds=0.0)])
def test_cost_is_positive_and_strictly_increasing(model):
    costs = [model.step_cost(k) for k in (2, 4, 8, 16, 32)]
    assert costs[0] > 0 and all(a < b for a, b in zip(costs, costs[1:], strict=False))


def test_no_overload_gives_an_empty_plan():
    p = plan([100, 95, 20, 100])
    assert (p.groups, p.uncovered, p.num_fused, p.cost) == ((), (), 0, 0)


def test_one_overloaded_instance_fuses_with_its_buddy():
    p = plan([130, 100, 100, 100])
    assert members(p) == [(0, 1)] and p.uncovered == ()
    (g,) = p.groups
    assert (g.deficit_blocks, g.gain_blocks, g.covers, g.cost) == (30, 40, True, COST.step_cost(2))
    assert members(plan([100, 100, 100, 130])) == [(2, 3)]


def test_a_pair_that_cannot_cover_becomes_a_quad():
    p = plan([170, 100, 90, 60])  # pair: 70 > 40; quad: 70 - 10 - 40 = 20 <= 120
    assert members(p) == [(0, 1, 2, 3)] and p.groups[0].covers and p.uncovered == ()
    assert members(plan([170, 100, 90, 60], sizes=(2, 4, 8))) == [(0, 1, 2, 3)]


def test_a_neighbours_surplus_helps_cover():
    assert plan([150, 100, 100, 100], sizes=(2,)).uncovered == (0,)  # 50 > 40 with a full neighbour
    p = plan([150, 40, 100, 100], sizes=(2,))  # the neighbour's 60 spare blocks: 50 - 60 = -10 <= 40
    assert members(p) == [(0, 1)] and p.groups[0].deficit_blocks == -10 and p.uncovered == ()


def test_unavailable_instances_are_never_fused():
    # Instance 1 is already in a group: neither the pair nor the quad around 0 is allowed.
    p = plan([130, 100, 100, 100], available={0, 2, 3})
    assert (p.groups, p.uncovered) == ((), (0,))
    # An unavailable instance is not counted as overloaded at all.
    assert plan([100, 100, 130, 100], available={0, 1, 3}) == DropPlan((), ())
    # The quad is blocked by 1, so 2 and 3 make do with their pair.
    assert members(plan([100, 100, 120, 110], available={0, 2, 3})) == [(2, 3)]


def test_uncovered_instances_get_the_largest_group_that_helps():
    p = plan([400, 100, 100, 100])  # pair: 300 - 40 = 260 < 300; quad: 300 - 120 = 180 < 300: the quad
    assert members(p) == [(0, 1, 2, 3)] and not p.groups[0].covers and p.uncovered == (0,)
    p = plan([400, 100, 100, 100], sizes=(2,))
    assert members(p) == [(0, 1)] and p.uncovered == (0,)
    # The quad would carry 2 and 3's deficits (980 > 300 after the gain), the pair still helps 0 (260 < 300).
    p = plan([400, 100, 500, 500])
    assert members(p) == [(0, 1)] and p.uncovered == (0, 2, 3)


def test_no_best_effort_group_when_fusing_would_not_help():
    p = plan([400, 500, 500, 500])
    assert (p.groups, p.uncovered) == ((), (0, 1, 2, 3))


def test_covered_instances_come_before_best_effort():
    # 2 is coverable by its pair; 0 is hopeless, and the quad that would help it is not free any more.
    p = plan([400, 100, 130, 100])
    assert members(p) == [(0, 1), (2, 3)] and [g.covers for g in p.groups] == [False, True]
    assert p.uncovered == (0,)


def test_a_planned_pair_is_absorbed_by_the_quad_a_later_instance_needs():
    # 0 (deficit 30) is planned first with its pair; 2 and 3 (25 each) need the quad, which takes the pair in.
    p = plan([130, 100, 125, 125])
    assert members(p) == [(0, 1, 2, 3)] and p.groups[0].deficit_blocks == 80 and p.uncovered == ()


def test_cost_decides_between_two_pairs_and_one_quad():
    demands = [130, 100, 130, 100]  # both pairs cover, so does the quad: four instances fused either way
    assert COST.step_cost(4) < 2 * COST.step_cost(2)
    assert members(plan(demands, cost=COST)) == [(0, 1, 2, 3)]
    assert LINK_BOUND.step_cost(4) > 2 * LINK_BOUND.step_cost(2)
    assert members(plan(demands, cost=LINK_BOUND)) == [(0, 1), (2, 3)]
    # Fewest fused outranks cost: with a pair enough the quad is never chosen, however cheap.
    assert members(plan([130, 100, 100, 100], cost=COST)) == [(0, 1)]


def test_loads_must_be_one_per_instance_in_order():
    loads = loads_of([100, 130])[::-1]
    with pytest.raises(ValueError, match="one load per instance"):
        plan_drop(loads, available={0, 1}, group_sizes=(2,), gain_blocks=GAIN, cost_model=COST)
    with pytest.raises(ValueError, match="outside"):
        plan([100, 130], available={0, 2})
    with pytest.raises(ValueError, match="exponential"):
        plan([100] * 32, planner=plan_drop_exhaustive)


def random_case(rng: random.Random):
    n = rng.choice([2, 4, 8])
    sizes = tuple(k for k in (2, 4, 8) if rng.random() < 0.6) or (rng.choice([2, 4, 8]),)
    demands = [rng.choice([rng.randint(20, 100), rng.randint(100, 240)]) for _ in range(n)]
    available = sorted(i for i in range(n) if rng.random() < 0.85)
    steps = [rng.randint(5, 70) for _ in range(3)]
    gains = {2: steps[0], 4: steps[0] + steps[1], 8: sum(steps)}  # monotone in k
    cost = rng.choice([COST, LINK_BOUND, PipelineCostModel(tick_seconds=2e-5, stale_rows=8)])
    return demands, available, sizes, gains.__getitem__, cost


def test_greedy_matches_brute_force_on_random_cases():
    rng = random.Random(20240611)
    seen = {"covered": 0, "best_effort": 0, "quad_or_more": 0, "link_bound_pairs": 0}
    for _ in range(600):
        demands, available, sizes, gain, cost = random_case(rng)
        loads = loads_of(demands)
        kwargs = dict(available=available, group_sizes=sizes, gain_blocks=gain, cost_model=cost)
        greedy, brute = plan_drop(loads, **kwargs), plan_drop_exhaustive(loads, **kwargs)
        covered = check_plan(greedy, loads, available, sizes, gain, cost)
        assert covered == check_plan(brute, loads, available, sizes, gain, cost), (demands, available, sizes)
        assert greedy.num_fused == brute.num_fused, (demands, available, sizes)
        assert greedy.cost <= brute.cost + 1e-12, (demands, available, sizes)
        assert greedy.uncovered == brute.uncovered
        seen["covered"] += covered > 0
        seen["best_effort"] += any(not g.covers for g in greedy.groups)
        seen["quad_or_more"] += any(g.k >= 4 and g.covers for g in greedy.groups)
        seen["link_bound_pairs"] += cost is LINK_BOUND and sum(g.k == 2 and g.covers for g in greedy.groups) >= 2
    assert all(count >= 5 for count in seen.values()), seen  # the random cases exercise every branch


def test_plan_drop_scales_to_thousands_of_instances():
    rng = random.Random(7)
    n = 4096
    # Every size up to N, mostly coverable; then pairs to octets only, mostly hopeless with a few idle neighbours
    # (best effort everywhere).
    cases = [(tuple(2**e for e in range(1, 13)), lambda: rng.randint(20, 160)),
             ((2, 4, 8), lambda: rng.randint(150, 400) if rng.random() < 0.7 else rng.randint(0, 60))]
    for sizes, demand in cases:
        loads = loads_of([demand() for _ in range(n)])
        available = [i for i in range(n) if rng.random() < 0.95]
        began = time.perf_counter()
        p = plan_drop(loads, available=available, group_sizes=sizes, gain_blocks=GAIN, cost_model=COST)
        assert time.perf_counter() - began < 5.0
        assert check_plan(p, loads, available, sizes, GAIN, COST) > 0
        assert any(g.covers for g in p.groups) and (sizes[-1] > 8 or any(not g.covers for g in p.groups))
