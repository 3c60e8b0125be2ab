"""One memory pool over every serving unit's KV, on two tiers (MemServe's MemPool): the API every policy uses.

Owned by the engine, handed to the policies (none builds its own). It holds the books, never the data:

* the **device tier** — every live unit's per-stage `BlockAllocator`s and its radix `PrefixIndex`
  (`kunjax.blocks`), reached through `units`;
* the **host tier** — per instance, `HostBooks`: capacity and books in blocks, and which host blocks each stored
  entry (a swapped request, an offloaded layer group) holds;
* the **operations** the books decided (`kunjax.plan`): block copies, swaps, transfers between units, slot moves.
  They queue here in order and the engine hands them to the executor before the next tick, so a copy is in place
  before the step that reads it and a block freed by a swap-out can hold that step's new tokens.

API: `alloc / free` (device), `swap_out / swap_in / drop_host` (tiers), `transfer` (between units),
`slots_out / slots_in / slots_copy` (layer-group slots, layerkv), `copy_blocks` (between a unit's stages),
`check`.

Invariant (`check`): device: `free + used + cached == total` on every stage of every unit; host:
`free + used == total`, and every used host block belongs to exactly one stored entry.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from kunjax.blocks import BlockAllocator, OutOfBlocks, PrefixIndex
from kunjax.plan import CopyBlocks, DropHost, MemoryOp, SlotCopy, SwapIn, SwapOut, Transfer
from kunjax.unit import ServingUnit


class HostBooks:
    """Host-memory KV of one instance: capacity and books in blocks, per stored entry."""

    def __init__(self, num_blocks: int):
        self.allocator = BlockAllocator(num_blocks + 1)  # +1: the allocator reserves id 0 (the null block)
        self.entries: dict[Hashable, list[int]] = {}

    @property
    def total(self) -> int:
        return self.allocator.total

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def num_used(self) -> int:
        return self.allocator.num_used

    def store(self, key: Hashable, n: int) -> None:
        if key in self.entries:
            raise ValueError(f"{key!r} already has KV on the host tier")
        self.entries[key] = self.allocator.allocate(n)

    def take(self, key: Hashable) -> int:
        blocks = self.entries.pop(key)
        self.allocator.free(blocks)
        return len(blocks)

    def check(self) -> None:
        self.allocator.check()
        held = [b for e in self.entries.values() for b in e]
        assert len(held) == len(set(held)) == self.allocator.num_used, (
            f"host books: {self.allocator.num_used} used blocks but entries hold {len(held)}")


class MemoryPool:
    """Every unit's device books, every instance's host books, and the operations queued for the executor."""

    def __init__(self, num_instances: int, host_blocks: int):
        self.units: dict[int, ServingUnit] = {}
        self.host = [HostBooks(host_blocks) for _ in range(num_instances)] if host_blocks else []
        self._ops: list[MemoryOp] = []
        # per instance: the prefix index whose spilled nodes hold host blocks there (`kunjax.hostcache`)
        self.spilled: dict[int, PrefixIndex] = {}
        self.blocks_swapped_out = 0
        self.blocks_swapped_in = 0
        self.blocks_transferred = 0
        self.slots_offloaded = 0
        self.slots_reloaded = 0
        self.host_reclaimed = 0  # host blocks of cached context dropped to make room for a swap-out

    # ---- operations ---------------------------------------------------------------------------------
    def issue(self, op: MemoryOp) -> None:
        self._ops.append(op)

    @property
    def has_ops(self) -> bool:
        return bool(self._ops)

    def take_ops(self) -> list[MemoryOp]:
        ops, self._ops = self._ops, []
        return ops

    # ---- device tier --------------------------------------------------------------------------------
    def alloc(self, unit: ServingUnit, n: int) -> list[list[int]]:
        """`n` logical blocks of `unit` (one per stage each), evicting cached prefixes if needed."""
        got = unit.allocate(n)
        if got is None:
            raise OutOfBlocks(f"unit {unit.uid}: {n} blocks wanted, {unit.num_allocatable} allocatable")
        return got

    def free(self, unit: ServingUnit, tables: Sequence[Sequence[int]]) -> None:
        for alloc, blocks in zip(unit.stages, tables, strict=True):
            alloc.free(blocks)

    def copy_blocks(self, unit: ServingUnit, copies: Sequence[tuple[int, int, int, int, int, int]]) -> None:
        if copies:
            self.issue(CopyBlocks(unit.uid, tuple(copies)))

    def transfer(self, src: ServingUnit, dst: ServingUnit, src_blocks: Sequence[int],
                 dst_blocks: Sequence[int], streamed: int = 1, measure: bool = False) -> None:
        """Copy whole blocks of replica `src` into (already allocated) blocks of replica `dst`; the books of both
        are the caller's (a live migration copies in rounds while the source keeps its blocks). `streamed`: see
        `Transfer` (and `measure`)."""
        if len(src_blocks) != len(dst_blocks):
            raise ValueError(f"transfer of {len(src_blocks)} blocks into {len(dst_blocks)}")
        if src_blocks:
            self.issue(Transfer(_instance(src), _instance(dst), tuple(src_blocks), tuple(dst_blocks), streamed,
                                measure))
            self.blocks_transferred += len(src_blocks)

    # ---- host tier ----------------------------------------------------------------------------------
    def host_free(self, instance: int) -> int:
        return self.host[instance].num_free if self.host else 0

    def host_blocks_of(self, instance: int, key: str) -> int:
        e = self.host[instance].entries.get(key) if self.host else None
        return len(e) if e is not None else 0

    def host_available(self, instance: int) -> int:
        """Host blocks a swap-out may have: free, plus those holding cached context (dropped to make room)."""
        if not self.host:
            return 0
        index = self.spilled.get(instance)
        return self.host[instance].num_free + (index.num_host if index is not None else 0)

    def swap_out(self, unit: ServingUnit, key: str, blocks: Sequence[int]) -> int:
        """Copy device blocks of replica `unit` to its host tier under `key` and free them; returns host blocks.
        Cached context on the host tier makes room for it."""
        i = _instance(unit)
        if self.host and len(blocks) > self.host[i].num_free and i in self.spilled:
            self.host_reclaimed += self.spilled[i].evict_host(len(blocks) - self.host[i].num_free)
        if not self.host or len(blocks) > self.host[i].num_free:
            raise OutOfBlocks(f"instance {i}: {len(blocks)} blocks to swap out, {self.host_free(i)} free on the "
                              f"host tier")
        self.host[i].store(key, len(blocks))
        self.issue(SwapOut(i, key, tuple(blocks)))
        unit.stages[0].free(blocks)
        self.blocks_swapped_out += len(blocks)
        return len(blocks)

    def swap_in(self, unit: ServingUnit, key: str) -> list[int]:
        """Bring `key`'s blocks back from the host tier into newly allocated device blocks; returns their ids."""
        i = _instance(unit)
        n = len(self.host[i].entries[key])
        blocks = self.alloc(unit, n)[0]  # raises OutOfBlocks before the host entry is touched
        self.host[i].take(key)
        self.issue(SwapIn(i, key, tuple(blocks)))
        self.blocks_swapped_in += n
        return blocks

    def drop_host(self, instance: int, key: str) -> None:
        """Forget `key`'s host copy (its request was aborted or finished)."""
        if self.host and key in self.host[instance].entries:
            self.host[instance].take(key)
            self.issue(DropHost(instance, key))

    # ---- layer-group slots (layerkv) ----------------------------------------------------------------
    def slots_out(self, unit: ServingUnit, key: str, slots: Sequence[int], groups: int) -> None:
        """Copy device slots of replica `unit` to its host tier under `key` (one host block per slot); the device
        books are the caller's. Ordered after whatever was issued before (the step that wrote them)."""
        i = _instance(unit)
        self.host[i].store(key, len(slots))
        self.issue(SwapOut(i, key, tuple(slots), groups))
        self.slots_offloaded += len(slots)

    def slots_in(self, unit: ServingUnit, key: str, slots: Sequence[int], groups: int) -> None:
        """Copy the host entry `key` (kept) into device slots `slots`."""
        self.issue(SwapIn(_instance(unit), key, tuple(slots), groups, keep=True))
        self.slots_reloaded += len(slots)

    def slots_copy(self, unit: ServingUnit, src: Sequence[int], dst: Sequence[int], groups: int) -> None:
        if src:
            self.issue(SlotCopy(_instance(unit), tuple(src), tuple(dst), groups))

    # ---- books --------------------------------------------------------------------------------------
    def check(self) -> None:
        for tier in self.host:
            tier.check()

    def stats(self) -> dict[str, int]:
        return {"blocks_swapped_out": self.blocks_swapped_out, "blocks_swapped_in": self.blocks_swapped_in,
                "blocks_transferred": self.blocks_transferred, "slots_offloaded": self.slots_offloaded,
                "slots_reloaded": self.slots_reloaded, "host_reclaimed": self.host_reclaimed,
                "host_used": sum(t.num_used for t in self.host), "host_total": sum(t.total for t in self.host)}


def _instance(unit: ServingUnit) -> int:
    if unit.k != 1:
        raise ValueError(f"unit {unit.uid} has {unit.k} stages: this move is for replicas")
    return unit.members[0]
