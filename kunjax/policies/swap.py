"""`swap` (vLLM swap preemption, InferCept's bounded swapping): a preempted request's KV goes to host memory.

Owns the swapped requests' trip through the host tier of the memory pool (`kunjax.mempool`):

* **Out.** The scheduler's victim (the latest admitted running request) has its blocks copied to its replica's
  host tier and freed on the device; it waits in the unit's `swapped` queue with all its progress. When the host
  tier is full, or the step's swap volume (`--swap-blocks-per-step`, InferCept's cap on what one step may move
  over the host link) is spent, the victim is recomputed instead: the cap bounds the stall a step can take.
* **In.** Before any new request is admitted, swapped requests come back FCFS into newly allocated device blocks
  (within the same per-step volume) and decode on in the same step; new admissions wait while any request is
  swapped out, so a swapped request is never starved by later arrivals.

The copies are queued as memory operations when the scheduler decides them and reach the executor before the
tick is launched, so a block freed by a swap-out can hold this tick's new tokens. A request's history is never
lost or recomputed on this path: its greedy output equals an unpreempted run.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

from kunjax.config import ConfigError, Options
from kunjax.microbatch import Scheduled
from kunjax.policies.base import Capabilities, MemoryPolicy
from kunjax.queues import insert_by_arrival
from kunjax.request import Request, RequestStatus
from kunjax.unit import ServingUnit

if TYPE_CHECKING:
    from kunjax.config import EngineConfig, ModelConfig


def host_blocks(config: EngineConfig, num_blocks: int, unit_bytes: int, what: str) -> int:
    """Host-tier capacity in units of `unit_bytes` (`--host-kv-bytes`, default 4x the device pool)."""
    if config.host_kv_bytes is None:
        return 4 * num_blocks
    n = config.host_kv_bytes // unit_bytes
    if n < 1:
        raise ConfigError(f"--host-kv-bytes {config.host_kv_bytes} holds no {what} of {unit_bytes} bytes")
    return n


@dataclasses.dataclass(frozen=True)
class SwapOptions(Options):
    concern: ClassVar[str] = "policy swap"
    swap_blocks_per_step: int = dataclasses.field(default=64, metadata={"help": (
        "most KV blocks moved between device and host in one step (InferCept's cap; a victim beyond it is "
        "recomputed)")})

    def __post_init__(self) -> None:
        if self.swap_blocks_per_step <= 0:
            raise ConfigError(f"--swap-blocks-per-step must be positive, got {self.swap_blocks_per_step}")


class Swap(MemoryPolicy):
    name = "swap"
    Options = SwapOptions

    def __init__(self, config: EngineConfig, model: ModelConfig, *, num_instances: int, num_blocks: int,
                 block_bytes: int):
        super().__init__(config, model, num_instances=num_instances, num_blocks=num_blocks, block_bytes=block_bytes)
        self.host = host_blocks(config, num_blocks, block_bytes, "KV block")
        self.blocks_per_step = self.options.swap_blocks_per_step
        self.volume: dict[int, int] = {}  # per unit: blocks moved over the host link in this step
        self.swap_outs = 0
        self.swap_ins = 0

    def capabilities(self) -> Capabilities:
        return Capabilities(host_blocks=self.host, overlap=True)

    def begin_step(self, unit: ServingUnit) -> set[Request]:
        self.volume[unit.uid] = 0
        return set()

    def _within_cap(self, unit: ServingUnit, n: int) -> bool:
        # One move larger than the cap is still allowed in an otherwise idle step, or it could never happen.
        v = self.volume.get(unit.uid, 0)
        return v + n <= self.blocks_per_step or v == 0

    def preempt(self, unit: ServingUnit, victim: Request) -> None:
        pool = self.view.mempool
        n = len(victim.blocks)
        if n == 0 or n > pool.host_available(unit.members[0]) or not self._within_cap(unit, n):
            unit.requeue(victim)
            return
        pool.swap_out(unit, victim.request_id, victim.blocks)
        self.volume[unit.uid] = self.volume.get(unit.uid, 0) + n
        self.swap_outs += 1
        unit.index.release(victim.index_path)
        victim.tables, victim.index_path = [[]], []  # its new blocks are indexed again as they commit
        victim.status = RequestStatus.SWAPPED
        victim.num_preemptions += 1
        unit.num_preemptions += 1
        unit.swapped.insert(victim)

    def resume(self, unit: ServingUnit, items: list[Scheduled], budget: int) -> int:
        pool = self.view.mempool
        i = unit.members[0]
        seqs = unit.shape.seqs
        while unit.swapped and budget > 0 and len(items) < seqs and len(unit.running) < unit.max_running:
            req = unit.swapped[0]
            n = pool.host_blocks_of(i, req.request_id)
            tokens = min(len(req.token_ids) - req.num_computed, budget)
            need = max(n, unit.blocks_for(req.num_computed + tokens))
            if need > unit.num_allocatable or not self._within_cap(unit, n):
                break
            req.tables = [pool.swap_in(unit, req.request_id)]
            self.volume[unit.uid] = self.volume.get(unit.uid, 0) + n
            self.swap_ins += 1
            unit.swapped.popleft()
            req.status = RequestStatus.RUNNING
            insert_by_arrival(unit.running, req)
            grown = unit.grow(req, tokens)
            assert grown, "swap-in checked the blocks it needs"
            items.append(Scheduled(req, req.num_computed, tokens, req.num_computed + tokens == len(req.token_ids)))
            budget -= tokens
        return budget

    def may_admit(self, unit: ServingUnit) -> bool:
        return not unit.swapped

    def forget(self, unit: ServingUnit, req: Request) -> None:
        self.view.mempool.drop_host(unit.members[0], req.request_id)

    def check(self) -> None:
        pool = self.view.mempool
        for unit in self.view.units:
            for r in unit.swapped:
                assert not r.blocks and pool.host_blocks_of(unit.members[0], r.request_id) > 0, (
                    f"swapped request {r.request_id} holds device blocks or has no host copy")

    def stats(self) -> dict[str, int]:
        return {**self.view.mempool.stats(), "swap_outs": self.swap_outs, "swap_ins": self.swap_ins}
