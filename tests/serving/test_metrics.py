"""Prometheus metrics of the gRPC server, scraped over HTTP like Prometheus would, against `FakeRuntime`.

What an operator can rely on: latency histograms count every finished request, outcomes are counted by finish
reason and refusals by status code, the per-instance load gauges show KV blocks in use while a request runs
and back at zero after, and the policy's metrics carry its counters and units and time each event exactly once,
however often Prometheus scrapes. (The real engine's drops and restores: `test_elastic_visibility.py`.)
"""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kunjax.api import PolicyEvent, PolicyStatus, UnitStatus
from serving.client import KunjaxClient
from serving.fake_runtime import FakeRuntime
from serving.server import ServerHandle, serve

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Served = tuple[FakeRuntime, ServerHandle, KunjaxClient]


@pytest.fixture
def served() -> Iterator[Served]:
    runtime = FakeRuntime(vocab_size=100, max_model_len=10**9, max_queued=4, step_interval_s=0.002)
    handle = serve(runtime, metrics_port=0, health_poll_s=0.01)
    client = KunjaxClient(handle.target, timeout_s=10.0)
    yield runtime, handle, client
    client.close()
    handle.stop(grace=0.5)
    runtime.shutdown(grace_s=0.0)


def scrape(handle: ServerHandle) -> Samples:
    assert handle.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_for(pred: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pred()


def test_histograms_count_each_finished_request_and_reasons_are_counted(served: Served) -> None:
    _, handle, client = served
    for i in range(3):
        assert client.generate_text([i + 1], max_tokens=4)[1] == "length"
    assert client.generate_text([5], stop_token_ids=[7], max_tokens=10)[1] == "stop"

    m = scrape(handle)
    for name in ("kunjax_time_to_first_token_seconds", "kunjax_queue_time_seconds",
                 "kunjax_e2e_request_latency_seconds", "kunjax_time_per_output_token_seconds"):
        assert m[(f"{name}_count", ())] == 4, name
        assert m[(f"{name}_bucket", (("le", "+Inf"),))] == 4, name
        assert m[(f"{name}_sum", ())] > 0, name
    assert m[("kunjax_requests_total", (("finish_reason", "length"),))] == 3
    assert m[("kunjax_requests_total", (("finish_reason", "stop"),))] == 1


def test_one_token_requests_have_no_time_per_output_token(served: Served) -> None:
    _, handle, client = served
    client.generate_text([1], max_tokens=1)
    m = scrape(handle)
    assert m[("kunjax_e2e_request_latency_seconds_count", ())] == 1
    assert m[("kunjax_time_per_output_token_seconds_count", ())] == 0


def test_rejections_are_counted_by_status_code_and_not_as_requests(served: Served) -> None:
    _, handle, client = served
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            list(client.generate([1], temperature=-1.0))
    running = [client.generate([1], request_id=f"fill{i}", max_tokens=None) for i in range(4)]
    for call in running:
        next(call)
    with pytest.raises(grpc.RpcError) as err:
        list(client.generate([1], max_tokens=1))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for call in running:
        call.cancel()

    def counted() -> bool:
        m = scrape(handle)
        return m.get(("kunjax_requests_total", (("finish_reason", "cancelled"),))) == 4
    assert wait_for(counted)
    m = scrape(handle)
    assert m[("kunjax_requests_rejected_total", (("code", "INVALID_ARGUMENT"),))] == 2
    assert m[("kunjax_requests_rejected_total", (("code", "RESOURCE_EXHAUSTED"),))] == 1
    assert m[("kunjax_e2e_request_latency_seconds_count", ())] == 0  # cancelled streams have no latency


def test_load_gauges_show_blocks_per_instance_while_running_and_zero_after(served: Served) -> None:
    runtime, handle, client = served
    total = runtime.kv_total
    m = scrape(handle)
    inst = (("instance", "0"), ("mode", "replica"))
    assert (m[("kunjax_kv_blocks_used", inst)], m[("kunjax_kv_blocks_free", inst)],
            m[("kunjax_kv_blocks_total", inst)], m[("kunjax_requests_running", inst)]) == (0, total, total, 0)

    call = client.generate([1] * 6, request_id="held", max_tokens=None)
    next(call)
    m = scrape(handle)
    assert m[("kunjax_requests_running", inst)] == 1
    assert m[("kunjax_kv_blocks_used", inst)] >= 2
    assert m[("kunjax_kv_blocks_used", inst)] + m[("kunjax_kv_blocks_free", inst)] == total
    call.cancel()
    assert wait_for(lambda: scrape(handle)[("kunjax_kv_blocks_used", inst)] == 0)
    assert scrape(handle)[("kunjax_requests_waiting", inst)] == 0


def test_two_servers_keep_separate_books_and_no_endpoint_without_a_port() -> None:
    runtimes = [FakeRuntime(vocab_size=100, max_model_len=64) for _ in range(2)]
    a = serve(runtimes[0], metrics_port=0)
    b = serve(runtimes[1])
    try:
        assert b.metrics_port is None
        with KunjaxClient(a.target) as client:
            client.generate_text([1], max_tokens=2)
        assert scrape(a)[("kunjax_requests_total", (("finish_reason", "length"),))] == 1
        assert b"kunjax_requests_total{" not in b.metrics.exposition()
    finally:
        for h, r in zip((a, b), runtimes, strict=True):
            h.stop(grace=0.1)
            r.shutdown(grace_s=0.0)


# ---- the memory policy --------------------------------------------------------------------------------
class ScriptedPolicyRuntime(FakeRuntime):
    """`FakeRuntime` whose `policy_status()` reports what the test last set (`None`: it fails)."""

    def __init__(self, **kwargs: object):
        super().__init__(**kwargs)
        self.status: PolicyStatus | None = PolicyStatus(policy="scripted")

    def policy_status(self) -> PolicyStatus:
        if self.status is None:
            raise RuntimeError("policy status unavailable")
        return self.status


def event(seq: int, kind: str, seconds: float, group: int = 0) -> PolicyEvent:
    return PolicyEvent(seq=seq, kind=kind, group=group, members=(0, 1), step=10 * seq, seconds=seconds,
                       detail={})


def units(pipelines: int, remote: int) -> tuple[UnitStatus, ...]:
    return tuple(UnitStatus(unit=9 + i, mode="pipeline", members=(2 * i, 2 * i + 1), running=4, waiting=0,
                            remote_dependent=remote if i == 0 else 0) for i in range(pipelines))


def test_policy_metrics_without_a_pipeline(served: Served) -> None:
    _, handle, _ = served
    m = scrape(handle)
    for name in ("kunjax_pipeline_units", "kunjax_remote_attention_requests"):
        assert m[(name, ())] == 0, name
    assert not [k for k in m if k[0].startswith("kunjax_policy_event_seconds")]


def test_each_event_is_timed_once_across_scrapes() -> None:
    runtime = ScriptedPolicyRuntime(vocab_size=100, max_model_len=64)
    handle = serve(runtime, metrics_port=0)
    try:
        drop = event(1, "drop", 0.2)
        runtime.status = PolicyStatus(policy="scripted", counters={"drops": 1, "blocks_exchanged": 5},
                                      events=(drop,), units=units(1, 3))
        for _ in range(3):  # the same event in every scrape's window counts once
            m = scrape(handle)
        assert m[("kunjax_policy_event_seconds_count", (("kind", "drop"),))] == 1
        assert m[("kunjax_policy_event_seconds_sum", (("kind", "drop"),))] == pytest.approx(0.2)
        assert m[("kunjax_policy_event_seconds_bucket", (("kind", "drop"), ("le", "0.25")))] == 1
        assert m[("kunjax_policy_event_seconds_bucket", (("kind", "drop"), ("le", "0.1")))] == 0
        assert (m[("kunjax_policy_stat", (("name", "drops"),))], m[("kunjax_pipeline_units", ())],
                m[("kunjax_remote_attention_requests", ())],
                m[("kunjax_policy_stat", (("name", "blocks_exchanged"),))]) == (1, 1, 3, 5)

        runtime.status = PolicyStatus(
            policy="scripted", counters={"drops": 2, "restores": 1, "blocks_exchanged": 9}, units=units(1, 0),
            events=(drop, event(2, "exchange_done", 1.5), event(3, "restore", 0.05), event(4, "drop", 0.3, 1)))
        m = scrape(handle)
        assert m[("kunjax_policy_event_seconds_count", (("kind", "drop"),))] == 2
        assert m[("kunjax_policy_event_seconds_sum", (("kind", "drop"),))] == pytest.approx(0.5)
        assert m[("kunjax_policy_event_seconds_count", (("kind", "exchange_done"),))] == 1
        assert m[("kunjax_policy_event_seconds_count", (("kind", "restore"),))] == 1
        assert (m[("kunjax_policy_stat", (("name", "drops"),))], m[("kunjax_policy_stat", (("name", "restores"),))],
                m[("kunjax_remote_attention_requests", ())]) == (2, 1, 0)

        runtime.status = dataclasses.replace(runtime.status, events=runtime.status.events[2:])  # older ones aged out
        assert scrape(handle)[("kunjax_policy_event_seconds_count", (("kind", "drop"),))] == 2
    finally:
        handle.stop(grace=0.1)
        runtime.shutdown(grace_s=0.0)


def test_a_failing_policy_status_leaves_out_only_the_policy_metrics() -> None:
    runtime = ScriptedPolicyRuntime(vocab_size=100, max_model_len=64)
    handle = serve(runtime, metrics_port=0)
    try:
        runtime.status = None
        with KunjaxClient(handle.target) as client:
            assert client.generate_text([1], max_tokens=2)[1] == "length"
        m = scrape(handle)
        assert m[("kunjax_requests_total", (("finish_reason", "length"),))] == 1
        assert m[("kunjax_kv_blocks_total", (("instance", "0"), ("mode", "replica")))] == runtime.kv_total
        assert not [k for k in m if "policy" in k[0] or k[0] in ("kunjax_pipeline_units",
                                                                  "kunjax_remote_attention_requests")]
    finally:
        handle.stop(grace=0.1)
        runtime.shutdown(grace_s=0.0)
