"""The engine on its own thread, as the gRPC layer uses it: concurrent submitters, streaming, abort, limits."""

from __future__ import annotations

import threading
import time

import jax
import pytest

from kunjax.api import GenerateRequest, InvalidRequest, Overloaded
from kunjax.checkpoint import load_params
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.memory import param_shapes
from kunjax.sampling_params import SamplingParams
from sharding.layouts import instance_meshes, param_shardings
from tests.helpers import TINY, naive_greedy, started, write_tiny_model
from tests.kunjax.test_engine import random_prompts

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["serial", "overlapped"])
def runtime(tmp_path_factory, request):
    """Every test runs on the serial step loop and on the overlapped one (`--async-scheduling`)."""
    path = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    engine = LLMEngine(path, config_from_kwargs(num_instances=2, block_size=4, num_blocks=40, max_num_seqs=4,
                                                max_num_batched_tokens=16, max_model_len=64, min_token_bucket=16,
                                                async_scheduling=request.param),
                       devices=jax.devices()[4:6])
    rt = started(engine, max_queued=8)
    yield rt
    rt.shutdown(grace_s=5)


def req(rid: str, ids, params=GREEDY) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt=None, prompt_ids=tuple(ids), params=params)


def collect(rt, rid):
    events = list(rt.events(rid, timeout_s=120))
    assert events and events[-1].finished, f"{rid}: stream ended without a final event"
    return events


def wait_idle(rt, timeout=30.0):
    deadline = time.monotonic() + timeout
    while any(x.kv_used or x.running or x.waiting for x in rt.load()):
        assert time.monotonic() < deadline, f"blocks not freed: {rt.load()}"
        time.sleep(0.02)


def test_concurrent_streams_match_offline_generation(runtime):
    prompts = random_prompts(6, 21)
    results: dict[str, list[int]] = {}

    def client(i):
        rid = f"c{i}"
        runtime.submit(req(rid, prompts[i]))
        events = collect(runtime, rid)
        results[rid] = [t for e in events for t in e.token_ids]
        assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 10
        assert events[-1].prompt_tokens == len(prompts[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    mesh = instance_meshes(jax.devices()[:1], 1, 1)[0]
    params = load_params(runtime.engine.model_path, TINY, param_shardings(mesh, param_shapes(TINY)), "float32")
    expected = naive_greedy(TINY, params, prompts, 10)
    assert [results[f"c{i}"] for i in range(6)] == expected
    wait_idle(runtime)
    overlap = runtime.engine.overlap
    assert overlap is None or overlap.overlapped > 0, "the overlapped runtime never overlapped a step"


def test_abort_mid_stream_frees_blocks(runtime, monkeypatch):
    # Hold the engine thread between two steps (outside its lock) from the first token until the abort is in, so a
    # loaded machine cannot let the request run to its length first.
    started, aborted = threading.Event(), threading.Event()
    has_requests, deliver = runtime.engine.has_requests, runtime._deliver

    def gated() -> bool:
        if started.is_set():
            aborted.wait(timeout=30)
        return has_requests()

    def delivered(out) -> None:
        deliver(out)
        if out.request_id == "long":
            started.set()

    monkeypatch.setattr(runtime.engine, "has_requests", gated)
    monkeypatch.setattr(runtime, "_deliver", delivered)
    runtime.submit(req("long", random_prompts(1, 22)[0], SamplingParams(max_tokens=40, temperature=0,
                                                                        ignore_eos=True)))
    it = runtime.events("long", timeout_s=60)
    first = next(it)
    assert not first.finished
    runtime.abort("long")
    aborted.set()
    rest = list(it)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    runtime.abort("long")  # idempotent
    wait_idle(runtime)
    runtime.engine.check_books()


def test_bad_requests_are_refused_before_acceptance(runtime):
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        runtime.submit(req("bad1", [1, 10_000]))
    with pytest.raises(InvalidRequest, match="empty"):
        runtime.submit(req("bad2", []))
    with pytest.raises(InvalidRequest, match="exactly one"):
        runtime.submit(GenerateRequest(request_id="bad3", prompt=None, prompt_ids=None, params=GREEDY))
    with pytest.raises(InvalidRequest, match="prompt is empty"):  # an empty text is empty ids, not a lone BOS
        runtime.submit(GenerateRequest(request_id="bad4", prompt="", prompt_ids=None, params=GREEDY))
    runtime.submit(req("dup", [1, 2, 3], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)))
    with pytest.raises(InvalidRequest, match="duplicate request id"):
        runtime.submit(req("dup", [1, 2, 3]))
    collect(runtime, "dup")
    wait_idle(runtime)


def test_overload_is_refused_with_a_retry_hint_and_nothing_is_lost(runtime):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    accepted = []
    with pytest.raises(Overloaded) as info:
        for i in range(20):
            runtime.submit(req(f"o{i}", [5, 6, 7], params))
            accepted.append(f"o{i}")
    assert len(accepted) == runtime.max_queued and info.value.retry_after_s > 0
    for rid in accepted:
        assert collect(runtime, rid)[-1].finish_reason == "length"
    wait_idle(runtime)


def test_info_and_load_describe_the_instances(runtime):
    info = runtime.info()
    assert info.architecture == "llama" and len(info.instances) == 2 and info.vocab_size == TINY.vocab_size
    load = runtime.load()
    assert [x.instance for x in load] == [0, 1]
    assert all(x.kv_free + x.kv_used + x.kv_cached == x.kv_total for x in load)


def test_the_id_of_a_finished_request_is_free_before_its_reader_drains_it(runtime):
    """An aborted request is finished at once; its id may be reused while its old reader still holds its final
    event, and each reader gets its own request's events."""
    long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    runtime.submit(req("reuse", [1, 2, 3], long))
    old = runtime.events("reuse", timeout_s=60)
    runtime.abort("reuse")  # at once: waiting for its first token first raced its 30 steps on a loaded machine
    runtime.submit(req("reuse", [4, 5, 6], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)))
    with pytest.raises(InvalidRequest, match="duplicate request id"):  # while it runs, the id is taken
        runtime.submit(req("reuse", [7]))
    assert list(old)[-1].finish_reason == "abort"
    new = collect(runtime, "reuse")
    assert new[-1].finish_reason == "length" and sum(len(e.token_ids) for e in new) > 30
    wait_idle(runtime)


def test_a_huge_text_prompt_is_refused_without_waiting_for_the_engine(runtime):
    """Tokenizing and its size check run outside the engine lock: a 4 MB text is refused while a step holds it."""
    result: dict[str, str] = {}

    def submit() -> None:
        try:
            runtime.submit(GenerateRequest(request_id="huge", prompt="x" * 4_000_000, prompt_ids=None, params=GREEDY))
        except InvalidRequest as e:
            result["error"] = str(e)

    with runtime._lock:  # the engine is in the middle of a long step
        t = threading.Thread(target=submit)
        t.start()
        t.join(timeout=10)
        assert not t.is_alive(), "the refusal waited for the engine"
    assert "prompt text has 4000000 characters" in result["error"]


def test_abort_and_load_answer_while_the_engine_lock_is_held(runtime):
    """An abort only queues the id and load reads a snapshot: neither waits behind a step or admissions (holding the
    lock here stands for them); the abort then happens at the next step boundary."""
    runtime.load()  # a snapshot exists
    runtime.submit(req("held", [5, 6, 7], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)))
    it = runtime.events("held", timeout_s=60)
    answered: dict[str, float] = {}

    def timed(name, fn) -> None:
        t0 = time.monotonic()
        fn()
        answered[name] = time.monotonic() - t0

    with runtime._lock:  # at once: the engine steps at most once before (waiting for a token raced its 40 steps)
        threads = [threading.Thread(target=timed, args=("abort", lambda: runtime.abort("held"))),
                   threading.Thread(target=timed, args=("load", runtime.load)),
                   threading.Thread(target=timed, args=("status", runtime.policy_status))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=5)
        assert not any(t.is_alive() for t in threads), f"waited for the engine lock: {answered}"
    assert max(answered.values()) < 1.0, answered
    assert list(it)[-1].finish_reason == "abort"
    wait_idle(runtime)
    runtime.engine.check_books()


def test_a_reader_polling_faster_than_the_freshness_window_still_sees_the_engine_go_idle(runtime):
    """A snapshot counts as fresh for `STATUS_FRESH_S` from when it was taken, not from when it was last handed out:
    a reader that polls faster than that (a dashboard, a test's wait loop) must not keep getting the one taken while
    a request still ran."""
    for i in range(5):
        rid = f"poll-{i}"
        runtime.submit(req(rid, [5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)))
        finals: list = []
        reader = threading.Thread(target=lambda rid=rid, finals=finals: finals.append(
            list(runtime.events(rid, timeout_s=60))[-1]))
        reader.start()
        while reader.is_alive():  # polled all along, as a dashboard would
            runtime.load()
            time.sleep(0.002)
        assert finals[0].finished
        deadline = time.monotonic() + 2.0
        while any(x.kv_used or x.running for x in runtime.load()):
            assert time.monotonic() < deadline, f"a stale snapshot kept being handed out: {runtime.load()}"
            time.sleep(0.002)


def test_quiet_gc_freezes_the_heap_and_raises_the_first_threshold():
    import gc

    from kunjax.engine_thread import GC_GEN0_THRESHOLD, quiet_gc

    threshold = gc.get_threshold()
    try:
        quiet_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (max(threshold[0], GC_GEN0_THRESHOLD), *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
