"""`layerkv` (LayerKV): admit a prefill when only some layer groups of its KV fit on device, keep the other groups
on the host tier, reload them for each step, and promote the request to device residency when memory frees up.

Owns, per instance, the partially resident ("layered") requests: where each layer group of their KV lives, the
staging of their offloaded groups for a step, their host copies, and the SLO-aware admission gate.

* **Layout.** The L layers are split into G groups (`--layerkv-layer-groups`, G | L). The pool's slot view
  (`kunjax.model.slot_view`, a reshape, no copy) has G slots per block, each holding L/G layers, and any slot can
  hold any group of any logical block: the step reads per-group slot tables `[G, S, MB]`. Ordinary requests
  hold whole blocks (group g of block p is slot p*G + g) and are scheduled as before. A layered request holds
  slots of split blocks (`layer_slots.SlotBook`) for its resident groups; its offloaded groups (the last ones)
  live on the host tier, one host block per slot.
* **Step.** A step needs every layer of every request in it on device, so offloaded groups are attended through
  the **staging region**: `--layerkv-staging-blocks` blocks reserved from the pool at start-up (outside the
  allocator; default: one longest sequence, at most a quarter of the pool) whose slots layered requests borrow
  for one step. When the scheduler grows a layered request (before the step is dispatched) its offloaded groups'
  history is reloaded from host into staging; the step reads it there and writes the new tokens' KV there; right
  after the step is dispatched the new blocks are copied back to host (ordered after the step on the device, not
  waited for: the offload overlaps the next host work) and the staging slots are released. This is where the
  memory comes from: between their steps layered requests hold only their resident groups, and the staging
  region is time-shared. When it cannot hold every layered request this step, the least recently run ones are
  **parked** for the step (they keep their KV and skip it); each fits the region alone, so each progresses.
* **Admission.** A waiting request whose full admission does not fit (and that matched no cached prefix) is
  admitted layered with the most groups that fit in free slots, at least `--layerkv-min-resident-groups`, when
  its offloaded groups fit this step's staging and, at its longest length, the whole region and the host tier,
  and when the projected step time of the running decodes plus its prefill tokens, with every layered request's
  reload traffic, stays under `--layerkv-tpot-slo-s` (`StepTimeModel`, fitted to measured steps); else it queues.
* **Promotion.** Oldest first, a layered request whose KV fits in whole blocks again (with one block of headroom
  per running request) is copied into whole blocks (resident groups device to device, offloaded ones from host:
  one reload) and becomes an ordinary request, at no extra cost from then on; failing that, its offloaded groups
  move into free slots one by one. A request that outgrew the staging region and cannot move is recomputed.
* **Preemption** is recompute: a layered victim frees its slots and its host blocks.

Never copies KV itself (`kunjax.mempool` does) and never changes the books of ordinary requests.

Invariants (`LayerKVRuntime.check`, every step in tests): the slot books balance (`SlotBook.check`); between steps
no staging slot is borrowed; the host tier's used blocks are exactly the layered requests' host parts; each
computed block of a layered request is, per group, either in its device slots or on the host, never both.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import TYPE_CHECKING

import numpy as np

from kunjax.policies.layer_slots import SlotBook
from kunjax.policies.recompute import Recompute, insert_by_arrival, requeue
from kunjax.request import Request, RequestStatus
from kunjax.scheduler import Scheduler, SchedulerOutput

if TYPE_CHECKING:
    from kunjax.engine import LLMEngine
    from kunjax.instance import Instance
    from kunjax.mempool import MemPool
    from kunjax.scheduler import ScheduledSeq


@dataclasses.dataclass
class HostPart:
    key: str  # host tier entry
    first: int  # first logical block it holds
    count: int  # blocks (host slots) it holds
    tail: bool  # its last block is partly filled: the next step rewrites it


@dataclasses.dataclass
class LayeredKV:
    """Where one layered request's KV lives, per layer group g (resident: device slots; else: host parts)."""

    resident: list[bool]  # [G]
    tables: list[list[int]]  # [G] slot of each logical block (resident groups), else []
    host: list[list[HostPart]]  # [G] host parts in block order (offloaded groups), else []
    staged: list[list[int]]  # [G] staging slot of each logical block during the current step, else []
    host_reserved: int  # host slots reserved at admission (its offloaded groups at its longest length)
    last_ran: int = -1  # step it last ran in (parking order: least recent first)

    def offloaded(self) -> list[int]:
        return [g for g, r in enumerate(self.resident) if not r]

    def host_blocks(self, g: int) -> int:
        return sum(p.count for p in self.host[g])


class StepTimeModel:
    """Seconds per step ≈ a + b·tokens + c·reloaded slots, fitted by exponentially weighted least squares.

    The weighted normal equations (features [1, T, R]) decay by `decay` per observation, so the fit follows the
    recent steps (an EMA of the sufficient statistics); a tiny ridge keeps them solvable while R has not varied
    (then c stays ~0 and reload cost is not yet priced in). No projection before `min_obs` observations.
    """

    def __init__(self, decay: float = 0.9, min_obs: int = 3):
        self.decay = decay
        self.min_obs = min_obs
        self.gram = np.zeros((3, 3))  # [3, 3] weighted sum of x xᵀ
        self.rhs = np.zeros(3)  # [3] weighted sum of x·seconds
        self.observations = 0

    def observe(self, tokens: int, reloaded: int, seconds: float) -> None:
        x = np.array([1.0, tokens, reloaded])
        self.gram = self.decay * self.gram + np.outer(x, x)
        self.rhs = self.decay * self.rhs + x * seconds
        self.observations += 1

    def project(self, tokens: int, reloaded: int) -> float | None:
        if self.observations < self.min_obs:
            return None
        coef = np.linalg.solve(self.gram + 1e-9 * np.eye(3), self.rhs)
        coef = np.maximum(coef, 0.0)  # a noisy fit may go negative; no term of a step's time does
        return float(coef @ np.array([1.0, tokens, reloaded]))


class LayerKVScheduler(Scheduler):
    """The instance's scheduler with layered requests: growth, release and commit go through the policy, and
    the layered requests that do not get staging this step are parked while the step is planned."""

    policy: LayerKV

    def grow(self, req: Request, num_tokens: int) -> bool:
        lk = self.policy.layered.get(req.request_id)
        if lk is not None:
            return self.policy.grow_layered(self, req, lk, num_tokens)
        if super().grow(req, num_tokens):
            return True
        if req.status is RequestStatus.WAITING and not req.blocks and req.num_computed == 0:
            return self.policy.admit_layered(self, req, num_tokens)
        return False

    def release(self, req: Request) -> None:
        self.policy.drop_layered(req)
        super().release(req)

    def commit(self, seq: ScheduledSeq) -> None:
        if seq.request.request_id in self.policy.layered:
            seq.request.num_computed = seq.start + seq.num_tokens  # split blocks are never prefix-cached
            return
        super().commit(seq)

    def schedule(self) -> SchedulerOutput:
        self.policy.start_step(self)
        parked = self.policy.park(self)
        self.max_num_seqs -= len(parked)  # parked requests keep their rows' worth of the sequence limit
        try:
            return super().schedule()
        finally:
            self.max_num_seqs += len(parked)
            for req in parked:
                insert_by_arrival(self.running, req)


class LayerKV(Recompute):
    """Per-instance hooks of `layerkv` (scheduler policy and `Instance.step_hooks`)."""

    name = "layerkv"

    def __init__(self, runtime: LayerKVRuntime, inst: Instance, book: SlotBook):
        self.runtime = runtime
        self.inst = inst
        self.book = book
        self.num_groups = book.num_groups
        self.layered: dict[str, LayeredKV] = {}
        self.stage_left = 0  # staging slots not yet promised this step
        self.step = 0
        self.reloaded = 0  # slots reloaded from host for the current step (promotions included)
        self.host_reserved = 0
        self._keys = itertools.count()
        self.partial_admissions = 0
        self.slo_refusals = 0
        self.promotions = 0
        self.parks = 0
        self.group_promotions = 0
        self.staging_evictions = 0  # layered requests recomputed because they outgrew the staging region

    @property
    def mempool(self) -> MemPool:
        return self.runtime.mempool

    # ---- one step -----------------------------------------------------------------------------------
    def start_step(self, sched: Scheduler) -> None:
        self.step += 1
        self.reloaded = 0
        self.promote(sched)

    def park(self, sched: Scheduler) -> list[Request]:
        """Promise staging to layered requests, least recently run first; take the rest out of `running`."""
        self.stage_left = len(self.book.staging)
        order = sorted((r for r in sched.running if r.request_id in self.layered),
                       key=lambda r: (self.layered[r.request_id].last_ran, r.arrival_time))
        parked = []
        for req in order:
            lk = self.layered[req.request_id]
            tokens = min(len(req.token_ids) - req.num_computed, sched.max_num_batched_tokens)
            need = sched.blocks_for(req.num_computed + tokens)
            if need * len(lk.offloaded()) > len(self.book.staging):  # outgrew staging: device slots, or recompute
                for g in lk.offloaded():
                    self.promote_group(sched, req, lk, g, headroom=0)
                if need * len(lk.offloaded()) > len(self.book.staging):
                    sched.running.remove(req)
                    requeue(sched, req)
                    self.staging_evictions += 1
                    continue
            if need * len(lk.offloaded()) <= self.stage_left:
                self.stage_left -= need * len(lk.offloaded())
            else:
                sched.running.remove(req)
                parked.append(req)
                self.parks += 1
        return parked

    def grow_layered(self, sched: Scheduler, req: Request, lk: LayeredKV, num_tokens: int) -> bool:
        need = sched.blocks_for(req.num_computed + num_tokens)
        grow = {g: need - len(lk.tables[g]) for g in range(self.num_groups)
                if lk.resident[g] and need > len(lk.tables[g])}
        if not self.book.fits(sum(grow.values())) or need * len(lk.offloaded()) > self.book.staging_free():
            return False
        got = iter(self.book.take(req.request_id, sum(grow.values())))
        for g, n in grow.items():
            lk.tables[g].extend(next(got) for _ in range(n))
        assert not any(lk.staged), f"{req.request_id} staged twice in one step"
        for g in lk.offloaded():
            lk.staged[g] = self.book.stage(req.request_id, need)
            for part in lk.host[g]:  # reload the history; dispatched now, before the step
                self.mempool.slots_in(self.inst.index, part.key, lk.staged[g][part.first:part.first + part.count])
                self.reloaded += part.count
        lk.last_ran = self.step
        return True

    def admit_layered(self, sched: Scheduler, req: Request, num_tokens: int) -> bool:
        """Admit `req` with only some groups on device, if the gates allow it (see the module docstring)."""
        need = sched.blocks_for(num_tokens)
        longest = sched.blocks_for(req.max_total_len)  # host blocks it may come to hold per offloaded group
        g_count = self.num_groups
        # The most groups that fit in free slots stay on device (the first ones: the last layers go to host).
        k = next((k for k in range(g_count - 1, self.runtime.min_resident_groups - 1, -1)
                  if self.book.fits(k * need)), 0)
        if k == 0:
            return False
        offloaded = list(range(k, g_count))
        host_need = len(offloaded) * longest
        if (len(offloaded) * need > self.stage_left or host_need > len(self.book.staging)  # must fit staging alone
                or self.host_reserved + host_need > self.mempool.host[self.inst.index].total):
            return False
        # Projected step time of the running decodes once this request runs alongside them, with every layered
        # request's history reloaded (this one's included: its steady state after the prefill).
        reload = sum(len(lk.offloaded()) * sched.blocks_for(r.num_computed)
                     for r in sched.running if (lk := self.layered.get(r.request_id)) is not None)
        projected = self.runtime.model.project(len(sched.running) + num_tokens, reload + len(offloaded) * need)
        if projected is not None and projected > self.runtime.tpot_slo_s:
            self.slo_refusals += 1
            return False
        lk = LayeredKV(resident=[g < k for g in range(g_count)], tables=[[] for _ in range(g_count)],
                       host=[[] for _ in range(g_count)], staged=[[] for _ in range(g_count)],
                       host_reserved=host_need, last_ran=self.step)
        got = self.book.take(req.request_id, k * need)
        for g in range(k):
            lk.tables[g] = got[g * need:(g + 1) * need]
        for g in offloaded:
            lk.staged[g] = self.book.stage(req.request_id, need)
        self.stage_left -= len(offloaded) * need
        self.layered[req.request_id] = lk
        self.host_reserved += host_need
        self.partial_admissions += 1
        return True

    def group_tables(self, req: Request) -> list[list[int]] | None:
        lk = self.layered.get(req.request_id)
        if lk is None:
            return None
        return [lk.tables[g] if lk.resident[g] else lk.staged[g] for g in range(self.num_groups)]

    def after_dispatch(self, plan: SchedulerOutput) -> None:
        """Copy the step's new KV of offloaded groups from staging to host (ordered after the step on the
        device, nothing waits), then give every staging slot back."""
        bs = self.inst.ecfg.block_size
        host = self.mempool.host[self.inst.index]
        for seq in plan.seqs:
            lk = self.layered.get(seq.request.request_id)
            if lk is None:
                continue
            end = seq.start + seq.num_tokens
            for g in lk.offloaded():
                parts = lk.host[g]
                if parts and parts[-1].tail:  # the partly filled block is rewritten whole
                    assert parts[-1].first == seq.start // bs
                    host.take(parts.pop().key)
                first, full = seq.start // bs, end // bs
                spans = [(first, full - first, False)] if full > first else []
                if end % bs:
                    spans.append((full, 1, True))
                for j, n, tail in spans:
                    key = f"{seq.request.request_id}/{g}/{next(self._keys)}"
                    self.mempool.slots_out(self.inst.index, key, lk.staged[g][j:j + n])
                    parts.append(HostPart(key, j, n, tail))
        self.book.unstage_all()
        for lk in self.layered.values():
            lk.staged = [[] for _ in range(self.num_groups)]

    # ---- promotion and release ----------------------------------------------------------------------
    def promote(self, sched: Scheduler) -> None:
        """Oldest first, copy layered requests into whole blocks while those fit with headroom to grow (one block
        per running request); else bring their offloaded groups into free slots of split blocks."""
        for req in list(sched.running):
            lk = self.layered.get(req.request_id)
            if lk is None:
                continue
            n = sched.blocks_for(req.num_computed)
            if n == 0:
                continue
            if sched.allocator.num_allocatable < n + len(sched.running):
                for g in lk.offloaded():
                    self.promote_group(sched, req, lk, g, headroom=len(sched.running))
                continue
            blocks = sched.allocator.allocate(n)
            for g in range(self.num_groups):
                slots = [p * self.num_groups + g for p in blocks]  # group g of the whole blocks
                if lk.resident[g]:
                    self.mempool.slots_copy(self.inst.index, lk.tables[g][:n], slots)
                else:
                    assert lk.host_blocks(g) == n, f"{req.request_id} group {g}: {lk.host_blocks(g)} on host, {n}"
                    for part in lk.host[g]:
                        self.mempool.slots_in(self.inst.index, part.key, slots[part.first:part.first + part.count])
                        self.reloaded += part.count
            self.drop_layered(req)
            req.blocks = blocks
            req.block_hashes = []  # registered again at its next commit
            self.promotions += 1

    def promote_group(self, sched: Scheduler, req: Request, lk: LayeredKV, g: int, headroom: int) -> bool:
        """Bring offloaded group g of `req` into permanent device slots (one reload) if they fit with
        `headroom` allocatable blocks to spare."""
        n = lk.host_blocks(g)
        if self.book.blocks_needed(n) + headroom > sched.allocator.num_allocatable:
            return False
        host = self.mempool.host[self.inst.index]
        slots = self.book.take(req.request_id, n)
        for part in lk.host[g]:
            self.mempool.slots_in(self.inst.index, part.key, slots[part.first:part.first + part.count])
            self.reloaded += part.count
            host.take(part.key)
        lk.host[g], lk.tables[g], lk.resident[g] = [], slots, True
        self.group_promotions += 1
        return True

    def drop_layered(self, req: Request) -> None:
        """Give back a layered request's device slots, staging and host blocks (release, preemption, promotion)."""
        lk = self.layered.pop(req.request_id, None)
        if lk is None:
            return
        host = self.mempool.host[self.inst.index]
        for g in range(self.num_groups):
            if lk.resident[g]:
                self.book.give(req.request_id, lk.tables[g])
            for part in lk.host[g]:
                host.take(part.key)
        self.book.unstage(req.request_id)
        self.host_reserved -= lk.host_reserved

    def preempt(self, sched: Scheduler, victim: Request) -> None:
        requeue(sched, victim)  # release() drops its layered KV: recompute is the fallback

    def forget(self, sched: Scheduler, req: Request) -> None:
        self.drop_layered(req)

    # ---- books --------------------------------------------------------------------------------------
    def check(self) -> None:
        self.book.check(between_steps=True)
        sched = self.inst.scheduler
        running = {r.request_id: r for r in sched.running}
        owned = self.book.owner
        mine = 0
        host_used = 0
        for rid, lk in self.layered.items():
            req = running.get(rid)
            assert req is not None, f"layered request {rid} is not running on instance {self.inst.index}"
            assert not req.blocks and not any(lk.staged), f"{rid}: whole blocks or staging held between steps"
            n = sched.blocks_for(req.num_computed)
            for g in range(self.num_groups):
                if lk.resident[g]:
                    assert not lk.host[g] and len(lk.tables[g]) >= n, f"{rid} group {g}: device {lk.tables[g]}"
                    for v in lk.tables[g]:
                        assert owned.get(v) == rid, f"{rid} group {g}: slot {v} is not its own"
                    mine += len(lk.tables[g])
                else:
                    assert not lk.tables[g] and lk.host_blocks(g) == n, (
                        f"{rid} group {g}: {lk.host_blocks(g)} host blocks for {n} computed blocks")
                    at = 0
                    for part in lk.host[g]:
                        assert part.first == at and part.key in self.mempool.host[self.inst.index].entries
                        at += part.count
                    host_used += lk.host_blocks(g)
        assert mine == len(owned), "a device slot is owned by no layered request"
        assert host_used == self.mempool.host[self.inst.index].num_used, (
            f"host tier: {self.mempool.host[self.inst.index].num_used} used, layered requests hold {host_used}")
        assert self.host_reserved == sum(lk.host_reserved for lk in self.layered.values())


class LayerKVRuntime:
    """The engine-level side of `layerkv`: the per-group step, the slot books and host tiers, the step-time
    model fed from every instance's measured steps."""

    def __init__(self, engine: LLMEngine):
        from kunjax.block_manager import BlockAllocator
        from kunjax.config import ConfigError
        from kunjax.instance import kv_block_bytes
        from kunjax.mempool import MemPool

        ecfg, cfg = engine.config, engine.model_config
        g = ecfg.layerkv_layer_groups
        if cfg.num_layers % g:
            raise ConfigError(f"--layerkv-layer-groups {g} must divide the model's {cfg.num_layers} layers")
        first = engine.instances[0]
        staging = ecfg.layerkv_staging_blocks
        if staging is None:
            staging = max(1, min(first.max_blocks_per_seq, (first.num_blocks - 1) // 4))
        if staging > first.num_blocks - 2:
            raise ConfigError(f"--layerkv-staging-blocks {staging} leaves no KV block for requests in a pool of "
                              f"{first.num_blocks}")
        if ecfg.host_kv_bytes is None:
            host_slots = 4 * first.num_blocks * g
        else:
            host_slots = ecfg.host_kv_bytes // (kv_block_bytes(cfg, ecfg.block_size, first.dtype, ecfg.tp) // g)
            if host_slots < 1:
                raise ConfigError(f"--host-kv-bytes {ecfg.host_kv_bytes} holds no layer group of a KV block")
        self.engine = engine
        self.num_groups = g
        self.min_resident_groups = ecfg.layerkv_min_resident_groups
        self.tpot_slo_s = ecfg.layerkv_tpot_slo_s
        self.model = StepTimeModel()
        self.hooks: list[LayerKV] = []
        for inst in engine.instances:
            # The staging region is the top `staging` blocks of the pool, outside the allocator's books.
            inst.allocator = BlockAllocator(inst.num_blocks - staging)
            old = inst.scheduler
            hooks = LayerKV(self, inst, SlotBook(inst.allocator, g, range(inst.num_blocks - staging,
                                                                            inst.num_blocks)))
            inst.scheduler = LayerKVScheduler(inst.allocator, block_size=old.block_size,
                                              max_num_seqs=old.max_num_seqs,
                                              max_num_batched_tokens=old.max_num_batched_tokens,
                                              enable_prefix_caching=old.enable_prefix_caching, policy=hooks)
            inst.num_layer_groups = g
            inst.step_hooks = hooks
            self.hooks.append(hooks)
        self.mempool = MemPool(engine.instances, host_slots)
        self.mempool.enable_slots(g)
        self._seen = [0] * len(engine.instances)

    def warmup(self) -> None:
        self.mempool.warmup_slots()

    def after_step(self) -> None:
        """Feed the step-time model with every instance's step just completed."""
        for inst, hooks in zip(self.engine.instances, self.hooks, strict=True):
            if inst.steps != self._seen[inst.index] and inst.last_step is not None:
                tokens, seconds = inst.last_step
                self.model.observe(tokens, hooks.reloaded, seconds)
            self._seen[inst.index] = inst.steps

    def reserved_blocks(self, i: int) -> collections.Counter[int]:
        return self.hooks[i].book.reserved()

    def check(self) -> None:
        self.mempool.check()
        for hooks in self.hooks:
            hooks.check()

    def stats(self) -> dict:
        h = self.hooks
        return {"host_used": sum(t.num_used for t in self.mempool.host),
                "host_total": sum(t.total for t in self.mempool.host),
                "slots_offloaded": self.mempool.slots_offloaded, "slots_reloaded": self.mempool.slots_reloaded,
                "partial_admissions": sum(x.partial_admissions for x in h),
                "slo_refusals": sum(x.slo_refusals for x in h), "promotions": sum(x.promotions for x in h),
                "group_promotions": sum(x.group_promotions for x in h),
                "staging_evictions": sum(x.staging_evictions for x in h),
                "parks": sum(x.parks for x in h), "layered": sum(len(x.layered) for x in h)}


def install(engine: LLMEngine) -> LayerKVRuntime:
    return LayerKVRuntime(engine)
