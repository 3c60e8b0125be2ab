"""Drop planner: which data-parallel instances fuse into pipeline groups when KV demand outruns memory (DESIGN.md §6.2).

Owns: choosing the groups of a drop from per-instance KV load snapshots, and the cost model that prices a group.
Never touches devices, weights or block books: it reads `InstanceLoad`s and returns a `DropPlan` that the engine
carries out (§6.3). Pure host-side Python.

Candidate groups are aligned buddy blocks only: a group of size k (a power of two >= 2 from `group_sizes`) is
`range(j*k, (j+1)*k)` with `(j+1)*k <= N`, because each shape is compiled ahead of time. A group is allowed when
every member is available (not already fused, not excluded by the caller). Fusing k instances frees `gain(k)` KV
blocks for the group as a whole; the group *covers* when the sum of its members' deficits is at most that gain.

Objective, lexicographic, over sets of disjoint allowed groups:
    1. cover as many overloaded instances (available, deficit > 0) as possible: an instance counts as covered only
       when its group covers;
    2. fuse as few instances as possible;
    3. lowest total cost, the sum of `PipelineCostModel.step_cost(k)` over the groups.
Then best effort, outside the objective: each overloaded instance still uncovered (largest deficit first) fuses
into the largest allowed group of still-unfused instances containing it whose deficit after the gain is below the
instance's own deficit, so it gets more memory than it has alone. Such groups never cover (else 1. was not
optimal); their overloaded members are reported in `DropPlan.uncovered` together with those left alone.

Why the greedy of `plan_drop` is exact: aligned blocks are laminar (two are disjoint or nested), so the allowed
covering groups containing an instance i form a chain; call the smallest g(i). Every coverable instance must sit
in a covering group containing g(i), so the union U of the maximal g(i) is fused by every plan optimal on 1 and
2, and that union is achievable: the greedy takes g(i) for each uncovered instance, absorbing the smaller planned
groups nested inside it. Plans optimal on 1 and 2 differ only in how U's maximal blocks are grouped into larger
allowed covering blocks (two pairs or one quad fuse the same four instances), which a bottom-up pass over the
buddy tree settles by cost. All of it is O(N log N): a sort plus O(1) prefix-sum checks per block and level.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Collection, Sequence


@dataclasses.dataclass(frozen=True)
class InstanceLoad:
    """One instance's KV pool as the monitor saw it, in blocks."""

    index: int
    total_blocks: int  # usable KV blocks of the instance
    free_blocks: int  # allocatable now
    demand_blocks: int  # blocks held by running requests + blocks the queued requests need
    queued_blocks: int  # blocks the queued (waiting) requests need
    seats_free: int = 1  # sequence slots (max_num_seqs - running): 0 means seats, not memory, hold the queue

    @property
    def deficit(self) -> int:
        """Blocks short of the demand; > 0 means overloaded, < 0 is a surplus a group partner can lend."""
        return self.demand_blocks - self.total_blocks


@dataclasses.dataclass(frozen=True)
class PipelineCostModel:
    """Estimated price of running k stages instead of k replicas, in seconds per engine step of the group.

        step_cost(k) = tick_seconds * (k - 1) / k                                          # fill bubble
                     + (k - 1) * microbatch_tokens * hidden_size * act_bytes / link_bytes_per_s  # activations
                     + stale_rows * num_layers * (k - 1) / k * 2 * row_bytes / link_bytes_per_s  # remote attention

    Fill bubble: the k-stage pipe idles stages for k - 1 ticks while it fills, amortised over the k micro-batches
    in flight. Activations: a micro-batch crosses k - 1 stage boundaries per step, each hop carrying one
    micro-batch's hidden states. Remote attention: a request running at the drop ("stale") finds its history for
    (k - 1) / k of the layers on another device; per such layer its query row goes there and its output row comes
    back. `row_bytes` is `head_bytes_per_row`, by default one hidden row (`hidden_size * act_bytes`).
    Every term grows with k and the activation term is positive, so the cost is strictly increasing for k >= 2.

    Across hosts (`instances_per_host` set: a multi-host group, instances spread evenly, aligned blocks): a group
    of k > instances_per_host spans k / instances_per_host hosts, and the hops between them go over the network
    (`network_bytes_per_s`) instead of the link — for the activations, the hops that cross; for remote attention,
    the share of a row's remote layers that sit on another host. A group within one host costs what it always did.
    """

    num_layers: int = 32
    hidden_size: int = 4096
    act_bytes: int = 4
    microbatch_tokens: int = 64
    link_bytes_per_s: float = 50e9
    tick_seconds: float = 5e-3
    stale_rows: int = 0
    head_bytes_per_row: int | None = None  # query (and output) bytes of one row at one layer
    instances_per_host: int | None = None  # None: one host
    network_bytes_per_s: float = 12.5e9  # between hosts (100 Gb/s)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "act_bytes", "microbatch_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PipelineCostModel.{name} must be positive, got {getattr(self, name)}")
        if self.link_bytes_per_s <= 0:
            raise ValueError(f"PipelineCostModel.link_bytes_per_s must be positive, got {self.link_bytes_per_s}")
        if self.tick_seconds < 0 or self.stale_rows < 0:
            raise ValueError("PipelineCostModel.tick_seconds and stale_rows must be >= 0")
        if self.head_bytes_per_row is not None and self.head_bytes_per_row <= 0:
            raise ValueError(f"PipelineCostModel.head_bytes_per_row must be positive, got {self.head_bytes_per_row}")
        if self.instances_per_host is not None and self.instances_per_host < 1:
            raise ValueError(f"PipelineCostModel.instances_per_host must be >= 1, got {self.instances_per_host}")
        if self.network_bytes_per_s <= 0:
            raise ValueError(f"PipelineCostModel.network_bytes_per_s must be positive, got {self.network_bytes_per_s}")

    @property
    def row_bytes(self) -> int:
        return self.hidden_size * self.act_bytes if self.head_bytes_per_row is None else self.head_bytes_per_row

    def step_cost(self, k: int) -> float:
        if k < 2:
            raise ValueError(f"a pipeline group has k >= 2 stages, got {k}")
        local = min(k, self.instances_per_host or k)  # stages on one host
        crossing = -(-k // local) - 1  # hops between hosts
        link, net = self.link_bytes_per_s, self.network_bytes_per_s
        bubble = self.tick_seconds * (k - 1) / k
        hop = self.microbatch_tokens * self.hidden_size * self.act_bytes
        activations = (k - 1 - crossing) * hop / link + crossing * hop / net
        row = self.stale_rows * self.num_layers * 2 * self.row_bytes
        remote = row * (local - 1) / k / link + row * (k - local) / k / net
        return bubble + activations + remote


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """One aligned block of instances to fuse into a k-stage pipeline group."""

    members: tuple[int, ...]  # aligned block of instance indices
    deficit_blocks: int  # sum of member deficits (may be negative)
    gain_blocks: int  # gain(k): KV blocks the drop frees, group total
    cost: float  # cost_model.step_cost(k)

    @property
    def k(self) -> int:
        return len(self.members)

    @property
    def covers(self) -> bool:
        return self.deficit_blocks <= self.gain_blocks


@dataclasses.dataclass(frozen=True)
class DropPlan:
    """The groups of one drop, ordered by first member, and the overloaded instances they leave uncovered."""

    groups: tuple[GroupPlan, ...]
    uncovered: tuple[int, ...]  # overloaded instances no allowed group covers (best effort was applied)

    @property
    def num_fused(self) -> int:
        return sum(g.k for g in self.groups)

    @property
    def cost(self) -> float:
        return sum((g.cost for g in self.groups), 0.0)


def _valid_sizes(group_sizes: Sequence[int]) -> list[int]:
    sizes = sorted(set(group_sizes))
    for k in sizes:
        if k < 2 or k & (k - 1):
            raise ValueError(f"group sizes are powers of two >= 2, got {k}")
    return sizes


def candidate_groups(num_instances: int, group_sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every aligned block of an allowed size, smallest sizes first, each size in index order."""
    return [tuple(range(start, start + k))
            for k in _valid_sizes(group_sizes) for start in range(0, num_instances - k + 1, k)]


Block = tuple[int, int]  # (first member, k): the aligned block range(start, start + k)


class _Problem:
    """The validated inputs with O(1) block queries (prefix sums over deficits and availability)."""

    def __init__(self, loads: Sequence[InstanceLoad], available: Collection[int], group_sizes: Sequence[int],
                 gain_blocks: Callable[[int], int], cost_model: PipelineCostModel) -> None:
        self.n = n = len(loads)
        for pos, load in enumerate(loads):
            if load.index != pos:
                raise ValueError(f"loads[{pos}] describes instance {load.index}; give one load per instance, in order")
        self.available = [False] * n
        for i in available:
            if not 0 <= i < n:
                raise ValueError(f"available instance {i} is outside 0..{n - 1}")
            self.available[i] = True
        self.sizes = [k for k in _valid_sizes(group_sizes) if k <= n]
        self.gain = {k: gain_blocks(k) for k in self.sizes}
        self.cost = {k: cost_model.step_cost(k) for k in self.sizes}
        self.deficit = [load.deficit for load in loads]
        self._deficit_prefix = list(itertools.accumulate(self.deficit, initial=0))
        self._available_prefix = list(itertools.accumulate(map(int, self.available), initial=0))
        # Largest deficit first, so best effort serves the worst-off instance first; ties by index (determinism).
        self.overloaded = sorted((i for i in range(n) if self.available[i] and self.deficit[i] > 0),
                                 key=lambda i: (-self.deficit[i], i))

    def block_deficit(self, start: int, k: int) -> int:
        return self._deficit_prefix[start + k] - self._deficit_prefix[start]

    def allowed(self, start: int, k: int) -> bool:
        return start + k <= self.n and self._available_prefix[start + k] - self._available_prefix[start] == k

    def covers(self, start: int, k: int) -> bool:
        return self.block_deficit(start, k) <= self.gain[k]

    def group(self, block: Block) -> GroupPlan:
        start, k = block
        return GroupPlan(tuple(range(start, start + k)), self.block_deficit(start, k), self.gain[k], self.cost[k])

    def finish(self, covering: Collection[Block]) -> DropPlan:
        """Adds the best-effort groups to an optimal covering set and lists the uncovered instances."""
        fused = [False] * self.n
        for start, k in covering:
            fused[start:start + k] = [True] * k
        # taken[(start, k)]: members of that aligned block already fused or unavailable; zero means it is free.
        taken: dict[Block, int] = {}
        for k in self.sizes:
            for start in range(0, self.n - k + 1, k):
                taken[start, k] = sum(1 for m in range(start, start + k) if fused[m] or not self.available[m])
        best_effort: list[Block] = []
        uncovered = [i for i in self.overloaded if not fused[i]]
        for i in uncovered:
            for k in reversed(self.sizes):
                start = i - i % k
                if taken.get((start, k), 1) == 0 and self.block_deficit(start, k) - self.gain[k] < self.deficit[i]:
                    best_effort.append((start, k))
                    for m in range(start, start + k):
                        for s in self.sizes:
                            if (m - m % s, s) in taken:
                                taken[m - m % s, s] += 1
                    break
        groups = sorted(map(self.group, [*covering, *best_effort]), key=lambda g: g.members[0])
        return DropPlan(tuple(groups), tuple(sorted(uncovered)))


def _cheapest_grouping(p: _Problem, atoms: dict[int, int]) -> list[Block]:
    """Cheapest grouping of the atoms (disjoint covering blocks) into allowed covering blocks made of whole atoms.

    Bottom-up over the buddy tree: a block is "buildable" when it is an atom or both halves are buildable; a
    buildable block either stays split (the halves' best cost) or, when allowed and covering, fuses whole.
    """
    best: dict[Block, tuple[float, bool]] = {}  # buildable block -> (cheapest cost, fused whole)
    previous: dict[int, float] = {}  # start -> cost, the buildable blocks of the level below
    k, largest = 2, max(p.sizes, default=0)
    while k <= largest:
        level = {start: (p.cost[k], True) for start, size in atoms.items() if size == k}
        for start, cost in previous.items():
            if start % k == 0 and start + k // 2 in previous:
                split = cost + previous[start + k // 2]
                whole = k in p.cost and p.covers(start, k)
                level[start] = (p.cost[k], True) if whole and p.cost[k] < split else (split, False)
        best.update(((start, k), choice) for start, choice in level.items())
        previous = {start: cost for start, (cost, _) in level.items()}
        k *= 2
    roots = [(start, k) for start, k in best if (start - start % (2 * k), 2 * k) not in best]
    chosen: list[Block] = []
    while roots:
        start, k = roots.pop()
        if best[start, k][1]:
            chosen.append((start, k))
        else:
            roots += [(start, k // 2), (start + k // 2, k // 2)]
    return chosen


def plan_drop(loads: Sequence[InstanceLoad], *, available: Collection[int], group_sizes: Sequence[int],
              gain_blocks: Callable[[int], int], cost_model: PipelineCostModel) -> DropPlan:
    """Optimal plan (module docstring's objective) by an O(N log N) greedy over the aligned buddy blocks."""
    p = _Problem(loads, available, group_sizes, gain_blocks, cost_model)
    owner = [-1] * p.n  # first member of the planned covering block holding the instance, or -1
    planned: dict[int, int] = {}  # start -> k of each planned covering block
    for i in p.overloaded:
        if owner[i] >= 0:
            continue  # a block planned for a larger deficit already covers it
        for k in p.sizes:
            start = i - i % k
            if p.allowed(start, k) and p.covers(start, k):
                # Blocks are laminar and i is in none, so every planned block meeting this one is nested in it.
                for m in range(start, start + k):
                    if owner[m] >= 0:
                        planned.pop(owner[m], None)
                    owner[m] = start
                planned[start] = k
                break
    return p.finish(_cheapest_grouping(p, planned))


_EXHAUSTIVE_MAX_INSTANCES = 16


def plan_drop_exhaustive(loads: Sequence[InstanceLoad], *, available: Collection[int], group_sizes: Sequence[int],
                         gain_blocks: Callable[[int], int], cost_model: PipelineCostModel) -> DropPlan:
    """Brute force over every set of disjoint allowed groups; exponential, for tests and N <= 16."""
    p = _Problem(loads, available, group_sizes, gain_blocks, cost_model)
    if p.n > _EXHAUSTIVE_MAX_INSTANCES:
        raise ValueError(f"plan_drop_exhaustive is exponential; N={p.n} > {_EXHAUSTIVE_MAX_INSTANCES}")
    candidates = [(start, k) for k in p.sizes for start in range(0, p.n - k + 1, k) if p.allowed(start, k)]
    overloaded = set(p.overloaded)
    best_key: tuple[int, int, float] | None = None
    best_set: list[Block] = []

    def visit(index: int, used_mask: int, chosen: list[Block]) -> None:
        nonlocal best_key, best_set
        if index == len(candidates):
            groups = [p.group(block) for block in chosen]
            covered = sum(1 for g in groups if g.covers for m in g.members if m in overloaded)
            key = (-covered, sum(g.k for g in groups), sum(g.cost for g in groups))
            if best_key is None or key < best_key:
                best_key, best_set = key, list(chosen)
            return
        visit(index + 1, used_mask, chosen)
        start, k = candidates[index]
        mask = ((1 << k) - 1) << start
        if not used_mask & mask:
            visit(index + 1, used_mask | mask, [*chosen, (start, k)])

    visit(0, 0, [])
    return p.finish(best_set)
