"""JetStream's `Orchestrator` end to end over a real loopback channel, beside `KunjaxService` on one server.

What a client built only from JetStream's proto can rely on: Decode streams the same hand-computable tokens
that kunjax's Generate returns for the same prompt (ids only for a token prompt, text and ids for a text
prompt), HealthCheck turns live after warm-up, bad input is INVALID_ARGUMENT, overload is RESOURCE_EXHAUSTED,
and a cancelled or timed-out Decode aborts its request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from serving._generated.jetstream_proto import jetstream_pb2 as js
from serving._generated.jetstream_proto import jetstream_pb2_grpc as js_grpc
from serving._generated.kunjax.serving.v2 import generate_pb2_grpc as pb_grpc
from serving.client import KunjaxClient
from serving.fake_runtime import FakeRuntime
from serving.jetstream import JETSTREAM_SERVICE_NAME, add_jetstream_servicer
from serving.server import KunjaxServicer
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

VOCAB = 100
MAX_LEN = 64
RPC_TIMEOUT_S = 10.0
LONG = 10**6  # max_tokens that will not run out during a test (with max_model_len out of reach)


class Served:
    """`FakeRuntime` behind a grpc.aio server (its own loop thread) holding both services, and a client of each."""

    def __init__(self, **runtime_kwargs: object):
        self.runtime = FakeRuntime(**{"vocab_size": VOCAB, "max_model_len": MAX_LEN, **runtime_kwargs})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-grpc-loop", daemon=True)
        self.thread.start()
        self.server, port = self._on_loop(self._start())
        self.kunjax = KunjaxClient(f"127.0.0.1:{port}", timeout_s=RPC_TIMEOUT_S)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.jetstream = js_grpc.OrchestratorStub(self.channel)

    def _on_loop(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    async def _start(self) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        self.kunjax_servicer = KunjaxServicer(self.runtime)
        pb_grpc.add_KunjaxServiceServicer_to_server(self.kunjax_servicer, server)
        self.jetstream_servicer = add_jetstream_servicer(server, self.runtime, kunjax=self.kunjax_servicer)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def decode(self, prompt: str | list[int], max_tokens: int, **kwargs: object) -> list[js.DecodeResponse]:
        return list(self.jetstream.Decode(decode_request(prompt, max_tokens), timeout=RPC_TIMEOUT_S, **kwargs))

    def close(self) -> None:
        self.kunjax.close()
        self.channel.close()
        self._on_loop(self.server.stop(0.5))
        self.kunjax_servicer.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
        self.runtime.shutdown(grace_s=0.0)


def decode_request(prompt: str | list[int], max_tokens: int, **fields: object) -> js.DecodeRequest:
    if isinstance(prompt, str):
        return js.DecodeRequest(max_tokens=max_tokens, text_content=js.DecodeRequest.TextContent(text=prompt),
                                **fields)
    return js.DecodeRequest(max_tokens=max_tokens, token_content=js.DecodeRequest.TokenContent(token_ids=prompt),
                            **fields)


@pytest.fixture
def make_served() -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(**runtime_kwargs: object) -> Served:
        made.append(Served(**runtime_kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def served(make_served: Callable[..., Served]) -> Served:
    return make_served()


def idle(s: Served) -> bool:
    (load,) = s.kunjax.load()
    return load.kv_used == 0 and load.running == 0


def samples(responses: list[js.DecodeResponse]) -> list[tuple[list[int], str]]:
    out = []
    for r in responses:
        assert r.WhichOneof("content") == "stream_content" and len(r.stream_content.samples) == 1
        (sample,) = r.stream_content.samples
        out.append((list(sample.token_ids), sample.text))
    return out


# ---- Decode ----------------------------------------------------------------------------------------------
def test_token_prompt_streams_one_id_per_message_without_text(served: Served) -> None:
    got = samples(served.decode([5, 6, 7], max_tokens=4))
    assert got == [([8], ""), ([9], ""), ([10], ""), ([11], "")]  # last prompt id 7, then +1 per step
    kunjax = list(served.kunjax.generate([5, 6, 7], max_tokens=4, temperature=0.0))
    assert [ids for ids, _ in got] == [list(r.token_ids) for r in kunjax]
    assert wait_until(lambda: idle(served))


def test_text_prompt_streams_the_same_ids_and_text_as_kunjax_generate(served: Served) -> None:
    got = samples(served.decode("ab", max_tokens=3))  # "ab" -> 97, 98; output wraps past VOCAB - 1
    assert got == [([99], "<99>"), ([0], "<0>"), ([1], "<1>")]
    kunjax = list(served.kunjax.generate("ab", max_tokens=3, temperature=0.0))
    assert got == [(list(r.token_ids), r.text) for r in kunjax]


def test_ignored_jetstream_fields_do_not_change_the_output(served: Served) -> None:
    req = decode_request([5], 2, num_samples=1, has_bos=True,
                         metadata=js.DecodeRequest.Metadata(start_time=time.time()))
    got = samples(list(served.jetstream.Decode(req, timeout=RPC_TIMEOUT_S)))
    assert got == [([6], ""), ([7], "")]


# ---- HealthCheck -----------------------------------------------------------------------------------------
def test_health_check_is_live_only_after_warm_up(make_served: Callable[..., Served]) -> None:
    s = make_served(warmup_s=0.5)

    def is_live() -> bool:
        return s.jetstream.HealthCheck(js.HealthCheckRequest(), timeout=RPC_TIMEOUT_S).is_live

    assert not is_live()
    assert wait_until(is_live, timeout_s=5.0)


# ---- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("request_, needle", [
    (js.DecodeRequest(max_tokens=4), "content is missing"),
    (decode_request([5], 0), "max_tokens"),  # JetStream's unset int32: kunjax has no implicit default
    (decode_request([], 4), "empty"),
    (decode_request("", 4), "prompt is empty"),
    (decode_request([VOCAB], 4), "outside the vocabulary"),
    (decode_request([5], 4, num_samples=2), "num_samples"),
    (decode_request([5], 4, lora_adapter_id="adapter-1"), "lora_adapter_id"),
])
def test_bad_input_is_invalid_argument_naming_the_problem(served: Served, request_: js.DecodeRequest,
                                                          needle: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(served.jetstream.Decode(request_, timeout=RPC_TIMEOUT_S))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()


def test_overload_is_resource_exhausted(make_served: Callable[..., Served]) -> None:
    s = make_served(max_queued=1, max_model_len=10**9, step_interval_s=0.005)
    first = s.jetstream.Decode(decode_request([1], LONG), timeout=RPC_TIMEOUT_S)
    next(first)  # admitted and running
    with pytest.raises(grpc.RpcError) as err:
        s.decode([2], max_tokens=2)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    first.cancel()
    assert wait_until(lambda: idle(s))


# ---- cancellation ----------------------------------------------------------------------------------------
def test_client_cancel_mid_stream_aborts_the_request(make_served: Callable[..., Served]) -> None:
    s = make_served(max_model_len=10**9, step_interval_s=0.005)
    call = s.jetstream.Decode(decode_request([1], LONG), timeout=RPC_TIMEOUT_S)
    assert samples([next(call)]) == [([2], "")]
    assert s.kunjax.load()[0].kv_used > 0
    call.cancel()
    assert wait_until(lambda: idle(s))


def test_deadline_mid_stream_aborts_the_request(make_served: Callable[..., Served]) -> None:
    s = make_served(max_model_len=10**9, step_interval_s=0.005)
    with pytest.raises(grpc.RpcError) as err:
        for _ in s.jetstream.Decode(decode_request([1], LONG), timeout=0.3):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: idle(s))


def test_request_aborted_by_the_runtime_ends_the_stream_with_aborted(make_served: Callable[..., Served]) -> None:
    s = make_served(max_model_len=10**9, step_interval_s=0.005)
    call = s.jetstream.Decode(decode_request([1], LONG), timeout=RPC_TIMEOUT_S)
    next(call)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(s.runtime.shutdown, 0.0)  # aborts every running request
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    assert err.value.code() == grpc.StatusCode.ABORTED


# ---- service identity and generated code -----------------------------------------------------------------
def test_service_is_jetstreams_on_the_wire() -> None:
    assert JETSTREAM_SERVICE_NAME == "jetstream_proto.Orchestrator"
    fields = {f.name: f.number for f in js.DecodeRequest.DESCRIPTOR.fields}
    assert fields == {"max_tokens": 4, "text_content": 5, "token_content": 6, "metadata": 7, "num_samples": 8,
                      "lora_adapter_id": 9, "has_bos": 10}
    assert {f.name: f.number for f in js.DecodeResponse.DESCRIPTOR.fields} == {"initial_content": 2,
                                                                               "stream_content": 3}



def test_a_runtime_that_can_no_longer_serve_ends_decode_with_unavailable(served: Served):
    """JetStream's proto has no error field: a runtime that lost part of itself (a multi-host peer) must say
    UNAVAILABLE (retry elsewhere), not INTERNAL, as the kunjax API does."""
    stream = served.jetstream.Decode(decode_request([1, 2], 10**6), timeout=RPC_TIMEOUT_S)
    next(stream)
    served.runtime.fatal("a peer process is gone")
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "a peer process is gone" in err.value.details()
