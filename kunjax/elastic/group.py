"""Host side of a pipeline group: per-stage block books, micro-batch scheduling, remote work lists, KV exchange.

A group serves its requests as k pipeline stages (DESIGN.md §6). Every request keeps, per stage s, a block table
of pipeline block ids in stage s's pool (each logical block of BS tokens has one block on every stage, holding
that stage's L/k layers). Requests that were running at the drop are *stale*: their pre-drop history is still on
their home device h, in the old full-layer blocks b, which after the reshape are the pipeline blocks `b·k + s`
for every stage s. For s == h that history is local; for s != h stage s reads it by remote attention until the
live exchange has copied it into stage s's own blocks. New tokens are always written on each stage's own blocks.

One group step is k ticks. At each tick a micro-batch enters stage 0 (decodes and prefill chunks of requests
that are not in flight, under the micro-batch token budget), every stage processes the micro-batch one stage
behind, and the micro-batch leaving the last stage is sampled; the host reads its tokens before the next tick,
so a request re-enters the pipe right after it leaves. Each stage's metadata is built when the stage processes
the micro-batch, so an exchange finishing between ticks takes effect at once.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import heapq
import math
import statistics
import time
from collections.abc import Iterable

import numpy as np

from kunjax.block_manager import NULL_BLOCK
from kunjax.elastic.pipeline import GroupShapes, TickInputs
from kunjax.instance import MAX_SUPPRESSED, suppressed_ids
from kunjax.request import Request, RequestStatus
from kunjax.sampling import pack_sampling


class StageAllocator:
    """Pipeline block ids of one stage's device: base `[1, NBp)` then extension `[NBp, NBp + NE)`.

    Refcounted (requests that shared prefix blocks before the drop share their history). The lowest free id is
    handed out first (base before extension), so live blocks pack at the low end of the pool and whole
    full-layer blocks stay free at the high end, which is where a restore moves requests home.
    `ext_open = False` stops allocation from the extension (before a restore).
    Invariant: `num_free + num_used == total`.
    """

    def __init__(self, num_base: int, num_ext: int, taken: Iterable[int] = ()):
        self.num_base, self.num_ext = num_base, num_ext
        self.total = num_base - 1 + num_ext
        self._ref = collections.Counter()
        for b in taken:
            self._ref[b] += 1
        self._free_base = [b for b in range(1, num_base) if b not in self._ref]  # heaps (sorted lists are heaps)
        self._free_ext = [b for b in range(num_base, num_base + num_ext) if b not in self._ref]
        self.ext_open = True

    @property
    def num_free(self) -> int:
        return len(self._free_base) + len(self._free_ext)

    @property
    def num_used(self) -> int:
        return len(self._ref)

    @property
    def num_allocatable(self) -> int:
        return len(self._free_base) + (len(self._free_ext) if self.ext_open else 0)

    def is_free(self, b: int) -> bool:
        return b != NULL_BLOCK and b not in self._ref

    def refcount(self, b: int) -> int:
        return self._ref.get(b, 0)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_allocatable:
            raise RuntimeError(f"need {n} pipeline blocks, {self.num_allocatable} allocatable")
        out = []
        for _ in range(n):
            b = heapq.heappop(self._free_base if self._free_base else self._free_ext)
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if self._ref.get(b, 0) <= 0:
                raise ValueError(f"double free or invalid pipeline block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                del self._ref[b]
                heapq.heappush(self._free_base if b < self.num_base else self._free_ext, b)

    def check(self) -> None:
        free = set(self._free_base) | set(self._free_ext)
        assert len(free) == self.num_free, "duplicate pipeline block on a free list"
        assert not free & set(self._ref), "pipeline block both free and used"
        assert NULL_BLOCK not in free and NULL_BLOCK not in self._ref
        assert self.num_free + self.num_used == self.total, (
            f"stage books do not balance: free {self.num_free} + used {self.num_used} != {self.total}")


@dataclasses.dataclass(eq=False)
class StaleKV:
    """Pre-drop history of a request that was running at the drop."""

    home: int  # stage index of its home device
    old_blocks: list[int]  # full-layer block ids on the home device (before the reshape)
    length: int  # tokens of history
    pending: set[int]  # stages != home whose layers are still read remotely
    copied: dict[int, int] = dataclasses.field(default_factory=dict)  # stage -> history blocks copied so far

    def history_ids(self, k: int, stage: int) -> list[int]:
        """Pipeline ids on the home device holding stage `stage`'s layers of the history."""
        return [b * k + stage for b in self.old_blocks]


@dataclasses.dataclass(eq=False)
class GroupSeq:
    req: Request
    tables: list[list[int]]  # per stage: pipeline block id of each logical block (NULL for remote history)
    stale: StaleKV | None = None
    in_flight: bool = False
    aborted: bool = False

    @property
    def num_logical(self) -> int:
        return len(self.tables[0])


@dataclasses.dataclass
class Scheduled:
    seq: GroupSeq
    start: int
    num_tokens: int
    sample: bool


@dataclasses.dataclass
class MicroBatch:
    items: list[Scheduled]
    tokens: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    seq_ids: np.ndarray  # [T] int32
    valid: np.ndarray  # [T] bool
    context_lens: np.ndarray  # [S] int32
    logits_indices: np.ndarray  # [S] int32
    suppress_ids: np.ndarray  # [S, MAX_SUPPRESSED] int32
    sampling: tuple  # SamplingArrays fields, [S] each


class GroupBooks:
    """Requests, block books and micro-batches of one pipeline group (no device arrays here)."""

    def __init__(self, shapes: GroupShapes, block_size: int, max_running: int):
        self.gs = shapes
        self.k = shapes.k
        self.block_size = block_size
        self.max_running = max_running
        self.stages: list[StageAllocator] = []
        self.running: list[GroupSeq] = []  # arrival order
        self.waiting: collections.deque[Request] = collections.deque()
        self.seqs: dict[str, GroupSeq] = {}
        self.at_stage: list[MicroBatch | None] = [None] * self.k
        self.admitting = True  # False while draining for a restore
        self.num_preemptions = 0
        self.blocks_exchanged = 0
        self.recent_prompts: collections.deque[int] = collections.deque(maxlen=64)  # for `chunk_cap`

    # ---- counts -------------------------------------------------------------------------------------
    def blocks_for(self, n: int) -> int:
        return math.ceil(n / self.block_size)

    @property
    def total_blocks(self) -> int:  # logical blocks: one pipeline block on every stage
        return self.stages[0].total if self.stages else 0

    @property
    def free_blocks(self) -> int:
        return min(s.num_allocatable for s in self.stages)

    def demand_blocks(self) -> int:
        used = max(s.num_used for s in self.stages)
        return used + sum(self.blocks_for(len(r.token_ids) + 1) for r in self.waiting)

    @property
    def num_remote_dependent(self) -> int:
        return sum(1 for q in self.running if q.stale is not None and q.stale.pending)

    @property
    def in_flight(self) -> bool:
        return any(mb is not None for mb in self.at_stage)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.in_flight)

    # ---- membership ---------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if self.blocks_for(req.max_total_len) > self.total_blocks:
            raise ValueError(f"request {req.request_id} may need {self.blocks_for(req.max_total_len)} KV blocks "
                             f"but the group holds {self.total_blocks}")
        req.status = RequestStatus.WAITING
        keys = [r.arrival_time for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, req.arrival_time), req)

    def adopt_running(self, req: Request, home: int) -> None:
        """A request running on member `home` at the drop: its history stays there, read remotely.

        Call `open_books` once every request is adopted."""
        k = self.k
        if not req.blocks:
            seq = GroupSeq(req, [[] for _ in range(k)])
        else:
            stale = StaleKV(home=home, old_blocks=list(req.blocks), length=req.num_computed,
                            pending={s for s in range(k) if s != home})
            tables = [[NULL_BLOCK] * len(req.blocks) for _ in range(k)]
            tables[home] = stale.history_ids(k, home)
            seq = GroupSeq(req, tables, stale)
        req.blocks, req.block_hashes = [], []
        self.running.append(seq)
        self.seqs[req.request_id] = seq

    def open_books(self, num_base: int, num_ext: int) -> None:
        """Stage books after the drop: each stale request holds all k pipeline ids of its old blocks on its home
        device; on the other stages, its partial last block gets a fresh block for the tokens that follow."""
        k, bs = self.k, self.block_size
        taken: list[list[int]] = [[] for _ in range(k)]
        for q in self.running:
            if q.stale is not None:
                taken[q.stale.home] += [b * k + s for b in q.stale.old_blocks for s in range(k)]
        self.stages = [StageAllocator(num_base, num_ext, taken[s]) for s in range(k)]
        for q in self.running:
            st = q.stale
            if st is None:
                continue
            full = st.length // bs
            for s in st.pending:
                for j in range(full, len(st.old_blocks)):
                    q.tables[s][j] = self.stages[s].allocate(1)[0]

    def _release(self, seq: GroupSeq) -> None:
        for s, table in enumerate(seq.tables):
            self.stages[s].free(b for b in table if b != NULL_BLOCK)
        st = seq.stale
        if st is not None:
            for s in st.pending:
                self.stages[st.home].free(st.history_ids(self.k, s))
            st.pending.clear()
        seq.stale = None
        seq.tables = [[] for _ in range(self.k)]
        seq.req.num_computed = 0

    def finish(self, req: Request) -> None:
        seq = self.seqs.pop(req.request_id)
        self.running.remove(seq)
        self._release(seq)
        req.status = RequestStatus.FINISHED

    def abort(self, req: Request) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
            return
        seq = self.seqs.get(req.request_id)
        if seq is None:
            return
        if seq.in_flight:
            seq.aborted = True  # its micro-batch still writes into its blocks: release when it leaves
            return
        self.seqs.pop(req.request_id)
        self.running.remove(seq)
        self._release(seq)

    # ---- scheduling ---------------------------------------------------------------------------------
    def _grow(self, seq: GroupSeq, upto_tokens: int) -> bool:
        need = self.blocks_for(upto_tokens) - seq.num_logical
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        for s in range(self.k):
            seq.tables[s].extend(self.stages[s].allocate(need))
        return True

    def _preempt_one(self, keep: GroupSeq) -> bool:
        """Recompute-preempt the latest arrival that is not in flight (never `keep`); False when none can go."""
        for victim in reversed(self.running):
            if victim is keep or victim.in_flight:
                continue
            self.running.remove(victim)
            self.seqs.pop(victim.req.request_id)
            self._release(victim)
            victim.req.num_preemptions += 1
            self.num_preemptions += 1
            self.add(victim.req)
            return True
        return False

    def chunk_cap(self) -> int:
        """Longest prefill chunk while others wait: the typical (median recent) prompt length, so one long prompt
        does not fill whole micro-batches while short ones queue behind it (KunServe's micro-batch balance)."""
        prefilling = sum(1 for q in self.running if len(q.req.token_ids) - q.req.num_computed > 1)
        if len(self.waiting) + prefilling < 2 or not self.recent_prompts:
            return self.gs.tokens
        return max(self.gs.buckets[0], int(statistics.median(self.recent_prompts)))

    def schedule(self) -> MicroBatch | None:
        """The micro-batch entering stage 0 this tick (None: nothing to run).

        Decodes and prefills in progress first (arrival order), then new requests (FCFS); each prefill chunk is
        capped by `chunk_cap`. Every tick's micro-batch is filled this way up to the same budget, which is what
        balance means for lockstep stages with one entering slot per tick.
        """
        gs = self.gs
        budget, items = gs.tokens, []
        cap = self.chunk_cap()
        remote_rows: collections.Counter[int] = collections.Counter()
        for seq in list(self.running):
            if budget <= 0 or len(items) >= gs.seqs:
                break
            if seq.in_flight or self.seqs.get(seq.req.request_id) is not seq:
                continue  # in the pipe, or preempted earlier in this loop
            req = seq.req
            n = min(len(req.token_ids) - req.num_computed, budget, cap)
            if n <= 0:
                continue  # its last token has not been applied yet (never happens between ticks)
            st = seq.stale
            if st is not None and st.pending:
                n = min(n, gs.remote_rows - remote_rows[st.home])  # its rows travel to the home device
                if n <= 0:
                    continue
            while not self._grow(seq, req.num_computed + n):
                if not self._preempt_one(keep=seq):
                    break
            else:
                if st is not None and st.pending:
                    remote_rows[st.home] += n
                seq.in_flight = True
                items.append(Scheduled(seq, req.num_computed, n, req.num_computed + n == len(req.token_ids)))
                budget -= n
        while (self.admitting and self.waiting and budget > 0 and len(items) < gs.seqs
               and len(self.running) < self.max_running):
            req = self.waiting[0]
            n = min(len(req.token_ids), budget, cap)
            seq = GroupSeq(req, [[] for _ in range(self.k)])
            if not self._grow(seq, n):
                break
            self.waiting.popleft()
            self.recent_prompts.append(len(req.token_ids))
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            req.num_computed = 0
            self.running.append(seq)
            self.seqs[req.request_id] = seq
            seq.in_flight = True
            items.append(Scheduled(seq, 0, n, n == len(req.token_ids)))
            budget -= n
        if not items:
            return None
        return self._pack(items)

    def _pack(self, items: list[Scheduled]) -> MicroBatch:
        gs = self.gs
        t, s = gs.tokens, gs.seqs
        mb = MicroBatch(items, np.zeros(t, np.int32), np.zeros(t, np.int32), np.zeros(t, np.int32),
                        np.zeros(t, bool), np.zeros(s, np.int32), np.zeros(s, np.int32),
                        np.full((s, MAX_SUPPRESSED), -1, np.int32), ())
        row = 0
        for i, it in enumerate(items):
            req, n = it.seq.req, it.num_tokens
            mb.tokens[row:row + n] = req.token_ids[it.start:it.start + n]
            mb.positions[row:row + n] = np.arange(it.start, it.start + n)
            mb.seq_ids[row:row + n] = i
            mb.valid[row:row + n] = True
            mb.context_lens[i] = it.start
            mb.logits_indices[i] = row + n - 1
            banned = suppressed_ids(req)
            mb.suppress_ids[i, :len(banned)] = banned
            row += n
        reqs = [it.seq.req for it in items]
        mb.sampling = tuple(pack_sampling([r.params for r in reqs], [r.seed for r in reqs],
                                          [r.num_output_tokens for r in reqs], s))
        return mb

    # ---- tick inputs --------------------------------------------------------------------------------
    def tick_bucket(self) -> int:
        """Rows of the next tick: the smallest compiled bucket holding every in-flight micro-batch."""
        need = max((sum(it.num_tokens for it in mb.items) for mb in self.at_stage if mb is not None), default=0)
        return next(b for b in self.gs.buckets if b >= need)

    def tick_inputs(self, rows: int | None = None) -> tuple[TickInputs, bool]:
        """Host arrays of the next tick from `at_stage`; also whether any row needs remote attention."""
        gs, k, bs = self.gs, self.k, self.block_size
        t = self.tick_bucket() if rows is None else rows
        s, mbw, r = gs.seqs, gs.max_blocks, gs.remote_rows
        inp = TickInputs(
            positions=np.zeros((k, t), np.int32), seq_ids=np.zeros((k, t), np.int32),
            valid=np.zeros((k, t), bool), slot_mapping=np.zeros((k, t), np.int32),
            block_tables=np.zeros((k, s, mbw), np.int32), context_lens=np.zeros((k, s), np.int32),
            context_starts=np.zeros((k, s), np.int32), send_rows=np.full((k, k, r), -1, np.int32),
            recv_tables=np.zeros((k, k, r, mbw), np.int32), recv_lens=np.zeros((k, k, r), np.int32),
            recv_pos=np.zeros((k, k, r), np.int32), tokens_in=np.zeros(t, np.int32),
            logits_indices=np.zeros(s, np.int32), suppress_ids=np.full((s, MAX_SUPPRESSED), -1, np.int32),
            temperature=np.zeros(s, np.float32), top_k=np.zeros(s, np.int32), top_p=np.ones(s, np.float32),
            min_p=np.zeros(s, np.float32), seeds=np.zeros(s, np.uint32), counters=np.zeros(s, np.int32))
        remote = False
        for stage, mb in enumerate(self.at_stage):
            if mb is None:
                continue
            inp.positions[stage], inp.seq_ids[stage] = mb.positions[:t], mb.seq_ids[:t]
            inp.valid[stage] = mb.valid[:t]
            inp.context_lens[stage] = mb.context_lens
            filled = collections.Counter()
            row = 0
            for i, it in enumerate(mb.items):
                seq, n = it.seq, it.num_tokens
                table = np.asarray(seq.tables[stage], np.int32)
                pos = mb.positions[row:row + n]
                inp.slot_mapping[stage, row:row + n] = table[pos // bs] * bs + pos % bs
                inp.block_tables[stage, i, :len(table)] = table
                st = seq.stale
                if st is not None and stage in st.pending:
                    remote = True
                    inp.context_starts[stage, i] = st.length
                    hist = st.history_ids(k, stage)
                    for p_row in range(row, row + n):
                        j = filled[st.home]
                        filled[st.home] += 1
                        inp.send_rows[stage, st.home, j] = p_row
                        inp.recv_tables[st.home, stage, j, :len(hist)] = hist
                        inp.recv_lens[st.home, stage, j] = st.length
                        inp.recv_pos[st.home, stage, j] = mb.positions[p_row]
                row += n
        if self.at_stage[0] is not None:
            inp.tokens_in = self.at_stage[0].tokens[:t]
        last = self.at_stage[k - 1]
        if last is not None:
            inp.logits_indices, inp.suppress_ids = last.logits_indices, last.suppress_ids
            (inp.temperature, inp.top_k, inp.top_p, inp.min_p, inp.seeds, inp.counters) = last.sampling
        return inp, remote

    def exit(self, mb: MicroBatch, tokens, logprob, top_ids, top_lps) -> list[tuple]:
        """The micro-batch left the last stage: commit its KV and return its samples (engine order)."""
        out = []
        for i, it in enumerate(mb.items):
            seq = it.seq
            seq.in_flight = False
            if seq.aborted:
                if self.seqs.get(seq.req.request_id) is seq:  # (the id may already be reused by a new request)
                    del self.seqs[seq.req.request_id]
                if seq in self.running:
                    self.running.remove(seq)
                self._release(seq)
                continue
            seq.req.num_computed = it.start + it.num_tokens
            if it.sample:
                out.append((seq.req, int(tokens[i]), float(logprob[i]), top_ids[i], top_lps[i]))
        return out

    # ---- live KV exchange ---------------------------------------------------------------------------
    def plan_exchange(self, limit: int) -> list[tuple[int, int, int, int, int, int]]:
        """Next batch of history blocks to move to the stage owning their layers.

        Returns copies `(src_stage, src_id, dst_stage, dst_id, lo, hi)`, at most `limit` per (src, dst) pair, in
        one deterministic order (request arrival, then stage, then block). Destination blocks are allocated
        here; a stage whose history is fully copied stops being remote once `commit_exchange` runs.
        """
        k, bs = self.k, self.block_size
        per_pair: collections.Counter[tuple[int, int]] = collections.Counter()
        copies = []
        for seq in self.running:
            st = seq.stale
            if st is None or not st.pending:
                continue
            n_hist = len(st.old_blocks)
            full = st.length // bs
            for s in sorted(st.pending):
                done = st.copied.get(s, 0)
                room = limit - per_pair[(st.home, s)]
                if room <= 0:
                    continue
                todo = list(range(done, n_hist))[:room]
                fresh = [j for j in todo if j < full]
                if self.stages[s].num_allocatable < len(fresh):
                    continue
                ids = self.stages[s].allocate(len(fresh))
                for j in todo:
                    if j < full:
                        seq.tables[s][j] = ids.pop(0)
                        lo, hi = 0, bs
                    else:  # the partial boundary block: its new tokens are already there, copy the head only
                        lo, hi = 0, max(st.length - j * bs, 0)
                    st.copied[s] = j + 1
                    if hi == 0:
                        continue
                    copies.append((st.home, st.old_blocks[j] * k + s, s, seq.tables[s][j], lo, hi))
                    per_pair[(st.home, s)] += 1
        return copies

    def commit_exchange(self) -> int:
        """After the copies landed: stages whose history is complete read locally; returns stages finished."""
        finished = 0
        for seq in self.running:
            st = seq.stale
            if st is None:
                continue
            for s in sorted(st.pending):
                if st.copied.get(s, 0) >= len(st.old_blocks):
                    st.pending.discard(s)
                    self.stages[st.home].free(st.history_ids(self.k, s))
                    finished += 1
            if not st.pending:
                seq.stale = None
        return finished

    # ---- restore ------------------------------------------------------------------------------------
    def plan_move_home(self, num_old_blocks: int, seats: int) -> dict[GroupSeq, tuple[int, list[int]]] | None:
        """Home member and full-layer blocks for every running request, using only old blocks whose k pipeline
        blocks are all free on that device (so no copy overwrites a block another copy still reads); None when
        they do not fit (try again later)."""
        k = self.k
        free_old = [[b for b in range(1, num_old_blocks)
                     if all(self.stages[h].is_free(b * k + s) for s in range(k))] for h in range(k)]
        seated = [0] * k
        plan: dict[GroupSeq, tuple[int, list[int]]] = {}
        for seq in sorted(self.running, key=lambda q: -q.num_logical):
            need = seq.num_logical
            h = max(range(k), key=lambda d: (len(free_old[d]) if seated[d] < seats else -1, -d))
            if seated[h] >= seats or len(free_old[h]) < need:
                return None
            plan[seq] = (h, free_old[h][:need])
            del free_old[h][:need]
            seated[h] += 1
        return plan

    def check(self) -> None:
        """Every stage's books balance and each pipeline block's refcount equals its holders."""
        held = [collections.Counter() for _ in range(self.k)]
        for seq in self.running:
            for s, table in enumerate(seq.tables):
                held[s].update(b for b in table if b != NULL_BLOCK)
            st = seq.stale
            if st is not None:
                for s in st.pending:
                    held[st.home].update(st.history_ids(self.k, s))
        for s, alloc in enumerate(self.stages):
            alloc.check()
            for b in set(held[s]) | set(alloc._ref):
                assert alloc.refcount(b) == held[s][b], (
                    f"stage {s} pipeline block {b}: refcount {alloc.refcount(b)} but {held[s][b]} holders")
