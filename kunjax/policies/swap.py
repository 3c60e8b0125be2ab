"""`swap` (vLLM swap preemption, InferCept's bounded swapping): a preempted request's KV goes to host memory.

Owns the swapped requests' trip through the host tier of the memory pool (`kunjax.mempool`):

* **Out.** The scheduler's victim (the latest-arrived running request) has its blocks copied to the instance's
  host tier and freed on the device; it waits in the scheduler's `swapped` queue with all its progress. When the
  host tier is full, or the step's swap volume (`--swap-blocks-per-step`, InferCept's cap on what one step may
  move over the host link) is spent, the victim is recomputed instead: the cap bounds the stall a step can take.
* **In.** Before any new request is admitted, swapped requests come back FCFS into newly allocated device blocks
  (within the same per-step volume) and decode on in the same step; new admissions wait while any request is
  swapped out, so a swapped request is never starved by later arrivals.

The copies are dispatched when the scheduler decides them, before the step is launched (see `kunjax.mempool`),
so a block freed by a swap-out can hold this step's new tokens. A request's history is never lost or recomputed
on this path: its greedy output equals an unpreempted run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kunjax.policies.recompute import insert_by_arrival, requeue
from kunjax.request import Request, RequestStatus

if TYPE_CHECKING:
    from kunjax.engine import LLMEngine
    from kunjax.mempool import MemPool
    from kunjax.scheduler import ScheduledSeq, Scheduler


class Swap:
    name = "swap"

    def __init__(self, mempool: MemPool, instance: int, blocks_per_step: int):
        self.mempool = mempool
        self.instance = instance
        self.blocks_per_step = blocks_per_step
        self.volume = 0  # blocks moved over the host link in this step
        self.swap_outs = 0
        self.swap_ins = 0

    def begin_step(self, sched: Scheduler) -> None:
        self.volume = 0

    def _within_cap(self, n: int) -> bool:
        # One move larger than the cap is still allowed in an otherwise idle step, or it could never happen.
        return self.volume + n <= self.blocks_per_step or self.volume == 0

    def preempt(self, sched: Scheduler, victim: Request) -> None:
        n = len(victim.blocks)
        if n == 0 or n > self.mempool.host_free(self.instance) or not self._within_cap(n):
            requeue(sched, victim)
            return
        self.mempool.swap_out(self.instance, victim.request_id, victim.blocks)
        self.volume += n
        self.swap_outs += 1
        victim.blocks = []
        victim.block_hashes = []  # the blocks it comes back to are new; they are indexed again as they commit
        victim.status = RequestStatus.SWAPPED
        victim.num_preemptions += 1
        sched.num_preemptions += 1
        insert_by_arrival(sched.swapped, victim)

    def resume(self, sched: Scheduler, seqs: list[ScheduledSeq], budget: int) -> int:
        from kunjax.scheduler import ScheduledSeq

        while (sched.swapped and budget > 0 and len(seqs) < sched.max_num_seqs
               and len(sched.running) < sched.max_num_seqs):
            req = sched.swapped[0]
            n = self.mempool.host_blocks_of(self.instance, req.request_id)
            tokens = min(len(req.token_ids) - req.num_computed, budget)
            need = max(n, sched.blocks_for(req.num_computed + tokens))
            if need > sched.allocator.num_allocatable or not self._within_cap(n):
                break
            req.blocks = self.mempool.swap_in(self.instance, req.request_id)
            self.volume += n
            self.swap_ins += 1
            sched.swapped.pop(0)
            req.status = RequestStatus.RUNNING
            insert_by_arrival(sched.running, req)
            grown = sched.grow(req, tokens)
            assert grown, "swap-in checked the blocks it needs"
            seqs.append(ScheduledSeq(req, req.num_computed, tokens, req.num_computed + tokens == len(req.token_ids)))
            budget -= tokens
        return budget

    def may_admit(self, sched: Scheduler) -> bool:
        return not sched.swapped

    def forget(self, sched: Scheduler, req: Request) -> None:
        self.mempool.drop_host(self.instance, req.request_id)


class SwapRuntime:
    """The engine-level side of `swap`: the memory pool with a host tier per instance, and its books."""

    def __init__(self, engine: LLMEngine):
        from kunjax.config import ConfigError
        from kunjax.instance import kv_block_bytes
        from kunjax.mempool import MemPool

        ecfg = engine.config
        first = engine.instances[0]
        if ecfg.host_kv_bytes is None:
            host_blocks = 4 * first.num_blocks
        else:
            block = kv_block_bytes(engine.model_config, ecfg.block_size, first.dtype, ecfg.tp)
            host_blocks = ecfg.host_kv_bytes // block
            if host_blocks < 1:
                raise ConfigError(f"--host-kv-bytes {ecfg.host_kv_bytes} holds no KV block of {block} bytes")
        self.engine = engine
        self.mempool = MemPool(engine.instances, host_blocks)
        for inst in engine.instances:
            inst.scheduler.policy = Swap(self.mempool, inst.index, ecfg.swap_blocks_per_step)

    def warmup(self) -> None:
        self.mempool.warmup()

    def after_step(self) -> None:
        pass

    def check(self) -> None:
        self.mempool.check()
        for inst in self.engine.instances:
            for r in inst.scheduler.swapped:
                assert not r.blocks and self.mempool.host_blocks_of(inst.index, r.request_id) > 0, (
                    f"swapped request {r.request_id} holds device blocks or has no host copy")

    def stats(self) -> dict:
        policies = [inst.scheduler.policy for inst in self.engine.instances]
        return {**self.mempool.stats(), "swap_outs": sum(p.swap_outs for p in policies),
                "swap_ins": sum(p.swap_ins for p in policies)}


def install(engine: LLMEngine) -> SwapRuntime:
    return SwapRuntime(engine)
