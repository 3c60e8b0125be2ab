"""A serving unit: k pipeline stages over k instances (k = 1: a replica), its requests, books and micro-batches.

One abstraction for both modes (DESIGN.md §4): a replica is the unit of one stage; a pipeline group fused from k
replicas is the unit of k stages. Each stage has a refcounted, segmented `BlockAllocator` (`kunjax.blocks`), and
every logical block of a request has one block id on every stage (`Request.tables[s]`), holding that stage's
layers. The unit owns what runs: the waiting, running and swapped queues, the scheduler (`schedule`), the
micro-batches in the pipe (`at_stage`), the prefix index's use, and what each tick computes (`tick_work`; its host
arrays, `tick_inputs`, for an executor that reads them).

One engine step of a unit is k ticks. At each tick a micro-batch enters stage 0, every stage processes the
micro-batch one stage behind, and the one leaving the last stage is sampled; its tokens are applied before the
next tick is scheduled, so a request re-enters the pipe right after it leaves. With k = 1 a tick is the step.

Scheduling (`schedule`, the same for every k): running requests first in arrival order (one decode token each,
or the next chunk of a prefill), then the policy's own returning requests (`SchedulerHooks.resume`, e.g. swap-ins),
then waiting requests FCFS, each with as large a prefill chunk as the micro-batch's token budget leaves. When a
running request needs a block and none is allocatable, the latest arrival that is not in the pipe is preempted,
the way the policy says (`SchedulerHooks.preempt`: recompute by default). In a pipeline (k > 1) a prefill chunk is
capped at the typical prompt length while other prefills wait (the micro-batch balance of the paper's pipeline).

Requests that were running when their replicas fused are *stale* (`StaleKV`): their pre-drop history stays on
their home device, in the old full-layer blocks b, which after the reshape are the pipeline blocks `b·k + s`; for
the other stages it is read by remote attention until the live exchange (`plan_exchange`) has copied each
stage's layers to the stage that owns them. New tokens are always written on each stage's own blocks.

Never touches device memory: every copy goes out as a memory operation (`kunjax.plan`) through the memory pool.
Invariant (`check`): per stage, each block's refcount equals its holders (requests' tables, stale histories,
in-flight aborted requests until they leave the pipe, the policy's reservations).
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from kunjax.blocks import NULL_BLOCK, BlockAllocator, PrefixIndex
from kunjax.microbatch import MicroBatch, Scheduled
from kunjax.packing import DecodeInputs
from kunjax.plan import (
    SMALL_BATCH_ROWS,
    StageLoad,
    StepInputs,
    TickWork,
    UnitShape,
    fill_tables,
    flat_tables,
)
from kunjax.queues import ArrivalQueue, insert_by_arrival
from kunjax.request import Request, RequestStatus

EMPTY_STAGE = StageLoad()


class SchedulerHooks(Protocol):
    """What a memory policy may change about scheduling (`kunjax.policies`); `kunjax.policies.base.PolicyHooks`
    is the default (recompute) and every policy's base."""

    def begin_step(self, unit: ServingUnit) -> set[Request]:
        """Before a micro-batch is scheduled; returns running requests to leave out of it (parked)."""

    def preempt(self, unit: ServingUnit, victim: Request) -> None:
        """`victim` (already out of `running`) must give up its device blocks."""

    def resume(self, unit: ServingUnit, items: list[Scheduled], budget: int) -> int:
        """After the running requests: bring the policy's own requests back into `items`; returns the budget."""

    def may_admit(self, unit: ServingUnit) -> bool: ...

    def grow(self, unit: ServingUnit, req: Request, num_tokens: int) -> bool | None:
        """Give `req` room for `num_tokens` more tokens its own way, or None for the unit's way."""

    def admit_fallback(self, unit: ServingUnit, req: Request, num_tokens: int) -> bool:
        """A fresh waiting request's blocks did not fit: admit it some other way (True) or let it wait."""

    def release(self, unit: ServingUnit, req: Request) -> None:
        """`req` gives back everything it holds (called before its tables are freed)."""

    def commit(self, unit: ServingUnit, req: Request) -> bool:
        """After a tick computed `req`'s chunk; True when the policy keeps its blocks out of the prefix index."""

    def group_tables(self, unit: ServingUnit, req: Request) -> list[list[int]] | None:
        """Per layer group, `req`'s slot of each logical block this tick (G > 1), or None for whole blocks."""

    def after_launch(self, unit: ServingUnit, mb: MicroBatch) -> None:
        """Right after the tick that ran `mb` was handed to the executor."""

    def forget(self, unit: ServingUnit, req: Request) -> None:
        """`req` left the unit (finished, aborted, migrated away)."""


class ServingUnit:
    """Requests, block books and micro-batches of one unit of `shape.k` stages (module docstring)."""

    def __init__(self, uid: int, members: tuple[int, ...], shape: UnitShape, allocators: Sequence[BlockAllocator],
                 hooks: SchedulerHooks, *, block_size: int, enable_prefix_caching: bool, now: Callable[[], float]):
        self.uid = uid
        self.members = members
        self.shape = shape
        self.k = shape.k
        self.stages = list(allocators)
        self.index = PrefixIndex(self.stages, block_size)
        self.hooks = hooks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._now = now
        self.max_running = self.k * shape.seqs
        self.waiting = ArrivalQueue(self._weigh_waiting, 2)  # arrival order; (blocks to start, tokens to compute)
        self.running: list[Request] = []  # admission order (the latest admitted is preempted first)
        self.swapped = ArrivalQueue(self._weigh_swapped, 1)  # KV on the host tier (swap policy); blocks to resume
        self.aborted_in_flight: list[Request] = []  # left the unit while in the pipe: their blocks go when it exits
        self.at_stage: list[MicroBatch | None] = [None] * self.k
        self.admitting = True  # False while draining for a restore
        self.ticks = 0
        self.remote_ticks = 0
        self.num_preemptions = 0
        self.blocks_exchanged = 0
        self.recent_prompts: collections.deque[int] = collections.deque(maxlen=64)  # for `chunk_cap`
        self.last_tick: tuple[int, int] = (0, 0)  # (tokens, rows of the bucket) of the last tick launched
        # More of a fresh request's prefix past its device match, in order: `HostCache.swap_in`, `PrefixPuller.pull`
        self.prefix_sources: list[Callable[[ServingUnit, Request, list], list]] = []
        self.role = "mixed"  # prefill / decode / mixed (`kunjax.disagg`)
        self._decode_inputs = DecodeInputs(block_size)  # a replica's previous tick inputs (`tick_inputs`)

    # ---- counts -------------------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    @property
    def total_blocks(self) -> int:
        """Logical blocks (one block on every stage each)."""
        return self.stages[0].total

    @property
    def num_allocatable(self) -> int:
        """Logical blocks a request could get now: free on every stage, plus cached prefixes it may evict."""
        return min(a.num_free_allocatable + a.num_cached for a in self.stages)

    @property
    def num_used(self) -> int:
        return max(a.num_used for a in self.stages)

    def _weigh_waiting(self, req: Request) -> tuple[int, int]:
        """A waiting request's blocks to start (its known tokens plus the next one) and tokens to compute (past
        what the router expected to find cached where it sent it)."""
        n = len(req.token_ids)
        return self.blocks_for(n + 1), n - max(req.num_computed, req.expected_cached_tokens)

    def _weigh_swapped(self, req: Request) -> tuple[int]:
        return (self.blocks_for(req.num_computed + 1),)

    def queued_blocks(self) -> int:
        """Blocks the waiting requests will need to start (their known tokens plus the next one)."""
        return self.waiting.total(0)

    def queued_tokens(self) -> int:
        """Tokens the waiting requests have to compute, past what the router expected to find cached."""
        return self.waiting.total(1)

    def demand_blocks(self) -> int:
        """KV demand: blocks held by running requests plus what the queued and swapped requests need to start."""
        return self.num_used + self.waiting.total(0) + self.swapped.total(0)

    def can_ever_fit(self, req: Request) -> bool:
        return self.blocks_for(req.max_total_len) <= self.total_blocks

    @property
    def in_flight(self) -> bool:
        return self.at_stage.count(None) < len(self.at_stage)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.swapped or self.in_flight)

    @property
    def num_remote_dependent(self) -> int:
        return sum(1 for r in self.running if r.stale is not None and r.stale.pending)

    @property
    def mode(self) -> str:
        return "replica" if self.k == 1 else "pipeline"

    # ---- membership ---------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue `req` (FCFS by arrival: a requeued request goes back to its arrival position)."""
        if not self.can_ever_fit(req):
            raise ValueError(f"request {req.request_id} may need {self.blocks_for(req.max_total_len)} KV blocks "
                             f"({req.max_total_len} tokens) but the unit holds {self.total_blocks}")
        req.status = RequestStatus.WAITING
        req.unit = self.uid
        self.waiting.insert(req)

    def release(self, req: Request) -> None:
        """Give back every block `req` holds on every stage (its prefix blocks stay cached in the index)."""
        self.hooks.release(self, req)
        for s, table in enumerate(req.tables):
            blocks = [b for b in table if b != NULL_BLOCK]
            if blocks:
                self.stages[s].free(blocks)
        st = req.stale
        if st is not None:
            for s in st.pending:
                self.stages[st.home].free(st.history_ids(self.k, s))
            st.pending.clear()
        self.index.release(req.index_path)
        req.stale = None
        req.tables = [[] for _ in range(self.k)]
        req.index_path = []
        req.num_computed = 0

    def requeue(self, req: Request) -> None:
        """Recompute preemption: free `req`'s KV, keep its tokens, back to the queue at its arrival position."""
        self.release(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.add(req)

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        self.release(req)
        self.hooks.forget(self, req)
        req.status = RequestStatus.FINISHED

    def abort(self, req: Request) -> None:
        """Take `req` out of the unit; one in the pipe keeps its blocks (its micro-batch still writes them) until
        the micro-batch leaves."""
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.swapped:
            self.swapped.remove(req)
        elif req in self.running:
            self.running.remove(req)
            if req.in_flight:
                req.aborted = True
                self.aborted_in_flight.append(req)
                self.hooks.forget(self, req)
                return
        self.release(req)
        self.hooks.forget(self, req)

    def take_running(self, req: Request) -> None:
        """`req` (holding blocks of this unit in `req.tables`) runs here from now on (a migration's final round)."""
        req.unit = self.uid
        req.status = RequestStatus.RUNNING
        insert_by_arrival(self.running, req)

    # ---- scheduling ---------------------------------------------------------------------------------
    def grow(self, req: Request, num_tokens: int) -> bool:
        """Room for `num_tokens` more tokens of `req` on every stage; False (nothing taken) when it does not fit."""
        own = self.hooks.grow(self, req, num_tokens)
        if own is not None:
            return own
        need = -(-(req.num_computed + num_tokens) // self.block_size) - len(req.tables[0])  # blocks_for, inlined
        if need <= 0:
            return True
        return self.extend(req, need)

    def allocate(self, n: int) -> list[list[int]] | None:
        """`n` logical blocks (per stage, one list of ids), evicting cached prefixes if needed; None when they do
        not fit."""
        if n > self.num_allocatable or not self.index.make_room(n):
            return None
        return [a.allocate(n) for a in self.stages]

    def extend(self, req: Request, n: int) -> bool:
        """`n` more logical blocks for `req`; False (nothing taken) when they do not fit."""
        got = self.allocate(n)
        if got is None:
            return False
        for table, ids in zip(req.tables, got, strict=True):
            table.extend(ids)
        return True

    def _victim(self, req: Request) -> Request | None:
        """Latest arrival not in the pipe; `req` itself only when nothing else waits in the pipe for blocks."""
        for v in reversed(self.running):
            if v.in_flight or v.status is not RequestStatus.RUNNING:
                continue
            if v is req and any(r.in_flight for r in self.running):
                return None  # wait a tick: in-flight micro-batches will leave and their requests can go first
            return v
        return None

    def chunk_cap(self) -> int:
        """Longest prefill chunk while others wait: in a pipeline, the typical (median recent) prompt length, so
        one long prompt does not fill whole micro-batches while short ones queue behind it (micro-batch
        balance). A replica has one micro-batch at a time: no cap."""
        if self.k == 1:
            return self.shape.tokens
        prefilling = sum(1 for r in self.running if len(r.token_ids) - r.num_computed > 1)
        if len(self.waiting) + prefilling < 2 or not self.recent_prompts:
            return self.shape.tokens
        return max(self.shape.buckets[0], int(statistics.median(self.recent_prompts)))

    def _match_prefix(self, req: Request) -> None:
        nodes = self.index.match(req.token_ids)
        for source in self.prefix_sources:  # from the host tier, from another unit
            nodes += source(self, req, nodes)
        req.tables = [[n.blocks[s] for n in nodes] for s in range(self.k)]
        req.index_path = list(nodes)
        req.num_computed = len(nodes) * self.block_size
        if req.num_preemptions == 0 and req.num_failures == 0:  # what the cache served its first admission
            req.num_cached_tokens = req.num_computed

    def schedule(self) -> MicroBatch | None:
        """The micro-batch entering stage 0 now (None: nothing to run); see the module docstring."""
        shape = self.shape
        budget, items, preempted = shape.tokens, [], []
        parked = self.hooks.begin_step(self)
        seqs = shape.seqs - len(parked)  # parked requests keep their rows' worth of the sequence limit
        cap = self.chunk_cap()
        remote_rows: collections.Counter[int] | None = None
        running = RequestStatus.RUNNING
        hooks_grow, bs, append = self.hooks.grow, self.block_size, items.append
        for req in list(self.running):  # (the hot loop: one pass per running request, `grow` inlined)
            if budget <= 0 or len(items) >= seqs:
                break
            if req.in_flight or req.status is not running or (parked and req in parked):
                continue
            computed = req.num_computed
            known = len(req.token_ids)
            n = known - computed
            if n != 1:
                if n <= 0:
                    continue
                n = min(n, budget, cap)
            st = req.stale
            if st is not None and st.pending:
                if remote_rows is None:
                    remote_rows = collections.Counter()
                n = min(n, shape.remote_rows - remote_rows[st.home])  # its rows travel to the home device
                if n <= 0:
                    continue
            grown = hooks_grow(self, req, n)  # `grow`: the policy's way, or None for the unit's
            if grown is None:
                need = -(-(computed + n) // bs) - len(req.tables[0])
                grown = need <= 0 or self.extend(req, need)
            while not grown:
                victim = self._victim(req)
                if victim is None:
                    break
                self.running.remove(victim)
                self.hooks.preempt(self, victim)
                preempted.append(victim)
                if victim is req:
                    break
                grown = self.grow(req, n)
            if req.status is not running:
                break  # it preempted itself: nothing more fits this tick
            if not grown:
                continue
            if st is not None and st.pending:
                remote_rows[st.home] += n
            computed = req.num_computed  # (unchanged unless it was preempted and grown again)
            append(Scheduled(req, computed, n, computed + n == known))
            budget -= n
        if not preempted:
            budget = self.hooks.resume(self, items, budget)
        # Admit new work only when nothing had to be preempted (it would be thrashing) and the policy has nothing
        # of its own waiting to come back.
        while (self.admitting and not preempted and self.hooks.may_admit(self) and self.waiting and budget > 0
               and len(items) < seqs and len(self.running) < self.max_running):
            req = self.waiting[0]
            if self.enable_prefix_caching and not req.tables[0] and req.num_computed == 0:
                self._match_prefix(req)
            n = min(len(req.token_ids) - req.num_computed, budget, cap)
            if not self.grow(req, n) and not (
                    not req.tables[0] and req.num_computed == 0 and self.hooks.admit_fallback(self, req, n)):
                self.release(req)  # matched prefix blocks go back to the cache until admission
                break
            self.waiting.popleft()
            if req.first_scheduled_time is None:
                req.first_scheduled_time = self._now()
            if req.num_preemptions == 0:
                self.recent_prompts.append(len(req.token_ids))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            items.append(Scheduled(req, req.num_computed, n, req.num_computed + n == len(req.token_ids)))
            budget -= n
        if not items:
            return None
        for it in items:
            it.req.in_flight = True
        return MicroBatch(items, shape.seqs)

    # ---- ticks --------------------------------------------------------------------------------------
    def advance(self) -> tuple[MicroBatch | None, bool]:
        """Shift the pipe by one tick: schedule the entering micro-batch; returns the one leaving the last stage
        this tick (None if none) and whether anything runs at all."""
        entering = self.schedule() if self.admitting else None  # draining: the pipe empties
        self.at_stage = [entering] + self.at_stage[:-1]
        leaving = self.at_stage[-1]
        return leaving, self.in_flight

    def tick_work(self) -> TickWork:
        """What the tick about to run (after `advance`) computes, in counts; counts the tick."""
        shape, k = self.shape, self.k
        self.ticks += 1
        if k == 1:  # a replica (the common tick): its one micro-batch enters and leaves, no stale history
            mb = self.at_stage[0]
            rows = shape.bucket(mb.num_tokens)
            self.last_tick = (mb.num_tokens, rows)
            return TickWork(rows, shape.seqs, shape.max_blocks,
                            (StageLoad(mb.num_tokens, mb.kv_tokens, mb.attn_pairs, mb.prefill_tokens),), False,
                            mb.seeds, mb.counters, mb.suppress, mb.top_n)
        tokens = widest = 0
        remote_in = [0] * k
        loads, remote = [], False
        for stage, mb in enumerate(self.at_stage):
            if mb is None:
                loads.append(EMPTY_STAGE)
                continue
            n = mb.num_tokens
            tokens += n
            widest = max(widest, n)
            kv, pairs, out = mb.kv_tokens, mb.attn_pairs, 0
            for i in mb.stale:  # rows whose older history this stage reads on their home device
                it = mb.items[i]
                st = it.req.stale
                if st is not None and stage in st.pending:
                    kv -= st.length
                    pairs -= it.num_tokens * st.length
                    out += it.num_tokens
                    remote_in[st.home] += it.num_tokens * st.length
            remote |= out > 0
            loads.append(StageLoad(n, kv, pairs, mb.prefill_tokens, out))
        if remote:
            loads = [w._replace(remote_kv_in=r) if r else w for w, r in zip(loads, remote_in, strict=True)]
        rows = shape.bucket(widest)
        self.remote_ticks += int(remote)
        self.last_tick = (tokens, rows)
        last = self.at_stage[k - 1]
        if last is None:
            return TickWork(rows, shape.seqs, shape.max_blocks, tuple(loads), remote)
        return TickWork(rows, shape.seqs, shape.max_blocks, tuple(loads), remote, last.seeds, last.counters,
                        last.suppress, last.top_n)

    def tick_inputs(self) -> StepInputs:
        """Host arrays of the tick about to run (after `advance`): what a compiled step reads. A replica's decode
        tick is built from its previous tick's when it can be (`kunjax.packing.DecodeInputs`)."""
        if self.k == 1 and self.shape.layer_groups == 1 and self.at_stage[0] is not None:
            return self._decode_inputs.build(self.ticks, self.at_stage[0], self._fresh_inputs)
        return self._fresh_inputs()

    def _fresh_inputs(self) -> StepInputs:
        """`tick_inputs` built from the micro-batches in the pipe."""
        shape, k, bs = self.shape, self.k, self.block_size
        in_pipe = [mb for mb in self.at_stage if mb is not None]
        rows = shape.bucket(max((mb.num_tokens for mb in in_pipe), default=0))
        inp = StepInputs.empty(shape, rows)
        g_count = shape.layer_groups
        for stage, mb in enumerate(self.at_stage):
            if mb is None:
                continue
            n, arr = mb.num_tokens, mb.arrays
            inp.positions[stage, :n], inp.seq_ids[stage, :n] = arr.positions, arr.seq_ids
            inp.valid[stage, :n] = True
            inp.context_lens[stage] = arr.context_lens
            reqs = [it.req for it in mb.items]
            tables = [r.tables[stage] for r in reqs]
            counts = [it.num_tokens for it in mb.items]
            if g_count == 1:
                fill_tables(inp.slot_mapping[stage], inp.block_tables[stage], tables, counts, arr.positions,
                            arr.seq_ids, bs)
            else:
                self._fill_group_tables(inp, stage, reqs, tables, counts, mb)
            if k > 1:
                self._fill_remote(inp, stage, mb)
        if self.at_stage[0] is not None:
            inp.tokens_in[:self.at_stage[0].num_tokens] = self.at_stage[0].arrays.tokens
        last = self.at_stage[k - 1]
        if last is not None:
            arr = last.arrays
            inp.logits_indices, inp.suppress_ids = arr.logits_indices, arr.suppress_ids
            (inp.temperature, inp.top_k, inp.top_p, inp.min_p, inp.seeds, inp.counters) = arr.sampling
            inp.top_n = np.asarray(last.top_n, np.int32)
        return inp

    def _fill_group_tables(self, inp: StepInputs, stage: int, reqs: list[Request], tables: list[list[int]],
                           counts: list[int], mb: MicroBatch) -> None:
        """Per layer group g, each row's slots (the policy's `group_tables`, or whole blocks: group g of block p is
        slot p * G + g of the slot view)."""
        g_count = self.shape.layer_groups
        own = [self.hooks.group_tables(self, r) for r in reqs]
        small = len(tables) <= SMALL_BATCH_ROWS
        if not small:
            flat = flat_tables(tables)
            lens = [len(t) for t in tables]
            offsets = np.cumsum(lens).tolist()
        for g in range(g_count):
            flat_g = None
            if small:
                pieces = [np.asarray(t, np.int32) * g_count + g if o is None else o[g]
                          for t, o in zip(tables, own, strict=True)]
            else:
                base = flat * g_count + g
                pieces = [base[end - n:end] if o is None else o[g]
                          for o, end, n in zip(own, offsets, lens, strict=True)]
                flat_g = base if all(o is None for o in own) else np.concatenate(
                    [np.asarray(p, np.int32) for p in pieces])
            fill_tables(inp.slot_mapping[stage, g], inp.block_tables[stage, g], pieces, counts, mb.arrays.positions,
                        mb.arrays.seq_ids, self.block_size, flat_g)

    def _fill_remote(self, inp: StepInputs, stage: int, mb: MicroBatch) -> None:
        """The remote-attention work of `stage`'s rows whose pre-drop history it does not hold yet."""
        k = self.k
        filled: collections.Counter[int] = collections.Counter()
        row = 0
        for i, it in enumerate(mb.items):
            req, n = it.req, it.num_tokens
            st = req.stale
            if st is not None and stage in st.pending:
                inp.context_starts[stage, i] = st.length
                hist = st.history_ids(k, stage)
                for p_row in range(row, row + n):
                    j = filled[st.home]
                    filled[st.home] += 1
                    inp.send_rows[stage, st.home, j] = p_row
                    inp.recv_tables[st.home, stage, j, :len(hist)] = hist
                    inp.recv_lens[st.home, stage, j] = st.length
                    inp.recv_pos[st.home, stage, j] = mb.arrays.positions[p_row]
            row += n

    def exit(self, mb: MicroBatch, tokens: np.ndarray, logprobs: np.ndarray) -> list[tuple[Request, int, float, int]]:
        """The micro-batch left the last stage: commit its KV, return its samples `(request, token, logprob, row)`
        in micro-batch order (`row` indexes the tick's sampled arrays, e.g. its top logprobs)."""
        self.at_stage[-1] = None
        out = []
        append, hooks_commit, caching, index = out.append, self.hooks.commit, self.enable_prefix_caching, self._index
        token_list, logprob_list = tokens.tolist(), logprobs.tolist()  # Python ints and floats
        for i, it in enumerate(mb.items):
            req = it.req
            req.in_flight = False
            if req.aborted:
                self.aborted_in_flight.remove(req)
                self.release(req)
                continue
            computed = req.num_computed = it.start + it.num_tokens  # `commit`, inlined
            if not hooks_commit(self, req) and caching and req.stale is None:
                index(req, computed)
            if it.sample:
                append((req, token_list[i], logprob_list[i], i))
        return out

    def commit(self, req: Request, computed: int) -> None:
        """`req`'s KV up to `computed` tokens is in the pool: index its newly full blocks for reuse."""
        req.num_computed = computed
        if self.hooks.commit(self, req) or not self.enable_prefix_caching or req.stale is not None:
            return
        self._index(req, computed)

    def _index(self, req: Request, computed: int) -> None:
        """`commit`'s indexing of `req`'s blocks that `computed` tokens filled."""
        bs = self.block_size
        while len(req.index_path) < computed // bs:
            j = len(req.index_path)
            parent = req.index_path[-1] if req.index_path else None
            chunk = tuple(req.token_ids[j * bs:(j + 1) * bs])
            own = tuple(t[j] for t in req.tables)
            node = self.index.insert(parent, chunk, own)
            if node.blocks != own:  # an equal block was indexed first: share it, give back this one
                for s, (alloc, b) in enumerate(zip(self.stages, own, strict=True)):
                    alloc.free([b])
                    req.tables[s][j] = node.blocks[s]
            req.index_path.append(node)

    # ---- live KV exchange (k > 1) -------------------------------------------------------------------
    def plan_exchange(self, limit: int) -> list[tuple[int, int, int, int, int, int]]:
        """Next batch of history blocks to move to the stage owning their layers.

        Returns copies `(src_stage, src_id, dst_stage, dst_id, lo, hi)`, at most `limit` per (src, dst) pair, in
        one deterministic order (arrival, then stage, then block). Destination blocks are allocated here; a stage
        whose history is fully copied stops being remote once `commit_exchange` runs.
        """
        k, bs = self.k, self.block_size
        per_pair: collections.Counter[tuple[int, int]] = collections.Counter()
        copies = []
        for req in self.running:
            st = req.stale
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
                if self.stages[s].num_free_allocatable < len(fresh):
                    continue
                ids = self.stages[s].allocate(len(fresh))
                for j in todo:
                    if j < full:
                        req.tables[s][j] = ids.pop(0)
                        lo, hi = 0, bs
                    else:  # the partial boundary block: its new tokens are already there, copy the head only
                        lo, hi = 0, max(st.length - j * bs, 0)
                    st.copied[s] = j + 1
                    if hi == 0:
                        continue
                    copies.append((st.home, st.old_blocks[j] * k + s, s, req.tables[s][j], lo, hi))
                    per_pair[(st.home, s)] += 1
        if not self.waiting:  # no memory pressure: cached blocks from before the fuse move too
            copies += self._localize_cached(limit, per_pair)
        self.blocks_exchanged += len(copies)
        return copies

    def _localize_cached(self, limit: int, per_pair: collections.Counter[tuple[int, int]]
                         ) -> list[tuple[int, int, int, int, int, int]]:
        """Copies moving stale prefix-index nodes (cached before the fuse, held by nobody) to their stages,
        parents first, within the pairs' remaining budget; each becomes an ordinary cached node."""
        k, bs = self.k, self.block_size
        copies = []
        for node in self.index.stale_cached():
            home, old = node.stale
            others = [s for s in range(k) if s != home]
            if (any(per_pair[(home, s)] >= limit for s in others)
                    or any(self.stages[s].num_free_allocatable < 1 for s in others)):
                continue
            blocks = [old * k + home if s == home else self.stages[s].allocate(1)[0] for s in range(k)]
            for s in others:
                copies.append((home, old * k + s, s, blocks[s], 0, bs))
                per_pair[(home, s)] += 1
            self.index.localize(node, tuple(blocks))
        return copies

    def commit_exchange(self) -> int:
        """After the copies were issued: stages whose history is complete read locally; returns stages finished."""
        finished = 0
        for req in self.running:
            st = req.stale
            if st is None:
                continue
            for s in sorted(st.pending):
                if st.copied.get(s, 0) >= len(st.old_blocks):
                    st.pending.discard(s)
                    self.stages[st.home].free(st.history_ids(self.k, s))
                    finished += 1
            if not st.pending:
                req.stale = None
        return finished

    # ---- books --------------------------------------------------------------------------------------
    def holders(self, reserved: Callable[[int], collections.Counter[int]]) -> list[collections.Counter[int]]:
        """Per stage, each block's holders: requests' tables, stale histories, aborted requests still in the
        pipe, and `reserved(stage)` (the policy's own references)."""
        held = [collections.Counter() for _ in range(self.k)]
        for req in [*self.running, *self.waiting, *self.swapped, *self.aborted_in_flight]:
            for s, table in enumerate(req.tables):
                held[s].update(b for b in table if b != NULL_BLOCK)
            st = req.stale
            if st is not None:
                for s in st.pending:
                    held[st.home].update(st.history_ids(self.k, s))
        for s in range(self.k):
            held[s].update(reserved(s))
        return held

    def check(self, reserved: Callable[[int], collections.Counter[int]]) -> None:
        """Every stage's books balance and each block's refcount equals its holders."""
        held = self.holders(reserved)
        for s, alloc in enumerate(self.stages):
            alloc.check()
            for b in range(1, alloc.num_blocks):
                assert alloc.refcount(b) == held[s][b], (
                    f"unit {self.uid} stage {s} block {b}: refcount {alloc.refcount(b)} but {held[s][b]} holders")
        self.index.check()
        self.waiting.check()
        self.swapped.check()
        for req in self.running:
            assert req.unit == self.uid and req.status is RequestStatus.RUNNING, f"{req.request_id} misfiled"
            assert all(len(t) == len(req.tables[0]) for t in req.tables), f"{req.request_id}: ragged tables"

