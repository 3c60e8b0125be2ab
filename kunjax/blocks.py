"""Host-side books of KV blocks: one refcounted, segmented allocator per stage of a unit, and the radix prefix index.

Owns block ids, never device memory (host decides, device computes; the executor owns the arrays):

* `BlockAllocator` — the block ids of one stage's device: the base segment `[1, num_base)` (a replica's pool, or
  its pipeline-format reinterpretation `NB·k` after a drop) then the extension segment `[num_base, num_base +
  num_ext)` (the memory the dropped weights freed). Block 0 is the null block padding rows write to; it is never
  handed out. The lowest free id goes first (base before extension), so live blocks pack at the low end and
  whole full-layer blocks stay free at the high end, which is where a restore moves requests home. A block is
  *free*, *used* (refcount > 0: requests hold it) or *cached* (refcount 0 but kept by the prefix index).
* `PrefixIndex` — a radix tree over block-sized token chunks (SGLang/MemServe): node = one full block of
  computed KV, keyed by its tokens under its parent (so a node is a whole prefix), holding one block id per stage.
  `match` walks the longest cached prefix and takes references; `insert` adds a request's newly full block;
  `evict` drops least recently used nodes nobody references, leaves first.

Invariant (`check`): on every stage `num_free + num_used + num_cached == total`; a cached block is exactly a
block of an index node whose refcount is 0; nothing is both free and held.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Iterable, Sequence

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """Raised by `allocate` when a stage cannot supply the blocks."""


class BlockAllocator:
    """Block ids of one stage's device (module docstring). Invariant: `num_free + num_used + num_cached == total`."""

    def __init__(self, num_base: int, num_ext: int = 0, taken: Iterable[int] = ()):
        if num_base < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is the null block), got {num_base}")
        self.num_base, self.num_ext = num_base, num_ext
        self.num_blocks = num_base + num_ext
        self.total = self.num_blocks - 1
        self._ref = [0] * self.num_blocks
        for b in taken:
            self._ref[b] += 1
        self._indexed: set[int] = set()
        self._free_base = [b for b in range(1, num_base) if not self._ref[b]]  # sorted lists are heaps
        self._free_ext = [b for b in range(num_base, self.num_blocks) if not self._ref[b]]
        self._num_cached = 0
        self.ext_open = True  # False: allocate from the base segment only (a group draining for its restore)

    # ---- counts -------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free_base) + len(self._free_ext)

    @property
    def num_cached(self) -> int:
        return self._num_cached

    @property
    def num_used(self) -> int:
        return self.total - self.num_free - self._num_cached

    @property
    def num_free_allocatable(self) -> int:
        """Free blocks `allocate` may hand out now (the extension only while it is open)."""
        return len(self._free_base) + (len(self._free_ext) if self.ext_open else 0)

    def refcount(self, b: int) -> int:
        return self._ref[b]

    def is_free(self, b: int) -> bool:
        return b != NULL_BLOCK and not self._ref[b] and b not in self._indexed

    # ---- allocation ---------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """`n` free blocks, lowest ids first, each with one reference (evicting the cache is the caller's job)."""
        if n > self.num_free_allocatable:
            raise OutOfBlocks(f"need {n} KV blocks, {self.num_free_allocatable} free of {self.total}")
        out = []
        for _ in range(n):
            b = heapq.heappop(self._free_base if self._free_base else self._free_ext)
            self._ref[b] = 1
            out.append(b)
        return out

    def take(self, blocks: Iterable[int]) -> None:
        """Reference specific free blocks (KV written there by a copy, e.g. moved home at a restore)."""
        want = set(blocks)
        bad = [b for b in want if not self.is_free(b)]
        if bad:
            raise ValueError(f"blocks {sorted(bad)[:5]} are not free")
        self._free_base = [b for b in self._free_base if b not in want]
        self._free_ext = [b for b in self._free_ext if b not in want]
        heapq.heapify(self._free_base)
        heapq.heapify(self._free_ext)
        for b in want:
            self._ref[b] = 1

    def ref(self, blocks: Iterable[int]) -> None:
        """One more reference on each held or cached block (a prefix match, a shared history)."""
        for b in blocks:
            if self._ref[b] == 0:
                if b not in self._indexed:
                    raise ValueError(f"block {b} is free: nothing to share")
                self._num_cached -= 1
            self._ref[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; an unreferenced block goes to the cache if the index keeps it,
        else to the free list."""
        for b in blocks:
            if b == NULL_BLOCK or self._ref[b] <= 0:
                raise ValueError(f"double free or invalid block {b} (refcount {self._ref[b]})")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._indexed:
                    self._num_cached += 1
                else:
                    self._push_free(b)

    def _push_free(self, b: int) -> None:
        heapq.heappush(self._free_base if b < self.num_base else self._free_ext, b)

    # ---- the prefix index's hold --------------------------------------------------------------------
    def index(self, b: int) -> None:
        """The prefix index keeps block `b` (held now) once nobody references it."""
        if self._ref[b] <= 0:
            raise ValueError(f"cannot index unreferenced block {b}")
        self._indexed.add(b)

    def unindex(self, b: int) -> None:
        """The index lets go of `b`; a cached `b` becomes free."""
        self._indexed.discard(b)
        if self._ref[b] == 0:
            self._num_cached -= 1
            self._push_free(b)

    def is_indexed(self, b: int) -> bool:
        return b in self._indexed

    # ---- checks -------------------------------------------------------------------------------------
    def check(self) -> None:
        free = set(self._free_base) | set(self._free_ext)
        used = {b for b in range(1, self.num_blocks) if self._ref[b] > 0}
        cached = {b for b in self._indexed if self._ref[b] == 0}
        assert len(free) == self.num_free, "duplicate block on a free list"
        assert not (free & used) and not (free & cached) and not (free & self._indexed), "block in two states"
        assert len(cached) == self._num_cached, f"cached count {self._num_cached} but {len(cached)} cached blocks"
        assert len(free) + len(used) + len(cached) == self.total, (
            f"books do not balance: free {len(free)} + used {len(used)} + cached {len(cached)} != {self.total}")
        assert self._ref[NULL_BLOCK] == 0 and NULL_BLOCK not in free | self._indexed


class PrefixNode:
    """One full block of computed KV: `tokens` (its chunk) under `parent`, `blocks[s]` its block on stage s."""

    __slots__ = ("tokens", "parent", "children", "blocks", "depth")

    def __init__(self, tokens: tuple[int, ...], parent: PrefixNode | None, blocks: tuple[int, ...]):
        self.tokens = tokens
        self.parent = parent
        self.children: dict[tuple[int, ...], PrefixNode] = {}
        self.blocks = blocks
        self.depth = 0 if parent is None else parent.depth + 1


class PrefixIndex:
    """Radix tree over block-sized token chunks for one unit (module docstring).

    A node's blocks are held by the index on every stage's allocator (`BlockAllocator.index`); the requests
    whose tables contain them hold references. A node nobody references is *cached*: evictable, least recently
    used first, and never before its children (a child's KV is only reachable through its parent).
    """

    def __init__(self, allocators: Sequence[BlockAllocator], block_size: int):
        self.allocators = list(allocators)
        self.block_size = block_size
        self.root = PrefixNode((), None, ())
        self._lru: collections.OrderedDict[PrefixNode, None] = collections.OrderedDict()  # cached, oldest first
        self._clock = itertools.count()
        self.hits = 0  # blocks served from the index (cumulative)

    def __len__(self) -> int:
        return sum(1 for _ in self.nodes())

    def nodes(self) -> Iterable[PrefixNode]:
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def _chunks(self, tokens: Sequence[int], n: int) -> Iterable[tuple[int, ...]]:
        bs = self.block_size
        for i in range(n):
            yield tuple(tokens[i * bs:(i + 1) * bs])

    @property
    def num_cached(self) -> int:
        return len(self._lru)

    def _referenced(self, node: PrefixNode) -> bool:
        return self.allocators[0].refcount(node.blocks[0]) > 0

    def _touch(self, node: PrefixNode) -> None:
        if node in self._lru:
            self._lru.move_to_end(node)

    # ---- lookup -------------------------------------------------------------------------------------
    def longest(self, tokens: Sequence[int]) -> list[PrefixNode]:
        """Nodes of the longest indexed prefix of `tokens` that leaves at least one token to compute (it yields
        the logits); no references taken (the router's query)."""
        out, node = [], self.root
        for chunk in self._chunks(tokens, (len(tokens) - 1) // self.block_size):
            node = node.children.get(chunk)
            if node is None:
                break
            out.append(node)
        return out

    def match(self, tokens: Sequence[int]) -> list[PrefixNode]:
        """`longest(tokens)`, taking one reference on each node's blocks (cached nodes become used)."""
        nodes = self.longest(tokens)
        for node in nodes:
            self._take(node)
        self.hits += len(nodes)
        return nodes

    def _take(self, node: PrefixNode) -> None:
        self._lru.pop(node, None)
        for a, b in zip(self.allocators, node.blocks, strict=True):
            a.ref([b])

    def release(self, nodes: Sequence[PrefixNode]) -> None:
        """Called after the holders' references on `nodes` were dropped: the unreferenced ones become cached
        (most recently used; deeper nodes older, so a leaf is evicted before its parent)."""
        for node in sorted(nodes, key=lambda n: -n.depth):
            if node.parent is not None and not self._referenced(node) and node not in self._lru:
                self._lru[node] = None

    # ---- growth -------------------------------------------------------------------------------------
    def insert(self, parent: PrefixNode | None, chunk: tuple[int, ...], blocks: tuple[int, ...]) -> PrefixNode:
        """The node of `chunk` under `parent` (root if None) for a holder of `blocks` that just computed it: a new
        node keeping `blocks` (the index keeps them once the holder releases them), or the existing node, on
        whose blocks a reference is then taken — the holder must switch to `node.blocks` (the same tokens after
        the same prefix: the same KV) and free its own. So every node on a holder's path is one it references,
        and a referenced node's ancestors are referenced too."""
        parent = parent or self.root
        node = parent.children.get(chunk)
        if node is not None:
            if node.blocks != tuple(blocks):
                self._take(node)
                self.hits += 1
            return node
        if any(a.is_indexed(b) for a, b in zip(self.allocators, blocks, strict=True)):
            raise ValueError(f"blocks {blocks} are already indexed under another prefix")
        node = PrefixNode(chunk, parent, tuple(blocks))
        parent.children[chunk] = node
        for a, b in zip(self.allocators, blocks, strict=True):
            a.index(b)
        return node

    # ---- eviction -----------------------------------------------------------------------------------
    def evict(self, n: int) -> int:
        """Drop up to `n` cached nodes (leaves first, least recently used first); returns how many."""
        done = 0
        while done < n and self._lru:
            node = next(iter(self._lru))
            while node.children:  # (only cached nodes hang below a cached node)
                node = next(iter(node.children.values()))
            self._remove(node)
            done += 1
        return done

    def _remove(self, node: PrefixNode) -> None:
        assert not node.children and not self._referenced(node)
        del node.parent.children[node.tokens]
        self._lru.pop(node, None)
        for a, b in zip(self.allocators, node.blocks, strict=True):
            a.unindex(b)

    def clear(self) -> None:
        """Drop every node (cached ones free their blocks; held ones stay with their holders, unindexed)."""
        for node in sorted(self.nodes(), key=lambda n: -n.depth):
            del node.parent.children[node.tokens]
            for a, b in zip(self.allocators, node.blocks, strict=True):
                a.unindex(b)
        self._lru.clear()

    def check(self) -> None:
        for node in self.nodes():
            assert len(node.blocks) == len(self.allocators), f"node with {len(node.blocks)} stage blocks"
            refs = {a.refcount(b) > 0 for a, b in zip(self.allocators, node.blocks, strict=True)}
            assert len(refs) == 1, f"node {node.blocks}: referenced on some stages only"
            assert all(a.is_indexed(b) for a, b in zip(self.allocators, node.blocks, strict=True))
            assert (node in self._lru) == (not refs.pop()), f"node {node.blocks}: cache state is wrong"
        indexed = sum(len(a._indexed) for a in self.allocators)
        assert indexed == len(self) * len(self.allocators), "an allocator indexes a block no node holds"
