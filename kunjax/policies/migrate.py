"""`migrate` (Llumnix live migration): move running requests' KV from the most loaded instance to the least
loaded one while they keep decoding.

Owns the in-flight migrations (`Migration`: a request, its source and destination replicas, and the destination
blocks reserved and filled so far) and the decision of what moves where, taken after every engine step
(`Migrate.after_step`):

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
  and it joins `dst`'s running list by arrival with the `dst` blocks (`PolicyView.move_running`). The final round
  runs between two steps and its copies are dispatched before `dst`'s next step, so the request misses at most
  that one step (none when `dst` schedules it at once); its stop time is the final round's host time.
* **Cancel.** When the request finishes, is aborted or is preempted on `src` (the scheduler hooks `forget` and
  `preempt`), or `dst` preempts a request or cannot supply the next round's blocks, the `dst` reservation is
  freed and the request stays on (or is requeued by) `src` exactly as under recompute.

Starts, completions and cancellations are counted (`stats()`); completions and cancellations are also kept as
events (`events`, kind "migration" or "migration_cancelled", with the start step in `detail`), which the runtime
numbers and serves like every policy's events.

Never changes a request's tokens or sampling state (a migrated request's greedy output equals an unmoved run);
never touches the device (copies are queued in the memory pool; the executor runs them before the next steps).

Invariant (`check`, and `LLMEngine.check_books` through `reserved_blocks`): on every replica, each block's
refcount equals the requests holding it plus the in-flight migrations that reserved it; a reserved block is held
by exactly one migration and by no request; a migrating request is running on its `src` and holds at least the
blocks already copied.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar

from kunjax.config import ConfigError, Options
from kunjax.policies.base import Capabilities, MemoryPolicy, PolicyView, Transition
from kunjax.request import Request, RequestStatus
from kunjax.unit import ServingUnit

if TYPE_CHECKING:
    from kunjax.config import EngineConfig, ModelConfig

log = logging.getLogger("kunjax.migrate")

PRESSURE_WINDOW = 4  # engine steps after a preemption during which a replica still counts as under pressure


@dataclasses.dataclass
class Migration:
    req: Request
    src: int  # replica (unit id = instance)
    dst: int
    start_step: int  # the step after which round 1 ran
    started: float  # the engine clock at round 1
    dst_blocks: list[int] = dataclasses.field(default_factory=list)  # copies of req.blocks[:len(dst_blocks)]
    rounds: int = 0

    @property
    def copied(self) -> int:
        return len(self.dst_blocks)


@dataclasses.dataclass(frozen=True)
class MigrateOptions(Options):
    concern: ClassVar[str] = "policy migrate"
    migrate_freeness_gap: float = dataclasses.field(default=2.0, metadata={"help": (
        "start a live migration when the most loaded instance's freeness (Llumnix: free KV blocks, queued demand "
        "counted as used, per running request) is below the least loaded one's by at least this")})
    migrate_final_blocks: int = dataclasses.field(default=1, metadata={"help": (
        "KV blocks left to copy at which the migrating request stops for the final round (earlier rounds copy "
        "while it keeps decoding)")})
    migrate_max_concurrent: int = dataclasses.field(default=2, metadata={"help": "most live migrations in flight"})

    def __post_init__(self) -> None:
        if not self.migrate_freeness_gap > 0:
            raise ConfigError(f"--migrate-freeness-gap must be positive, got {self.migrate_freeness_gap}")
        for name in ("migrate_final_blocks", "migrate_max_concurrent"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


class Migrate(MemoryPolicy):
    """Recompute inside scheduling, plus cancelling a request's migration when it leaves its source; the
    migrations themselves after every step."""

    name = "migrate"
    Options = MigrateOptions

    def __init__(self, config: EngineConfig, model: ModelConfig, *, num_instances: int, num_blocks: int,
                 block_bytes: int):
        super().__init__(config, model, num_instances=num_instances, num_blocks=num_blocks, block_bytes=block_bytes)
        self.freeness_gap = self.options.migrate_freeness_gap
        self.final_blocks = self.options.migrate_final_blocks
        self.max_concurrent = self.options.migrate_max_concurrent
        self.inflight: dict[str, Migration] = {}  # by request id
        self.counts = collections.Counter(migrations=0, cancelled=0, blocks_copied=0, rounds=0)
        self._seen_preemptions = [0] * num_instances
        self._last_preempt_step = [-PRESSURE_WINDOW - 1] * num_instances

    # ---- scheduling hooks ---------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        return Capabilities()  # not `overlap`: `after_step` moves running requests, which may be in flight

    def preempt(self, unit: ServingUnit, victim: Request) -> None:
        self.cancel(victim, "preempted")
        unit.requeue(victim)

    def forget(self, unit: ServingUnit, req: Request) -> None:
        # `finish` runs after the finish reason is set; an abort before it is set.
        self.cancel(req, "finished" if req.finish_reason is not None else "aborted")

    # ---- load ---------------------------------------------------------------------------------------
    def _unit(self, i: int) -> ServingUnit:
        u = self.view.replica(i)
        assert u is not None, f"instance {i} is not a replica"
        return u

    @staticmethod
    def freeness(u: ServingUnit) -> float:
        """Llumnix's freeness of a replica: free blocks per running request, queued demand counted as used."""
        head = u.blocks_for(len(u.waiting[0].token_ids) + 1) if u.waiting else 0
        return (u.total_blocks - u.stages[0].num_used - head) / (len(u.running) + 1)

    def under_pressure(self, u: ServingUnit) -> bool:
        return (bool(u.waiting) or self.view.step_no - self._last_preempt_step[u.uid] <= PRESSURE_WINDOW
                or u.num_allocatable < len(u.running))

    # ---- the policy, after every step ---------------------------------------------------------------
    def after_step(self, view: PolicyView) -> list[Transition]:
        replicas = [u for u in view.units if u.k == 1]
        for u in replicas:
            if u.num_preemptions != self._seen_preemptions[u.uid]:
                self._seen_preemptions[u.uid] = u.num_preemptions
                self._last_preempt_step[u.uid] = view.step_no
        for m in list(self.inflight.values()):
            self._advance(m)
        if len(self.inflight) < self.max_concurrent:
            self._maybe_start(replicas)
        return []

    def _maybe_start(self, replicas: list[ServingUnit]) -> None:
        if len(replicas) < 2:
            return
        f = {u.uid: self.freeness(u) for u in replicas}
        src, dst = min(replicas, key=lambda u: f[u.uid]), max(replicas, key=lambda u: f[u.uid])
        if (src is dst or f[dst.uid] - f[src.uid] < self.freeness_gap or not self.under_pressure(src)
                or self.under_pressure(dst)):
            return
        if len(dst.running) >= dst.shape.seqs:
            return
        room = dst.num_allocatable
        cands = [r for r in src.running
                 if r.request_id not in self.inflight and r.num_computed == len(r.token_ids) - 1
                 and r.num_computed >= r.num_prompt_tokens and r.max_total_len - len(r.token_ids) >= 2
                 and len(r.blocks) + 1 <= room]
        if not cands:
            return
        req = min(cands, key=lambda r: (len(r.blocks), -r.arrival_time))
        m = Migration(req, src.uid, dst.uid, start_step=self.view.step_no, started=self.view.clock.now())
        self.inflight[req.request_id] = m
        if len(req.blocks) <= self.final_blocks:
            self._final(m)  # small enough to stop and copy at once
            return
        self._copy(m, req.num_computed // self._bs - m.copied)

    def _advance(self, m: Migration) -> None:
        req, d = m.req, self._unit(m.dst)
        if self._last_preempt_step[m.dst] > m.start_step:
            self.cancel(req, "destination preempted")
            return
        remaining = len(req.blocks) - m.copied
        if remaining <= self.final_blocks and len(d.running) < d.shape.seqs:
            if d.num_allocatable < remaining + 1:
                self.cancel(req, "destination out of blocks")
            else:
                self._final(m)
            return
        filled = req.num_computed // self._bs - m.copied  # blocks that filled since the last round
        if filled > d.num_allocatable:
            self.cancel(req, "destination out of blocks")
        elif filled > 0:
            self._copy(m, filled)

    @property
    def _bs(self) -> int:
        return self.config.block_size

    def _copy(self, m: Migration, n: int) -> None:
        """One round: the next `n` blocks of the request into newly reserved blocks of `dst`."""
        if n > 0:
            pool = self.view.mempool
            src, dst = self._unit(m.src), self._unit(m.dst)
            new = pool.alloc(dst, n)[0]
            pool.transfer(src, dst, m.req.blocks[m.copied:m.copied + n], new)
            m.dst_blocks.extend(new)
            self.counts["blocks_copied"] += n
        m.rounds += 1
        self.counts["rounds"] += 1

    def _final(self, m: Migration) -> None:
        t0 = time.perf_counter()
        req = m.req
        src, dst = self._unit(m.src), self._unit(m.dst)
        self._copy(m, len(req.blocks) - m.copied)  # the partial last block included
        del self.inflight[req.request_id]
        # Prefix-shared blocks keep their other references on the source (or stay cached there); the destination
        # blocks are indexed again as the request commits there.
        self.view.move_running(req, src, dst, [m.dst_blocks])
        done = time.perf_counter()
        self.counts["migrations"] += 1
        detail: dict[str, Any] = {"request": req.request_id, "blocks": m.copied, "rounds": m.rounds,
                                  "start_step": m.start_step}
        if not self.view.clock.virtual:  # host time of the stop-and-copy; modelled time books the copy in its step
            detail["stop_s"] = f"{done - t0:.6f}"
        self._event("migration", m, detail)

    def cancel(self, req: Request, reason: str) -> None:
        """Drop `req`'s in-flight migration, if any, and free its reservation on the destination."""
        m = self.inflight.get(req.request_id)
        if m is None or m.req is not req:
            return
        del self.inflight[req.request_id]
        if m.dst_blocks:
            self.view.mempool.free(self._unit(m.dst), [m.dst_blocks])
        self.counts["cancelled"] += 1
        self._event("migration_cancelled", m, {"request": req.request_id, "blocks": m.copied, "rounds": m.rounds,
                                               "reason": reason, "start_step": m.start_step})

    # ---- books and visibility -----------------------------------------------------------------------
    def reserved_blocks(self, unit: ServingUnit, stage: int) -> collections.Counter[int]:
        """Blocks of `unit` referenced by in-flight migrations (their destination copies), by block id."""
        return collections.Counter(b for m in self.inflight.values() if m.dst == unit.uid for b in m.dst_blocks)

    def check(self) -> None:
        owners: dict[tuple[int, int], str] = {}
        for rid, m in self.inflight.items():
            req, src = m.req, self._unit(m.src)
            assert rid == req.request_id and m.src != m.dst, f"migration {rid}: bad key or src == dst"
            assert req.unit == m.src and req.status is RequestStatus.RUNNING and req in src.running, (
                f"migrating request {rid} is not running on its source {m.src}")
            assert m.copied <= len(req.blocks), f"migration {rid}: copied {m.copied} of {len(req.blocks)} blocks"
            held = {b for r in self._unit(m.dst).running for b in r.blocks}
            for b in m.dst_blocks:
                assert (m.dst, b) not in owners, f"block {b} of instance {m.dst} reserved by {owners[m.dst, b]} too"
                assert b not in held, f"block {b} of instance {m.dst} reserved by {rid} is held by a request"
                owners[m.dst, b] = rid

    def stats(self) -> dict[str, Any]:
        return {**self.view.mempool.stats(), "migrations": self.counts["migrations"],
                "migrations_cancelled": self.counts["cancelled"], "migration_rounds": self.counts["rounds"],
                "migration_blocks_copied": self.counts["blocks_copied"], "migrations_in_flight": len(self.inflight)}

    def _event(self, kind: str, m: Migration, detail: dict[str, Any]) -> None:
        seconds = self.view.clock.now() - m.started
        self.record(kind, -1, (m.src, m.dst), seconds, detail)
        log.info("%s: instance %d -> %d in %.1f ms %s", kind, m.src, m.dst, seconds * 1e3, detail)
