"""One memory pool over every instance's KV, on two tiers (MemServe's MemPool): the API every policy uses.

Owns
* the **device tier**: each instance's `BlockAllocator` (the books) over its pool array `[NB, L, 2, BS, K, D]`
  (the data, held by the `Instance`; this module replaces it with the donated result of each copy);
* the **host tier**: per instance, a `HostTier` whose books are a `BlockAllocator` and whose data are host-memory
  arrays (`pinned_host` memory kind where the platform has one — GPU, TPU and also CPU jax — so a copy is an
  asynchronous DMA that never blocks the controller thread; plain device arrays otherwise);
* the compiled block copies: a gather of `n` blocks out of a pool and a donated scatter into a pool, for `n` a
  power of two up to `MAX_COPY`; any count is moved as its binary decomposition, so nothing is padded and the set
  of compiled shapes is small and warmed up ahead of serving.

API (`MemPool`): `alloc / free / swap_out / swap_in / transfer / evict`, and `check()`; for layer-wise
residency (layerkv) `slots_out / slots_in / slots_copy` move layer-group slots (a `BlockCopier` over the slot
view), the books of those slots being the policy's.

Ordering: a copy is dispatched to the device when it is called, before the step that reuses the blocks is
dispatched; JAX runs work on a device in dispatch order and a donation waits for earlier reads, so a block freed
by a swap-out can be handed to the same step's new tokens. Nothing here waits for the device.

Invariant, checked by `check()` on both tiers (and by `LLMEngine.check_books` in tests):
    device: free + used + cached == total            host: free + used == total, and
    every used host block belongs to exactly one stored entry, whose arrays hold exactly its blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from kunjax.block_manager import BlockAllocator, OutOfBlocks
from kunjax.model import slot_view

MAX_COPY = 64  # largest block count moved by one compiled copy (powers of two up to it are compiled)


def copy_sizes(n: int) -> list[int]:
    """`n` as a sum of compiled copy sizes: the binary decomposition, chunks of `MAX_COPY` first."""
    out = [MAX_COPY] * (n // MAX_COPY)
    rest = n % MAX_COPY
    bit = MAX_COPY
    while rest:
        bit //= 2
        if rest >= bit:
            out.append(bit)
            rest -= bit
    return out


class BlockCopier:
    """Compiled gathers and donated scatters of one pool's blocks (one sharding, one shape).

    With `num_groups` G > 1 the units are layer-group slots instead of whole blocks: the rows of the pool's slot
    view `[NB * G, L/G, 2, BS, K, D]` (`kunjax.model.slot_view`, a reshape), slot `p * G + s` being layers
    `s*L/G ..` of block `p` (layerkv). Counts are moved as their binary decomposition (`copy_sizes`).
    """

    def __init__(self, pool: jax.Array, num_groups: int = 1):  # [NB, L, 2, BS, K, D] the instance's pool
        self.sharding: NamedSharding = pool.sharding
        self._ids_sharding = NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec())

        def gather(pool, ids):  # [NB, L, ...], [n] -> [n, L/G, 2, BS, K, D]
            return slot_view(pool, num_groups)[ids]

        def scatter(pool, ids, data):  # data [n, L/G, 2, BS, K, D]
            return slot_view(pool, num_groups).at[ids].set(data.astype(pool.dtype)).reshape(pool.shape)

        ids = self._ids_sharding
        self._gather = jax.jit(gather, in_shardings=(self.sharding, ids), out_shardings=self.sharding)
        self._scatter = jax.jit(scatter, donate_argnums=(0,), in_shardings=(self.sharding, ids, self.sharding),
                                out_shardings=self.sharding)

    def warmup(self, pool: jax.Array) -> jax.Array:
        """Compile every copy size ahead of serving (unit 0, in the null block, is read and written back)."""
        n = 1
        while n <= MAX_COPY:
            ids = [0] * n
            pool = self.write(pool, ids, self.read(pool, ids))
            n *= 2
        return pool

    def _ids(self, ids: Sequence[int]) -> jax.Array:  # [n] int32, replicated
        return jax.device_put(np.asarray(ids, np.int32), self._ids_sharding)

    def read(self, pool: jax.Array, ids: Sequence[int]) -> list[jax.Array]:
        """Units `ids` as device arrays [n_i, L/G, 2, BS, K, D], one per compiled copy size."""
        out, at = [], 0
        for n in copy_sizes(len(ids)):
            out.append(self._gather(pool, self._ids(ids[at:at + n])))
            at += n
        return out

    def write(self, pool: jax.Array, ids: Sequence[int], parts: Sequence[jax.Array]) -> jax.Array:
        """Scatter `parts` (as returned by `read`, possibly from another pool or the host tier) into units `ids`."""
        at = 0
        for part in parts:
            n = part.shape[0]
            pool = self._scatter(pool, self._ids(ids[at:at + n]), jax.device_put(part, self.sharding))
            at += n
        assert at == len(ids), f"wrote {at} units into {len(ids)} ids"
        return pool


def host_sharding(sharding: NamedSharding) -> NamedSharding:
    """The pool's sharding in host memory (`pinned_host` where the devices have it), else the pool's own."""
    dev = sharding.mesh.devices.flat[0]
    try:
        kinds = {m.kind for m in dev.addressable_memories()}
    except (AttributeError, NotImplementedError):
        kinds = set()
    return sharding.with_memory_kind("pinned_host") if "pinned_host" in kinds else sharding


@dataclasses.dataclass
class HostEntry:
    blocks: list[int]  # host block ids (books)
    parts: list[jax.Array]  # host-memory arrays, each [n_i, L, 2, BS, K, D]; sum n_i == len(blocks)


class HostTier:
    """Host-memory KV of one instance: capacity and books in blocks, data per stored entry (a swapped request)."""

    def __init__(self, num_blocks: int, sharding: NamedSharding):
        self.allocator = BlockAllocator(num_blocks + 1)  # +1: the allocator reserves id 0 (null block)
        self.sharding = host_sharding(sharding)
        self.entries: dict[str, HostEntry] = {}

    @property
    def total(self) -> int:
        return self.allocator.total

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def num_used(self) -> int:
        return self.allocator.num_used

    def store(self, key: str, parts: Sequence[jax.Array]) -> HostEntry:  # parts: device arrays [n_i, ...]
        n = sum(p.shape[0] for p in parts)
        if key in self.entries:
            raise ValueError(f"{key!r} already has KV on the host tier")
        blocks = self.allocator.allocate(n)
        # Asynchronous device-to-host copies: nothing waits here.
        entry = HostEntry(blocks, [jax.device_put(p, self.sharding) for p in parts])
        self.entries[key] = entry
        return entry

    def take(self, key: str) -> HostEntry:
        entry = self.entries.pop(key)
        self.allocator.free(entry.blocks)
        return entry

    def check(self) -> None:
        self.allocator.check()
        assert self.allocator.num_cached == 0, "host tier blocks are never prefix-cached"
        held = [b for e in self.entries.values() for b in e.blocks]
        assert len(held) == len(set(held)) == self.allocator.num_used, (
            f"host books: {self.allocator.num_used} used blocks but entries hold {len(held)}")
        for key, e in self.entries.items():
            assert sum(p.shape[0] for p in e.parts) == len(e.blocks), f"host entry {key!r}: data != books"


class MemPool:
    """Every instance's KV on the device and host tiers, and the moves between them.

    `instances` are `kunjax.instance.Instance`s (their `allocator` and `kv_pool`); the pool array of an instance is
    replaced by the donated result of every copy into it, so callers must not hold on to `inst.kv_pool`.
    """

    def __init__(self, instances: Sequence, host_blocks: int):
        self.instances = list(instances)
        self.copiers = [BlockCopier(inst.kv_pool) for inst in self.instances]
        self.host = [HostTier(host_blocks, inst.kv_pool.sharding) for inst in self.instances] if host_blocks else []
        self.blocks_swapped_out = 0
        self.blocks_swapped_in = 0
        self.blocks_transferred = 0

    def warmup(self) -> None:
        for inst, copier in zip(self.instances, self.copiers, strict=True):
            inst.kv_pool = copier.warmup(inst.kv_pool)

    # ---- device tier --------------------------------------------------------------------------------
    def alloc(self, i: int, n: int) -> list[int]:
        return self.instances[i].allocator.allocate(n)

    def free(self, i: int, blocks: Sequence[int]) -> None:
        self.instances[i].allocator.free(blocks)

    def evict(self, i: int, n: int) -> int:
        """Drop up to `n` prefix-cached blocks of instance `i` back to its free list; returns how many."""
        return self.instances[i].allocator.evict(n)

    # ---- tiers --------------------------------------------------------------------------------------
    def host_free(self, i: int) -> int:
        return self.host[i].num_free if self.host else 0

    def swap_out(self, i: int, key: str, blocks: Sequence[int]) -> int:
        """Copy device blocks of instance `i` to its host tier under `key` and free them; returns host blocks."""
        inst = self.instances[i]
        if not self.host or len(blocks) > self.host[i].num_free:
            raise OutOfBlocks(f"instance {i}: {len(blocks)} blocks to swap out, "
                              f"{self.host_free(i)} free on the host tier")
        parts = self.copiers[i].read(inst.kv_pool, list(blocks))
        self.host[i].store(key, parts)
        inst.allocator.free(blocks)
        self.blocks_swapped_out += len(blocks)
        return len(blocks)

    def swap_in(self, i: int, key: str) -> list[int]:
        """Bring `key`'s blocks back from the host tier into newly allocated device blocks; returns their ids."""
        inst = self.instances[i]
        n = len(self.host[i].entries[key].blocks)
        blocks = inst.allocator.allocate(n)  # raises OutOfBlocks before the host entry is touched
        entry = self.host[i].take(key)
        inst.kv_pool = self.copiers[i].write(inst.kv_pool, blocks, entry.parts)
        self.blocks_swapped_in += n
        return blocks

    def host_blocks_of(self, i: int, key: str) -> int:
        e = self.host[i].entries.get(key) if self.host else None
        return len(e.blocks) if e is not None else 0

    def drop_host(self, i: int, key: str) -> None:
        """Forget `key`'s host copy (its request was aborted or finished)."""
        if self.host and key in self.host[i].entries:
            self.host[i].take(key)

    def transfer(self, src: int, dst: int, src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> None:
        """Copy blocks of instance `src` into (already allocated) blocks of instance `dst`; the books of both are
        the caller's (a live migration copies in rounds while the source keeps its blocks)."""
        if len(src_blocks) != len(dst_blocks):
            raise ValueError(f"transfer of {len(src_blocks)} blocks into {len(dst_blocks)}")
        if not src_blocks:
            return
        a, b = self.instances[src], self.instances[dst]
        parts = self.copiers[src].read(a.kv_pool, list(src_blocks))
        b.kv_pool = self.copiers[dst].write(b.kv_pool, list(dst_blocks), parts)
        self.blocks_transferred += len(src_blocks)

    # ---- layer-group slots (layerkv) ----------------------------------------------------------------
    def enable_slots(self, num_groups: int) -> None:
        """Compile slot copies for every instance: `slots_out / slots_in / slots_copy` then work."""
        self.slot_copiers = [BlockCopier(inst.kv_pool, num_groups) for inst in self.instances]
        self.slots_offloaded = 0
        self.slots_reloaded = 0

    def warmup_slots(self) -> None:
        for inst, copier in zip(self.instances, self.slot_copiers, strict=True):
            inst.kv_pool = copier.warmup(inst.kv_pool)

    def slots_out(self, i: int, key: str, slots: Sequence[int]) -> None:
        """Copy device slots of instance `i` to its host tier under `key` (one host block per slot); the device
        books are the caller's. Asynchronous: dispatched now, after whatever was dispatched before."""
        self.host[i].store(key, self.slot_copiers[i].read(self.instances[i].kv_pool, list(slots)))
        self.slots_offloaded += len(slots)

    def slots_in(self, i: int, key: str, slots: Sequence[int]) -> None:
        """Copy the host entry `key` (kept) into device slots `slots` of instance `i`."""
        inst = self.instances[i]
        inst.kv_pool = self.slot_copiers[i].write(inst.kv_pool, list(slots), self.host[i].entries[key].parts)
        self.slots_reloaded += len(slots)

    def slots_copy(self, i: int, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy device slots `src` into slots `dst` of instance `i`."""
        if src:
            inst, copier = self.instances[i], self.slot_copiers[i]
            inst.kv_pool = copier.write(inst.kv_pool, list(dst), copier.read(inst.kv_pool, list(src)))

    # ---- books --------------------------------------------------------------------------------------
    def check(self) -> None:
        for inst in self.instances:
            if inst.group is None:
                inst.allocator.check()
        for tier in self.host:
            tier.check()

    def stats(self) -> dict[str, int]:
        return {"blocks_swapped_out": self.blocks_swapped_out, "blocks_swapped_in": self.blocks_swapped_in,
                "blocks_transferred": self.blocks_transferred,
                "host_used": sum(t.num_used for t in self.host), "host_total": sum(t.total for t in self.host)}

