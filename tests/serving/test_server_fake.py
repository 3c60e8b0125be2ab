"""The gRPC server end to end over a real loopback channel, against `FakeRuntime`'s hand-computable outputs.

What a client of `kunjax.serving.v2.KunjaxService` can rely on: streamed ids and text, a final message with usage
and finish reason, aborts and cancellations that free the request's blocks, INVALID_ARGUMENT / RESOURCE_EXHAUSTED
with useful messages, health that turns SERVING only after warm-up, reflection, and info / load that say when
there is no elasticity (drops and restores of a real engine: `test_elastic_visibility.py`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving import build_protos
from serving._generated.kunjax.serving.v2 import generate_pb2 as pb
from serving.client import KunjaxClient
from serving.fake_runtime import FakeRuntime
from serving.jetstream import JETSTREAM_SERVICE_NAME
from serving.server import RETRY_AFTER_KEY, SERVICE_NAME, ServerHandle, serve
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

VOCAB = 100
MAX_LEN = 64
RPC_TIMEOUT_S = 10.0
ENDLESS = {"max_tokens": None}  # runs until max_model_len, which these runtimes set out of reach


class Served:
    def __init__(self, runtime: FakeRuntime, handle: ServerHandle):
        self.runtime = runtime
        self.handle = handle
        self.client = KunjaxClient(handle.target, timeout_s=RPC_TIMEOUT_S)


@pytest.fixture
def make_served() -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(*, max_message_bytes: int = 4 * 1024 * 1024, **runtime_kwargs: object) -> Served:
        kwargs = {"vocab_size": VOCAB, "max_model_len": MAX_LEN, **runtime_kwargs}
        runtime = FakeRuntime(**kwargs)
        s = Served(runtime, serve(runtime, max_message_bytes=max_message_bytes, health_poll_s=0.01))
        made.append(s)
        return s

    yield make
    for s in made:
        s.client.close()
        s.handle.stop(grace=0.5)
        s.runtime.shutdown(grace_s=0.0)


@pytest.fixture
def served(make_served: Callable[..., Served]) -> Served:
    return make_served()


def idle(s: Served) -> bool:
    (load,) = s.client.load()
    return load.kv_used == 0 and load.running == 0


def expected_ids(last_prompt_id: int, n: int) -> list[int]:
    return [(last_prompt_id + i + 1) % VOCAB for i in range(n)]


# ---- streaming -------------------------------------------------------------------------------------------
def test_token_id_prompt_streams_hand_computed_tokens_then_usage(served: Served) -> None:
    responses = list(served.client.generate([5, 6, 7], request_id="r1", max_tokens=4))

    want = expected_ids(7, 4)  # 8, 9, 10, 11
    assert [list(r.token_ids) for r in responses] == [[t] for t in want]
    assert [r.text for r in responses] == [f"<{t}>" for t in want]
    assert {r.request_id for r in responses} == {"r1"}
    *middle, last = responses
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not r.HasField("usage") for r in middle)
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_tokens) == (3, 4, 0)
    assert wait_until(lambda: idle(served))


def test_text_prompt_is_one_id_per_character_and_ids_wrap_at_vocab(served: Served) -> None:
    # "ab": ids 97, 98; output continues from 98 and wraps past VOCAB - 1.
    text, reason = served.client.generate_text("ab", max_tokens=3)
    assert (text, reason) == ("<99><0><1>", "length")


def test_server_assigns_a_request_id_when_none_is_given(served: Served) -> None:
    responses = list(served.client.generate([1], max_tokens=2))
    assert responses[0].request_id and {r.request_id for r in responses} == {responses[0].request_id}


def test_stop_token_id_ends_with_stop_and_names_the_token(served: Served) -> None:
    responses = list(served.client.generate([5], stop_token_ids=[8], max_tokens=10))
    assert [t for r in responses for t in r.token_ids] == [6, 7, 8]
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.WhichOneof("stop_reason") == "stop_token_id" and last.stop_token_id == 8
    assert last.usage.completion_tokens == 3


def test_logprobs_are_returned_per_token_most_likely_first(served: Served) -> None:
    responses = list(served.client.generate([5], max_tokens=2, logprobs=2))
    entries = [lp for r in responses for lp in r.logprobs]
    assert [e.token_id for e in entries] == [6, 7]
    assert entries[0].logprob == 0.0
    assert [(t.token_id, t.logprob) for t in entries[0].top] == [(6, 0.0), (7, -1.0)]


def test_64_concurrent_streams_all_complete_with_their_own_tokens(make_served: Callable[..., Served]) -> None:
    s = make_served(max_queued=64)
    calls = [s.client.generate([i], request_id=f"c{i}", max_tokens=8) for i in range(64)]  # all in flight
    for i, call in enumerate(calls):
        responses = list(call)
        assert [t for r in responses for t in r.token_ids] == expected_ids(i, 8)
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert wait_until(lambda: idle(s))


# ---- abort, cancel, deadline -----------------------------------------------------------------------------
def test_abort_mid_stream_ends_it_with_abort_and_frees_blocks(make_served: Callable[..., Served]) -> None:
    s = make_served(max_model_len=10**9, step_interval_s=0.005)
    call = s.client.generate([1], request_id="long", **ENDLESS)
    first = next(call)
    assert list(first.token_ids) == [2]
    assert s.client.load()[0].kv_used > 0
    s.client.abort("long")
    rest = list(call)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert wait_until(lambda: idle(s))
    s.client.abort("long")  # idempotent, also once finished


def test_client_cancel_mid_stream_aborts_the_request(make_served: Callable[..., Served]) -> None:
    s = make_served(max_model_len=10**9, step_interval_s=0.005)
    call = s.client.generate([1], request_id="cancelled", **ENDLESS)
    next(call)
    call.cancel()
    assert wait_until(lambda: idle(s), timeout_s=5.0)


def test_deadline_mid_stream_aborts_the_request(make_served: Callable[..., Served]) -> None:
    s = make_served(max_model_len=10**9, step_interval_s=0.005)
    with pytest.raises(grpc.RpcError) as err:
        for _ in s.client.generate([1], timeout_s=0.3, **ENDLESS):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: idle(s), timeout_s=5.0)


# ---- bad input and overload ------------------------------------------------------------------------------
@pytest.mark.parametrize(("prompt", "options", "message"), [
    ("", {}, "prompt is empty"),
    ([], {}, "prompt is empty"),
    ([5, VOCAB], {}, "outside the vocabulary"),
    ([-1], {}, "outside the vocabulary"),
    ([1] * MAX_LEN, {}, "too long"),
    ([1], {"temperature": -1.0}, "temperature"),
    ([1], {"top_p": 0.0}, "top_p"),
    ([1], {"max_tokens": 0}, "max_tokens"),
    ([1], {"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ([1], {"logprobs": 1000}, "logprobs"),
    ([1], {"session_id": "s" * 257}, "session_id has 257 characters (at most 256)"),
    ([1], {"request_id": "r" * 300}, "request_id has 300 characters (at most 256)"),
], ids=["empty-text", "empty-ids", "id-past-vocab", "negative-id", "too-long", "temperature", "top_p",
        "max_tokens", "stop-id-past-vocab", "too-many-logprobs", "long-session-id", "long-request-id"])
def test_bad_input_is_invalid_argument_naming_the_problem(served: Served, prompt: object, options: dict,
                                                         message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(served.client.generate(prompt, **options))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert idle(served)


def test_missing_prompt_is_invalid_argument(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(served.client.stub.Generate(pb.GenerateRequest(), timeout=RPC_TIMEOUT_S))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt is missing" in err.value.details()


def test_duplicate_concurrent_request_id_is_invalid_argument(make_served: Callable[..., Served]) -> None:
    s = make_served(max_model_len=10**9, step_interval_s=0.005)
    first = s.client.generate([1], request_id="same", **ENDLESS)
    next(first)
    with pytest.raises(grpc.RpcError) as err:
        list(s.client.generate([2], request_id="same", max_tokens=1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "duplicate request id 'same'" in err.value.details()
    next(first)  # the refusal did not abort the running request of that id
    first.cancel()
    assert wait_until(lambda: idle(s))


def test_overload_is_resource_exhausted_with_a_retry_hint(make_served: Callable[..., Served]) -> None:
    s = make_served(max_queued=2, max_model_len=10**9, step_interval_s=0.005)
    running = [s.client.generate([1], request_id=f"fill{i}", **ENDLESS) for i in range(2)]
    for call in running:
        next(call)
    with pytest.raises(grpc.RpcError) as err:
        list(s.client.generate([1], max_tokens=1))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after" in err.value.details()
    trailers = dict(err.value.trailing_metadata())
    assert float(trailers[RETRY_AFTER_KEY]) > 0
    for call in running:
        call.cancel()
    assert wait_until(lambda: idle(s))
    assert s.client.generate_text([1], max_tokens=1) == ("<2>", "length")  # capacity is back


def test_oversized_request_is_refused_by_grpc(make_served: Callable[..., Served]) -> None:
    s = make_served(max_message_bytes=1024)
    with pytest.raises(grpc.RpcError) as err:
        list(s.client.generate("x" * 4096, max_tokens=1))
    assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    assert s.client.generate_text("x", max_tokens=1)[1] == "length"  # the server is still fine


# ---- health, reflection, info, load ----------------------------------------------------------------------
def test_health_is_not_serving_until_warm_up_then_serving(make_served: Callable[..., Served]) -> None:
    s = make_served(warmup_s=0.5)
    health = health_pb2_grpc.HealthStub(s.client.channel)

    def status(service: str = "") -> int:
        req = health_pb2.HealthCheckRequest(service=service)
        return health.Check(req, timeout=RPC_TIMEOUT_S).status

    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING, timeout_s=5.0)
    assert status(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    assert status(JETSTREAM_SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING


def test_health_is_not_serving_from_the_start_of_the_drain(make_served: Callable[..., Served]) -> None:
    """`begin_drain` (what `kunjax serve` does on SIGTERM, before the grace period) turns every service name's
    health NOT_SERVING while the streams in flight go on."""
    s = make_served(max_model_len=10**9, step_interval_s=0.005)
    health = health_pb2_grpc.HealthStub(s.client.channel)
    assert wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S).status
                      == health_pb2.HealthCheckResponse.SERVING, timeout_s=5.0)
    stream = s.client.generate([1], **ENDLESS)
    next(stream)
    s.handle.begin_drain()
    for service in ("", SERVICE_NAME, JETSTREAM_SERVICE_NAME):
        got = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S).status
        assert got == health_pb2.HealthCheckResponse.NOT_SERVING, service
    assert next(stream).token_ids  # still streaming
    stream.cancel()


def test_reflection_lists_the_services(served: Served) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(served.client.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                        timeout=RPC_TIMEOUT_S)
    names = {svc.name for reply in replies for svc in reply.list_services_response.service}
    assert {"kunjax.serving.v2.KunjaxService", "grpc.health.v1.Health"} <= names


def test_server_info_and_load_round_trip(make_served: Callable[..., Served]) -> None:
    s = make_served(max_queued=3)
    info = s.client.info()
    assert (info.model, info.vocab_size, info.max_model_len) == ("fake", VOCAB, MAX_LEN)
    assert list(info.instances) == ["instance 0: fake on host"] and dict(info.versions) == {"fake_runtime": "1"}
    (load,) = s.client.load()
    total = 3 * (MAX_LEN // 4)
    assert (load.instance, load.mode, load.kv_used, load.kv_free, load.kv_total) == (0, "replica", 0, total, total)
    assert (load.group, load.stage) == (-1, -1)
    assert (info.block_size, info.kv_pool_blocks) == (4, total)


def test_a_runtime_without_elasticity_reports_its_policy_and_one_unit(served: Served) -> None:
    info = served.client.info()
    assert dict(info.policy_settings) == {}
    served.client.generate_text([1], max_tokens=2)
    status = served.client.policy_status()
    assert status == pb.PolicyStatus(policy="fake", units=[pb.UnitStatus(unit=0, mode="replica", members=[0])])


def test_load_counts_one_block_per_four_tokens_of_a_running_request(make_served: Callable[..., Served]) -> None:
    s = make_served(max_model_len=10**9, step_interval_s=0.1)
    call = s.client.generate([1] * 6, request_id="blocks", **ENDLESS)
    next(call)  # 6 prompt + 1 or 2 output tokens: 2 blocks until the 3rd output token
    (load,) = s.client.load()
    assert load.running == 1 and load.kv_used == 2 and load.kv_free == load.kv_total - 2
    call.cancel()
    assert wait_until(lambda: idle(s))


# ---- generated code ----------------------------------------------------------------------------------------
def test_checked_in_generated_code_is_fresh() -> None:
    pytest.importorskip("grpc_tools")
    assert build_protos.check() == []


def test_check_reports_a_stale_generated_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("grpc_tools")
    copy = tmp_path / "_generated"
    shutil.copytree(build_protos.OUT_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "kunjax/serving/v2/generate_pb2.py").write_text("# edited by hand\n")
    monkeypatch.setattr(build_protos, "OUT_ROOT", copy)
    assert build_protos.check() == ["stale: kunjax/serving/v2/generate_pb2.py"]


def test_a_request_id_can_be_reused_right_after_its_stream_is_cancelled(make_served: Callable[..., Served]) -> None:
    """A cancelled stream's abort runs in the background: a new request reusing the id at once must not be told
    "duplicate request id" (the old request is on its way out, not running)."""
    s = make_served(max_model_len=10**9, step_interval_s=0.005)
    for _ in range(20):
        call = s.client.generate([1], request_id="again", **ENDLESS)
        next(call)
        call.cancel()
        assert s.client.generate_text([2], request_id="again", max_tokens=1)[1] == "length"
    assert wait_until(lambda: idle(s))


def test_control_calls_and_cancels_do_not_wait_behind_admissions(make_served: Callable[..., Served]) -> None:
    """Admissions run on their own threads: with every admission thread stuck in a slow submit, GetLoad, Abort
    and a cancelled stream's abort still answer at once."""
    import threading
    import time

    s = make_served(max_model_len=10**9, step_interval_s=0.005)
    running = s.client.generate([1], request_id="running", **ENDLESS)
    next(running)
    gate = threading.Event()
    submit = s.runtime.submit

    def slow_submit(request, on_event=None):
        gate.wait(timeout=30)
        submit(request, on_event)

    s.runtime.submit = slow_submit
    stuck = [s.client.generate([2], max_tokens=1) for _ in range(8)]  # more than the admission threads
    time.sleep(0.2)
    try:
        t0 = time.monotonic()
        assert s.client.load()[0].running == 1
        s.client.abort("running")
        assert time.monotonic() - t0 < 1.0
        assert list(running)[-1].finish_reason == pb.FINISH_REASON_ABORT
    finally:
        gate.set()
    for call in stuck:
        assert list(call)[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert wait_until(lambda: idle(s))


def test_stopping_during_warm_up_leaves_no_pending_task(tmp_path) -> None:
    """The task that turns health SERVING is still waiting when a server stops during warm-up (SIGTERM while
    compiling): stopping reaps it instead of logging "Task was destroyed but it is pending"."""
    import subprocess
    import sys

    script = ("import time\n"
              "from serving.fake_runtime import FakeRuntime\n"
              "from serving.server import serve\n"
              "rt = FakeRuntime(vocab_size=10, max_model_len=16, warmup_s=30)\n"
              "h = serve(rt)\n"
              "time.sleep(0.2)\n"
              "h.stop(grace=0.1)\n"
              "rt.shutdown(0)\n"
              "print('stopped')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "stopped" in res.stdout, res.stderr
    assert "Task was destroyed" not in res.stderr, res.stderr


def test_streams_hold_no_thread_each(make_served: Callable[..., Served]) -> None:
    """The runtime hands each event to its stream's asyncio queue: 200 concurrent streams add no threads (they
    once held one each), and half of them cancelled mid-stream free their blocks."""
    import threading

    s = make_served(max_queued=400, max_model_len=10**9, step_interval_s=0.005)
    before = threading.active_count()
    calls = [s.client.generate([1 + i % 50], **ENDLESS) for i in range(200)]
    for c in calls:
        next(c)
    assert threading.active_count() - before < 20, threading.active_count() - before
    for c in calls[::2]:
        c.cancel()
    assert wait_until(lambda: s.client.load()[0].running == 100, timeout_s=10.0)
    for c in calls[1::2]:
        c.cancel()
    assert wait_until(lambda: idle(s), timeout_s=10.0)


def test_a_runtime_that_can_no_longer_serve_ends_streams_with_unavailable_and_says_so(served: Served) -> None:
    call = served.client.generate([1], request_id="doomed", **ENDLESS)
    next(call)
    served.runtime.fatal("a peer process is gone")
    last = None
    with pytest.raises(grpc.RpcError) as err:
        for resp in call:
            last = resp
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "a peer process is gone" in err.value.details()
    assert last is not None and last.finish_reason == pb.FINISH_REASON_ERROR and last.error_code == "unavailable"
