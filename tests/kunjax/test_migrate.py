"""`migrate` (Llumnix live migration): under an imbalanced load, running requests move from the loaded instance to
the idle one while they decode, over at least two copy rounds, missing at most one step; their greedy outputs equal
the naive oracle; a migration cancelled mid-way frees its reservation; the events reach the runtime's policy status.

The load is made imbalanced through the public API: a burst is routed over both instances, then every request the
router sent to instance 1 is aborted, leaving instance 0 overloaded (queue, preemptions) and instance 1 empty.
"""

from __future__ import annotations

import collections

import jax
import pytest

from kunjax.config import ConfigError
from kunjax.engine import LLMEngine, config_from_kwargs
from tests.kunjax.test_policies import GREEDY, TIGHT, make_engine, prompts_and_expected, tiny_dir  # noqa: F401


@pytest.fixture(scope="module")
def engine(tiny_dir) -> LLMEngine:  # noqa: F811
    return make_engine(tiny_dir, "migrate", jax.devices()[6:8])


def load_imbalanced(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, int]:
    """Route all prompts, then abort those on instance 1; returns the kept request ids -> prompt index."""
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    kept = {}
    for i, rid in enumerate(ids):
        if engine.requests[rid].unit == 1:
            engine.abort(rid)
        else:
            kept[rid] = i
    assert len(kept) >= 8 and not engine.units[1].has_work
    engine.check_books()
    return kept


def test_requests_migrate_while_decoding_and_match_the_oracle(engine, prompts_and_expected):  # noqa: F811
    prompts, expected = prompts_and_expected
    pol = engine.policy
    before = set(map(id, pol.events))
    kept = load_imbalanced(engine, prompts)
    advanced: dict[str, set[int]] = collections.defaultdict(set)  # request id -> steps that gave it a token
    outputs: dict[str, list[int]] = {}
    for _ in range(2000):
        if not engine.has_requests():
            break
        for out in engine.step():
            advanced[out.request_id].add(engine.step_no)
            if out.finished:
                outputs[out.request_id] = out.token_ids
        engine.check_books()
    assert sorted(outputs) == sorted(kept), "a request was lost"
    for rid, i in kept.items():
        assert outputs[rid] == expected[i], f"prompt {i} diverged from the oracle"

    events = [ev for ev in pol.events if id(ev) not in before]
    done = [ev for ev in events if ev.kind == "migration"]
    assert done, f"no migration under an imbalanced load: {pol.stats()}"
    for ev in done:
        rid, start = ev.detail["request"], ev.detail["start_step"]
        assert ev.members == (0, 1) and ev.group == -1 and rid in kept
        assert ev.detail["rounds"] >= 2, "the request must decode on its source between the copy rounds"
        assert ev.detail["blocks"] > 0 and float(ev.detail["stop_s"]) <= ev.seconds
        steps = advanced[rid]
        # From the step after round 1 through the step after the final round, it decodes every step but one at
        # most (it decodes on the source while earlier rounds copy; the final round is between two steps).
        window = [s for s in range(start + 1, ev.step + 2) if s <= max(steps)]
        missed = [s for s in window if s not in steps]
        assert len(missed) <= 1, f"{rid} missed steps {missed} of {window} while migrating"
        assert any(start < s <= ev.step for s in steps), f"{rid} did not decode on its source while migrating"
    stats = pol.stats()
    assert stats["migrations"] >= len(done) and stats["migration_blocks_copied"] >= sum(e.detail["blocks"]
                                                                                          for e in done)
    assert stats["migrations_in_flight"] == 0
    assert all(u.stages[0].num_used == 0 for u in engine.units.values())


def test_abort_mid_migration_frees_the_reservation(engine, prompts_and_expected):  # noqa: F811
    prompts, _ = prompts_and_expected
    pol = engine.policy
    kept = load_imbalanced(engine, prompts)
    m = None
    for _ in range(500):
        engine.step()
        engine.check_books()
        m = next((m for m in pol.inflight.values() if m.copied > 0), None)
        if m is not None:
            break
    assert m is not None, "no migration got under way"
    dst = engine.units[m.dst].stages[0]
    used, cancelled = dst.num_used, pol.counts["cancelled"]
    assert sum(pol.reserved_blocks(engine.units[m.dst], 0).values()) >= m.copied > 0
    engine.abort(m.req.request_id)
    assert m.req.request_id not in pol.inflight and pol.counts["cancelled"] == cancelled + 1
    assert dst.num_used == used - m.copied, "the destination reservation was not freed"
    ev = pol.events[-1]
    assert ev.kind == "migration_cancelled" and ev.detail["reason"] == "aborted"
    engine.check_books()
    for rid in kept:
        engine.abort(rid)
    engine.check_books()
    assert not pol.inflight and all(u.stages[0].num_used == 0 for u in engine.units.values())


def test_migration_events_reach_the_runtime_policy_status(engine, prompts_and_expected):  # noqa: F811
    from kunjax.engine_thread import EngineThread

    prompts, _ = prompts_and_expected
    if not any(ev.kind == "migration" for ev in engine.policy.events):
        load_imbalanced(engine, prompts)
        while engine.has_requests():
            engine.step()
    runtime = EngineThread(engine, warmup=False)
    try:
        status = runtime.policy_status()
        assert status.policy == "migrate" and "drops" not in status.counters
        kinds = collections.Counter(ev.kind for ev in status.events)
        assert kinds["migration"] >= 1, kinds
        ev = next(ev for ev in status.events if ev.kind == "migration")
        assert ev.group == -1 and ev.members == (0, 1) and int(ev.detail["rounds"]) >= 2
        assert [e.seq for e in status.events] == list(range(1, len(status.events) + 1))
        assert runtime.policy_status().events == status.events, "events are numbered once"
        stats = status.counters  # the policy's counters, as GetLoad and the metrics carry them
        assert stats["migrations"] == sum(ev.kind == "migration" for ev in engine.policy.events) >= 1
        assert stats["migration_blocks_copied"] > 0 and "preemptions" in stats
    finally:
        runtime.shutdown(0)


def test_bad_migrate_flags_are_named():
    for flag, value in (("migrate_freeness_gap", 0.0), ("migrate_final_blocks", 0), ("migrate_max_concurrent", 0)):
        with pytest.raises(ConfigError, match="--" + flag.replace("_", "-")):
            config_from_kwargs(**{**TIGHT, "policy": "migrate", flag: value})


def test_a_migrated_request_keeps_what_it_computed():
    """The destination continues from the copied KV: a migration that made it recompute its whole sequence there
    (it once did: `move_running` forgot `num_computed`) would cost more than the preemption it avoids."""
    import dataclasses

    from kunjax.engine import EngineView
    from tests.helpers import SPLIT, burst, run_open_loop

    model = dataclasses.replace(SPLIT, num_layers=8)
    eng = LLMEngine(model, config_from_kwargs(policy="migrate", num_instances=8, block_size=8, num_blocks=48,
                                              max_num_seqs=16, max_num_batched_tokens=128, max_model_len=128,
                                              min_token_bucket=16), executor="arith")
    eng.warmup()
    moved = []
    real = EngineView.move_running

    def watched(self, req, src, dst, tables):
        before = req.num_computed
        real(self, req, src, dst, tables)
        moved.append((before, req.num_computed))

    EngineView.move_running = watched
    try:
        arrivals = burst(1000, seed=3, vocab=model.vocab_size)
        out = run_open_loop(eng, arrivals)
    finally:
        EngineView.move_running = real
    assert moved and all(after == before > 0 for before, after in moved), moved[:5]
    assert list(out.values()) == [eng.executor.expected_greedy(p, n) for _, p, n in arrivals]
