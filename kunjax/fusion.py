"""Fusing replica units into one pipeline unit and splitting it back, on the host books (DESIGN.md §6.3, §6.7).

The device side of both is the executor's (`kunjax.plan.Fuse` / `Split`: resharding the weights, reinterpreting
the pools); this module moves the requests and the block books:

* **Fuse** (`fuse_books`) — every member's pool of NB full-layer blocks becomes, in place, NB·k pipeline blocks
  of L/k layers (`old[b, s·L/k + j] == new[b·k + s, j]`), plus the extension the dropped weights freed. Running
  requests are adopted with their history left where it is (`kunjax.unit.StaleKV`): on their home stage they
  hold all k pipeline ids of their old blocks (stage `home`'s layers are local, the others are read remotely until
  the live exchange copies them); on the other stages their partial last block gets a fresh block for the tokens
  that follow. Queued requests join the pipeline's queue by arrival. Nothing is recomputed or lost.
* **Split** (`plan_move_home` / `split_books`) — every request moves into whole free full-layer blocks on one
  member (only old blocks whose k pipeline blocks are all free on that device, so no copy overwrites a block
  another copy still reads); the copies go out as one `CopyBlocks`; queued requests go to the members by least
  demand. The caller (the engine) drains the pipe and finishes the exchange first.

The prefix index survives both (`adopt_indexes`, `plan_prefix_home`): at a fuse every member's cached block is
reinterpreted in place like any block — a stale node of the pipeline's index whose layers stay on the member's
device until the live exchange moves them (or a request computing the same tokens heals it); at a split the
pipeline's nodes go home, each under its parent on one member, copied into whole free full-layer blocks (stale
ones are full-layer blocks already), as long as there is room; the rest are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kunjax.blocks import NULL_BLOCK, BlockAllocator, PrefixNode
from kunjax.plan import UnitShape
from kunjax.request import Request, RequestStatus, StaleKV
from kunjax.unit import SchedulerHooks, ServingUnit


def fuse_books(uid: int, members: Sequence[ServingUnit], shape: UnitShape, hooks: SchedulerHooks, *,
               block_size: int, enable_prefix_caching: bool, now: Callable[[], float]) -> ServingUnit:
    """The pipeline unit of `members` (replica units, stage order) with their requests adopted."""
    k = shape.k
    for m in members:
        assert m.k == 1 and not m.in_flight and not m.swapped, f"unit {m.uid} cannot fuse now"
    running = sorted(((r, h) for h, m in enumerate(members) for r in m.running), key=lambda x: x[0].arrival_time)
    taken: list[list[int]] = [[] for _ in range(k)]
    for req, h in running:
        taken[h] += [b * k + s for b in req.tables[0] for s in range(k)]
    stages = [BlockAllocator(shape.num_base, shape.num_ext, taken[s]) for s in range(k)]
    unit = ServingUnit(uid, tuple(i for m in members for i in m.members), shape, stages, hooks,
                       block_size=block_size, enable_prefix_caching=enable_prefix_caching, now=now)
    if enable_prefix_caching:  # before any new block is handed out: the cached blocks stay where they are
        adopt_indexes(unit, members)
    for req, h in running:
        old = list(req.tables[0])
        req.index_path = []
        if not old:
            req.tables = [[] for _ in range(k)]
        else:
            st = StaleKV(home=h, old_blocks=old, length=req.num_computed, pending={s for s in range(k) if s != h})
            tables = [[NULL_BLOCK] * len(old) for _ in range(k)]
            tables[h] = st.history_ids(k, h)
            full = st.length // block_size
            for s in st.pending:  # the partial last block: the next tokens go to a fresh block of each stage
                for j in range(full, len(old)):
                    tables[s][j] = stages[s].allocate(1)[0]
            req.tables, req.stale = tables, st
        req.unit = uid
        unit.running.append(req)
    for m in members:
        for req in m.waiting:
            req.tables, req.index_path = [[] for _ in range(k)], []
            unit.add(req)
        m.running.clear()
        m.waiting.clear()
    return unit


def adopt_indexes(unit: ServingUnit, members: Sequence[ServingUnit]) -> None:
    """Every member's prefix-index node becomes a stale node of the pipeline's index (its data left in place);
    a path two members both cached is kept once, from the first member."""
    for h, m in enumerate(members):
        mapped: dict[int, PrefixNode | None] = {id(m.index.root): unit.index.root}
        for node in m.index.nodes():  # parents first
            parent = mapped.get(id(node.parent))
            if parent is None or node.tokens in parent.children:
                mapped[id(node)] = None  # (its subtree too)
                continue
            mapped[id(node)] = unit.index.adopt_stale(parent, node.tokens, h, node.blocks[0])


def plan_move_home(unit: ServingUnit, num_old_blocks: int, seats: int) -> dict[Request, tuple[int, list[int]]] | None:
    """Home stage and full-layer blocks for every running request of a drained pipeline unit; None when they do not
    fit the members' own pools yet (try again later)."""
    k = unit.k
    free_old = [[b for b in range(1, num_old_blocks)
                 if all(unit.stages[h].is_free(b * k + s) for s in range(k))] for h in range(k)]
    seated = [0] * k
    plan: dict[Request, tuple[int, list[int]]] = {}
    for req in sorted(unit.running, key=lambda r: -len(r.tables[0])):
        need = len(req.tables[0])
        h = max(range(k), key=lambda d: (len(free_old[d]) if seated[d] < seats else -1, -d))
        if seated[h] >= seats or len(free_old[h]) < need:
            return None
        plan[req] = (h, free_old[h][:need])
        del free_old[h][:need]
        seated[h] += 1
    return plan


def move_home_copies(unit: ServingUnit, plan: dict[Request, tuple[int, list[int]]]
                     ) -> list[tuple[int, int, int, int, int, int]]:
    """The block copies of a move-home plan: each stage's part of logical block j into pipeline block
    `new·k + s` on the home device (the whole block)."""
    k, bs = unit.k, unit.block_size
    return [(s, req.tables[s][j], h, blk * k + s, 0, bs)
            for req, (h, blocks) in plan.items() for j, blk in enumerate(blocks) for s in range(k)]


def plan_prefix_home(unit: ServingUnit, plan: dict[Request, tuple[int, list[int]]], num_old_blocks: int
                     ) -> tuple[dict[PrefixNode, tuple[int, int]], list[tuple[int, int, int, int, int, int]]]:
    """Where each prefix-index node of a pipeline goes at its split: `node -> (member, full-layer block)` and the
    copies that put it there. A node goes to its parent's member (a root to the member with the most room); a
    stale node only to its home, where it already is; others into whole free blocks the requests' plan left."""
    k, bs = unit.k, unit.block_size
    taken = {(h, b) for h, blocks in plan.values() for b in blocks}
    free = [[b for b in range(1, num_old_blocks) if (h, b) not in taken
             and all(unit.stages[h].is_free(b * k + s) for s in range(k))] for h in range(k)]
    placed: dict[PrefixNode, tuple[int, int]] = {}
    copies = []
    for node in unit.index.nodes():  # parents first
        parent = node.parent
        if parent is not unit.index.root and parent not in placed:
            continue  # its parent stayed behind: so does it
        want = placed[parent][0] if parent in placed else None
        if node.stale is not None:
            home, old = node.stale
            if want in (None, home):
                placed[node] = (home, old)
            continue
        h = want if want is not None else max(range(k), key=lambda d: (len(free[d]), -d))
        if not free[h]:
            continue
        b = free[h].pop(0)
        placed[node] = (h, b)
        copies += [(s, node.blocks[s], h, b * k + s, 0, bs) for s in range(k)]
    return placed, copies


def install_prefix(placed: dict[PrefixNode, tuple[int, int]], root: PrefixNode,
                   replicas: Sequence[ServingUnit]) -> None:
    """The placed nodes (parents first) as cached nodes of their members' indexes."""
    mapped: dict[PrefixNode, PrefixNode] = {}
    for node, (h, b) in placed.items():
        parent = None if node.parent is root else mapped[node.parent]
        index = replicas[h].index
        mapped[node] = index.adopt_block(parent, node.tokens, b)


def split_books(unit: ServingUnit, plan: dict[Request, tuple[int, list[int]]],
                replicas: Sequence[ServingUnit]) -> None:
    """After the move home: `replicas` (the members' new one-stage units, stage order) take the requests."""
    for req in sorted(plan, key=lambda r: r.arrival_time):
        h, blocks = plan[req]
        home = replicas[h]
        home.stages[0].take(blocks)
        req.tables, req.index_path, req.stale = [list(blocks)], [], None
        req.unit, req.status = home.uid, RequestStatus.RUNNING
        home.running.append(req)
    for req in list(unit.waiting):
        req.tables, req.index_path = [[]], []
        target = min(replicas, key=lambda u: (u.demand_blocks() / u.total_blocks, u.uid))
        target.add(req)
    unit.running.clear()
    unit.waiting.clear()
