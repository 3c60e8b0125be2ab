"""Per-instance continuous-batching scheduler: which tokens of which requests run in the next step.

Owns the waiting and running queues of one instance and decides, each step, under a token budget
(`max_num_batched_tokens`) and a sequence limit (`max_num_seqs`):

1. running requests first, oldest first: one decode token each, or the next chunk of a prefill in progress;
2. then waiting requests (FCFS by arrival), each admitted with as large a prefill chunk as the budget leaves.

When a running request needs a block and none is allocatable, the latest-arrived running request is preempted.
What preemption does is the memory policy's (`kunjax.policies`): recompute (vLLM's default: its blocks are freed,
its generated tokens kept, and it re-enters the waiting queue at its arrival position to be re-prefilled later),
or a move to the host tier (`swap`), from which the policy brings it back before new admissions (`resume`). A
request that could never fit alone is refused at `add`, so with one request left it always progresses: no
deadlock, no lost request. The scheduler itself never touches device memory; a policy's moves go through the
memory pool (`kunjax.mempool`), dispatched before the step that uses the freed blocks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque

from kunjax.block_manager import BlockAllocator, chain_hash
from kunjax.policies.recompute import Recompute
from kunjax.request import Request, RequestStatus


@dataclasses.dataclass
class ScheduledSeq:
    request: Request
    start: int  # first token index computed this step (== request.num_computed before the step)
    num_tokens: int  # tokens computed this step
    sample: bool  # True when the chunk reaches the end of the known tokens: a new token is sampled


@dataclasses.dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, *, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_prefix_caching: bool = False, policy=None):
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # ordered by arrival time
        self.swapped: list[Request] = []  # KV on the host tier (swap policy), ordered by arrival time
        self.policy = policy or Recompute()  # kunjax.policies: what preemption does, and what comes back when
        self.num_preemptions = 0

    # ---- queue management ---------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_ever_fit(self, req: Request) -> bool:
        return self.blocks_for(req.max_total_len) <= self.allocator.total

    def add(self, req: Request) -> None:
        if not self.can_ever_fit(req):
            raise ValueError(
                f"request {req.request_id} may need {self.blocks_for(req.max_total_len)} KV blocks "
                f"({req.max_total_len} tokens) but the instance pool has {self.allocator.total}")
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def abort(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req in self.swapped:
            self.swapped.remove(req)
        self.release(req)
        self.policy.forget(self, req)

    def release(self, req: Request) -> None:
        """Give back the request's blocks (full, hashed blocks stay in the prefix cache)."""
        if req.blocks:
            self.allocator.free(req.blocks)
        req.blocks = []
        req.block_hashes = []
        req.num_computed = 0

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        self.release(req)
        self.policy.forget(self, req)
        req.status = RequestStatus.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def queued_blocks(self) -> int:
        """Blocks the waiting requests will need to start (their known tokens plus the next one)."""
        return sum(self.blocks_for(len(r.token_ids) + 1) for r in self.waiting)

    def demand_blocks(self) -> int:
        """KV demand of this instance: blocks held by running requests plus those the queue (and the swapped
        requests, coming back) will need."""
        swapped = sum(self.blocks_for(r.num_computed + 1) for r in self.swapped)
        return sum(len(r.blocks) for r in self.running) + self.queued_blocks() + swapped

    # ---- the step plan ------------------------------------------------------------------------------
    def grow(self, req: Request, num_tokens: int) -> bool:
        """Give `req` the blocks for `num_tokens` more tokens; False (and nothing taken) when they don't fit."""
        need = self.blocks_for(req.num_computed + num_tokens) - len(req.blocks)
        if need <= 0:
            return True
        if need > self.allocator.num_allocatable:
            return False
        req.blocks.extend(self.allocator.allocate(need))
        return True

    def _match_prefix(self, req: Request) -> None:
        # Reuse full cached blocks, but always leave at least one token to compute (it yields the logits).
        n_full = (len(req.token_ids) - 1) // self.block_size
        hashes, parent = [], None
        for i in range(n_full):
            parent = chain_hash(parent, req.token_ids[i * self.block_size:(i + 1) * self.block_size])
            hashes.append(parent)
        matched = self.allocator.match(hashes)
        req.blocks = matched
        req.block_hashes = hashes[:len(matched)]
        req.num_computed = len(matched) * self.block_size
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted: list[Request] = []
        self.policy.begin_step(self)
        i = 0
        while i < len(self.running) and budget > 0 and len(seqs) < self.max_num_seqs:
            req = self.running[i]
            n = min(len(req.token_ids) - req.num_computed, budget)
            while not self.grow(req, n):
                victim = self.running.pop()  # latest arrival
                self.policy.preempt(self, victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            seqs.append(ScheduledSeq(req, req.num_computed, n, req.num_computed + n == len(req.token_ids)))
            budget -= n
            i += 1
        if not preempted:
            budget = self.policy.resume(self, seqs, budget)  # e.g. swapped requests come back first
        # Admit new work only when nothing had to be preempted this step (it would be thrashing) and the policy
        # has nothing of its own waiting to come back.
        while (not preempted and self.policy.may_admit(self) and self.waiting and budget > 0
               and len(seqs) < self.max_num_seqs and len(self.running) < self.max_num_seqs):
            req = self.waiting[0]
            if self.enable_prefix_caching and not req.blocks:
                self._match_prefix(req)
            n = min(len(req.token_ids) - req.num_computed, budget)
            if not self.grow(req, n):
                self.release(req)  # matched prefix blocks go back to the cache until admission
                break
            self.waiting.popleft()
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(ScheduledSeq(req, req.num_computed, n, req.num_computed + n == len(req.token_ids)))
            budget -= n
        return SchedulerOutput(seqs, preempted)

    def commit(self, seq: ScheduledSeq) -> None:
        """After the device step: the chunk's KV is in the pool. Index newly full blocks for reuse."""
        req = seq.request
        req.num_computed = seq.start + seq.num_tokens
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while len(req.block_hashes) < req.num_computed // bs:
            j = len(req.block_hashes)
            parent = req.block_hashes[-1] if req.block_hashes else None
            h = chain_hash(parent, req.token_ids[j * bs:(j + 1) * bs])
            req.block_hashes.append(h)
            self.allocator.register(req.blocks[j], h)
