"""The kunserve policy: watch the instances, drop replicated weights into pipeline groups, restore them.

After every engine step `KunServeController.after_step` (DESIGN.md §6):

1. **Restore watch** — a group whose demand stayed below the low-water mark, with nothing queued, for the
   window stops admitting and drains its pipeline (at most k-1 ticks); its remaining remote history is
   exchanged; then every request's KV moves home in full-layer format, the extension is freed, the weights are
   gathered back over `stage` and the members serve as instances again. Requests keep their KV: none restarts.
2. **Drop** — instances whose KV demand crossed the drop rule go to the planner; each planned aligned group is
   dropped at this step boundary: weights resharded to `P('stage')` (copies freed), pools reinterpreted in
   pipeline format (a donated reshape), the freed bytes allocated as an extension segment, running requests
   adopted with their history left in place (remote attention until exchanged), queued ones moved to the
   group's queue.

Every transition is logged with its timing and kept as an event for `GetServerInfo` / metrics.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import jax

from kunjax.block_manager import BlockAllocator
from kunjax.elastic.group import GroupBooks
from kunjax.elastic.monitor import RestoreWatch, Thresholds, needs_drop
from kunjax.elastic.planner import InstanceLoad, PipelineCostModel, candidate_groups, plan_drop
from kunjax.elastic.runtime import GroupRuntime, PipelineGroup, compile_runtime, plan_runtime
from kunjax.model import flatten_params as flatten
from kunjax.model import param_shapes
from kunjax.model import unflatten_params as unflatten
from kunjax.request import RequestStatus
from sharding.layouts import param_shardings

if TYPE_CHECKING:
    from kunjax.engine import LLMEngine
    from kunjax.instance import Instance

log = logging.getLogger("kunjax.elastic")


@dataclasses.dataclass
class ElasticEvent:
    kind: str  # "drop" | "restore" | "exchange_done" | "restore_deferred"
    group: int
    members: tuple[int, ...]
    step: int
    seconds: float
    detail: dict[str, Any]
    time_unix_s: float = dataclasses.field(default_factory=time.time)  # when it was recorded (wall clock)


def group_sizes(num_instances: int, num_layers: int, max_group: int) -> list[int]:
    out, k = [], 2
    while k <= min(max_group, num_instances):
        if num_layers % k == 0:
            out.append(k)
        k *= 2
    return out


class KunServeController:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        ecfg, cfg = engine.config, engine.model_config
        self.th = Thresholds(ecfg.drop_demand_ratio, ecfg.restore_demand_ratio, ecfg.restore_window_steps,
                             ecfg.min_group_steps)
        self.sizes = group_sizes(len(engine.instances), cfg.num_layers, ecfg.kunserve_max_group)
        self.runtimes: dict[tuple[int, ...], GroupRuntime] = {}
        for members in candidate_groups(len(engine.instances), self.sizes):
            blocks = {engine.instances[i].num_blocks for i in members}
            if len(blocks) != 1:  # (pools sized from each device's free memory can differ by a few blocks)
                log.warning("instances %s have pools of %s blocks: they cannot fuse", list(members), sorted(blocks))
                continue
            pool_shape = (blocks.pop(), cfg.num_layers, 2, ecfg.block_size, cfg.num_kv_heads, cfg.head_dim)
            devices = [engine.instances[i].mesh.devices.flat[0] for i in members]
            rt = plan_runtime(members, devices, cfg, ecfg, param_shapes(cfg), pool_shape)
            if rt is not None:
                self.runtimes[members] = rt
        self.cost_model = PipelineCostModel(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                                            microbatch_tokens=ecfg.max_num_batched_tokens)
        self.groups: list[PipelineGroup] = []
        self.events: collections.deque[ElasticEvent] = collections.deque(maxlen=256)
        self.counts = collections.Counter()
        self._gids = 0
        self.step_no = 0

    # ---- setup --------------------------------------------------------------------------------------
    def warmup(self) -> float:
        t0 = time.perf_counter()
        for rt in self.runtimes.values():
            if not rt.ticks:
                compile_runtime(rt, self.engine.model_config, self.engine.config)
                log.info("kunserve: group %s compiled in %.1fs", list(rt.members), rt.compile_seconds)
        return time.perf_counter() - t0

    def gain_blocks(self, k: int) -> int:
        rts = [rt for m, rt in self.runtimes.items() if len(m) == k]
        return rts[0].shapes.num_ext if rts else 0

    # ---- the policy ---------------------------------------------------------------------------------
    def instance_load(self, inst: Instance) -> InstanceLoad:
        sch = inst.scheduler
        return InstanceLoad(inst.index, inst.allocator.total, inst.allocator.num_allocatable,
                            sch.demand_blocks(), sch.queued_blocks(), sch.max_num_seqs - len(sch.running))

    def after_step(self) -> None:
        self.step_no += 1
        for g in list(self.groups):
            self._watch(g)
        free = [inst for inst in self.engine.instances if inst.group is None]
        loads = {inst.index: self.instance_load(inst) for inst in free}
        if not any(needs_drop(ld, self.th) for ld in loads.values()):
            return
        all_loads = [loads.get(i) or InstanceLoad(i, 1, 0, 0, 0) for i in range(len(self.engine.instances))]
        plan = plan_drop(all_loads, available=set(loads), group_sizes=self.sizes, gain_blocks=self.gain_blocks,
                         cost_model=self.cost_model)
        for gp in plan.groups:
            if gp.members in self.runtimes:
                self.drop(gp.members, reason=f"deficit {gp.deficit_blocks} blocks, gain {gp.gain_blocks}")

    def begin_restore(self, g: PipelineGroup) -> None:
        """Ask for the group to restore as soon as its requests' KV fits the members' own pools (an operator's
        or a test's request; the restore watch asks by itself when the burst is over)."""
        g.restore_requested = True

    def _drain(self, g: PipelineGroup) -> None:
        g.books.admitting = False  # nothing new enters the pipe, and the extension stops growing
        for s in g.books.stages:
            s.ext_open = False

    def _defer(self, g: PipelineGroup, reason: str) -> None:
        """Serve on; a restore is tried again later. Logged once per window, not every step."""
        b = g.books
        b.admitting = True
        for s in b.stages:
            s.ext_open = True
        g.watch = RestoreWatch(self.th, self.step_no)
        if g.deferred_at is None or self.step_no - g.deferred_at >= self.th.restore_window_steps:
            g.deferred_at = self.step_no
            self._event("restore_deferred", g, 0.0, {"reason": reason, "running": len(b.running),
                                                     "remote_dependent": b.num_remote_dependent})

    def _fits_home(self, g: PipelineGroup) -> bool:
        inst0 = self.engine.instances[g.members[0]]
        return g.books.plan_move_home(inst0.num_blocks, self.engine.config.max_num_seqs) is not None

    def _watch(self, g: PipelineGroup) -> None:
        b = g.books
        if not g.exchange_done and not b.num_remote_dependent:
            g.exchange_done = True
            self._event("exchange_done", g, time.perf_counter() - g.created,
                        {"blocks_exchanged": b.blocks_exchanged, "remote_ticks": g.remote_ticks})
        if b.admitting:
            base = sum(self.engine.instances[i].allocator.total for i in g.members)
            wants = g.watch.observe(self.step_no, b.demand_blocks(), base, len(b.waiting))
            if wants or g.restore_requested:
                # Drain only when the move home can succeed: a drain costs every request of the group a step.
                if self._fits_home(g):
                    self._drain(g)
                elif wants:
                    self._defer(g, "KV does not fit whole free blocks yet")
            return
        if b.in_flight:
            return
        while b.num_remote_dependent:  # finish the exchange: the move home reads each stage's own blocks
            if not g.exchange_round():
                break
        if b.num_remote_dependent:
            self._defer(g, "exchange blocked")
        elif not self.restore(g):
            self._defer(g, "KV does not fit whole free blocks yet")

    # ---- drop ---------------------------------------------------------------------------------------
    def drop(self, members: tuple[int, ...], reason: str = "") -> PipelineGroup:
        eng = self.engine
        rt = self.runtimes[members]
        if not rt.ticks:
            compile_runtime(rt, eng.model_config, eng.config)
        insts = [eng.instances[i] for i in members]
        if any(inst.group is not None for inst in insts):
            raise RuntimeError(f"instances {members} are already in a group")
        t0 = time.perf_counter()
        replicas = [flatten(inst.params) for inst in insts]
        for inst in insts:
            inst.params = None
        params = unflatten(rt.reshard.drop_weights(replicas))
        t_weights = time.perf_counter() - t0
        pools = [inst.kv_pool for inst in insts]
        for inst in insts:
            inst.kv_pool = None
        pool = rt.reshard.pools_to_pipeline(pools)
        ext = rt.reshard.new_extension()
        acts = rt.acts_zeros()
        books = GroupBooks(rt.shapes, eng.config.block_size, max_running=rt.k * eng.config.max_num_seqs)
        running = sorted(((r, h) for h, inst in enumerate(insts) for r in inst.scheduler.running),
                         key=lambda x: x[0].arrival_time)
        for req, h in running:
            books.adopt_running(req, h)
        books.open_books(rt.shapes.num_base, rt.shapes.num_ext)
        group = PipelineGroup(self._gids, rt, books, params, pool, ext, acts, RestoreWatch(self.th, self.step_no))
        self._gids += 1
        for req, _ in running:
            req.group = group
        for inst in insts:
            for req in inst.scheduler.waiting:
                books.add(req)
                req.group = group
            inst.scheduler.running.clear()
            inst.scheduler.waiting.clear()
            inst.allocator = BlockAllocator(inst.num_blocks)  # its pool is the group's now
            inst.scheduler.allocator = inst.allocator
            inst.group = group
        jax.block_until_ready((pool, ext, params))
        seconds = time.perf_counter() - t0
        self.groups.append(group)
        self.counts["drops"] += 1
        detail = {"reason": reason, "k": rt.k, "weights_seconds": round(t_weights, 4),
                  "freed_bytes_per_device": rt.freed_bytes, "extension_blocks": rt.shapes.num_ext,
                  "stale_requests": books.num_remote_dependent, "queued": len(books.waiting)}
        self._event("drop", group, seconds, detail)
        return group

    # ---- restore ------------------------------------------------------------------------------------
    def restore(self, g: PipelineGroup) -> bool:
        """Move every request home, free the extension, gather the weights, split the group; False (nothing
        changed) when the requests' KV does not fit the members' own pools yet."""
        eng, b, rt = self.engine, g.books, g.rt
        insts = [eng.instances[i] for i in g.members]
        assert not b.in_flight and not b.num_remote_dependent
        plan = b.plan_move_home(insts[0].num_blocks, eng.config.max_num_seqs)
        if plan is None:
            return False
        t0 = time.perf_counter()
        k, bs = g.k, eng.config.block_size
        copies = [(s, seq.tables[s][j], h, blk * k + s, 0, bs)
                  for seq, (h, blocks) in plan.items() for j, blk in enumerate(blocks) for s in range(k)]
        g.copy_blocks(copies)
        g.ext, g.acts = None, None  # the extension is empty now: release it before the weights come back
        pools = rt.reshard.pool_to_members(g.pool)
        g.pool = None
        flat = flatten(g.params)
        g.params = None  # `flat` is the only reference: each stage-sharded leaf goes as soon as it is gathered
        per_member = rt.reshard.gather_weights(flat)
        shapes = param_shapes(eng.model_config)
        for h, inst in enumerate(insts):
            shardings = flatten(param_shardings(inst.mesh, shapes))
            inst.params = unflatten({p: jax.make_array_from_single_device_arrays(a.shape, shardings[p], [a])
                                     for p, a in per_member[h].items()})
            pool = pools[h]
            inst.kv_pool = jax.make_array_from_single_device_arrays(pool.shape, inst.pool_sharding, [pool])
            inst.allocator = BlockAllocator(inst.num_blocks)
            inst.scheduler.allocator = inst.allocator
            inst.group = None
        del pools, per_member
        for seq in sorted(plan, key=lambda q: q.req.arrival_time):
            h, blocks = plan[seq]
            inst, req = insts[h], seq.req
            inst.allocator.take(blocks)
            req.blocks, req.block_hashes, req.group = list(blocks), [], None
            req.instance, req.status = inst.index, RequestStatus.RUNNING
            inst.scheduler.running.append(req)
        for req in list(b.waiting):
            req.group = None
            target = min(insts, key=lambda i: (i.scheduler.demand_blocks() / i.allocator.total, i.index))
            req.instance = target.index
            target.scheduler.add(req)
        jax.block_until_ready([inst.kv_pool for inst in insts])
        seconds = time.perf_counter() - t0
        self.groups.remove(g)
        self.counts["restores"] += 1
        self.counts["blocks_exchanged_done"] += b.blocks_exchanged
        self.counts["remote_ticks_done"] += g.remote_ticks
        self._event("restore", g, seconds, {"moved_requests": len(plan), "moved_blocks": len(copies),
                                            "requeued": len(b.waiting)})
        return True

    # ---- visibility ---------------------------------------------------------------------------------
    def _event(self, kind: str, g: PipelineGroup, seconds: float, detail: dict[str, Any]) -> None:
        ev = ElasticEvent(kind, g.gid, g.members, self.step_no, seconds, detail)
        self.events.append(ev)
        log.info("kunserve %s: group %d members %s in %.1f ms %s", kind, g.gid, list(g.members),
                 seconds * 1e3, detail)

    def stats(self) -> dict[str, Any]:
        return {"drops": self.counts["drops"], "restores": self.counts["restores"],
                "groups": [g.info() for g in self.groups],
                "remote_dependent": sum(g.books.num_remote_dependent for g in self.groups),
                "blocks_exchanged": self.counts["blocks_exchanged_done"] + sum(
                    g.books.blocks_exchanged for g in self.groups),
                "remote_ticks": self.counts["remote_ticks_done"] + sum(g.remote_ticks for g in self.groups)}
