"""The router: which serving unit a new request joins (`--routing`), and the global prompt tree it reads.

Modes (MemServe's baselines and its locality-aware router):

* `least-load`: the unit with the least KV demand relative to its capacity (`demand_blocks / total_blocks`,
  running requests' blocks plus what its queue will need), the new request's blocks included; cached prefixes
  are ignored.
* `session`: a request with a `session_id` joins the unit that served its session last (found by instance, so
  a unit that fused into a pipeline still counts); a new session, or one without an id, goes `least-load`.
  Sessions are remembered least recently used first, at most `MAX_SESSIONS`.
* `prompt-tree` (default): the unit holding the most of the prompt, unless that delays its first token too much.
  With `hit` the blocks of the prompt's longest prefix a unit holds or will hold (neither allocated nor computed
  again there), each unit gets an estimate of the engine steps until the request's first token, `(queued prompt
  tokens + prompt - hit tokens) / (token budget - running rows)` (the queue's prefill, each waiting request less
  the cached tokens the router expected for it there, and its own, at the tokens a step has left after the
  decodes). Among the units where the request's KV fits beside their demand (`demand + new - hit <= total`;
  all, if none), those within `--routing-slack-steps` (8) of the soonest compete, and the largest `hit` wins;
  ties: fewer steps, lower KV demand ratio, fewer waiting, lower uid. Prefill saved now is prefill every later
  request of that prefix saves too, so a little queueing buys a lot of reuse; the slack bounds what it may
  cost. Without prefix caching there is no tree and it is `least-load`. (With the cache on and nothing of the
  prompt cached anywhere, the soonest first token still decides: on the bundled Mooncake trace at GPU scale
  falling back to `least-load` there cost 7 points of hit rate and 1.8 s of P99 TTFT at slack 4.)

**The global prompt tree** (`PromptTree`) is the router's own view of which unit holds which prefixes: a radix
tree over block-sized chunks whose nodes name their holders. Units do not answer queries; their prefix indexes
(`kunjax.blocks.PrefixIndex`) report every matchable node they gain or lose (`insert` / `evict` events), and the
tree applies them at the end of every `--routing-sync-steps`-th engine step, so what it knows is at most that
many steps old (bounded staleness: a placement may miss a prefix cached since, never count one that was
evicted more than that long ago). A request routed to a unit counts there for its prompt's full blocks until it
has computed them (`expect`): a burst of requests sharing a prefix meets where the first of them computes it,
instead of spreading before anyone has cached it. A lookup ignores an expectation whose request has computed its
prompt or left the unit; syncs forget such expectations a bounded number at a time (`sync`), so the tree's
upkeep per step grows with the requests routed, not with those queued. A unit added by a fuse or split is read
whole; a unit that goes away takes its holdings with it. Stale nodes (a replica's cache before its fuse, not
matchable until the exchange moves it) are not in the tree until they become matchable, nor is a node whose
parent is not.

Owns routing decisions only: it never changes a unit's books.

Invariant (`PromptTree.check`, after every step in tests with `--routing-sync-steps 1`): the tree's holders are
exactly the nodes every unit's index would match (reachable from its root through matchable nodes), at their
paths; a node with neither holders, children nor expectations is pruned.
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
EXPECTATIONS_PER_SYNC = 32  # expectations a sync checks besides twice those made since the last (`PromptTree.sync`)


class TreeNode:
    """One chunk of the global tree: its holders (unit uids) and children."""

    __slots__ = ("tokens", "parent", "children", "holders", "expected")

    def __init__(self, tokens: tuple[int, ...], parent: TreeNode | None):
        self.tokens = tokens
        self.parent = parent
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.holders: set[int] = set()
        self.expected: dict[int, Request] = {}  # uid -> a request routed there that will compute this chunk


class PromptTree:
    """Which unit holds which block-sized prefix chunks, from the units' index events (module docstring)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.root = TreeNode((), None)
        self.placed: dict[int, dict[PrefixNode, TreeNode]] = {}  # uid -> its index's nodes -> where in the tree
        self.pending: list[tuple[bool, int, PrefixNode]] = []  # (insert?, uid, node), oldest first
        self.applied = 0  # events applied so far
        # (uid, request, the nodes it is expected at): routed, maybe not computed yet; oldest checked first
        self.expectations: collections.deque[tuple[int, Request, list[TreeNode]]] = collections.deque()
        self.routed = 0  # requests expected since the last sync

    def listener(self, uid: int) -> Callable[[bool, PrefixNode], None]:
        pending = self.pending
        return lambda insert, node: pending.append((insert, uid, node))

    # ---- events ---------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Apply every pending event, oldest first; forget some of the expectations that no longer hold.

        An expectation ends when its request has computed its prompt or left the unit. `match` checks each one it
        meets, so forgetting them only frees the tree; a sync checks a bounded number, oldest first, turning the
        ones still computing to the back — O(requests routed), not O(requests queued), per sync."""
        for insert, uid, node in self.pending:
            if uid in self.placed:
                (self._insert if insert else self._evict)(uid, node)
        self.applied += len(self.pending)
        self.pending.clear()
        budget = min(len(self.expectations), EXPECTATIONS_PER_SYNC + 2 * self.routed)
        self.routed = 0
        for _ in range(budget):
            uid, req, nodes = self.expectations.popleft()
            if _computing(req, uid):
                self.expectations.append((uid, req, nodes))
                continue
            for t in nodes:
                if t.expected.get(uid) is req:
                    del t.expected[uid]
                    self._prune(t)

    def expect(self, uid: int, req: Request) -> None:
        """`req` was routed to unit `uid`: until it has computed its prompt there, count its prompt's full blocks
        as held by `uid` (so a burst of requests sharing a prefix meets where the first of them computes it)."""
        bs, t, tokens = self.block_size, self.root, req.token_ids
        nodes = []
        for d in range((len(tokens) - 1) // bs):
            chunk = tuple(tokens[d * bs:(d + 1) * bs])
            nxt = t.children.get(chunk)
            if nxt is None:
                nxt = t.children[chunk] = TreeNode(chunk, t)
            t = nxt
            if uid not in t.holders:
                t.expected[uid] = req
                nodes.append(t)
        if nodes:
            self.expectations.append((uid, req, nodes))
            self.routed += 1

    def _insert(self, uid: int, node: PrefixNode) -> None:
        placed = self.placed[uid]
        if node in placed or not node.matchable:
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
                         if c.matchable and c not in placed)

    def _evict(self, uid: int, node: PrefixNode) -> None:
        t = self.placed[uid].pop(node, None)
        if t is not None:
            self._release(t, uid)

    def _release(self, t: TreeNode, uid: int) -> None:
        t.holders.discard(uid)
        self._prune(t)

    def _prune(self, t: TreeNode) -> None:
        while t.parent is not None and not t.holders and not t.children and not t.expected:
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
        """Per unit, how many leading blocks of `tokens` it holds or will hold (a request routed there is computing
        them), as `PrefixIndex.longest` counts them: at least one token left to compute."""
        bs, t = self.block_size, self.root
        out: dict[int, int] = {}
        active: set[int] | None = None
        for d in range((len(tokens) - 1) // bs):
            t = t.children.get(tuple(tokens[d * bs:(d + 1) * bs]))
            if t is None:
                break
            have = t.holders.union(u for u, r in t.expected.items() if _computing(r, u)) if t.expected else t.holders
            active = set(have) if active is None else active & have
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
                if not n.matchable:
                    continue
                want[n] = path
                stack.extend((c, (*path, c.tokens)) for c in n.children.values())
            have = self.placed.get(uid, {})
            assert set(have) == set(want), (f"unit {uid}: the prompt tree holds {len(have)} nodes, its index "
                                            f"{len(want)}")
            for n, t in have.items():
                assert uid in t.holders and _path(t) == want[n], f"unit {uid}: a node is at the wrong path"
        assert seen == set(self.placed), f"the prompt tree holds units {sorted(self.placed)}, not {sorted(seen)}"
        held = {u: {id(t) for t in placed.values()} for u, placed in self.placed.items()}
        stack = list(self.root.children.values())
        while stack:
            t = stack.pop()
            assert t.holders or t.children or t.expected, "an empty node was not pruned"
            assert all(id(t) in held[u] for u in t.holders), "a holder without the node"
            stack.extend(t.children.values())


def _computing(req: Request, uid: int) -> bool:
    """`req` is still on unit `uid` and has not computed its prompt yet."""
    return req.unit == uid and not req.finished and req.num_computed < req.num_prompt_tokens


def _path(t: TreeNode) -> tuple:
    out = []
    while t.parent is not None:
        out.append(t.tokens)
        t = t.parent
    return tuple(reversed(out))


class Router:
    """Picks a unit for each new request (module docstring)."""

    def __init__(self, mode: str, block_size: int, sync_steps: int, caching: bool, slack_steps: float = 8.0):
        if mode not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode {mode!r}: give one of {', '.join(ROUTING_MODES)}")
        self.mode, self.block_size, self.sync_steps, self.slack_steps = mode, block_size, sync_steps, slack_steps
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

    def routed(self, req: Request, unit: ServingUnit) -> None:
        """`req` joined `unit` (after `pick`, once the unit took it)."""
        if self.tree is not None and unit.enable_prefix_caching:
            self.tree.expect(unit.uid, req)

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
        if self.tree is None:  # least-load, session's new sessions, or no prefix caching
            unit = min(candidates, key=lambda u: ((u.demand_blocks() + new) / u.total_blocks, len(u.waiting), u.uid))
        else:
            hits, bs, n = self.tree.match(req.token_ids), self.block_size, len(req.token_ids)
            rows = []
            for u in candidates:
                hit, demand = hits.get(u.uid, 0), u.demand_blocks()
                steps = (u.queued_tokens() + n - hit * bs) / max(u.shape.tokens - len(u.running), 1)
                rows.append((demand + new - hit > u.total_blocks, steps, -hit, (demand + new - hit) / u.total_blocks,
                             len(u.waiting), u.uid, u))
            fits = [r for r in rows if not r[0]] or rows
            soonest = min(r[1] for r in fits)
            near = [r for r in fits if r[1] <= soonest + self.slack_steps]
            unit = min(near, key=lambda r: r[2:6])[-1]
            req.expected_cached_tokens = hits.get(unit.uid, 0) * bs
        if self.mode == "session" and session_id is not None:
            self.sessions[session_id] = unit.members[0]
            self.sessions.move_to_end(session_id)
            if len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        return unit
