"""`recompute` (vLLM's default preemption): a preempted request loses its KV and is re-prefilled later.

The victim's blocks go back to the pool (full hashed blocks stay in the prefix cache), its generated tokens are
kept, and it re-enters the waiting queue at its arrival position, ahead of later arrivals. Nothing moves between
memory tiers; it is also the fallback of every other policy when its own move does not fit.
"""

from __future__ import annotations

import bisect
from collections.abc import MutableSequence
from typing import TYPE_CHECKING

from kunjax.request import Request, RequestStatus

if TYPE_CHECKING:
    from kunjax.scheduler import ScheduledSeq, Scheduler


def insert_by_arrival(queue: MutableSequence[Request], req: Request) -> None:
    """Insert `req` into `queue` (ordered by arrival time) after every request that arrived no later."""
    keys = [r.arrival_time for r in queue]
    queue.insert(bisect.bisect_right(keys, req.arrival_time), req)


def requeue(sched: Scheduler, req: Request) -> None:
    """Release `req`'s KV and put it back in the waiting queue at its arrival position (FCFS)."""
    sched.release(req)
    req.status = RequestStatus.WAITING
    req.num_preemptions += 1
    sched.num_preemptions += 1
    insert_by_arrival(sched.waiting, req)


class Recompute:
    """The scheduler's preemption hooks with nothing beyond recompute."""

    name = "recompute"

    def begin_step(self, sched: Scheduler) -> None:
        pass

    def preempt(self, sched: Scheduler, victim: Request) -> None:
        requeue(sched, victim)

    def resume(self, sched: Scheduler, seqs: list[ScheduledSeq], budget: int) -> int:
        return budget

    def may_admit(self, sched: Scheduler) -> bool:
        return True

    def forget(self, sched: Scheduler, req: Request) -> None:
        """`req` left this scheduler (finished, aborted): drop whatever the policy holds for it."""
