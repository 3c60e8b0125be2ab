"""`kunjax serve` as a real process: gRPC over loopback to the real engine, health, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kunjax.demo import ensure_demo_model, recitation_prompts
from serving.client import KunjaxClient
from tests.e2e.serve_process import start_serve
from tests.helpers import wait_until

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = ensure_demo_model()
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    proc, target, metrics = start_serve(
        ["--model", str(model), "--cpu-devices", "2", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
         "--min-token-bucket", "64", "--max-model-len", "256", "--grace-s", "60", "--auth-token-file",
         str(token_file)], timeout_s=300)
    yield proc, target, metrics
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def test_generate_over_grpc_recites_the_demo(server):
    _, target, metrics = server
    with KunjaxClient(target, timeout_s=120) as client, pytest.raises(grpc.RpcError) as err:
        client.info()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with KunjaxClient(target, timeout_s=120, auth_token=TOKEN) as client:
        for prompt, expected in recitation_prompts()[:3]:
            text, reason = client.generate_text(prompt, max_tokens=160, temperature=0.0)
            assert (text, reason) == (expected, "stop")
        info = client.info()
        assert len(info.instances) == 2
        assert all(x.kv_used == 0 for x in client.load())
    scraped = urllib.request.urlopen(metrics, timeout=10).read().decode()
    assert re.search(r"^kunjax_time_to_first_token_seconds_count 3(\.0)?$", scraped, re.M), scraped[:2000]


def test_jetstream_decode_async_client_and_cli_match_generate(server, tmp_path):
    _, target, _ = server
    from serving._generated.jetstream_proto import jetstream_pb2 as js
    from serving._generated.jetstream_proto import jetstream_pb2_grpc as js_grpc
    from serving.client import AsyncKunjaxClient

    prompt, expected = recitation_prompts()[5]
    auth = (("authorization", f"Bearer {TOKEN}"),)
    with KunjaxClient(target, timeout_s=120, auth_token=TOKEN) as client:
        ids = [t for r in client.generate(prompt, max_tokens=20, temperature=0.0) for t in r.token_ids]
    with grpc.insecure_channel(target) as ch:
        decoded = [t for r in js_grpc.OrchestratorStub(ch).Decode(
            js.DecodeRequest(max_tokens=20, text_content=js.DecodeRequest.TextContent(text=prompt)),
            timeout=120, metadata=auth) for s in r.stream_content.samples for t in s.token_ids]
    assert decoded == ids and len(ids) == 20

    async def via_async():
        async with AsyncKunjaxClient(target, timeout_s=120, auth_token=TOKEN) as client:
            return await client.generate_text(prompt, max_tokens=160, temperature=0.0)

    assert asyncio.run(via_async()) == (expected, "stop")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    res = subprocess.run([sys.executable, "-m", "kunjax", "generate", "--server", target, "--auth-token-file",
                          str(token_file), "--max-tokens", "160", prompt], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{prompt}|{expected}" in res.stdout and "(stop," in res.stdout


def test_sigterm_lets_in_flight_streams_finish_then_exits(server):
    proc, target, _ = server
    with KunjaxClient(target, timeout_s=120, auth_token=TOKEN) as client:
        prompt, expected = recitation_prompts()[4]
        stream = client.generate(prompt, max_tokens=160, temperature=0.0)
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(client.channel)
        assert wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                          == health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=5.0)  # at the drain's start
        text = first.text + "".join(r.text for r in stream)
        assert text == expected  # the accepted request was finished, not dropped
    assert proc.wait(timeout=120) == 0


def test_a_second_sigterm_ends_the_drain(tmp_path):
    """With a long grace period, a second signal aborts what is still running and the process exits at once."""
    proc, target, _ = start_serve(
        ["--model", str(ensure_demo_model()), "--cpu-devices", "1", "--max-num-seqs", "4",
         "--max-num-batched-tokens", "64", "--min-token-bucket", "64", "--max-model-len", "512",
         "--grace-s", "600"], timeout_s=300)
    try:
        with KunjaxClient(target, timeout_s=120) as client:
            stream = client.generate("a long story", max_tokens=None, ignore_eos=True, temperature=0.0)
            next(stream)
            proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(client.channel)
            assert wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                              == health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=5.0)
            proc.send_signal(signal.SIGTERM)
            last = list(stream)[-1]
            assert last.finish_reason == 3  # FINISH_REASON_ABORT: cut short, not left hanging
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
