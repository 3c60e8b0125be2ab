"""Request queues keep arrival order and the totals the router and policies read (`kunjax.queues`)."""

from __future__ import annotations

import random

import pytest

from kunjax.queues import ArrivalQueue, insert_by_arrival
from kunjax.request import Request
from kunjax.sampling_params import SamplingParams


def request(rid: str, arrival: float, n: int) -> Request:
    return Request(rid, None, list(range(n)), n, SamplingParams(), 0, frozenset(), 64, arrival_time=arrival)


def weigh(r: Request) -> tuple[int, int]:
    return -(-(len(r.token_ids) + 1) // 4), len(r.token_ids) - r.num_computed


def test_arrival_order_and_totals_through_every_change():
    rng = random.Random(0)
    q = ArrivalQueue(weigh, 2)
    reqs = [request(f"r{i}", float(rng.randint(0, 20)), rng.randint(1, 30)) for i in range(60)]
    model: list[Request] = []
    for r in reqs:
        q.insert(r)
        model.append(r)
        model.sort(key=lambda x: x.arrival_time)  # stable: equal arrivals keep their insertion order
        assert list(q) == model
        q.check()
    for step in range(40):
        r = q.popleft() if step % 3 == 0 else model[rng.randrange(len(model))]
        if step % 3:
            q.remove(r)
        model.remove(r)
        assert r not in q and list(q) == model and len(q) == len(model)
        assert (q.total(0), q.total(1)) == tuple(map(sum, zip(*map(weigh, model), strict=True)))
        if step % 5 == 0:  # requeued: back at its arrival position
            q.insert(r)
            model.append(r)
            model.sort(key=lambda x: x.arrival_time)
            assert list(q) == model and q[0] is model[0]
        q.check()
    q.clear()
    assert not q and len(q) == 0 and q.total(0) == q.total(1) == 0
    q.check()


def test_a_request_queued_twice_or_changed_while_queued_is_caught():
    q = ArrivalQueue(weigh, 2)
    r = request("a", 1.0, 10)
    q.insert(r)
    with pytest.raises(ValueError, match="queued already"):
        q.insert(r)
    r.num_computed = 4  # progress while queued breaks the totals: `check` says which request
    with pytest.raises(AssertionError, match="request a weighs"):
        q.check()


def test_insert_by_arrival_on_lists_and_deques():
    q: list[Request] = []
    for rid, t in [("a", 2.0), ("b", 1.0), ("c", 2.0), ("d", 0.5), ("e", 3.0)]:
        insert_by_arrival(q, request(rid, t, 1))
    assert [r.request_id for r in q] == ["d", "b", "a", "c", "e"]
