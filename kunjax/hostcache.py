"""Cached prefix blocks on the host tier (MemServe's MemPool over HBM and DRAM): spill under pressure, swap back
in on a hit when that beats recomputing.

Without it, a replica's prefix index drops its least recently used cached node when the device needs the block;
the next request with that prefix recomputes it. With it (`HostCache.attach`, replicas with prefix caching and a
host tier), the index *spills* the node instead (`PrefixIndex._spill` calls `spill` here): one `SwapOut` copies
its block to the instance's host tier as its own entry, the device block is freed, and the node stays in the tree
as a host node. When the host tier is full, the least recently spilled leaves are dropped first; the swap policy's
victims come before cached context (`MemoryPool.swap_out` drops spilled leaves to make room).

When a replica admits a fresh request, after its device match (`ServingUnit._match_prefix`) `swap_in` looks at the
host nodes that continue it along the prompt. Swapping them in costs one `SwapIn` per block over the host link;
recomputing them costs at least the dense FLOPs of their tokens through every layer. With a hardware profile the
cost model prices both and the cheaper wins (each decision counted); without one (the real model on its devices)
the swap-in is taken — the host link moves a block's KV (2·L·K·D values) far faster than the model recomputes
its tokens. A declined swap-in leaves the nodes on the host; the request recomputes those tokens and its blocks
replace the host copies (`PrefixIndex.insert`). The swapped-in blocks are allocated first (which may spill other
nodes, or drop host leaves), then the path is walked again, so a node dropped meanwhile is simply recomputed.

Only replicas (k = 1) spill: a pipeline's blocks are split over its stages. When a replica fuses, its spilled nodes
leave its index but their host copies stay, *parked* (`park`), while its device-cached nodes live on in the
pipeline as stale nodes; when the pipeline splits, the member's new replica takes its parked nodes back under the
prefixes it holds again (`attach`), and drops the rest.
Layer-wise offload (`layerkv`) counts its host tier in layer-group slots and keeps it to itself.

Invariant (`check`): the cache's host entries are exactly the spilled nodes of the replicas' indexes and the
parked ones, one block each.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING

from kunjax.plan import SwapIn, SwapOut

if TYPE_CHECKING:
    from kunjax.blocks import PrefixNode
    from kunjax.cost_model import CostModel
    from kunjax.mempool import MemoryPool
    from kunjax.request import Request
    from kunjax.unit import ServingUnit

KEY = "prefix-cache"  # host entries are (KEY, n): never a request id (a string)


class _Tier:
    """One replica's side of the host tier, as its prefix index sees it (`kunjax.blocks.HostTier`)."""

    def __init__(self, cache: HostCache, instance: int):
        self.cache, self.instance = cache, instance

    def spill(self, node: PrefixNode) -> Hashable | None:
        c, i = self.cache, self.instance
        host = c.mempool.host[i]
        if host.num_free < 1:
            return None
        key = (KEY, next(c.keys))
        host.store(key, 1)
        c.mempool.issue(SwapOut(i, key, node.blocks))
        c.spilled += 1
        return key

    def drop(self, node: PrefixNode) -> None:
        self.cache.mempool.drop_host(self.instance, node.host)
        self.cache.dropped += 1


class HostCache:
    """See the module docstring. `cost` (optional) prices swap-in against recomputing."""

    def __init__(self, mempool: MemoryPool, block_size: int, cost: CostModel | None = None):
        self.mempool, self.block_size, self.cost = mempool, block_size, cost
        self.keys = itertools.count()
        self.spilled = self.dropped = 0  # blocks spilled to the host; host copies dropped (room, a fuse, a heal)
        self.swap_ins = self.blocks_in = 0  # admissions that swapped cached blocks in; those blocks
        self.declined = self.blocks_declined = 0  # admissions (blocks) that recomputed instead: cheaper
        self.parked: dict[int, list[tuple[tuple, Hashable]]] = {}  # instance -> spilled nodes kept over a fuse
        self.kept = 0  # parked nodes taken back at a split

    def attach(self, unit: ServingUnit) -> None:
        """Let replica `unit`'s prefix index spill to its instance's host tier and its admissions swap back in."""
        if unit.k != 1 or not unit.enable_prefix_caching or not self.mempool.host:
            return
        i = unit.members[0]
        unit.index.host = _Tier(self, i)
        unit.prefix_sources.insert(0, self.swap_in)
        self.mempool.spilled[i] = unit.index
        self.unpark(unit)

    def park(self, unit: ServingUnit) -> int:
        """Replica `unit` is about to fuse: its spilled nodes leave its index, their host copies kept; how many."""
        if unit.index.host is None:
            return 0
        entries = unit.index.detach_host()
        self.parked.setdefault(unit.members[0], []).extend(entries)
        return len(entries)

    def unpark(self, unit: ServingUnit) -> None:
        """Replica `unit`'s instance had nodes parked: those whose parent prefix its index holds come back as spilled
        nodes, parents first; the others' host copies are dropped."""
        i = unit.members[0]
        for path, key in sorted(self.parked.pop(i, []), key=lambda e: len(e[0])):
            if unit.index.adopt_host(path, key):
                self.kept += 1
            else:
                self.mempool.drop_host(i, key)
                self.dropped += 1

    def detach(self, unit: ServingUnit) -> None:
        if unit.k == 1 and self.mempool.spilled.get(unit.members[0]) is unit.index:
            del self.mempool.spilled[unit.members[0]]

    def swap_in(self, unit: ServingUnit, req: Request, own: list[PrefixNode]) -> list[PrefixNode]:
        """The host nodes continuing `own` (`req`'s device match on `unit`, referenced), swapped back in and
        referenced by `req` (one reference each, from their allocation); [] when recomputing them is cheaper."""
        path = unit.index.on_host(req.token_ids, own)
        if not path:
            return []
        if not self._cheaper(unit, len(path)):
            self.declined += 1
            self.blocks_declined += len(path)
            return []
        got = unit.allocate(len(path))  # evicts only cached nodes (`own` is referenced), maybe spilling some
        if got is None:
            return []
        blocks = got[0]
        path = unit.index.on_host(req.token_ids, own)  # making room may have dropped host leaves of the path
        if len(path) < len(blocks):
            unit.stages[0].free(blocks[len(path):])
            if not path:
                return []
        i, pool = unit.members[0], self.mempool
        for node, b in zip(path, blocks, strict=False):
            pool.host[i].take(node.host)
            pool.issue(SwapIn(i, node.host, (b,)))
            unit.index.unspill(node, (b,))
        self.swap_ins += 1
        self.blocks_in += len(path)
        return path

    def _cheaper(self, unit: ServingUnit, n: int) -> bool:
        if self.cost is None:
            return True
        swap_s = n * self.cost.op_seconds(SwapIn(unit.members[0], KEY, (0,)))[unit.members[0]]
        return swap_s < self.cost.recompute_seconds(n * self.block_size)

    def check(self, units: Iterable[ServingUnit]) -> None:
        spilled = {key: i for i, entries in self.parked.items() for _, key in entries}
        for u in units:
            if u.index.host is not None:
                for node in u.index.nodes():
                    if node.host is not None:
                        spilled[node.host] = u.members[0]
        for i, tier in enumerate(self.mempool.host):
            mine = {k: len(v) for k, v in tier.entries.items() if isinstance(k, tuple) and k[0] == KEY}
            want = {k for k, inst in spilled.items() if inst == i}
            assert set(mine) == want, (f"instance {i}: {len(mine)} cached host entries, {len(want)} spilled nodes "
                                       f"({sorted(set(mine) ^ want)[:3]})")
            assert all(n == 1 for n in mine.values()), "a spilled node holds more than one host block"

    def stats(self) -> dict[str, int]:
        return {"cache_blocks_spilled": self.spilled, "cache_host_dropped": self.dropped,
                "cache_swap_ins": self.swap_ins, "cache_blocks_swapped_in": self.blocks_in,
                "cache_swap_ins_declined": self.declined, "cache_blocks_recomputed_not_swapped": self.blocks_declined,
                "cache_host_parked": sum(map(len, self.parked.values())), "cache_host_kept_over_fuse": self.kept,
                "cache_host_blocks": sum(1 for t in self.mempool.host for k in t.entries
                                         if isinstance(k, tuple) and k[0] == KEY)}
