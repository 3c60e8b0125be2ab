"""KunServe mechanics on a 2-instance engine: drop/restore as resharding, remote attention, exchange, cycles.

Oracles: the naive full-recompute loop (greedy outputs must be token-identical across every transition), the
bytes of the live arrays on each device (not the books), and the weights before the drop (bit-identical after
every restore).
"""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kunjax.unit as unit_mod
from kunjax.config import ConfigError
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.executor.jax_executor import tree_bytes_per_device
from kunjax.memory import flatten_params as flatten
from kunjax.memory import kv_block_bytes
from kunjax.policies.base import FuseUnits
from kunjax.sampling_params import SamplingParams
from sharding.layouts import instance_meshes
from sharding.reshard import GroupReshard, live_bytes_per_device
from tests.helpers import SPLIT, load_single_device_params, naive_greedy, write_tiny_model

GREEDY = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("split2"), SPLIT, seed=5)


@pytest.fixture(scope="module")
def oracle(model_dir):
    params = load_single_device_params(model_dir, SPLIT)
    return lambda prompts, n=GREEDY.max_tokens: naive_greedy(SPLIT, params, prompts, n)


@pytest.fixture(scope="module")
def engine(model_dir):
    """Two instances; one KV block moves per exchange round, so remote attention lasts several steps."""
    cfg = config_from_kwargs(num_instances=2, policy="kunserve", num_blocks=64, block_size=4, max_num_seqs=8,
                             max_num_batched_tokens=32, max_model_len=128, exchange_blocks_per_step=1, remote_rows=8,
                             restore_window_steps=1000)  # transitions in this module are driven by the tests
    eng = LLMEngine(model_dir, cfg, devices=jax.devices()[:2])
    eng.warmup()
    return eng


def prompts_for(seed: int, n: int, lo: int = 5, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, SPLIT.vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def step(eng, outputs: dict[str, list[int]]) -> None:
    for out in eng.step():
        if out.finished:
            outputs[out.request_id] = out.outputs[0].token_ids
    eng.check_books()


def run_until_done(eng, outputs: dict[str, list[int]], max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if not eng.requests:  # (has_unfinished stays true while a group lives: it steps towards its restore)
            return
        step(eng, outputs)
    pytest.fail("requests did not finish")


def drop(eng, members=(0, 1)):
    """Fuse `members` now (as the policy would), returning the pipeline unit."""
    outcome = eng.transition(FuseUnits(members, "test"))
    return eng.units[outcome.unit]


def restore_all(eng, outputs: dict[str, list[int]], max_steps: int = 50) -> None:
    for g in eng.groups:
        eng.policy.begin_restore(g)  # it happens once the KV fits the replicas' own pools
    for _ in range(max_steps):
        if not eng.groups:
            return
        step(eng, outputs)
    pytest.fail("the group did not restore")


def host_params(eng) -> list[dict[str, np.ndarray]]:
    return [{p: np.array(a) for p, a in flatten(rep.params).items()} for rep in eng.executor.replicas]


# ---- pool formats -------------------------------------------------------------------------------------------
def test_pool_reinterpretation_is_a_donated_reshape_with_the_block_identity():
    devices = jax.devices()[:2]
    k, nb, n_layers = 2, 6, 4
    tail = (2, 4, 2, 8)
    rs = GroupReshard(instance_meshes(devices, k, 1), {}, {}, (nb, n_layers, *tail), jnp.float32, num_ext=1)
    rs.compile()
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((nb, n_layers, *tail)).astype(np.float32) for _ in devices]
    # `* 1` gives XLA-owned buffers: a CPU device_put may alias the numpy memory, and an aliased buffer cannot
    # be donated (the reshape would then copy, which is what this test must catch).
    pools = [jax.device_put(h, d) * 1 for h, d in zip(host, devices, strict=True)]
    ptrs = [p.unsafe_buffer_pointer() for p in pools]
    pipe = rs.pools_to_pipeline(pools)
    assert pools == []
    by_dev = {s.device: s for s in pipe.addressable_shards}
    for i, d in enumerate(devices):
        shard = by_dev[d].data
        assert shard.unsafe_buffer_pointer() == ptrs[i], "the reshape copied the pool"
        local = np.array(shard)
        assert local.shape == (nb * k, n_layers // k, *tail)
        for b in range(nb):
            for s in range(k):
                lk = n_layers // k
                np.testing.assert_array_equal(local[b * k + s], host[i][b, s * lk:(s + 1) * lk])
    back = rs.pool_to_members(pipe)
    for i in range(k):
        assert back[i].unsafe_buffer_pointer() == ptrs[i]
        np.testing.assert_array_equal(np.array(back[i]), host[i])


# ---- drop and restore -----------------------------------------------------------------------------------------
def test_drop_frees_weights_and_restore_is_bit_identical(engine, oracle):
    eng = engine
    original = host_params(eng)
    ex = eng.executor
    full = ex.weight_bytes
    devices = [ex.devices_of(i)[0] for i in range(eng.num_instances)]
    before = live_bytes_per_device()
    prompts = prompts_for(1, 6)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    outputs: dict[str, list[int]] = {}
    for _ in range(3):
        step(eng, outputs)
    g = drop(eng)
    arrays = ex.group_arrays(g.uid)
    assert all(rep.params is None and rep.pool is None for rep in ex.replicas)
    # Each device keeps half of every weight (the final norm, a few hundred bytes, stays replicated).
    assert tree_bytes_per_device(arrays.params) <= full // 2 + 4 * SPLIT.hidden_size
    after = live_bytes_per_device()
    ext_bytes = tree_bytes_per_device(arrays.ext)
    for d in devices:
        # Weights fell by the freed bytes; the extension took at most that; the pool itself did not move.
        assert after[d] - before[d] == ext_bytes + tree_bytes_per_device(arrays.acts) - ex.freed_bytes((0, 1))
    assert ext_bytes == g.shape.num_ext * kv_block_bytes(SPLIT, 4, "float32") // 2
    assert g.total_blocks == 2 * ex.num_blocks - 1 + g.shape.num_ext
    restore_all(eng, outputs)
    assert live_bytes_per_device() == before
    for i, orig in enumerate(host_params(eng)):
        for p, a in orig.items():
            np.testing.assert_array_equal(a, original[i][p], err_msg=p)
    run_until_done(eng, outputs)
    assert [outputs[i] for i in ids] == oracle(prompts)


def test_running_requests_lose_at_most_one_step_and_use_remote_attention(engine, oracle):
    eng = engine
    prompts = prompts_for(2, 8, lo=10, hi=30)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    outputs: dict[str, list[int]] = {}
    for _ in range(4):  # everyone is decoding by now (prompts fit one chunk each per instance)
        step(eng, outputs)
    reqs = [eng.requests[i] for i in ids]
    assert all(r.num_output_tokens > 0 for r in reqs)
    counts = [r.num_output_tokens for r in reqs]
    g = drop(eng)
    remote = [g.num_remote_dependent]
    assert remote[0] == len(ids)
    step(eng, outputs)
    step(eng, outputs)
    remote.append(g.num_remote_dependent)
    # Two steps after the drop every request has at least one more token: at most one step lost, no recompute.
    assert all(r.num_output_tokens >= c + 1 for r, c in zip(reqs, counts, strict=True))
    assert all(r.num_preemptions == 0 for r in reqs)
    assert g.remote_ticks > 0
    while g.num_remote_dependent:
        step(eng, outputs)
        remote.append(g.num_remote_dependent)
    assert remote == sorted(remote, reverse=True) and remote[-1] == 0
    assert g.blocks_exchanged > 0
    run_until_done(eng, outputs)
    restore_all(eng, outputs)
    assert [outputs[i] for i in ids] == oracle(prompts)


def test_without_remote_attention_stale_requests_go_wrong(engine, oracle, monkeypatch):
    """Sensitivity: the remote path is what keeps stale requests right (so the tests above can fail)."""
    eng = engine
    prompts = prompts_for(3, 4, lo=20, hi=30)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    outputs: dict[str, list[int]] = {}
    for _ in range(3):
        step(eng, outputs)
    real = unit_mod.ServingUnit.tick_inputs

    real_work = unit_mod.ServingUnit.tick_work

    def local_only(self):
        inp = real(self)
        inp.send_rows[:] = -1
        return inp

    def no_remote(self):
        return real_work(self)._replace(remote=False)

    monkeypatch.setattr(unit_mod.ServingUnit, "tick_inputs", local_only)
    monkeypatch.setattr(unit_mod.ServingUnit, "tick_work", no_remote)
    drop(eng)
    for _ in range(3):
        step(eng, outputs)
    monkeypatch.setattr(unit_mod.ServingUnit, "tick_inputs", real)
    monkeypatch.setattr(unit_mod.ServingUnit, "tick_work", real_work)
    run_until_done(eng, outputs)
    restore_all(eng, outputs)
    assert [outputs[i] for i in ids] != oracle(prompts)


def test_twenty_drop_restore_cycles_under_load_leak_nothing(engine, oracle):
    eng = engine
    before = live_bytes_per_device()
    original = host_params(eng)
    rng = random.Random(11)
    prompts: list[list[int]] = []
    ids: list[str] = []
    outputs: dict[str, list[int]] = {}
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def top_up():
        while len(eng.requests) < 6:
            p = [rng.randrange(1, SPLIT.vocab_size) for _ in range(rng.randint(3, 20))]
            prompts.append(p)
            ids.append(eng.add_request(p, params))

    for cycle in range(20):
        top_up()
        for _ in range(2):
            step(eng, outputs)
        drop(eng)
        eng.check_books()
        top_up()  # new arrivals go to the group
        for _ in range(2):
            step(eng, outputs)
        restore_all(eng, outputs)
        assert live_bytes_per_device() == before, f"cycle {cycle}"
    assert eng.policy.stats()["restores"] >= 20
    run_until_done(eng, outputs)
    assert live_bytes_per_device() == before
    for i, orig in enumerate(host_params(eng)):
        assert all(np.array_equal(a, original[i][p]) for p, a in orig.items())
    assert [outputs[i] for i in ids] == oracle(prompts, params.max_tokens)


# ---- configuration --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, flag", [
    (dict(kunserve_max_group=3), "--kunserve-max-group must be a power of two"),
    (dict(restore_demand_ratio=0.96), "--restore-demand-ratio"),
    (dict(exchange_blocks_per_step=0), "--exchange-blocks-per-step must be positive"),
    (dict(device_memory_bytes=-1), "--device-memory-bytes must be positive"),
    (dict(attention_backend="cuda"), "--attention-backend must be one of"),
    (dict(remote_transport="tcp"), "--remote-transport must be one of"),
])
def test_bad_kunserve_options_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        config_from_kwargs(policy="kunserve", **kwargs)


def test_an_option_of_another_policy_is_refused_by_name():
    with pytest.raises(ConfigError, match="--restore-window-steps is an option of --policy kunserve, not of swap"):
        config_from_kwargs(policy="swap", restore_window_steps=3)
    assert config_from_kwargs(policy="kunserve", restore_window_steps=3).policy_options.restore_window_steps == 3


# ---- more paths through a group -------------------------------------------------------------------------------
def test_drop_and_restore_peaks_are_one_leaf_slice(engine):
    """Leaf by leaf, each old copy released at once: neither transition holds more than one extra leaf slice
    above what the device held before the drop."""
    eng = engine
    rt = eng.executor.candidates[(0, 1)]
    devices = [eng.executor.devices_of(i)[0] for i in range(eng.num_instances)]
    largest_slice = max(int(np.prod(s)) * 4 for s, _ in rt.reshard.leaf_shapes.values()) // 2
    seen: list[dict] = []

    def measuring(fn):
        def call(x):
            y = fn(x)
            seen.append(live_bytes_per_device())
            return y
        return call

    before = live_bytes_per_device()
    real_drop, real_gather = dict(rt.reshard._drop), dict(rt.reshard._gather)
    rt.reshard._drop.update({p: measuring(fn) for p, fn in real_drop.items()})
    rt.reshard._gather.update({p: measuring(fn) for p, fn in real_gather.items()})
    try:
        drop(eng)
        assert len(seen) == len(rt.reshard.leaf_shapes)
        restore_all(eng, {})
        assert len(seen) == 2 * len(rt.reshard.leaf_shapes)
    finally:
        rt.reshard._drop.update(real_drop)
        rt.reshard._gather.update(real_gather)
    for d in devices:
        assert max(s[d] for s in seen) <= before[d] + largest_slice
    assert live_bytes_per_device() == before


def test_abort_in_flight_and_seeded_sampling_through_a_drop(engine):
    eng = engine
    prompts = prompts_for(4, 6)
    # Seeded draws depend only on (seed, tokens generated), so they survive the drop. (Not with top-p: its cut
    # moves with last-ulp differences of the log-sum-exp merge, like any change of batch layout.)
    sampled = [SamplingParams(max_tokens=20, temperature=0.8, seed=100 + i, ignore_eos=True)
               for i in range(len(prompts))]
    # Reference: the same seeded requests with no drop.
    ref_ids = [eng.add_request(p, sp) for p, sp in zip(prompts, sampled, strict=True)]
    reference: dict[str, list[int]] = {}
    run_until_done(eng, reference)
    outputs: dict[str, list[int]] = {}
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, sampled, strict=True)]
    victims = [eng.add_request(p, GREEDY) for p in prompts_for(5, 3)]
    step(eng, outputs)
    g = drop(eng)
    step(eng, outputs)
    assert g.in_flight
    for rid in victims:
        eng.abort(rid)  # in the pipe or not: its blocks go back once nothing writes them
    eng.check_books()
    run_until_done(eng, outputs)
    restore_all(eng, outputs)
    assert all(outputs[a] == reference[b] for a, b in zip(ids, ref_ids, strict=True))
    assert not set(victims) & set(outputs)
    eng.check_books()


def test_prefix_shared_blocks_cross_a_drop(model_dir, oracle):
    """Requests sharing prefix-cache blocks at the drop share their history (refcounted) and stay exact."""
    cfg = config_from_kwargs(num_instances=2, policy="kunserve", num_blocks=64, block_size=4, max_num_seqs=8,
                             max_num_batched_tokens=32, max_model_len=128, exchange_blocks_per_step=2,
                             enable_prefix_caching=True, restore_window_steps=1000)
    eng = LLMEngine(model_dir, cfg, devices=jax.devices()[2:4])
    eng.warmup()
    rng = random.Random(9)
    shared = [rng.randrange(1, SPLIT.vocab_size) for _ in range(17)]
    prompts = [shared + [rng.randrange(1, SPLIT.vocab_size) for _ in range(rng.randint(1, 6))] for _ in range(8)]
    outputs: dict[str, list[int]] = {}
    first = eng.add_request(prompts[0], GREEDY)
    for _ in range(3):
        step(eng, outputs)  # the shared prefix is computed and cached once
    ids = [first] + [eng.add_request(p, GREEDY) for p in prompts[1:]]
    for _ in range(2):
        step(eng, outputs)
    assert sum(eng.requests[i].num_cached_tokens for i in ids[1:]) > 0, "prefix cache was not exercised"
    drop(eng)
    run_until_done(eng, outputs)
    restore_all(eng, outputs)
    assert [outputs[i] for i in ids] == oracle(prompts)


def test_restore_waits_while_the_kv_does_not_fit_the_replicas(engine, oracle):
    eng = engine
    prompts = prompts_for(6, 14, lo=26, hi=30)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    outputs: dict[str, list[int]] = {}
    step(eng, outputs)
    g = drop(eng)
    for _ in range(3):
        step(eng, outputs)
    assert g.demand_blocks() > eng.executor.num_blocks  # over half of what the replicas hold
    eng.policy.begin_restore(g)
    tokens = sum(len(r.token_ids) for r in eng.requests.values())
    for _ in range(3):
        step(eng, outputs)
        assert eng.groups == [g] and g.admitting  # no drain while the move home cannot succeed
    assert sum(len(r.token_ids) for r in eng.requests.values()) + sum(map(len, outputs.values())) > tokens
    restore_all(eng, outputs, max_steps=200)  # it happens once requests finish and blocks free up
    assert eng.policy.events[-1].kind == "restore"
    run_until_done(eng, outputs)
    assert [outputs[i] for i in ids] == oracle(prompts)


def test_instances_outside_the_plan_are_untouched(model_dir, oracle):
    cfg = config_from_kwargs(num_instances=4, policy="kunserve", num_blocks=64, block_size=4, max_num_seqs=8,
                             max_num_batched_tokens=32, max_model_len=128, restore_window_steps=1000)
    eng = LLMEngine(model_dir, cfg, devices=jax.devices()[4:8])
    # The replicas only: the pair dropped below compiles at its drop.
    eng.executor.warmup([(u.uid, u.members, u.shape) for u in eng.units.values()], [])
    prompts = prompts_for(8, 12)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    outputs: dict[str, list[int]] = {}
    step(eng, outputs)
    others = [2, 3]
    reps = eng.executor.replicas

    def pointers():
        return [(reps[i].params["layers"]["wq"].unsafe_buffer_pointer(), reps[i].pool.unsafe_buffer_pointer())
                for i in others]

    ptrs = pointers()
    served = [list(eng.units[i].running) for i in others]
    drop(eng)
    for _ in range(3):
        step(eng, outputs)
    assert all(eng.units[i].k == 1 for i in others)
    assert ptrs == pointers()  # same weights, same (donated, in place) pool
    assert all(r.unit == i for i, rs in zip(others, served, strict=True) for r in rs)
    run_until_done(eng, outputs)
    restore_all(eng, outputs)
    assert [outputs[i] for i in ids] == oracle(prompts)


def test_logprobs_stop_tokens_and_min_tokens_in_a_pipeline_unit_match_the_replicas(engine):
    """A request served whole by a pipeline unit gets the same tokens, finish and logprobs as on a replica."""
    eng = engine
    prompts = prompts_for(11, 4)
    params = [SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, min_tokens=2 * i, stop_token_ids=[7, 11])
              for i in range(len(prompts))]

    def serve() -> list:
        ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        done = {}
        for _ in range(200):
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
            eng.check_books()
            if len(done) == len(ids):
                return [done[i] for i in ids]
        pytest.fail("requests did not finish")

    replica = serve()
    g = drop(eng)
    piped = serve()
    assert g.k == 2 and not eng.requests
    restore_all(eng, {})
    for a, b in zip(replica, piped, strict=True):
        assert (a.token_ids, a.finish_reason, a.stop_reason) == (b.token_ids, b.finish_reason, b.stop_reason)
        assert len(b.logprobs) == len(b.token_ids) > 0
        for ea, eb in zip(a.logprobs, b.logprobs, strict=True):
            assert ea.keys() == eb.keys()
            assert [eb[t] for t in ea] == pytest.approx([ea[t] for t in ea], abs=1e-4)
        assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-3)
