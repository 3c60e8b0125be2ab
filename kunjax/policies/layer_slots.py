"""Device books of layer-group slots for `layerkv`: which slot of the pool holds whose KV.

The pool is block-major with all L layers in a block (`[NB, L, 2, BS, K, D]`). With the layers split into G
groups, its slot view (`kunjax.model.slot_view`, a reshape) is `[NB * G, L/G, 2, BS, K, D]`: slot `p * G + s`
is the s-th group of layers of block `p`, and any slot can hold any layer group of any logical block (the
step reads it through per-group slot tables). Two kinds of blocks hand out slots:

* **split blocks**: whole blocks taken from the replica unit's allocator (its books count them as used; the
  policy reports them through `reserved_blocks`) whose G slots are handed out one by one to partially resident
  requests; a split block goes back to the allocator as soon as all its slots are free again;
* the **staging region**: `staging` blocks outside the allocator's range (reserved from the pool at start-up)
  whose slots are borrowed for one step by the offloaded groups of the requests in that step.

Owns only books (host decides, device computes): the data moves through `kunjax.mempool`. Never touches whole
blocks of ordinary requests.

Invariant, checked by `check()` (counted in slots, G per block):
    free + used + cached + staging == total
where free = G * allocator free + free slots of split blocks, used = G * whole blocks of ordinary requests +
owned slots of split blocks, cached = G * prefix-cached blocks, staging = G * staging blocks (none borrowed
between steps); every owned slot has exactly one owner.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

from kunjax.unit import ServingUnit


class SlotBook:
    """Layer-group slots of one replica unit: split blocks from its allocator, and its staging region."""

    def __init__(self, unit: ServingUnit, num_groups: int, staging_blocks: Sequence[int]):
        self.unit = unit
        self.allocator = unit.stages[0]
        self.num_groups = num_groups
        self.owner: dict[int, str] = {}  # owned slot of a split block -> request id
        self.split: set[int] = set()  # blocks taken from the allocator and handed out as slots
        self.free: set[int] = set()  # free slots of split blocks
        self.staging = [p * num_groups + s for p in staging_blocks for s in range(num_groups)]  # slot ids
        self.staged: dict[int, str] = {}  # borrowed staging slot -> request id

    def slots_of(self, block: int) -> range:
        return range(block * self.num_groups, (block + 1) * self.num_groups)

    # ---- split blocks (permanent slots) -------------------------------------------------------------
    def blocks_needed(self, n: int) -> int:
        """Blocks the allocator must supply for `n` more slots."""
        return math.ceil(max(0, n - len(self.free)) / self.num_groups)

    def fits(self, n: int) -> bool:
        return self.blocks_needed(n) <= self.unit.num_allocatable

    def take(self, owner: str, n: int) -> list[int]:
        """`n` slots for `owner`: free slots of split blocks first, then newly split blocks. Check `fits` first."""
        got = self.unit.allocate(self.blocks_needed(n))  # (evicting cached prefixes if needed)
        assert got is not None, "take() without fits()"
        for p in got[0]:
            self.split.add(p)
            self.free.update(self.slots_of(p))
        got = sorted(self.free)[:n]
        self.free.difference_update(got)
        for v in got:
            self.owner[v] = owner
        return got

    def give(self, owner: str, slots: Sequence[int]) -> None:
        """Free `owner`'s `slots`; a split block with every slot free goes back to the allocator."""
        for v in slots:
            assert self.owner.get(v) == owner, f"slot {v} is {self.owner.get(v)!r}'s, not {owner!r}'s"
            del self.owner[v]
            self.free.add(v)
            p = v // self.num_groups
            if all(s in self.free for s in self.slots_of(p)):
                self.free.difference_update(self.slots_of(p))
                self.split.discard(p)
                self.allocator.free([p])

    # ---- staging region (borrowed for one step) -----------------------------------------------------
    def staging_free(self) -> int:
        return len(self.staging) - len(self.staged)

    def stage(self, owner: str, n: int) -> list[int]:
        got = [v for v in self.staging if v not in self.staged][:n]
        assert len(got) == n, f"staging: {n} slots wanted, {self.staging_free()} free"
        for v in got:
            self.staged[v] = owner
        return got

    def unstage(self, owner: str) -> None:
        for v in [v for v, o in self.staged.items() if o == owner]:
            del self.staged[v]

    def unstage_all(self) -> None:
        self.staged.clear()

    # ---- books --------------------------------------------------------------------------------------
    def reserved(self) -> collections.Counter[int]:
        """The allocator references this book holds (one per split block), for `LLMEngine.check_books`."""
        return collections.Counter(self.split)

    def counts(self) -> dict[str, int]:
        a, g = self.allocator, self.num_groups
        return {"free": g * a.num_free + len(self.free), "used": g * (a.num_used - len(self.split)) + len(self.owner),
                "cached": g * a.num_cached, "staging": len(self.staging), "staging_borrowed": len(self.staged),
                "total": g * a.total + len(self.staging)}

    def check(self, between_steps: bool = True) -> None:
        c = self.counts()
        assert c["free"] + c["used"] + c["cached"] + c["staging"] == c["total"], f"slot books do not balance: {c}"
        assert not set(self.owner) & self.free, "a slot is both owned and free"
        split_slots = {v for p in self.split for v in self.slots_of(p)}
        assert set(self.owner) | self.free == split_slots, "owned + free slots != the split blocks' slots"
        for p in self.split:
            assert self.allocator.refcount(p) == 1, f"split block {p} has refcount {self.allocator.refcount(p)}"
            assert any(v in self.owner for v in self.slots_of(p)), f"split block {p} has no owner"
        assert min(self.staging, default=self.allocator.num_blocks * self.num_groups) >= (
            self.allocator.num_blocks * self.num_groups), "staging region inside the allocator's blocks"
        if between_steps:
            assert not self.staged, f"{len(self.staged)} staging slots still borrowed between steps"
