"""The overlapped step loop (`--async-scheduling`, `kunjax/overlap.py`) on the real engine and JAX executor: the
same greedy tokens as the serial loop and the naive oracle, stops and `max_tokens` landing while the next tick is
in flight, streaming order, the explicit serial fallback when a policy acts, and aborts of requests in flight.
(The arithmetic executor's burst under every policy, overlapped, is in `test_arith_executor.py`.)"""

from __future__ import annotations

import random

import jax
import pytest

from kunjax import LLM, SamplingParams
from kunjax.demo import ensure_demo_model, recitation_prompts
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.policies.base import FuseUnits
from tests.helpers import TINY, burst, load_single_device_params, naive_greedy, run_open_loop
from tests.kunjax.test_arith_executor import CONFIG, KUNSERVE, MODEL
from tests.kunjax.test_engine import random_prompts
from tests.kunjax.test_policies import GREEDY, TIGHT, make_engine, run_checked, tiny_dir  # noqa: F401 (a fixture)

ROOMY = dict(num_blocks=200, enable_prefix_caching=True)  # room for every request: no step needs to preempt


@pytest.fixture(scope="module")
def oracle(tiny_dir):  # noqa: F811
    params = load_single_device_params(tiny_dir, TINY)
    return lambda prompts: naive_greedy(TINY, params, prompts, GREEDY.max_tokens)


def mixed_requests(seed: int, oracle) -> tuple[list[list[int]], list[SamplingParams], list[list[int]]]:
    """Prompts of 1-40 tokens, some sharing a prefix; each with its own `max_tokens`, some with a stop id taken
    from its own greedy output (so it stops mid-generation); returns prompts, params and expected tokens."""
    rng = random.Random(seed)
    head = random_prompts(1, seed, 12, 12)[0]
    prompts = random_prompts(14, seed + 1) + [head + p for p in random_prompts(4, seed + 2, 1, 9)]
    full = oracle(prompts)
    params, expected = [], []
    for out in full:
        n = rng.randint(1, GREEDY.max_tokens)
        if rng.random() < 0.4:
            stop = out[rng.randrange(n)]
            cut = out.index(stop) + 1
            params.append(SamplingParams(max_tokens=n, temperature=0.0, stop_token_ids=[stop]))
            expected.append(out[:cut])
        else:
            params.append(SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            expected.append(out[:n])
    return prompts, params, expected


def serve(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """All requests at once, the books checked after every step; each request's streamed deltas must add up to
    its final output, and nothing may follow the final one. Returns the final outputs in request order."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    streamed: dict[str, list[int]] = {i: [] for i in ids}
    finals: dict[str, list[int]] = {}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            assert out.request_id not in finals, f"{out.request_id}: an output after its final one"
            streamed[out.request_id] += out.outputs[0].delta_token_ids
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
        engine.check_books()
    assert sorted(finals) == sorted(ids), "a request was lost"
    assert all(streamed[i] == finals[i] for i in ids), "the streamed deltas do not add up to the output"
    assert all(a.num_used == 0 for u in engine.units.values() for a in u.stages)
    return [finals[i] for i in ids]


def test_overlapped_tokens_equal_the_serial_loop_and_the_oracle(tiny_dir, oracle):  # noqa: F811
    prompts, params, expected = mixed_requests(21, oracle)
    serial = make_engine(tiny_dir, "recompute", jax.devices()[:2], **ROOMY)
    overlapped = make_engine(tiny_dir, "recompute", jax.devices()[2:4], **ROOMY, async_scheduling=True)
    assert serve(serial, prompts, params) == expected
    assert serve(overlapped, prompts, params) == expected
    ov = overlapped.overlap
    assert ov.overlapped > 0 and not ov.reasons, ov.reasons  # every step overlapped: none had to preempt
    assert serial.overlap is None
    # the same again, the prompts now cached (admissions matching prefixes while a tick is in flight)
    assert serve(overlapped, prompts, params) == expected


@pytest.mark.parametrize("policy", ["recompute", "swap"])
def test_preemption_and_swaps_fall_back_to_the_serial_step(tiny_dir, oracle, policy):  # noqa: F811
    rng = random.Random(7)
    prompts = [[rng.randrange(1, TINY.vocab_size) for _ in range(rng.randint(8, 40))] for _ in range(24)]
    engine = make_engine(tiny_dir, policy, jax.devices()[4:6], async_scheduling=True)
    assert engine.config.num_blocks == TIGHT["num_blocks"]
    assert run_checked(engine, prompts) == oracle(prompts)
    ov = engine.overlap
    assert sum(u.num_preemptions for u in engine.units.values()) > 0, "the pool was not tight"
    assert ov.reasons["a unit may have to preempt"] > 0 and ov.overlapped > 0, (ov.overlapped, ov.reasons)
    if policy == "swap":
        assert engine.policy.swap_outs > 0 and ov.reasons["a unit has requests swapped out"] > 0


def test_aborting_requests_whose_tick_is_in_flight(tiny_dir, oracle):  # noqa: F811
    prompts = random_prompts(6, 31, 4, 20)
    engine = make_engine(tiny_dir, "recompute", jax.devices()[6:8], **ROOMY, async_scheduling=True)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    got: dict[str, list[int]] = {i: [] for i in ids}
    aborted: set[str] = set()
    for step in range(200):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            assert out.request_id not in aborted, "an aborted request produced tokens"
            got[out.request_id] += out.outputs[0].delta_token_ids
        if step in (3, 6):  # a decoding request and, later, one more
            req = next(r for r in engine.requests.values() if r.in_flight and r.num_computed > len(r.token_ids) // 2)
            final = engine.abort(req.request_id)
            assert final.finished and final.outputs[0].finish_reason == "abort"
            aborted.add(req.request_id)
            assert engine.units[req.unit].aborted_in_flight == [req]  # its blocks stay until its tick leaves
        engine.check_books()
    assert len(aborted) == 2 and engine.overlap.overlapped > 0
    expected = dict(zip(ids, oracle(prompts), strict=True))
    for i in ids:
        if i in aborted:
            assert got[i] == expected[i][:len(got[i])]
        else:
            assert got[i] == expected[i]
    assert all(a.num_used == 0 for u in engine.units.values() for a in u.stages)


def test_a_transition_drains_the_ticks_in_flight():
    """A fuse asked for between steps (the ticks of both replicas in flight) collects and applies them first; their
    tokens come first out of the next step, and every output still equals the oracle through the drop and the
    restore (arithmetic executor)."""
    engine = LLMEngine(MODEL, config_from_kwargs(**{**KUNSERVE, "num_instances": 2, "num_blocks": 400,
                                                    "restore_window_steps": 100_000}, async_scheduling=True),
                       executor="arith")
    rng = random.Random(5)
    prompts = {}
    for _ in range(12):
        p, m = [rng.randrange(1, MODEL.vocab_size) for _ in range(rng.randint(4, 30))], rng.randint(8, 24)
        prompts[engine.add_request(p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))] = (p, m)
    out: dict[str, list[int]] = {i: [] for i in prompts}

    def step() -> None:
        for o in engine.step():
            out[o.request_id] += o.outputs[0].delta_token_ids
        engine.check_books()

    for _ in range(4):
        step()
    assert engine.overlap.flights, "no tick in flight"
    g = engine.units[engine.transition(FuseUnits((0, 1), "test")).unit]
    assert not engine.overlap.flights and engine._held
    while engine.requests:
        step()
    engine.policy.begin_restore(g)
    while engine.groups:
        step()
    assert out == {i: engine.executor.expected_greedy(p, m) for i, (p, m) in prompts.items()}
    assert engine.overlap.reasons["a pipeline unit exists"] > 0


def test_a_tick_failing_while_the_next_is_scheduled_is_recomputed():
    """A collect that fails in an overlapped step (placeholders in place, t+1 packed): the placeholders come out,
    the unit's requests are recomputed, and every output still equals the oracle (arithmetic executor)."""
    engine = LLMEngine(MODEL, config_from_kwargs(**{**CONFIG, "num_instances": 2, "num_blocks": 400},
                                                 async_scheduling=True), executor="arith")
    collect, calls = engine.executor.collect, [0]

    def failing(launched, leaving):
        calls[0] += 1
        if calls[0] in (6, 15):
            raise RuntimeError("injected")
        return collect(launched, leaving)

    engine.executor.collect = failing
    arrivals = burst(40, seed=9, vocab=MODEL.vocab_size)
    got = run_open_loop(engine, arrivals)
    assert list(got.values()) == [engine.executor.expected_greedy(p, n) for _, p, n in arrivals]
    assert engine.failures["step"] == 2 and engine.overlap.overlapped > 0 and not engine.overlap.reasons


def test_demo_model_eos_and_stop_strings_overlapped():
    """The demo model (a tokenizer, EOS) recites its passages overlapped: each ends on EOS while its next tick is
    in flight, and a stop string cuts the text as in the serial loop."""
    llm = LLM(ensure_demo_model(), devices=jax.devices()[7:8], max_num_seqs=8, max_num_batched_tokens=64,
              min_token_bucket=64, max_model_len=256, async_scheduling=True)
    pairs = recitation_prompts()[:4]
    greedy = SamplingParams(max_tokens=160, temperature=0.0)
    outs = llm.generate([p for p, _ in pairs], greedy)
    for out, (_, expected) in zip(outs, pairs, strict=True):
        assert out.text == expected and out.outputs[0].finish_reason == "stop"
    prompt, expected = pairs[2]
    stop = " " + expected.split()[5]  # a word in the middle of the continuation
    streamed, final = "", None
    for out in llm.stream(prompt, SamplingParams(max_tokens=160, temperature=0.0, stop=[stop])):
        streamed += out.outputs[0].delta_text
        final = out
    assert final.finished and final.outputs[0].stop_reason == stop
    assert final.text == streamed == expected[:expected.index(stop)]
    assert llm.engine.overlap.overlapped > 0
    llm.engine.check_books()
