"""Scheduler policy without a device: token budget, chunked prefill, decode-first, preemption by recompute."""

import random

import pytest

from kunjax.block_manager import BlockAllocator
from kunjax.request import Request, RequestStatus
from kunjax.sampling_params import SamplingParams
from kunjax.scheduler import Scheduler


def make_req(i: int, prompt_len: int, max_tokens: int, t: float) -> Request:
    return Request(request_id=f"r{i}", prompt=None, token_ids=list(range(1, prompt_len + 1)),
                   num_prompt_tokens=prompt_len, params=SamplingParams(max_tokens=max_tokens, temperature=0),
                   seed=0, eos_token_ids=frozenset(), max_total_len=prompt_len + max_tokens, arrival_time=t)


def run_to_completion(s: Scheduler, reqs: list[Request], max_steps: int = 10_000) -> list[list]:
    plans = []
    for _ in range(max_steps):
        if not s.has_work:
            return plans
        out = s.schedule()
        assert out.seqs or out.preempted, "scheduler made no progress"
        assert out.num_tokens <= s.max_num_batched_tokens
        assert len(out.seqs) <= s.max_num_seqs
        plans.append(out)
        for seq in out.seqs:
            s.commit(seq)
            if seq.sample:
                req = seq.request
                req.token_ids.append(7)
                if len(req.token_ids) >= req.max_total_len:
                    s.finish(req)
        s.allocator.check()
    raise AssertionError("did not finish")


def test_chunked_prefill_mixes_with_decodes_under_the_budget():
    s = Scheduler(BlockAllocator(64), block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    a, b = make_req(0, 3, 4, 0.0), make_req(1, 20, 2, 1.0)
    s.add(a)
    s.add(b)
    first = s.schedule()
    assert [(x.request.request_id, x.num_tokens, x.sample) for x in first.seqs] == [("r0", 3, True), ("r1", 5, False)]
    for seq in first.seqs:
        s.commit(seq)
    a.token_ids.append(9)
    second = s.schedule()
    # The running decode goes first (1 token), the prefill continues with the rest of the budget.
    assert [(x.request.request_id, x.start, x.num_tokens) for x in second.seqs] == [("r0", 3, 1), ("r1", 5, 7)]


def test_preemption_by_recompute_keeps_generated_tokens_and_everyone_finishes():
    s = Scheduler(BlockAllocator(9), block_size=4, max_num_seqs=8, max_num_batched_tokens=64)  # 8 usable
    reqs = [make_req(i, 6, 12, float(i)) for i in range(4)]  # each needs up to 5 blocks
    for r in reqs:
        s.add(r)
    plans = run_to_completion(s, reqs)
    assert s.num_preemptions > 0
    victims = [v for p in plans for v in p.preempted]
    # The victim is always the latest arrival among the running requests at that moment.
    assert all(v.request_id != "r0" for v in victims)
    assert all(r.status is RequestStatus.FINISHED and len(r.output_ids) == 12 for r in reqs)
    assert s.allocator.num_free == s.allocator.total


def test_a_request_that_can_never_fit_is_refused_at_add():
    s = Scheduler(BlockAllocator(5), block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="needs? 5 KV blocks.*pool has 4"):
        s.add(make_req(0, 10, 10, 0.0))


def test_prefix_cache_hit_skips_computed_blocks():
    s = Scheduler(BlockAllocator(32), block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                  enable_prefix_caching=True)
    a = make_req(0, 10, 1, 0.0)
    s.add(a)
    run_to_completion(s, [a])
    b = make_req(1, 10, 1, 1.0)
    s.add(b)
    plan = s.schedule()
    assert plan.seqs[0].start == 8 and b.num_cached_tokens == 8  # two full blocks reused, 2 tokens computed


@pytest.mark.parametrize("seed", range(5))
def test_random_workloads_never_deadlock_or_lose_requests(seed):
    rng = random.Random(seed)
    s = Scheduler(BlockAllocator(rng.randint(12, 40)), block_size=rng.choice([2, 4, 8]),
                  max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=rng.randint(8, 40),
                  enable_prefix_caching=rng.random() < 0.5)
    reqs = []
    for i in range(30):
        r = make_req(i, rng.randint(1, 30), rng.randint(1, 20), float(i))
        try:
            s.add(r)
            reqs.append(r)
        except ValueError:
            pass
    run_to_completion(s, reqs)
    assert all(r.finished for r in reqs)
    assert s.allocator.num_used == 0
