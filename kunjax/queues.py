"""Request queues in arrival order, with the totals the router and the policies read for every request.

The router weighs every candidate unit for each new request (the KV its queue will need, the tokens its queue
still has to compute), and the policies read each unit's demand every step. Summing a queue on every read makes
routing quadratic in the queue: at a 3x overload the simulated bench queues thousands of requests per unit and
spent most of its time in those sums. An `ArrivalQueue` keeps what each request weighed when it joined and the
running totals, so a read is O(1) and a join or a leave O(log n) (plus the deque's own insert).

A queued request's weight must not change while it is queued: its tokens and its progress are frozen until it
leaves the queue (the scheduler may match a head request's cached prefix, but it either admits it — taking it out
of the queue — or releases the match before the step ends). `check` recomputes every weight and asserts this.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kunjax.request import Request


def insert_by_arrival(queue: collections.deque[Request] | list[Request], req: Request) -> None:
    """Insert `req` into `queue` (ordered by arrival time) after every request that arrived no later."""
    if not queue or queue[-1].arrival_time <= req.arrival_time:  # the common case: the newest arrival
        queue.append(req)
        return
    queue.insert(bisect.bisect_right(queue, req.arrival_time, key=_arrival), req)


def _arrival(req: Request) -> float:
    return req.arrival_time


class ArrivalQueue:
    """Requests in arrival order (FCFS; a requeued request goes back to its arrival position), with the totals of
    `weigh(req)` over the queue (module docstring). Reads like a deque of requests."""

    def __init__(self, weigh: Callable[[Request], tuple[int, ...]], width: int):
        self.weigh, self.width = weigh, width
        self._queue: collections.deque[Request] = collections.deque()
        self._weights: dict[Request, tuple[int, ...]] = {}  # each queued request's weight when it joined
        self._totals = [0] * width

    # ---- changes ------------------------------------------------------------------------------------
    def insert(self, req: Request) -> None:
        """Queue `req` after every request that arrived no later."""
        if req in self._weights:
            raise ValueError(f"request {req.request_id} is queued already")
        w = self.weigh(req)
        self._weights[req] = w
        for i, x in enumerate(w):
            self._totals[i] += x
        insert_by_arrival(self._queue, req)

    def popleft(self) -> Request:
        req = self._queue.popleft()
        self._forget(req)
        return req

    def remove(self, req: Request) -> None:
        self._queue.remove(req)
        self._forget(req)

    def clear(self) -> None:
        self._queue.clear()
        self._weights.clear()
        self._totals = [0] * self.width

    def _forget(self, req: Request) -> None:
        for i, x in enumerate(self._weights.pop(req)):
            self._totals[i] -= x

    # ---- reads --------------------------------------------------------------------------------------
    def total(self, i: int) -> int:
        """The sum of the weights' `i`-th entries over the queue."""
        return self._totals[i]

    def __len__(self) -> int:
        return len(self._queue)

    def __bool__(self) -> bool:
        return bool(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def __getitem__(self, i: int) -> Request:
        return self._queue[i]

    def __contains__(self, req: object) -> bool:
        return req in self._weights

    def __repr__(self) -> str:
        return f"ArrivalQueue({[r.request_id for r in self._queue]}, totals={self._totals})"

    def check(self) -> None:
        """Arrival order, and every weight and total as `weigh` computes them now."""
        arrivals = [r.arrival_time for r in self._queue]
        assert arrivals == sorted(arrivals), "the queue is out of arrival order"
        assert set(self._weights) == set(self._queue) and len(self._weights) == len(self._queue), (
            "the queue's weights and requests differ")
        totals = [0] * self.width
        for req in self._queue:
            w = self.weigh(req)
            assert w == self._weights[req], (f"request {req.request_id} weighs {w} now but {self._weights[req]} "
                                             f"when it joined: a queued request changed")
            for i, x in enumerate(w):
                totals[i] += x
        assert totals == self._totals, f"the queue's totals are {self._totals}, its requests sum to {totals}"
