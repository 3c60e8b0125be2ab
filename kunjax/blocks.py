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
block of an index node whose refcount is 0; nothing is both free and held; a node spilled to the host tier holds
no device block and has only spilled descendants.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Protocol

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

    def keep(self, blocks: Iterable[int]) -> None:
        """The prefix index keeps `blocks` as they are: a free one becomes cached, a held one indexed."""
        want = set(blocks)
        for b in want:
            if b == NULL_BLOCK or b in self._indexed:
                raise ValueError(f"block {b} cannot be kept (null or already indexed)")
        free = {b for b in want if not self._ref[b]}
        if free:
            self._free_base = [b for b in self._free_base if b not in free]
            self._free_ext = [b for b in self._free_ext if b not in free]
            heapq.heapify(self._free_base)
            heapq.heapify(self._free_ext)
            self._num_cached += len(free)
        self._indexed.update(want)

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
    """One full block of computed KV: `tokens` (its chunk) under `parent`, `blocks[s]` its block on stage s.

    A *stale* node (`stale = (home, old)`, `blocks = ()`) is a block a replica had cached before it fused into
    a pipeline: its data is still the old full-layer block `old` on stage `home`'s device, i.e. the pipeline blocks
    `old·k + s` there, all held on `home`'s allocator, until the live exchange copies each stage's layers to the
    stage that owns them (`PrefixIndex.localize`), or a request that computed the same tokens heals it."""

    __slots__ = ("tokens", "parent", "children", "blocks", "stale", "host", "depth")

    def __init__(self, tokens: tuple[int, ...], parent: PrefixNode | None, blocks: tuple[int, ...],
                 stale: tuple[int, int] | None = None):
        self.tokens = tokens
        self.parent = parent
        self.children: dict[tuple[int, ...], PrefixNode] = {}
        self.blocks = blocks
        self.stale = stale
        self.host: Hashable | None = None  # on the host tier under this key (`blocks = ()`), see `HostTier`
        self.depth = 0 if parent is None else parent.depth + 1

    @property
    def matchable(self) -> bool:
        """Its KV can serve a prefix hit: on the unit's device, or on its host tier (swapped back in first)."""
        return self.stale is None and (bool(self.blocks) or self.host is not None)


class HostTier(Protocol):
    """Where a one-stage index spills cached nodes under pressure instead of dropping them (`kunjax.hostcache`)."""

    def spill(self, node: PrefixNode) -> Hashable | None:
        """Copy `node`'s (device) block to the host tier; its key, or None when the host tier has no room."""

    def drop(self, node: PrefixNode) -> None:
        """Forget the host copy of host node `node`."""


class PrefixIndex:
    """Radix tree over block-sized token chunks for one unit (module docstring).

    A node's blocks are held by the index on every stage's allocator (`BlockAllocator.index`/`keep`); the
    requests whose tables contain them hold references. A node nobody references is *cached*: evictable, least
    recently used first, and never before its children (a child's KV is only reachable through its parent).
    Stale nodes (after a fuse) are never matched; they are evictable once nobody references their blocks.

    With a `host` tier (replicas), an evicted node is *spilled* rather than dropped: its block is copied to the
    host and freed on the device, and the node stays in the tree (`node.host` its key) until a request brings it
    back (`unspill`) or the host tier needs the room (least recently spilled leaves first). A host node's
    descendants are host nodes too: spills go leaves first and a swap-in goes down a path from the root.
    """

    def __init__(self, allocators: Sequence[BlockAllocator], block_size: int):
        self.allocators = list(allocators)
        self.k = len(self.allocators)
        self.block_size = block_size
        self.root = PrefixNode((), None, ())
        self._lru: collections.OrderedDict[PrefixNode, None] = collections.OrderedDict()  # evictable, oldest first
        self.host: HostTier | None = None
        self._host_lru: collections.OrderedDict[PrefixNode, None] = collections.OrderedDict()  # spilled, oldest first
        self.hits = 0  # blocks served from the index (cumulative)
        # Told of every node that becomes matchable (True) or stops being (False): the router's prompt tree.
        self.listener: Callable[[bool, PrefixNode], None] | None = None

    def __len__(self) -> int:
        return sum(1 for _ in self.nodes())

    def nodes(self) -> Iterable[PrefixNode]:
        """Every node, parents before children (breadth first)."""
        queue = collections.deque(self.root.children.values())
        while queue:
            n = queue.popleft()
            yield n
            queue.extend(n.children.values())

    def _chunks(self, tokens: Sequence[int], n: int) -> Iterable[tuple[int, ...]]:
        bs = self.block_size
        for i in range(n):
            yield tuple(tokens[i * bs:(i + 1) * bs])

    def held(self, node: PrefixNode) -> list[tuple[int, int]]:
        """`(stage, block)` of every block the node keeps."""
        if node.stale is not None:
            home, old = node.stale
            return [(home, old * self.k + s) for s in range(self.k)]
        return list(enumerate(node.blocks))

    @property
    def num_cached(self) -> int:
        return sum(1 for n in self._lru if not self.referenced(n))

    def referenced(self, node: PrefixNode) -> bool:
        return any(self.allocators[s].refcount(b) > 0 for s, b in self.held(node))

    # ---- lookup -------------------------------------------------------------------------------------
    def longest(self, tokens: Sequence[int]) -> list[PrefixNode]:
        """Nodes of the longest indexed prefix of `tokens` on the device that leaves at least one token to compute
        (it yields the logits); no references taken. Stops at a stale or a host node."""
        out, node = [], self.root
        for chunk in self._chunks(tokens, (len(tokens) - 1) // self.block_size):
            node = node.children.get(chunk)
            if node is None or node.stale is not None or node.host is not None:
                break
            out.append(node)
        return out

    def on_host(self, tokens: Sequence[int], own: Sequence[PrefixNode]) -> list[PrefixNode]:
        """The host nodes that continue `own` (a device match of `tokens`) along `tokens`, under the same rule."""
        bs, out, node = self.block_size, [], own[-1] if own else self.root
        for d in range(len(own), (len(tokens) - 1) // bs):
            node = node.children.get(tuple(tokens[d * bs:(d + 1) * bs]))
            if node is None or node.host is None:
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
            if node.parent is not None and not self.referenced(node) and node not in self._lru:
                self._lru[node] = None

    # ---- growth -------------------------------------------------------------------------------------
    def insert(self, parent: PrefixNode | None, chunk: tuple[int, ...], blocks: tuple[int, ...]) -> PrefixNode:
        """The node of `chunk` under `parent` (root if None) for a holder of `blocks` that just computed it: a new
        node keeping `blocks` (the index keeps them once the holder releases them), a stale or spilled node healed
        with `blocks`, or the existing node, on whose blocks a reference is then taken — the holder must switch to
        `node.blocks` (the same tokens after the same prefix: the same KV) and free its own. So every node on a
        holder's path is one it references, and a referenced node's ancestors are referenced too."""
        parent = parent or self.root
        node = parent.children.get(chunk)
        if node is not None and node.host is not None:  # spilled: the holder's blocks replace the host copy
            self._host_lru.pop(node)
            self.host.drop(node)
            node.host, node.blocks = None, tuple(blocks)
        elif node is not None and node.stale is None:
            if node.blocks != tuple(blocks):
                self._take(node)
                self.hits += 1
            return node
        elif node is not None:  # heal a stale node: the holder's local blocks replace the history on the home
            self._unkeep(node)  # (the holder may share its home-stage block: released first, indexed again below)
            node.stale, node.blocks = None, tuple(blocks)
            self._lru.pop(node, None)
        if any(a.is_indexed(b) for a, b in zip(self.allocators, blocks, strict=True)):
            raise ValueError(f"blocks {blocks} are already indexed under another prefix")
        if node is None:
            node = PrefixNode(chunk, parent, tuple(blocks))
            parent.children[chunk] = node
        for a, b in zip(self.allocators, blocks, strict=True):
            a.index(b)
        if self.listener is not None:
            self.listener(True, node)
        return node

    def adopt_stale(self, parent: PrefixNode | None, chunk: tuple[int, ...], home: int, old: int) -> PrefixNode:
        """A node whose data is full-layer block `old` of stage `home`'s device (a replica's cached block after
        its fuse); its pipeline blocks there are kept (cached unless a request still holds them)."""
        parent = parent or self.root
        assert chunk not in parent.children, "a path is adopted once"
        node = PrefixNode(chunk, parent, (), (home, old))
        parent.children[chunk] = node
        self.allocators[home].keep([b for _, b in self.held(node)])
        self._lru[node] = None
        return node

    def adopt_block(self, parent: PrefixNode | None, chunk: tuple[int, ...], block: int) -> PrefixNode:
        """A cached node of a one-stage index for full-layer block `block` (KV copied there at a split)."""
        parent = parent or self.root
        assert self.k == 1 and chunk not in parent.children
        node = PrefixNode(chunk, parent, (block,))
        parent.children[chunk] = node
        self.allocators[0].keep([block])
        self._lru[node] = None
        if self.listener is not None:
            self.listener(True, node)
        return node

    def stale_cached(self) -> list[PrefixNode]:
        """The stale nodes nobody references, parents first (read off the cached list: every stale node is on it,
        so no walk of the whole tree, which holds every running request's prefix too)."""
        return sorted((n for n in self._lru if n.stale is not None and not self.referenced(n)), key=lambda n: n.depth)

    def localize(self, node: PrefixNode, blocks: tuple[int, ...]) -> None:
        """A stale node's layers were copied to their stages (`blocks`, allocated by the caller with one
        reference each, which the index takes over): it is an ordinary cached node from now on."""
        home, old = node.stale
        kept = old * self.k + home
        for s, b in self.held(node):
            if b != kept:
                self.allocators[s].unindex(b)
        node.stale, node.blocks = None, tuple(blocks)
        for s, (a, b) in enumerate(zip(self.allocators, blocks, strict=True)):
            if s != home:
                a.index(b)
                a.free([b])
        if self.listener is not None:
            self.listener(True, node)

    # ---- eviction -----------------------------------------------------------------------------------
    def make_room(self, n: int) -> bool:
        """Evict cached nodes until every stage can hand out `n` blocks; False when not enough are evictable."""
        while min(a.num_free_allocatable for a in self.allocators) < n:
            if not self._evict_one():
                return False
        return True

    def evict(self, n: int) -> int:
        """Drop up to `n` unreferenced nodes (leaves first, least recently used first); returns how many."""
        done = 0
        while done < n and self._evict_one():
            done += 1
        return done

    def _evict_one(self) -> bool:
        # Only stale nodes are listed while referenced; passed over, they go to the back (as a released node
        # would), so evictions under a pipeline's many referenced stale nodes do not walk them again each time.
        # An unreferenced node's subtree is unreferenced too (`insert`), so its walk finds a leaf at once.
        busy, leaf = [], None
        for node in self._lru:  # (not copied: an eviction costs O(what it passes over), not O(the cache))
            if self.referenced(node):
                busy.append(node)
                continue
            leaf = self._evictable_leaf(node)
            if leaf is not None:
                break
        for node in busy:
            self._lru.move_to_end(node)
        if leaf is None:
            return False
        if not (leaf.stale is None and self.host is not None and self._spill(leaf)):
            for child in list(leaf.children.values()):  # host nodes: they cannot outlive their parent
                self._drop_subtree(child)
            self._remove(leaf)
        return True

    def _evictable_leaf(self, node: PrefixNode) -> PrefixNode | None:
        """The first unreferenced device node without device children in `node`'s subtree (itself last)."""
        device_children = False
        for child in node.children.values():
            if child.host is None:
                device_children = True
                leaf = self._evictable_leaf(child)
                if leaf is not None:
                    return leaf
        return node if not device_children and not self.referenced(node) else None

    def _spill(self, node: PrefixNode) -> bool:
        """`node`'s block to the host tier (making room there by dropping spilled leaves); False when it cannot."""
        while (key := self.host.spill(node)) is None:
            if not self.evict_host(1):
                return False
        self._lru.pop(node, None)
        self._unkeep(node)
        node.blocks, node.host = (), key
        self._host_lru[node] = None
        return True

    def unspill(self, node: PrefixNode, blocks: tuple[int, ...]) -> None:
        """Host node `node`'s KV was copied back into `blocks` (allocated, one reference each: its holder's)."""
        assert node.host is not None and (node.parent is self.root or node.parent.host is None)
        self._host_lru.pop(node)
        node.host, node.blocks = None, tuple(blocks)
        for a, b in zip(self.allocators, blocks, strict=True):
            a.index(b)

    @property
    def num_host(self) -> int:
        return len(self._host_lru)

    def evict_host(self, n: int) -> int:
        """Drop up to `n` spilled nodes (leaves, least recently spilled first); returns how many."""
        done = 0
        while done < n:
            leaf = next((node for node in self._host_lru if not node.children), None)
            if leaf is None:
                break
            self._remove(leaf)
            done += 1
        return done

    def detach_host(self) -> list[tuple[tuple[tuple[int, ...], ...], Hashable]]:
        """Take every spilled node out of the index, its host copy kept (its unit is about to fuse: a pipeline
        cannot swap them in): `(its chunks from the root, its key)`, parents first."""
        out = []
        for node in sorted(self._host_lru, key=lambda x: x.depth):
            path, n = [], node
            while n.parent is not None:
                path.append(n.tokens)
                n = n.parent
            out.append((tuple(reversed(path)), node.host))
        for node in sorted(self._host_lru, key=lambda x: -x.depth):
            del node.parent.children[node.tokens]
            if self.listener is not None:
                self.listener(False, node)
        self._host_lru.clear()
        return out

    def adopt_host(self, path: Sequence[tuple[int, ...]], key: Hashable) -> bool:
        """A spilled node for `path` (its chunks from the root) whose copy is host entry `key` (one detached at a
        fuse); False, nothing changed, when its parent is not in the index or the path is there already."""
        parent = self.root
        for chunk in path[:-1]:
            parent = parent.children.get(chunk)
            if parent is None or parent.stale is not None:
                return False
        if path[-1] in parent.children:
            return False
        node = PrefixNode(path[-1], parent, ())
        node.host = key
        parent.children[path[-1]] = node
        self._host_lru[node] = None
        if self.listener is not None:
            self.listener(True, node)
        return True

    def _drop_subtree(self, node: PrefixNode) -> None:
        for child in list(node.children.values()):
            self._drop_subtree(child)
        self._remove(node)

    def _unkeep(self, node: PrefixNode) -> None:
        for s, b in self.held(node):
            self.allocators[s].unindex(b)

    def _remove(self, node: PrefixNode) -> None:
        assert not node.children and not self.referenced(node)
        del node.parent.children[node.tokens]
        self._forget(node)
        self._lru.pop(node, None)

    def _forget(self, node: PrefixNode) -> None:
        if node.host is not None:
            self._host_lru.pop(node)
            self.host.drop(node)
            node.host = None
        else:
            self._unkeep(node)
        if self.listener is not None and node.stale is None:
            self.listener(False, node)

    def clear(self) -> None:
        """Drop every node (cached ones free their blocks, spilled ones their host copies; held ones stay with
        their holders, unindexed)."""
        for node in reversed(list(self.nodes())):
            del node.parent.children[node.tokens]
            self._forget(node)
        self._lru.clear()

    def check(self) -> None:
        num_host = 0
        for node in self.nodes():
            if node.host is not None:
                num_host += 1
                assert not node.blocks and node.stale is None and node in self._host_lru, "a bad host node"
                assert all(c.host is not None for c in node.children.values()), "a device node under a host node"
                continue
            held = self.held(node)
            assert all(self.allocators[s].is_indexed(b) for s, b in held), f"node {held}: a block is not indexed"
            if node.stale is not None:
                assert node in self._lru, f"stale node {node.stale} is not evictable"
                continue
            assert len(node.blocks) == self.k, f"node with {len(node.blocks)} stage blocks"
            refs = {self.allocators[s].refcount(b) > 0 for s, b in held}
            assert len(refs) == 1, f"node {node.blocks}: referenced on some stages only"
            assert (node in self._lru) == (not refs.pop()), f"node {node.blocks}: cache state is wrong"
        assert num_host == len(self._host_lru), f"{len(self._host_lru)} spilled nodes listed, {num_host} in the tree"
        indexed = sum(len(a._indexed) for a in self.allocators)
        assert indexed == sum(len(self.held(n)) for n in self.nodes()), "an allocator indexes a block no node holds"
