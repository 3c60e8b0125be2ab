"""Host-side book of one instance's paged KV pool: which block holds what, and who references it.

Owns: the free list, per-block reference counts, and the prefix cache (content-hashed full blocks that no
request references any more, kept for reuse and evicted LRU). Never touches device memory: the device pool is a
plain array indexed by the block ids handed out here (DESIGN.md §3, "host decides, device computes").

Invariant, checked by `check()` and in tests at every transition:
    num_free + num_used + num_cached == total
where `used` blocks have refcount > 0, `cached` blocks have refcount 0 and a content hash, and `free` blocks have
neither. Block 0 of every pool is the null block (padding rows write there) and is never handed out.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Sequence

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """Raised by `allocate` when the pool cannot supply the blocks even after evicting the prefix cache."""


def chain_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Hash of a full block's tokens chained with its prefix, so equal hashes mean equal whole prefixes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0")
    h.update(",".join(map(str, tokens)).encode())
    return h.digest()


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.total = num_blocks - 1  # usable blocks: all but the null block
        self._free: collections.deque[int] = collections.deque(range(1, num_blocks))
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # block -> content hash (full, computed blocks only)
        self._block_of: dict[bytes, int] = {}  # content hash -> block
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, oldest first

    # ---- counts -------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._lru)

    @property
    def num_used(self) -> int:
        return self.total - self.num_free - self.num_cached

    @property
    def num_allocatable(self) -> int:
        """Blocks an `allocate` call can hand out now (free, plus cached ones it may evict)."""
        return self.num_free + self.num_cached

    def refcount(self, block: int) -> int:
        return self._ref[block]

    # ---- allocation ---------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > self.num_allocatable:
            raise OutOfBlocks(f"need {n} KV blocks, {self.num_allocatable} allocatable of {self.total}")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently used cached block
                b, _ = self._lru.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
            self._ref[b] = 1
            out.append(b)
        return out

    def take(self, blocks: Iterable[int]) -> None:
        """Reference specific free blocks (KV that was written there by a copy, e.g. moved home at a restore)."""
        want = set(blocks)
        bad = [b for b in want if b == NULL_BLOCK or self._ref[b] > 0 or b in self._lru]
        if bad:
            raise ValueError(f"blocks {sorted(bad)[:5]} are not free")
        self._free = collections.deque(b for b in self._free if b not in want)
        for b in want:
            self._ref[b] = 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; unreferenced blocks go to the prefix cache or the free list.

        Blocks are released in reverse so that a request's tail blocks are evicted before its head blocks,
        which keeps the longest reusable prefixes cached.
        """
        for b in reversed(list(blocks)):
            if b == NULL_BLOCK or self._ref[b] <= 0:
                raise ValueError(f"double free or invalid block {b} (refcount {self._ref[b]})")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._lru[b] = None
                else:
                    self._free.append(b)

    def evict(self, n: int) -> int:
        """Return up to `n` least recently used prefix-cached blocks to the free list; returns how many."""
        done = 0
        while done < n and self._lru:
            b, _ = self._lru.popitem(last=False)
            del self._block_of[self._hash_of.pop(b)]
            self._free.append(b)
            done += 1
        return done

    # ---- prefix cache -------------------------------------------------------------------------------
    def register(self, block: int, content_hash: bytes) -> None:
        """Record that a referenced, fully computed block holds the prefix identified by `content_hash`."""
        if self._ref[block] <= 0:
            raise ValueError(f"cannot register unreferenced block {block}")
        if content_hash in self._block_of or block in self._hash_of:
            return  # an identical block is already indexed; this one stays private
        self._hash_of[block] = content_hash
        self._block_of[content_hash] = block

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """Longest indexed prefix of `hashes`; takes a reference on each returned block."""
        out = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            out.append(b)
        for b in out:
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1
        return out

    # ---- checks -------------------------------------------------------------------------------------
    def check(self) -> None:
        free = set(self._free)
        cached = set(self._lru)
        used = {b for b in range(1, self.num_blocks) if self._ref[b] > 0}
        assert len(free) == len(self._free), "duplicate block on the free list"
        assert not (free & cached) and not (free & used) and not (cached & used), "block in two states"
        assert len(free) + len(used) + len(cached) == self.total, (
            f"books do not balance: free {len(free)} + used {len(used)} + cached {len(cached)} != {self.total}")
        assert all(b in self._hash_of for b in cached), "cached block without a hash"
        assert self._ref[NULL_BLOCK] == 0 and NULL_BLOCK not in free | cached
