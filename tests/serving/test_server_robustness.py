"""Property-based robustness of the gRPC server: random, malformed, cancelled and overlapping requests.

The specification, for any input a client can put on the wire: each call ends with a complete response stream
or with INVALID_ARGUMENT / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED / CANCELLED (never UNKNOWN or INTERNAL,
which would mean a handler crashed); the server keeps serving; and once the streams are gone the runtime's
books balance (no KV blocks held, nothing running, no stream reader threads left).

Requests are sent to a real server on loopback over `FakeRuntime` (`max_model_len` small, so even "unlimited"
requests end quickly). Hypothesis keeps no example database here (no settings profile needed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving._generated.kunjax.serving.v2 import generate_pb2 as pb
from serving.client import KunjaxClient
from serving.fake_runtime import FakeRuntime
from serving.server import DisconnectedWriteFilter, ServerHandle, serve

pytestmark = pytest.mark.timeout(120)

VOCAB = 100
MAX_LEN = 32
MAX_QUEUED = 4
INT32 = st.integers(-(2**31), 2**31 - 1)
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
PROPERTY = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass(frozen=True)
class Case:
    request: pb.GenerateRequest
    action: str  # "read" the whole stream, "cancel" after the first message, or read under a tiny "deadline"
    timeout_s: float


FLOATS = st.one_of(st.floats(width=32), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 3.4e38, -1.0]))
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # proto strings are valid UTF-8
PROMPT_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=MAX_LEN - 1)


@st.composite
def sampling(draw: st.DrawFn, plausible: bool) -> pb.SamplingParams:
    """Sampling options; `plausible` ones are in range (most get admitted), the others anything the wire takes."""
    sp = pb.SamplingParams()
    max_tokens = draw(st.integers(1, 8) if plausible else INT32)
    optional = {
        "max_tokens": st.just(max_tokens),
        "temperature": st.floats(0.0, 2.0, width=32) if plausible else FLOATS,
        "top_p": st.floats(0.125, 1.0, width=32) if plausible else FLOATS,
        "min_p": st.floats(0.0, 1.0, width=32) if plausible else FLOATS,
        "top_k": st.integers(-1, 50) if plausible else INT32,
        "seed": st.integers(0, 2**63 - 1) if plausible else st.integers(0, 2**64 - 1),
        "logprobs": st.integers(0, 5) if plausible else INT32,
        "skip_special_tokens": st.booleans(),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            setattr(sp, name, draw(strategy))
    sp.stop.extend(draw(st.lists(PROMPT_TEXT if plausible else TEXT, max_size=2)))
    sp.stop_token_ids.extend(draw(st.lists(st.integers(0, VOCAB - 1) if plausible else INT32, max_size=3)))
    sp.ignore_eos = draw(st.booleans())
    sp.include_stop_str_in_output = draw(st.booleans())
    sp.min_tokens = draw(st.integers(0, max_tokens if sp.HasField("max_tokens") else 4) if plausible else INT32)
    sp.max_tokens_unlimited = draw(st.integers(0, 9)) == 0
    return sp


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """One request and what the client does with it; half plausible (in range), half anything at all."""
    plausible = draw(st.booleans())
    req = pb.GenerateRequest(
        request_id=draw(st.one_of(st.just(""), st.sampled_from(["dup-a", "dup-b"]), TEXT)),
        sampling=draw(sampling(plausible)))
    if plausible:
        if draw(st.booleans()):
            req.text = draw(PROMPT_TEXT)
        else:
            req.token_ids.ids.extend(draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=MAX_LEN - 1)))
    else:
        prompt = draw(st.sampled_from(["text", "ids", "missing"]))
        if prompt == "text":
            req.text = draw(TEXT)
        elif prompt == "ids":
            req.token_ids.ids.extend(draw(st.lists(INT32, max_size=MAX_LEN + 8)))
    action = draw(st.sampled_from(["read", "read", "read", "cancel", "deadline"]))
    timeout_s = draw(st.floats(0.0005, 0.05)) if action == "deadline" else 10.0
    return Case(req, action, timeout_s)


def outcome(call: grpc.Call, case: Case) -> grpc.StatusCode:
    """Consumes the call as `case.action` says; returns its status, checking what a stream promises."""
    responses: list[pb.GenerateResponse] = []
    try:
        for resp in call:
            responses.append(resp)
            if case.action == "cancel":
                call.cancel()
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, f"{e.code()}: {e.details()} for {case}"
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert e.details(), "INVALID_ARGUMENT must say what is wrong"
        return e.code()
    finals = [r for r in responses if r.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
    assert len(finals) == 1 and responses[-1] is finals[0], f"one final message, last: {responses} for {case}"
    sp, n = case.request.sampling, sum(len(r.token_ids) for r in responses)
    if finals[0].finish_reason != pb.FINISH_REASON_ABORT:
        assert finals[0].usage.completion_tokens == n
    if sp.HasField("max_tokens") and not sp.max_tokens_unlimited:
        assert n <= sp.max_tokens
    return grpc.StatusCode.OK


def books_balance(runtime: FakeRuntime, timeout_s: float = 10.0) -> bool:
    def balanced() -> bool:
        (load,) = runtime.load()
        readers = [t for t in threading.enumerate() if t.name.startswith("kunjax-stream-")]
        return load.kv_used == 0 and load.running == 0 and not readers
    deadline = time.monotonic() + timeout_s
    while not balanced() and time.monotonic() < deadline:
        time.sleep(0.02)
    return balanced()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FakeRuntime, ServerHandle, KunjaxClient]]:
    runtime = FakeRuntime(vocab_size=VOCAB, max_model_len=MAX_LEN, max_queued=MAX_QUEUED, step_interval_s=0.001)
    handle = serve(runtime)
    client = KunjaxClient(handle.target, timeout_s=10.0)
    yield runtime, handle, client
    client.close()
    handle.stop(grace=0.5)
    runtime.shutdown(grace_s=0.0)


def still_serves(client: KunjaxClient) -> bool:
    return client.generate_text([5], max_tokens=2) == ("<6><7>", "length")


def test_random_requests_one_at_a_time(server: tuple[FakeRuntime, ServerHandle, KunjaxClient]) -> None:
    runtime, _, client = server
    seen: dict[grpc.StatusCode, int] = {}

    @settings(PROPERTY, max_examples=500)
    @given(case=cases())
    def one(case: Case) -> None:
        code = outcome(client.stub.Generate(case.request, timeout=case.timeout_s), case)
        seen[code] = seen.get(code, 0) + 1

    one()
    assert sum(seen.values()) >= 500
    assert seen.get(grpc.StatusCode.OK) and seen.get(grpc.StatusCode.INVALID_ARGUMENT), seen  # both paths ran
    assert still_serves(client)
    assert books_balance(runtime)


def test_random_overlapping_requests_with_duplicate_ids_and_overload(
        server: tuple[FakeRuntime, ServerHandle, KunjaxClient]) -> None:
    runtime, _, client = server

    @settings(PROPERTY, max_examples=40)
    @given(batch=st.lists(cases(), min_size=2, max_size=2 * MAX_QUEUED))
    def overlapping(batch: list[Case]) -> None:
        calls = [client.stub.Generate(c.request, timeout=c.timeout_s) for c in batch]  # all in flight at once
        for call, case in zip(calls, batch, strict=True):
            outcome(call, case)

    overlapping()
    assert still_serves(client)
    assert books_balance(runtime)


def test_raw_bytes_get_a_status_never_a_crash(server: tuple[FakeRuntime, ServerHandle, KunjaxClient]) -> None:
    runtime, handle, client = server
    service = "/kunjax.serving.v2.KunjaxService/"
    with grpc.insecure_channel(handle.target) as channel:  # no serializers: bytes go out as they are
        streams = {"Generate": channel.unary_stream(service + "Generate"),
                   "Decode": channel.unary_stream("/jetstream_proto.Orchestrator/Decode")}
        unary = {m: channel.unary_unary(service + m) for m in ("GetLoad", "GetServerInfo", "Abort")}

        @settings(PROPERTY, max_examples=150)
        @given(data=st.one_of(st.binary(max_size=64), cases().map(lambda c: c.request.SerializeToString()[:-1])),
               method=st.sampled_from(["Generate", "Generate", "Decode", "GetLoad", "GetServerInfo", "Abort"]))
        def raw(data: bytes, method: str) -> None:
            try:
                if method in streams:
                    list(streams[method](data, timeout=10))
                else:
                    unary[method](data, timeout=10)
            except grpc.RpcError as e:
                assert e.code() in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}, (
                    f"{method}({data!r}): {e.code()} {e.details()}")

        raw()
    assert still_serves(client)
    assert books_balance(runtime)


def test_grpc_core_errors_about_gone_clients_become_a_debug_line():
    """gRPC's core logs a traceback for each response written to a disconnected client (~16,000 in the 30-minute
    soak); those become one debug line each, and nothing else is hidden."""
    f = DisconnectedWriteFilter()

    def record(msg, *args):
        return logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1, msg, args, None)

    assert not f.filter(record("%s raised in core by servicer method [%s]", "ExecuteBatchError",
                               "/kunjax.serving.v2.KunjaxService/Generate"))
    assert not f.filter(record("ExecuteBatchError raised in core by servicer method [/x/Generate]"))
    assert f.filter(record("%s raised in core by servicer method [%s]", "ValueError", "/x/Generate"))
    assert f.filter(record("something else entirely"))
