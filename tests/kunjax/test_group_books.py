"""Host books of a pipeline group, without devices: stage allocators, stale history, exchange and move-home plans."""

from __future__ import annotations

import numpy as np
import pytest

from kunjax.elastic.group import GroupBooks, StageAllocator
from kunjax.elastic.pipeline import GroupShapes
from kunjax.request import Request, RequestStatus
from kunjax.sampling_params import SamplingParams

BS = 4


def shapes(k: int = 2, **kw) -> GroupShapes:
    base = dict(k=k, num_base=8 * k, num_ext=6, tokens=16, buckets=(8, 16), seqs=4, max_blocks=8, remote_rows=4,
                copy_blocks=3, num_logprobs=0)
    base.update(kw)
    return GroupShapes(**base)


def request(rid: str, n_tokens: int, blocks: list[int], computed: int) -> Request:
    r = Request(request_id=rid, prompt=None, token_ids=list(range(1, n_tokens + 1)), num_prompt_tokens=n_tokens,
                params=SamplingParams(max_tokens=8), seed=0, eos_token_ids=frozenset(), max_total_len=n_tokens + 8)
    r.blocks, r.num_computed, r.status = list(blocks), computed, RequestStatus.RUNNING
    return r


def test_stage_allocator_packs_low_ids_and_balances():
    a = StageAllocator(num_base=8, num_ext=4, taken=[3, 3, 5])
    assert a.total == 11 and a.num_used == 2 and a.refcount(3) == 2
    assert a.allocate(3) == [1, 2, 4]  # lowest first, skipping held ids
    a.free([2])
    assert a.allocate(1) == [2]
    a.ext_open = False
    assert a.num_allocatable == len([b for b in range(1, 8) if a.is_free(b)])
    with pytest.raises(RuntimeError):
        a.allocate(a.num_allocatable + 1)
    a.free([3])
    assert a.refcount(3) == 1
    with pytest.raises(ValueError, match="double free"):
        a.free([9])
    a.check()


def adopted(k: int = 2) -> tuple[GroupBooks, Request, Request]:
    b = GroupBooks(shapes(k), BS, max_running=8)
    r0 = request("a", 10, blocks=[2, 5, 6], computed=10)  # homed on stage 0; 10 tokens: last block partial
    r1 = request("b", 8, blocks=[1, 3], computed=8)  # homed on stage 1; exactly two full blocks
    b.adopt_running(r0, 0)
    b.adopt_running(r1, 1)
    b.open_books(num_base=8 * k, num_ext=6)
    return b, r0, r1


def test_adoption_holds_every_pipeline_id_of_the_old_blocks_on_the_home():
    b, r0, r1 = adopted()
    k = 2
    q0, q1 = b.seqs["a"], b.seqs["b"]
    assert q0.tables[0] == [2 * k, 5 * k, 6 * k]  # home stage reads its own layers locally
    assert q0.tables[1][:2] == [0, 0] and q0.tables[1][2] != 0  # remote history; fresh partial block
    assert q1.tables[0] == [0, 0]  # whole blocks: nothing to allocate until new tokens come
    assert b.num_remote_dependent == 2
    assert all(b.stages[0].refcount(x * k + s) == 1 for x in [2, 5, 6] for s in range(k))
    b.check()


def test_exchange_moves_history_in_bounded_deterministic_batches_and_releases_it():
    b, r0, r1 = adopted()
    first = b.plan_exchange(limit=3)
    # (src, dst) pairs get at most 3 copies each; arrival order, then stage, then block.
    assert [c[:3] for c in first] == [(0, 2 * 2 + 1, 1), (0, 5 * 2 + 1, 1), (0, 6 * 2 + 1, 1),
                                      (1, 1 * 2 + 0, 0), (1, 3 * 2 + 0, 0)]
    assert first[2][4:] == (0, 2)  # partial block: only its 2 history tokens are copied
    assert all(c[4:] == (0, BS) for c in first if c != first[2])
    assert b.plan_exchange(limit=3) == []  # everything was planned
    assert b.num_remote_dependent == 2  # ... but counts only after the copies land
    b.commit_exchange()
    assert b.num_remote_dependent == 0
    # The home devices gave back the other stage's history ids; what stays is each request's own tables.
    assert b.stages[0].refcount(2 * 2 + 1) == 0 and b.stages[0].refcount(2 * 2) == 1
    b.check()


def test_move_home_uses_only_whole_free_old_blocks():
    b, r0, r1 = adopted()
    b.plan_exchange(limit=8)
    b.commit_exchange()
    plan = b.plan_move_home(num_old_blocks=8, seats=4)
    assert plan is not None
    for seq, (home, blocks) in plan.items():
        assert len(blocks) == seq.num_logical
        assert all(b.stages[home].is_free(x * 2 + s) for x in blocks for s in range(2))
    used = [x for home, blocks in plan.values() for x in blocks]
    assert len(used) == len(set((h, x) for h, bl in plan.values() for x in bl))
    assert b.plan_move_home(num_old_blocks=3, seats=4) is None  # not enough whole free blocks: defer


def test_abort_while_in_flight_releases_when_the_micro_batch_leaves():
    b, r0, r1 = adopted()
    for r in (r0, r1):
        r.token_ids.append(7)  # the token each sampled last step: one decode each
    mb = b.schedule()
    assert mb is not None and b.seqs["a"].in_flight
    used = b.stages[1].num_used
    b.abort(r0)
    assert b.stages[1].num_used == used  # still being written by the micro-batch
    n = len(mb.items)
    out = b.exit(mb, np.zeros(n, np.int32), np.zeros(n), np.zeros((n, 0)), np.zeros((n, 0)))
    assert [s[0].request_id for s in out] == ["b"]
    assert "a" not in b.seqs
    b.check()


def test_long_prefills_are_chunked_to_the_typical_length_while_others_wait():
    b = GroupBooks(shapes(tokens=64, buckets=(8, 64), seqs=8), BS, max_running=8)
    b.open_books(num_base=64, num_ext=8)
    b.recent_prompts.extend([10, 12, 14])  # typical prompt: 12 tokens
    long_req = request("long", 60, blocks=[], computed=0)
    shorts = [request(f"s{i}", 10, blocks=[], computed=0) for i in range(3)]
    for r in [long_req, *shorts]:
        b.add(r)
    mb = b.schedule()
    got = {it.seq.req.request_id: it.num_tokens for it in mb.items}
    assert got["long"] == 12  # capped: the short prompts behind it start in the same micro-batch
    assert all(got[f"s{i}"] == 10 for i in range(3))
    # Alone in the queue, a prefill takes the whole budget.
    b2 = GroupBooks(shapes(tokens=64, buckets=(8, 64), seqs=8), BS, max_running=8)
    b2.open_books(num_base=64, num_ext=8)
    b2.recent_prompts.extend([10, 12, 14])
    b2.add(request("alone", 60, blocks=[], computed=0))
    assert b2.schedule().items[0].num_tokens == 60
