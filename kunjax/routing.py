"""The router: which serving unit a new request joins (`--routing`), and the global prompt tree it reads.

Modes (MemServe's baselines and its locality-aware router):

* `least-load`: the unit with the least KV demand relative to its capacity (`demand_blocks / total_blocks`,
  running requests' blocks plus what its queue will need), the new request's blocks included; cached prefixes
  are ignored.
* `session`: a request with a `session_id` joins the unit that served its session last (found by instance, so
  a unit that fused into a pipeline still counts); a new session, or one without an id, goes `least-load`.
  Sessions are remembered least recently used first, at most `MAX_SESSIONS`.
* `prompt-tree` (default): where the request's first token comes soonest, the cached prefix counted. With
  `hit` the blocks of the prompt's longest prefix a unit holds (neither allocated nor computed again there), a
  unit is ranked by, in order: whether the request's KV fits beside the unit's demand (`demand + new - hit <=
  total`: if not it would wait for memory); the engine steps until its first token, `(queued prompt tokens +
  prompt - hit tokens) / (token budget - running rows)` (the queue's prefill and its own, at the tokens a step
  has left after the decodes); its KV demand ratio as in `least-load`; fewer waiting; lower uid. Without prefix
  caching there is no tree and it is `least-load`.

**The global prompt tree** (`PromptTree`) is the router's own view of which unit holds which prefixes: a radix
tree over block-sized chunks whose nodes name their holders. Units do not answer queries; their prefix indexes
(`kunjax.blocks.PrefixIndex`) report every matchable node they gain or lose (`insert` / `evict` events), and the
tree applies them at the end of every `--routing-sync-steps`-th engine step, so what it knows is at most that
many steps old (bounded staleness: a placement may miss a prefix cached since, never count one that was
evicted more than that long ago). A unit added by a fuse or split is read whole; a unit that goes away takes
its holdings with it. Stale nodes (a replica's cache before its fuse, not matchable until the exchange moves
it) are not in the tree until they become matchable, nor is a node whose parent is not.

Owns routing decisions only: it never changes a unit's books.

Invariant (`PromptTree.check`, after every step in tests with `--routing-sync-steps 1`): the tree holds exactly
the nodes every unit's index would match (reachable from its root through matchable nodes), at their paths.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kunjax.blocks import PrefixIndex, PrefixNode
    from kunjax.request import Request
    from kunjax.unit import ServingUnit

ROUTING_MODES = ("prompt-tree", "least-load", "session")
MAX_SESSIONS = 100_000


class TreeNode:
    """One chunk of the global tree: its holders (unit uids) and children."""

    __slots__ = ("tokens", "parent", "children", "holders")

    def __init__(self, tokens: tuple[int, ...], parent: TreeNode | None):
        self.tokens = tokens
        self.parent = parent
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.holders: set[int] = set()


class PromptTree:
    """Which unit holds which block-sized prefix chunks, from the units' index events (module docstring)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.root = TreeNode((), None)
        self.placed: dict[int, dict[PrefixNode, TreeNode]] = {}  # uid -> its index's nodes -> where in the tree
        self.pending: list[tuple[bool, int, PrefixNode]] = []  # (insert?, uid, node), oldest first
        self.applied = 0  # events applied so far

    def listener(self, uid: int) -> Callable[[bool, PrefixNode], None]:
        pending = self.pending
        return lambda insert, node: pending.append((insert, uid, node))

    # ---- events ---------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Apply every pending event, oldest first."""
        for insert, uid, node in self.pending:
            if uid in self.placed:
                (self._insert if insert else self._evict)(uid, node)
        self.applied += len(self.pending)
        self.pending.clear()

    def _insert(self, uid: int, node: PrefixNode) -> None:
        placed = self.placed[uid]
        if node in placed or node.stale is not None or not node.blocks:
            return
        parent = self.root if node.parent is None or node.parent.parent is None else placed.get(node.parent)
        if parent is None:  # its parent is not matchable (yet): attached with the parent
            return
        stack = [(parent, node)]
        while stack:
            at, n = stack.pop()
            t = at.children.get(n.tokens)
            if t is None:
                t = at.children[n.tokens] = TreeNode(n.tokens, at)
            t.holders.add(uid)
            placed[n] = t
            stack.extend((t, c) for c in n.children.values()
                         if c.stale is None and c.blocks and c not in placed)

    def _evict(self, uid: int, node: PrefixNode) -> None:
        t = self.placed[uid].pop(node, None)
        if t is not None:
            self._release(t, uid)

    def _release(self, t: TreeNode, uid: int) -> None:
        t.holders.discard(uid)
        while t.parent is not None and not t.holders and not t.children:
            del t.parent.children[t.tokens]
            t = t.parent

    def add_unit(self, uid: int, index: PrefixIndex) -> None:
        """Hold everything `index` can match now, and follow its events from here on."""
        self.placed.setdefault(uid, {})
        index.listener = self.listener(uid)
        for node in index.root.children.values():
            self._insert(uid, node)

    def drop_unit(self, uid: int) -> None:
        # children before parents, so pruning never meets a node that still has placed children
        for _, t in sorted(self.placed.pop(uid, {}).items(), key=lambda kv: -kv[0].depth):
            self._release(t, uid)

    # ---- queries --------------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> dict[int, int]:
        """Per unit, how many leading blocks of `tokens` it holds (as `PrefixIndex.longest` counts them: at least
        one token left to compute)."""
        bs, t = self.block_size, self.root
        out: dict[int, int] = {}
        active: set[int] | None = None
        for d in range((len(tokens) - 1) // bs):
            t = t.children.get(tuple(tokens[d * bs:(d + 1) * bs]))
            if t is None:
                break
            active = set(t.holders) if active is None else active & t.holders
            if not active:
                break
            for uid in active:
                out[uid] = d + 1
        return out

    def check(self, indexes: Iterable[tuple[int, PrefixIndex]]) -> None:
        """The tree holds exactly what each index would match (module docstring); call with nothing pending."""
        assert not self.pending, "events not applied yet"
        seen = set()
        for uid, index in indexes:
            seen.add(uid)
            want: dict[PrefixNode, tuple] = {}
            stack = [(n, (n.tokens,)) for n in index.root.children.values()]
            while stack:
                n, path = stack.pop()
                if n.stale is not None or not n.blocks:
                    continue
                want[n] = path
                stack.extend((c, (*path, c.tokens)) for c in n.children.values())
            have = self.placed.get(uid, {})
            assert set(have) == set(want), (f"unit {uid}: the prompt tree holds {len(have)} nodes, its index "
                                            f"{len(want)}")
            for n, t in have.items():
                assert uid in t.holders and _path(t) == want[n], f"unit {uid}: a node is at the wrong path"
        assert seen == set(self.placed), f"the prompt tree holds units {sorted(self.placed)}, not {sorted(seen)}"
        stack = list(self.root.children.values())
        while stack:
            t = stack.pop()
            assert t.holders or t.children, "an empty node was not pruned"
            assert all(t in self.placed[u].values() for u in t.holders), "a holder without the node"
            stack.extend(t.children.values())


def _path(t: TreeNode) -> tuple:
    out = []
    while t.parent is not None:
        out.append(t.tokens)
        t = t.parent
    return tuple(reversed(out))


class Router:
    """Picks a unit for each new request (module docstring)."""

    def __init__(self, mode: str, block_size: int, sync_steps: int, caching: bool):
        if mode not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode {mode!r}: give one of {', '.join(ROUTING_MODES)}")
        self.mode, self.block_size, self.sync_steps = mode, block_size, sync_steps
        self.tree = PromptTree(block_size) if caching and mode == "prompt-tree" else None
        self.sessions: collections.OrderedDict[str, int] = collections.OrderedDict()  # session -> instance
        self.session_hits = 0  # requests placed by their session

    def add_unit(self, unit: ServingUnit) -> None:
        if self.tree is not None and unit.enable_prefix_caching:
            self.tree.add_unit(unit.uid, unit.index)

    def drop_unit(self, unit: ServingUnit) -> None:
        if self.tree is not None:
            self.tree.drop_unit(unit.uid)
            unit.index.listener = None

    def end_step(self, step_no: int) -> None:
        if self.tree is not None and step_no % self.sync_steps == 0:
            self.tree.sync()

    def pick(self, req: Request, candidates: Sequence[ServingUnit], unit_of_instance: Callable[[int], ServingUnit],
             session_id: str | None) -> ServingUnit:
        new = -(-(len(req.token_ids) + 1) // self.block_size)
        if self.mode == "session" and session_id is not None:
            inst = self.sessions.get(session_id)
            if inst is not None:
                unit = unit_of_instance(inst)
                if unit in candidates:
                    self.session_hits += 1
                    self.sessions.move_to_end(session_id)
                    return unit
        if self.tree is None:
            unit = min(candidates, key=lambda u: ((u.demand_blocks() + new) / u.total_blocks, len(u.waiting), u.uid))
        else:
            hits, bs, n = self.tree.match(req.token_ids), self.block_size, len(req.token_ids)

            def cost(u: ServingUnit) -> tuple:
                hit, demand = hits.get(u.uid, 0), u.demand_blocks()
                queued = sum(len(r.token_ids) - r.num_computed for r in u.waiting)
                steps = (queued + n - hit * bs) / max(u.shape.tokens - len(u.running), 1)
                return (demand + new - hit > u.total_blocks, steps, (demand + new - hit) / u.total_blocks,
                        len(u.waiting), u.uid)

            unit = min(candidates, key=cost)
        if self.mode == "session" and session_id is not None:
            self.sessions[session_id] = unit.members[0]
            self.sessions.move_to_end(session_id)
            if len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        return unit
