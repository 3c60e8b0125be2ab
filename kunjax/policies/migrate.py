"""`migrate` (Llumnix live migration): move running requests' KV from the most loaded instance to the least
loaded one while they keep decoding.

Owns the in-flight migrations (`Migration`: a request, its source and destination instances, and the destination
blocks reserved and filled so far) and the decision of what moves where, taken after every engine step
(`MigrateRuntime.after_step`):

* **Load** is Llumnix's freeness, per instance: `F = (M - V) / (B + 1)`, with `M` the pool's usable blocks,
  `V` its used blocks (running requests' blocks, a shared prefix block counted once, plus blocks reserved on it
  by in-flight migrations) plus the blocks its head-of-line waiting request needs to start (Llumnix's virtual
  usage, which counts queued demand), and `B` its running batch (+1, so an idle instance has a finite `F`).
* **Trigger.** With `src` the instance of lowest `F` and `dst` the one of highest: `F_dst - F_src >=
  --migrate-freeness-gap`; `src` is under pressure (a request is waiting, it preempted within the last
  `PRESSURE_WINDOW` steps, or it has fewer allocatable blocks than running requests, i.e. the batch's next
  blocks may not fit) and `dst` is not; fewer than `--migrate-max-concurrent` migrations are in flight. At most
  one migration starts per step.
* **Candidate.** A running request on `src` whose prefill is done (it is decoding), with at least two tokens
  left to generate (it outlives the two rounds), not already migrating, whose blocks plus one fit on `dst`
  (which also needs a free batch row): the fewest blocks first (Llumnix's cheapest move), the latest arrival on
  ties (the request `src` would preempt first).
* **Rounds.** Round 1 allocates the request's full computed blocks on `dst` and copies them
  (`MemPool.transfer`); the request keeps decoding on `src`. Each later step copies the blocks that filled since.
  When the blocks left to copy (the partial last one included) are at most `--migrate-final-blocks`, the final
  round: the request leaves `src`'s running list, its remaining blocks are copied, its `src` blocks are freed,
  and it joins `dst`'s running list by arrival with the `dst` blocks (`req.instance = dst`). The final round
  runs between two steps and its copies are dispatched before `dst`'s next step, so the request misses at most
  that one step (none when `dst` schedules it at once); its stop time is the final round's host time.
* **Cancel.** When the request finishes, is aborted or is preempted on `src` (the scheduler hooks `forget` and
  `preempt`), or `dst` preempts a request or cannot supply the next round's blocks, the `dst` reservation is
  freed and the request stays on (or is requeued by) `src` exactly as under recompute.

Starts, completions and cancellations are counted (`stats()`); completions and cancellations are also kept as
events (`events`, the fields of `kunjax.elastic.controller.ElasticEvent`, kind "migration" or
"migration_cancelled", with the start step in `detail`), which
`EngineThread.elastic()` numbers and serves like kunserve's transitions.

Never changes a request's tokens or sampling state (a migrated request's greedy output equals an unmoved run);
never waits for the device (copies are dispatched; JAX runs them before the steps that donate the pools).

Invariant (`check`, and `LLMEngine.check_books` through `reserved_blocks`): on every instance, each block's
refcount equals the requests holding it plus the in-flight migrations that reserved it; a reserved block is held
by exactly one migration and by no request; a migrating request is running on its `src` and holds at least the
blocks already copied.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from kunjax.elastic.controller import ElasticEvent
from kunjax.mempool import MemPool
from kunjax.policies.recompute import Recompute, insert_by_arrival, requeue
from kunjax.request import Request, RequestStatus

if TYPE_CHECKING:
    from kunjax.engine import LLMEngine
    from kunjax.instance import Instance
    from kunjax.scheduler import Scheduler

log = logging.getLogger("kunjax.migrate")

PRESSURE_WINDOW = 4  # engine steps after a preemption during which an instance still counts as under pressure


@dataclasses.dataclass
class Migration:
    req: Request
    src: int
    dst: int
    start_step: int  # the step after which round 1 ran
    started: float  # time.perf_counter() at round 1
    dst_blocks: list[int] = dataclasses.field(default_factory=list)  # copies of req.blocks[:len(dst_blocks)]
    rounds: int = 0

    @property
    def copied(self) -> int:
        return len(self.dst_blocks)


class Migrate(Recompute):
    """Per-instance hooks: recompute, plus cancelling a request's migration when it leaves its source."""

    name = "migrate"

    def __init__(self, runtime: MigrateRuntime):
        self.runtime = runtime

    def preempt(self, sched: Scheduler, victim: Request) -> None:
        self.runtime.cancel(victim, "preempted")
        requeue(sched, victim)

    def forget(self, sched: Scheduler, req: Request) -> None:
        # `finish` runs before the engine marks an abort, and after the finish reason is set.
        self.runtime.cancel(req, "finished" if req.finish_reason is not None else "aborted")


class MigrateRuntime:
    """The engine-level side of `migrate`: freeness, the in-flight migrations, their copies and their books."""

    def __init__(self, engine: LLMEngine):
        ecfg = engine.config
        self.engine = engine
        self.freeness_gap = ecfg.migrate_freeness_gap
        self.final_blocks = ecfg.migrate_final_blocks
        self.max_concurrent = ecfg.migrate_max_concurrent
        self.mempool = MemPool(engine.instances, host_blocks=0)  # device tier only: copies between instances
        self.inflight: dict[str, Migration] = {}  # by request id
        self.events: collections.deque[ElasticEvent] = collections.deque(maxlen=256)
        self.counts = collections.Counter(migrations=0, cancelled=0, blocks_copied=0, rounds=0)
        self.step_no = 0
        n = len(engine.instances)
        self._seen_preemptions = [0] * n
        self._last_preempt_step = [-PRESSURE_WINDOW - 1] * n
        for inst in engine.instances:
            inst.scheduler.policy = Migrate(self)

    # ---- load ---------------------------------------------------------------------------------------
    def _inst(self, i: int) -> Instance:
        return self.engine.instances[i]

    def freeness(self, i: int) -> float:
        """Llumnix's freeness of instance `i`: free blocks per running request, queued demand counted as used."""
        inst = self._inst(i)
        s = inst.scheduler
        head = s.blocks_for(len(s.waiting[0].token_ids) + 1) if s.waiting else 0
        return (inst.allocator.total - inst.allocator.num_used - head) / (len(s.running) + 1)

    def under_pressure(self, i: int) -> bool:
        inst = self._inst(i)
        s = inst.scheduler
        return (bool(s.waiting) or self.step_no - self._last_preempt_step[i] <= PRESSURE_WINDOW
                or inst.allocator.num_allocatable < len(s.running))

    # ---- the policy, after every step ---------------------------------------------------------------
    def warmup(self) -> None:
        self.mempool.warmup()

    def after_step(self) -> None:
        self.step_no += 1
        for i, inst in enumerate(self.engine.instances):
            if inst.scheduler.num_preemptions != self._seen_preemptions[i]:
                self._seen_preemptions[i] = inst.scheduler.num_preemptions
                self._last_preempt_step[i] = self.step_no
        for m in list(self.inflight.values()):
            self._advance(m)
        if len(self.inflight) < self.max_concurrent:
            self._maybe_start()

    def _maybe_start(self) -> None:
        free = [inst.index for inst in self.engine.instances if inst.group is None]
        if len(free) < 2:
            return
        f = {i: self.freeness(i) for i in free}
        src, dst = min(free, key=f.__getitem__), max(free, key=f.__getitem__)
        if (src == dst or f[dst] - f[src] < self.freeness_gap or not self.under_pressure(src)
                or self.under_pressure(dst)):
            return
        d = self._inst(dst)
        if len(d.scheduler.running) >= d.scheduler.max_num_seqs:
            return
        room = d.allocator.num_allocatable
        cands = [r for r in self._inst(src).scheduler.running
                 if r.request_id not in self.inflight and r.num_computed == len(r.token_ids) - 1
                 and r.num_computed >= r.num_prompt_tokens and r.max_total_len - len(r.token_ids) >= 2
                 and len(r.blocks) + 1 <= room]
        if not cands:
            return
        req = min(cands, key=lambda r: (len(r.blocks), -r.arrival_time))
        m = Migration(req, src, dst, start_step=self.step_no, started=time.perf_counter())
        self.inflight[req.request_id] = m
        if len(req.blocks) <= self.final_blocks:
            self._final(m)  # small enough to stop and copy at once
            return
        self._copy(m, req.num_computed // self._bs - m.copied)

    def _advance(self, m: Migration) -> None:
        req, d = m.req, self._inst(m.dst)
        if self._last_preempt_step[m.dst] > m.start_step:
            self.cancel(req, "destination preempted")
            return
        remaining = len(req.blocks) - m.copied
        if remaining <= self.final_blocks and len(d.scheduler.running) < d.scheduler.max_num_seqs:
            if d.allocator.num_allocatable < remaining + 1:
                self.cancel(req, "destination out of blocks")
            else:
                self._final(m)
            return
        filled = req.num_computed // self._bs - m.copied  # blocks that filled since the last round
        if filled > d.allocator.num_allocatable:
            self.cancel(req, "destination out of blocks")
        elif filled > 0:
            self._copy(m, filled)

    @property
    def _bs(self) -> int:
        return self.engine.config.block_size

    def _copy(self, m: Migration, n: int) -> None:
        """One round: the next `n` blocks of the request into newly reserved blocks of `dst`."""
        if n > 0:
            new = self.mempool.alloc(m.dst, n)
            self.mempool.transfer(m.src, m.dst, m.req.blocks[m.copied:m.copied + n], new)
            m.dst_blocks.extend(new)
            self.counts["blocks_copied"] += n
        m.rounds += 1
        self.counts["rounds"] += 1

    def _final(self, m: Migration) -> None:
        t0 = time.perf_counter()
        req = m.req
        src, dst = self._inst(m.src), self._inst(m.dst)
        src.scheduler.running.remove(req)
        self._copy(m, len(req.blocks) - m.copied)  # the partial last block included
        src.allocator.free(req.blocks)  # prefix-shared blocks keep their other references (or stay cached)
        req.blocks = m.dst_blocks
        req.block_hashes = []  # the dst blocks are indexed again as the request commits on dst
        req.instance = m.dst
        insert_by_arrival(dst.scheduler.running, req)
        del self.inflight[req.request_id]
        done = time.perf_counter()
        self.counts["migrations"] += 1
        self._event("migration", m, done - m.started, {
            "request": req.request_id, "blocks": m.copied, "rounds": m.rounds, "stop_s": f"{done - t0:.6f}",
            "start_step": m.start_step})

    def cancel(self, req: Request, reason: str) -> None:
        """Drop `req`'s in-flight migration, if any, and free its reservation on the destination."""
        m = self.inflight.get(req.request_id)
        if m is None or m.req is not req:
            return
        del self.inflight[req.request_id]
        if m.dst_blocks:
            self.mempool.free(m.dst, m.dst_blocks)
        self.counts["cancelled"] += 1
        self._event("migration_cancelled", m, time.perf_counter() - m.started, {
            "request": req.request_id, "blocks": m.copied, "rounds": m.rounds, "reason": reason,
            "start_step": m.start_step})

    # ---- books and visibility -----------------------------------------------------------------------
    def reserved_blocks(self, instance: int) -> collections.Counter[int]:
        """Blocks of `instance` referenced by in-flight migrations (their destination copies), by block id."""
        return collections.Counter(b for m in self.inflight.values() if m.dst == instance for b in m.dst_blocks)

    def check(self) -> None:
        self.mempool.check()
        owners: dict[tuple[int, int], str] = {}
        for rid, m in self.inflight.items():
            req, src = m.req, self._inst(m.src)
            assert rid == req.request_id and m.src != m.dst, f"migration {rid}: bad key or src == dst"
            assert req.instance == m.src and req.status is RequestStatus.RUNNING and req in src.scheduler.running, (
                f"migrating request {rid} is not running on its source {m.src}")
            assert m.copied <= len(req.blocks), f"migration {rid}: copied {m.copied} of {len(req.blocks)} blocks"
            held = {b for r in self._inst(m.dst).scheduler.running for b in r.blocks}
            for b in m.dst_blocks:
                assert (m.dst, b) not in owners, f"block {b} of instance {m.dst} reserved by {owners[m.dst, b]} too"
                assert b not in held, f"block {b} of instance {m.dst} reserved by {rid} is held by a request"
                owners[m.dst, b] = rid

    def stats(self) -> dict[str, Any]:
        return {**self.mempool.stats(), "migrations": self.counts["migrations"],
                "migrations_cancelled": self.counts["cancelled"], "migration_rounds": self.counts["rounds"],
                "migration_blocks_copied": self.counts["blocks_copied"], "migrations_in_flight": len(self.inflight)}

    def _event(self, kind: str, m: Migration, seconds: float, detail: dict[str, Any]) -> None:
        self.events.append(ElasticEvent(kind, -1, (m.src, m.dst), self.step_no, seconds, detail))
        log.info("%s: instance %d -> %d in %.1f ms %s", kind, m.src, m.dst, seconds * 1e3, detail)


def install(engine: LLMEngine) -> MigrateRuntime:
    return MigrateRuntime(engine)
