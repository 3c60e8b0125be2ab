"""A serving unit's host side without a device: the one scheduler for replicas and pipelines (token budget,
chunked prefill, decode-first, preemption by recompute, prefix reuse), and a pipeline's stale history, live
exchange, move-home plan, in-flight aborts and micro-batch balance."""

import collections
import random

import numpy as np
import pytest

from kunjax.blocks import BlockAllocator
from kunjax.engine import config_from_kwargs
from kunjax.fusion import fuse_books, plan_move_home
from kunjax.plan import UnitShape
from kunjax.policies.base import MemoryPolicy
from kunjax.request import Request, RequestStatus
from kunjax.sampling_params import SamplingParams
from kunjax.unit import ServingUnit
from tests.helpers import TINY, check_tick_work

BS = 4


def hooks() -> MemoryPolicy:
    return MemoryPolicy(config_from_kwargs(), TINY, num_instances=1, num_blocks=2, block_bytes=1)


def make_req(i: int, prompt_len: int, max_tokens: int, t: float) -> Request:
    return Request(request_id=f"r{i}", prompt=None, token_ids=list(range(1, prompt_len + 1)),
                   num_prompt_tokens=prompt_len, params=SamplingParams(max_tokens=max_tokens, temperature=0),
                   seed=0, eos_token_ids=frozenset(), max_total_len=prompt_len + max_tokens, arrival_time=t)


def replica(num_blocks: int, *, bs: int = BS, seqs: int = 4, tokens: int = 16, caching: bool = False,
            uid: int = 0) -> ServingUnit:
    shape = UnitShape(k=1, tp=1, tokens=tokens, buckets=(tokens,), seqs=seqs, max_blocks=64, num_base=num_blocks)
    return ServingUnit(uid, (uid,), shape, [BlockAllocator(num_blocks)], hooks(), block_size=bs,
                       enable_prefix_caching=caching, now=lambda: 0.0)


def tick(unit: ServingUnit, token: int = 7):
    """One tick as the engine runs it, with `token` as every sample; returns the leaving micro-batch."""
    leaving, active = unit.advance()
    if not active:
        return None
    work, inputs = unit.tick_work(), unit.tick_inputs()
    check_tick_work(work, inputs)
    assert inputs.valid.sum() == sum(mb.num_tokens for mb in unit.at_stage if mb is not None)
    if leaving is None:
        return None
    n = len(leaving.items)
    for req, tok, *_ in unit.exit(leaving, np.full(n, token), np.zeros(n)):
        req.token_ids.append(tok)
        if len(req.token_ids) >= req.max_total_len:
            unit.finish(req)
    return leaving


def run_to_completion(unit: ServingUnit, max_ticks: int = 10_000) -> list:
    batches = []
    for _ in range(max_ticks):
        if not unit.has_work:
            return batches
        mb = tick(unit)
        if mb is not None:
            assert mb.num_tokens <= unit.shape.tokens and len(mb.items) <= unit.shape.seqs
            batches.append(mb)
        unit.check(no_reservations)
    raise AssertionError("did not finish")


def test_chunked_prefill_mixes_with_decodes_under_the_budget():
    u = replica(64, seqs=4, tokens=8)
    a, b = make_req(0, 3, 4, 0.0), make_req(1, 20, 2, 1.0)
    u.add(a)
    u.add(b)
    first = tick(u)
    assert [(x.req.request_id, x.num_tokens, x.sample) for x in first.items] == [("r0", 3, True), ("r1", 5, False)]
    second = tick(u)
    # The running decode goes first (1 token), the prefill continues with the rest of the budget.
    assert [(x.req.request_id, x.start, x.num_tokens) for x in second.items] == [("r0", 3, 1), ("r1", 5, 7)]


def test_preemption_by_recompute_keeps_generated_tokens_and_everyone_finishes():
    u = replica(9, seqs=8, tokens=64)  # 8 usable blocks
    reqs = [make_req(i, 6, 12, float(i)) for i in range(4)]  # each needs up to 5 blocks
    for r in reqs:
        u.add(r)
    run_to_completion(u)
    assert u.num_preemptions > 0
    assert reqs[0].num_preemptions == 0  # the victim is always the latest admitted
    assert all(r.status is RequestStatus.FINISHED and len(r.output_ids) == 12 for r in reqs)
    assert u.stages[0].num_free == u.stages[0].total


def test_a_request_that_can_never_fit_is_refused_at_add():
    u = replica(5)
    with pytest.raises(ValueError, match="needs? 5 KV blocks.*holds 4"):
        u.add(make_req(0, 10, 10, 0.0))


def test_prefix_cache_hit_skips_computed_blocks_and_equal_blocks_are_shared():
    u = replica(32, tokens=64, caching=True)
    a = make_req(0, 10, 1, 0.0)
    u.add(a)
    run_to_completion(u)
    b = make_req(1, 10, 1, 1.0)
    u.add(b)
    mb = tick(u)
    assert mb.items[0].start == 8 and b.num_cached_tokens == 8  # two full blocks reused, 2 tokens computed
    c, d = make_req(2, 8, 5, 2.0), make_req(3, 8, 5, 3.0)  # exactly two blocks: the last one is computed by both
    u.add(c)
    u.add(d)
    run_to_completion(u)
    assert u.index.hits >= 4 and u.stages[0].num_used == 0
    u.check(no_reservations)


@pytest.mark.parametrize("seed", range(5))
def test_random_workloads_never_deadlock_or_lose_requests(seed):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    tokens = rng.randint(8, 40)
    u = replica(rng.randint(12, 40), bs=bs, seqs=rng.randint(1, 8), tokens=tokens, caching=rng.random() < 0.5)
    reqs = []
    for i in range(30):
        r = make_req(i, rng.randint(1, 30), rng.randint(1, 20), float(i))
        try:
            u.add(r)
            reqs.append(r)
        except ValueError:
            pass
    run_to_completion(u)
    assert all(r.finished for r in reqs)
    assert u.stages[0].num_used == 0


# ---- pipelines (k > 1) ----------------------------------------------------------------------------------------
def pipeline_shape(k: int = 2, **kw) -> UnitShape:
    base = dict(k=k, tp=1, num_base=8 * k, num_ext=6, tokens=16, buckets=(8, 16), seqs=4, max_blocks=8,
                remote_rows=4, copy_blocks=3)
    base.update(kw)
    return UnitShape(**base)


def running(u: ServingUnit, rid: str, n_tokens: int, blocks: list[int]) -> Request:
    r = Request(request_id=rid, prompt=None, token_ids=list(range(1, n_tokens + 1)), num_prompt_tokens=n_tokens,
                params=SamplingParams(max_tokens=8), seed=0, eos_token_ids=frozenset(),
                max_total_len=n_tokens + 8)
    r.tables, r.num_computed, r.status = [list(blocks)], n_tokens, RequestStatus.RUNNING
    for b in blocks:
        u.stages[0].take([b])
    u.running.append(r)
    return r


def fused(k: int = 2, shape: UnitShape | None = None) -> tuple[ServingUnit, Request, Request]:
    members = [replica(8, uid=i) for i in range(k)]
    r0 = running(members[0], "a", 10, blocks=[2, 5, 6])  # homed on stage 0; 10 tokens: the last block partial
    r1 = running(members[1], "b", 8, blocks=[1, 3])  # homed on stage 1; exactly two full blocks
    unit = fuse_books(9, members, shape or pipeline_shape(k), hooks(), block_size=BS, enable_prefix_caching=False,
                      now=lambda: 0.0)
    return unit, r0, r1


def no_reservations(s):
    return collections.Counter()


def test_fusion_holds_every_pipeline_id_of_the_old_blocks_on_the_home():
    u, r0, r1 = fused()
    k = 2
    assert r0.tables[0] == [2 * k, 5 * k, 6 * k]  # the home stage reads its own layers locally
    assert r0.tables[1][:2] == [0, 0] and r0.tables[1][2] != 0  # remote history; a fresh partial block
    assert r1.tables[0] == [0, 0]  # whole blocks: nothing to allocate until new tokens come
    assert u.num_remote_dependent == 2 and r0.unit == r1.unit == 9
    assert all(u.stages[0].refcount(x * k + s) == 1 for x in [2, 5, 6] for s in range(k))
    u.check(no_reservations)


def test_exchange_moves_history_in_bounded_deterministic_batches_and_releases_it():
    u, r0, r1 = fused()
    first = u.plan_exchange(limit=3)
    # (src, dst) pairs get at most 3 copies each; arrival order, then stage, then block.
    assert [c[:3] for c in first] == [(0, 2 * 2 + 1, 1), (0, 5 * 2 + 1, 1), (0, 6 * 2 + 1, 1),
                                      (1, 1 * 2 + 0, 0), (1, 3 * 2 + 0, 0)]
    assert first[2][4:] == (0, 2)  # partial block: only its 2 history tokens are copied
    assert all(c[4:] == (0, BS) for c in first if c != first[2])
    assert u.plan_exchange(limit=3) == []  # everything was planned
    assert u.num_remote_dependent == 2  # ... but counts only after the copies are issued
    u.commit_exchange()
    assert u.num_remote_dependent == 0
    # The home devices gave back the other stage's history ids; what stays is each request's own tables.
    assert u.stages[0].refcount(2 * 2 + 1) == 0 and u.stages[0].refcount(2 * 2) == 1
    u.check(no_reservations)


def test_move_home_uses_only_whole_free_old_blocks():
    u, r0, r1 = fused()
    u.plan_exchange(limit=8)
    u.commit_exchange()
    plan = plan_move_home(u, num_old_blocks=8, seats=4)
    assert plan is not None
    for req, (home, blocks) in plan.items():
        assert len(blocks) == len(req.tables[0])
        assert all(u.stages[home].is_free(x * 2 + s) for x in blocks for s in range(2))
    assert len([x for _, bl in plan.values() for x in bl]) == len({(h, x) for h, bl in plan.values() for x in bl})
    assert plan_move_home(u, num_old_blocks=3, seats=4) is None  # not enough whole free blocks: defer


def test_abort_while_in_flight_releases_when_the_micro_batch_leaves():
    u, r0, r1 = fused()
    for r in (r0, r1):
        r.token_ids.append(7)  # the token each sampled last step: one decode each
    mb = u.schedule()
    assert mb is not None and r0.in_flight
    used = u.stages[1].num_used
    u.abort(r0)
    assert u.stages[1].num_used == used  # still being written by the micro-batch
    u.check(no_reservations)
    n = len(mb.items)
    out = u.exit(mb, np.zeros(n, np.int32), np.zeros(n))
    assert [s[0].request_id for s in out] == ["b"]
    assert r0 not in u.running and not u.aborted_in_flight and u.stages[1].num_used < used
    u.check(no_reservations)


def test_long_prefills_are_chunked_to_the_typical_length_while_others_wait():
    shape = pipeline_shape(tokens=64, buckets=(8, 64), seqs=8, num_base=64, num_ext=8)
    u = ServingUnit(3, (0, 1), shape, [BlockAllocator(64, 8) for _ in range(2)], hooks(), block_size=BS,
                    enable_prefix_caching=False, now=lambda: 0.0)
    u.recent_prompts.extend([10, 12, 14])  # typical prompt: 12 tokens
    long_req = make_req(0, 60, 8, 0.0)
    shorts = [make_req(i, 10, 8, float(i)) for i in range(1, 4)]
    for r in [long_req, *shorts]:
        r.tables = [[], []]
        u.add(r)
    mb = u.schedule()
    got = {it.req.request_id: it.num_tokens for it in mb.items}
    assert got["r0"] == 12  # capped: the short prompts behind it start in the same micro-batch
    assert all(got[f"r{i}"] == 10 for i in range(1, 4))
    # Alone in the queue, a prefill takes the whole budget.
    u2 = ServingUnit(4, (0, 1), shape, [BlockAllocator(64, 8) for _ in range(2)], hooks(), block_size=BS,
                     enable_prefix_caching=False, now=lambda: 0.0)
    u2.recent_prompts.extend([10, 12, 14])
    alone = make_req(9, 60, 8, 0.0)
    alone.tables = [[], []]
    u2.add(alone)
    assert u2.schedule().items[0].num_tokens == 60


def test_a_pipeline_runs_requests_to_completion_through_its_ticks():
    u, r0, r1 = fused()
    for r in (r0, r1):
        r.token_ids.append(7)
    extra = make_req(5, 9, 6, 5.0)
    extra.tables = [[], []]
    u.add(extra)
    for _ in range(200):
        if not u.has_work:
            break
        tick(u)
        if u.num_remote_dependent:
            u.plan_exchange(2)
            u.commit_exchange()
        u.check(no_reservations)
    assert all(r.finished for r in (r0, r1, extra))
    assert all(a.num_used == 0 for a in u.stages)
