"""`layerkv` (LayerKV): admit a prefill when only some layer groups of its KV fit on device, keep the other groups
on the host tier, reload them for each step, and promote the request to device residency when memory frees up.

Owns, per replica unit, the partially resident ("layered") requests: where each layer group of their KV lives, the
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

Invariants (`LayerKV.check`, every step in tests): the slot books balance (`SlotBook.check`); between steps
no staging slot is borrowed; the host tier's used blocks are exactly the layered requests' host parts; each
computed block of a layered request is, per group, either in its device slots or on the host, never both.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from kunjax.config import ConfigError, Options
from kunjax.microbatch import MicroBatch
from kunjax.policies.base import Capabilities, MemoryPolicy, PolicyView
from kunjax.policies.layer_slots import SlotBook
from kunjax.policies.swap import host_blocks
from kunjax.request import Request, RequestStatus
from kunjax.unit import ServingUnit

if TYPE_CHECKING:
    from kunjax.config import EngineConfig, ModelConfig


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
        # The weighted sums of x xᵀ (x = [1, T, R]: six distinct entries, symmetric) and of x·seconds, as plain
        # floats updated in place: observed every tick of every unit, projected only at a layered admission.
        self.n = self.t = self.r = self.tt = self.tr = self.rr = 0.0
        self.s = self.ts = self.rs = 0.0
        self.observations = 0

    def observe(self, tokens: int, reloaded: int, seconds: float) -> None:
        d, t, r = self.decay, float(tokens), float(reloaded)
        self.n = d * self.n + 1.0
        self.t = d * self.t + t
        self.r = d * self.r + r
        self.tt = d * self.tt + t * t
        self.tr = d * self.tr + t * r
        self.rr = d * self.rr + r * r
        self.s = d * self.s + seconds
        self.ts = d * self.ts + t * seconds
        self.rs = d * self.rs + r * seconds
        self.observations += 1

    @property
    def gram(self) -> np.ndarray:  # [3, 3]
        return np.array([[self.n, self.t, self.r], [self.t, self.tt, self.tr], [self.r, self.tr, self.rr]])

    @property
    def rhs(self) -> np.ndarray:  # [3]
        return np.array([self.s, self.ts, self.rs])

    def project(self, tokens: int, reloaded: int) -> float | None:
        if self.observations < self.min_obs:
            return None
        coef = np.linalg.solve(self.gram + 1e-9 * np.eye(3), self.rhs)
        coef = np.maximum(coef, 0.0)  # a noisy fit may go negative; no term of a step's time does
        return float(coef @ np.array([1.0, tokens, reloaded]))


class LayeredUnit:
    """`layerkv`'s state and moves on one replica unit (the module docstring)."""

    def __init__(self, policy: LayerKV, unit: ServingUnit, book: SlotBook):
        self.policy = policy
        self.unit = unit
        self.instance = unit.members[0]
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
    def pool(self):
        return self.policy.view.mempool

    # ---- one step -----------------------------------------------------------------------------------
    def begin_step(self) -> set[Request]:
        self.step += 1
        self.reloaded = 0
        if not self.layered:  # no request partly on the host: nothing to promote or park (the common tick)
            self.stage_left = len(self.book.staging)
            return set()
        self.promote()
        return self.park()

    def park(self) -> set[Request]:
        """Promise staging to layered requests, least recently run first; the rest sit this tick out."""
        unit = self.unit
        self.stage_left = len(self.book.staging)
        order = sorted((r for r in unit.running if r.request_id in self.layered),
                       key=lambda r: (self.layered[r.request_id].last_ran, r.arrival_time))
        parked: set[Request] = set()
        for req in order:
            lk = self.layered[req.request_id]
            tokens = min(len(req.token_ids) - req.num_computed, unit.shape.tokens)
            need = unit.blocks_for(req.num_computed + tokens)
            if need * len(lk.offloaded()) > len(self.book.staging):  # outgrew staging: device slots, or recompute
                for g in lk.offloaded():
                    self.promote_group(req, lk, g, headroom=0)
                if need * len(lk.offloaded()) > len(self.book.staging):
                    unit.running.remove(req)
                    unit.requeue(req)
                    self.staging_evictions += 1
                    continue
            if need * len(lk.offloaded()) <= self.stage_left:
                self.stage_left -= need * len(lk.offloaded())
            else:
                parked.add(req)
                self.parks += 1
        return parked

    def grow_layered(self, req: Request, lk: LayeredKV, num_tokens: int) -> bool:
        need = self.unit.blocks_for(req.num_computed + num_tokens)
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
            for part in lk.host[g]:  # reload the history; issued now, before the step
                self.pool.slots_in(self.unit, part.key, lk.staged[g][part.first:part.first + part.count],
                                   self.num_groups)
                self.reloaded += part.count
        lk.last_ran = self.step
        return True

    def admit_layered(self, req: Request, num_tokens: int) -> bool:
        """Admit `req` with only some groups on device, if the gates allow it (see the module docstring)."""
        unit, policy = self.unit, self.policy
        need = unit.blocks_for(num_tokens)
        longest = unit.blocks_for(req.max_total_len)  # host blocks it may come to hold per offloaded group
        g_count = self.num_groups
        # The most groups that fit in free slots stay on device (the first ones: the last layers go to host).
        k = next((k for k in range(g_count - 1, policy.min_resident_groups - 1, -1)
                  if self.book.fits(k * need)), 0)
        if k == 0:
            return False
        offloaded = list(range(k, g_count))
        host_need = len(offloaded) * longest
        if (len(offloaded) * need > self.stage_left or host_need > len(self.book.staging)  # must fit staging alone
                or self.host_reserved + host_need > self.pool.host[self.instance].total):
            return False
        # Projected step time of the running decodes once this request runs alongside them, with every layered
        # request's history reloaded (this one's included: its steady state after the prefill).
        reload = sum(len(lk.offloaded()) * unit.blocks_for(r.num_computed)
                     for r in unit.running if (lk := self.layered.get(r.request_id)) is not None)
        projected = policy.model_time.project(len(unit.running) + num_tokens, reload + len(offloaded) * need)
        if projected is not None and projected > policy.tpot_slo_s:
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

    def after_launch(self, mb: MicroBatch) -> None:
        """Copy the step's new KV of offloaded groups from staging to host (ordered after the step, nothing
        waits), then give every staging slot back."""
        bs = self.unit.block_size
        for it in mb.items:
            lk = self.layered.get(it.req.request_id)
            if lk is None:
                continue
            end = it.start + it.num_tokens
            for g in lk.offloaded():
                parts = lk.host[g]
                if parts and parts[-1].tail:  # the partly filled block is rewritten whole
                    assert parts[-1].first == it.start // bs
                    self.pool.drop_host(self.instance, parts.pop().key)
                first, full = it.start // bs, end // bs
                spans = [(first, full - first, False)] if full > first else []
                if end % bs:
                    spans.append((full, 1, True))
                for j, n, tail in spans:
                    key = f"{it.req.request_id}/{g}/{next(self._keys)}"
                    self.pool.slots_out(self.unit, key, lk.staged[g][j:j + n], self.num_groups)
                    parts.append(HostPart(key, j, n, tail))
        self.book.unstage_all()
        for lk in self.layered.values():
            lk.staged = [[] for _ in range(self.num_groups)]

    # ---- promotion and release ----------------------------------------------------------------------
    def promote(self) -> None:
        """Oldest first, copy layered requests into whole blocks while those fit with headroom to grow (one block
        per running request); else bring their offloaded groups into free slots of split blocks."""
        unit = self.unit
        for req in list(unit.running):
            lk = self.layered.get(req.request_id)
            if lk is None:
                continue
            n = unit.blocks_for(req.num_computed)
            if n == 0:
                continue
            if unit.num_allocatable < n + len(unit.running):
                for g in lk.offloaded():
                    self.promote_group(req, lk, g, headroom=len(unit.running))
                continue
            blocks = unit.allocate(n)[0]
            for g in range(self.num_groups):
                slots = [p * self.num_groups + g for p in blocks]  # group g of the whole blocks
                if lk.resident[g]:
                    self.pool.slots_copy(unit, lk.tables[g][:n], slots, self.num_groups)
                else:
                    assert lk.host_blocks(g) == n, f"{req.request_id} group {g}: {lk.host_blocks(g)} on host, {n}"
                    for part in lk.host[g]:
                        self.pool.slots_in(unit, part.key, slots[part.first:part.first + part.count],
                                           self.num_groups)
                        self.reloaded += part.count
            self.drop_layered(req)
            req.tables = [blocks]  # indexed for reuse at its next commit
            self.promotions += 1

    def promote_group(self, req: Request, lk: LayeredKV, g: int, headroom: int) -> bool:
        """Bring offloaded group g of `req` into permanent device slots (one reload) if they fit with
        `headroom` allocatable blocks to spare."""
        n = lk.host_blocks(g)
        if self.book.blocks_needed(n) + headroom > self.unit.num_allocatable:
            return False
        slots = self.book.take(req.request_id, n)
        for part in lk.host[g]:
            self.pool.slots_in(self.unit, part.key, slots[part.first:part.first + part.count], self.num_groups)
            self.reloaded += part.count
            self.pool.drop_host(self.instance, part.key)
        lk.host[g], lk.tables[g], lk.resident[g] = [], slots, True
        self.group_promotions += 1
        return True

    def drop_layered(self, req: Request) -> None:
        """Give back a layered request's device slots, staging and host blocks (release, preemption, promotion)."""
        lk = self.layered.pop(req.request_id, None)
        if lk is None:
            return
        for g in range(self.num_groups):
            if lk.resident[g]:
                self.book.give(req.request_id, lk.tables[g])
            for part in lk.host[g]:
                self.pool.drop_host(self.instance, part.key)
        self.book.unstage(req.request_id)
        self.host_reserved -= lk.host_reserved

    # ---- books --------------------------------------------------------------------------------------
    def check(self) -> None:
        self.book.check(between_steps=True)
        unit = self.unit
        host = self.pool.host[self.instance]
        running = {r.request_id: r for r in unit.running}
        owned = self.book.owner
        mine = 0
        host_used = 0
        for rid, lk in self.layered.items():
            req = running.get(rid)
            assert req is not None, f"layered request {rid} is not running on instance {self.instance}"
            assert not req.blocks and not any(lk.staged), f"{rid}: whole blocks or staging held between steps"
            n = unit.blocks_for(req.num_computed)
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
                        assert part.first == at and part.key in host.entries
                        at += part.count
                    host_used += lk.host_blocks(g)
        assert mine == len(owned), "a device slot is owned by no layered request"
        assert host_used == host.num_used, f"host tier: {host.num_used} used, layered requests hold {host_used}"
        assert self.host_reserved == sum(lk.host_reserved for lk in self.layered.values())


@dataclasses.dataclass(frozen=True)
class LayerKVOptions(Options):
    concern: ClassVar[str] = "policy layerkv"
    layerkv_layer_groups: int = dataclasses.field(default=2, metadata={"help": (
        "layer groups G (G divides the model's layers); a request may hold some groups of its KV on device and "
        "the others on the host tier")})
    layerkv_min_resident_groups: int = dataclasses.field(default=1, metadata={"help": (
        "fewest layer groups of a request on device for a partial admission (G: never admit partially)")})
    layerkv_staging_blocks: int | None = dataclasses.field(default=None, metadata={"help": (
        "KV blocks reserved from each instance's pool at start-up as the staging region into which offloaded "
        "groups are reloaded for one step; default: one longest sequence, at most a quarter of the pool")})
    layerkv_tpot_slo_s: float = dataclasses.field(default=1.0, metadata={"help": (
        "refuse a partial admission when the projected seconds per step of the running decodes (with its reload "
        "traffic) exceed this")})

    def __post_init__(self) -> None:
        for name in ("layerkv_layer_groups", "layerkv_min_resident_groups", "layerkv_staging_blocks"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.layerkv_min_resident_groups > self.layerkv_layer_groups:
            raise ConfigError(f"--layerkv-min-resident-groups ({self.layerkv_min_resident_groups}) must be at most "
                              f"--layerkv-layer-groups ({self.layerkv_layer_groups})")
        if not self.layerkv_tpot_slo_s > 0:
            raise ConfigError(f"--layerkv-tpot-slo-s must be positive, got {self.layerkv_tpot_slo_s}")


class LayerKV(MemoryPolicy):
    """The `layerkv` policy: per replica a `LayeredUnit`; the step-time model fed from every measured tick."""

    name = "layerkv"
    Options = LayerKVOptions

    def __init__(self, config: EngineConfig, model: ModelConfig, *, num_instances: int, num_blocks: int,
                 block_bytes: int):
        super().__init__(config, model, num_instances=num_instances, num_blocks=num_blocks, block_bytes=block_bytes)
        opts = self.options
        g = opts.layerkv_layer_groups
        if model.num_layers % g:
            raise ConfigError(f"--layerkv-layer-groups {g} must divide the model's {model.num_layers} layers")
        staging = opts.layerkv_staging_blocks
        if staging is None:
            staging = max(1, min(config.max_blocks_per_seq(model), (num_blocks - 1) // 4))
        if staging > num_blocks - 2:
            raise ConfigError(f"--layerkv-staging-blocks {staging} leaves no KV block for requests in a pool of "
                              f"{num_blocks}")
        self.num_groups = g
        self.num_blocks = num_blocks
        self.staging = staging
        self.host_slots = host_blocks(config, num_blocks * g, block_bytes // g, "layer group of a KV block")
        self.min_resident_groups = opts.layerkv_min_resident_groups
        self.tpot_slo_s = opts.layerkv_tpot_slo_s
        self.model_time = StepTimeModel()
        self.units: dict[int, LayeredUnit] = {}

    def capabilities(self) -> Capabilities:
        return Capabilities(host_blocks=self.host_slots, layer_groups=self.num_groups, staging_blocks=self.staging)

    def attach(self, view: PolicyView) -> None:
        super().attach(view)
        for unit in view.units:
            # The staging region is the top `staging` blocks of the pool, outside the allocator's books.
            book = SlotBook(unit, self.num_groups, range(self.num_blocks - self.staging, self.num_blocks))
            self.units[unit.uid] = LayeredUnit(self, unit, book)

    # ---- scheduling hooks ---------------------------------------------------------------------------
    def begin_step(self, unit: ServingUnit) -> set[Request]:
        return self.units[unit.uid].begin_step()

    def grow(self, unit: ServingUnit, req: Request, num_tokens: int) -> bool | None:
        lu = self.units[unit.uid]
        lk = lu.layered.get(req.request_id)
        return None if lk is None else lu.grow_layered(req, lk, num_tokens)

    def admit_fallback(self, unit: ServingUnit, req: Request, num_tokens: int) -> bool:
        return req.status is RequestStatus.WAITING and self.units[unit.uid].admit_layered(req, num_tokens)

    def release(self, unit: ServingUnit, req: Request) -> None:
        self.units[unit.uid].drop_layered(req)  # (preemption is recompute: this frees its slots and host blocks)

    def commit(self, unit: ServingUnit, req: Request) -> bool:
        return req.request_id in self.units[unit.uid].layered  # split blocks are never prefix-cached

    def group_tables(self, unit: ServingUnit, req: Request) -> list[list[int]] | None:
        return self.units[unit.uid].group_tables(req)

    def after_launch(self, unit: ServingUnit, mb: MicroBatch) -> None:
        self.units[unit.uid].after_launch(mb)

    def forget(self, unit: ServingUnit, req: Request) -> None:
        self.units[unit.uid].drop_layered(req)

    # ---- engine level -------------------------------------------------------------------------------
    def observe_tick(self, unit: ServingUnit, tokens: int, seconds: float) -> None:
        self.model_time.observe(tokens, self.units[unit.uid].reloaded, seconds)

    def reserved_blocks(self, unit: ServingUnit, stage: int):
        return self.units[unit.uid].book.reserved()

    def check(self) -> None:
        for lu in self.units.values():
            lu.check()

    def stats(self) -> dict[str, int]:
        us = self.units.values()
        pool = self.view.mempool
        return {"host_used": sum(t.num_used for t in pool.host), "host_total": sum(t.total for t in pool.host),
                "slots_offloaded": pool.slots_offloaded, "slots_reloaded": pool.slots_reloaded,
                "partial_admissions": sum(x.partial_admissions for x in us),
                "slo_refusals": sum(x.slo_refusals for x in us), "promotions": sum(x.promotions for x in us),
                "group_promotions": sum(x.group_promotions for x in us),
                "staging_evictions": sum(x.staging_evictions for x in us),
                "parks": sum(x.parks for x in us), "layered": sum(len(x.layered) for x in us)}
