"""Prefix transfers between units (MemServe's `transfer_with_insert`): a prompt's cached prefix computed on one
replica is copied to the replica that admits the request, when that is cheaper than recomputing it.

When a replica admits a fresh request (`ServingUnit._match_prefix`), its own prefix index gives the longest
cached prefix it holds (on its device, then swapped in from its host tier). `PrefixPuller.pull` looks at every
other replica's index for a longer one — on that replica's device, continued by what it spilled to its host tier
(`kunjax.hostcache`); if the difference is at least `min_blocks` blocks and copying them is cheaper than
recomputing them, it allocates that many blocks on the admitting replica, queues one `Transfer` of the source's
device blocks and one `SwapIn` from the source's host tier per spilled block (the source keeps its copy) into
them, applied before the tick that reads them, and inserts them into the admitting replica's index under its own
matched prefix: the request then holds them as if it had matched them there, and later requests find them
locally. The cost comparison uses the hardware profile's cost model when time is modelled (`kunjax.cost_model`:
the transfer over the link between the two instances, the host blocks over the admitting instance's host link,
against the prefill of those tokens through every layer); without one (the real model on its own devices) a copy
is taken to be cheaper — a block's KV is 2·L·K·D values, recomputing it runs the whole model on its tokens (for an
8B model on an H100: ~0.3 µs per token over NVLink against ~16 µs of prefill compute). Every decision is counted
(`stats`).

Only replica units (k = 1) give and take: a pipeline unit's blocks are split over its stages. The source blocks
need no pin: they are indexed (full, never written again), and the `Transfer` is issued right after the admitting
unit's scheduling, before any other unit schedules (and could evict them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from kunjax.blocks import PrefixNode
from kunjax.plan import SwapIn, Transfer

if TYPE_CHECKING:
    from kunjax.cost_model import CostModel
    from kunjax.mempool import MemoryPool
    from kunjax.request import Request
    from kunjax.unit import ServingUnit


def insert_received(dst: ServingUnit, parent: PrefixNode | None, chunks: list[tuple[int, ...]],
                    blocks: list[int]) -> list[PrefixNode]:
    """The insert half of `transfer_with_insert`: full blocks `blocks` of replica `dst` (allocated, one reference
    each, a `Transfer` filling them already queued) holding `chunks` join its index one under the other below
    `parent`; returns their nodes. An equal block already indexed there (not past a longest match, so only
    defensively) is shared: ours is freed and `blocks[j]` names the indexed one."""
    out = []
    for j, chunk in enumerate(chunks):
        parent = dst.index.insert(parent, chunk, (blocks[j],))
        if parent.blocks != (blocks[j],):
            dst.stages[0].free([blocks[j]])
            blocks[j] = parent.blocks[0]
        out.append(parent)
    return out


class PrefixPuller:
    """See the module docstring. `units()` gives the engine's units; `cost` (optional) prices the choice."""

    def __init__(self, mempool: MemoryPool, units: Callable[[], Iterable[ServingUnit]], block_size: int,
                 min_blocks: int = 1, cost: CostModel | None = None):
        self.mempool, self.units, self.block_size = mempool, units, block_size
        self.min_blocks, self.cost = min_blocks, cost
        self.pulls = self.blocks = self.declined = 0
        self.from_host = 0  # of the blocks pulled, those read from the source's host tier

    def pull(self, dst: ServingUnit, req: Request, own: list[PrefixNode]) -> list[PrefixNode]:
        """Nodes of `req`'s prompt past `own` (its match on `dst`, referenced) copied from another replica and
        inserted under `own[-1]` on `dst`, referenced by `req` (one reference each, from their allocation)."""
        if dst.k != 1:
            return []
        best, src_nodes = None, own
        for u in self.units():
            if u is dst or u.k != 1 or not u.enable_prefix_caching:
                continue
            nodes = u.index.longest(req.token_ids)
            if u.index.host is not None:
                nodes += u.index.on_host(req.token_ids, nodes)
            if len(nodes) > len(src_nodes):
                best, src_nodes = u, nodes
        n = len(src_nodes) - len(own)
        if best is None or n < self.min_blocks:
            return []
        new = src_nodes[len(own):]
        on_host = sum(1 for node in new if node.host is not None)
        if not self._cheaper(best, dst, n - on_host, on_host):
            self.declined += 1
            return []
        got = dst.allocate(n)  # evicts (or spills) only dst's cached nodes: `own` is referenced
        if got is None:
            return []
        src_blocks, dst_blocks = [], []
        s, d = best.members[0], dst.members[0]
        for node, b in zip(new, got[0], strict=True):
            if node.host is None:
                src_blocks.append(node.blocks[0])
                dst_blocks.append(b)
            else:  # through the host tier: the source keeps its copy
                self.mempool.issue(SwapIn(d, node.host, (b,), keep=True, src=s))
        self.mempool.transfer(best, dst, src_blocks, dst_blocks)
        out = insert_received(dst, own[-1] if own else None, [node.tokens for node in new], got[0])
        self.pulls += 1
        self.blocks += n
        self.from_host += on_host
        return out

    def _cheaper(self, src: ServingUnit, dst: ServingUnit, n_device: int, n_host: int = 0) -> bool:
        if self.cost is None:
            return True
        c, s, d = self.cost, src.members[0], dst.members[0]
        blocks = tuple(range(n_device))
        copy_s = max(c.op_seconds(Transfer(s, d, blocks, blocks)).values()) if n_device else 0.0
        copy_s += n_host * c.op_seconds(SwapIn(d, "", (0,), keep=True, src=s))[d]
        return copy_s < c.recompute_seconds((n_device + n_host) * self.block_size)

    def stats(self) -> dict[str, int]:
        return {"prefix_pulls": self.pulls, "prefix_blocks_pulled": self.blocks,
                "prefix_blocks_pulled_from_host": self.from_host, "prefix_pulls_declined": self.declined}
