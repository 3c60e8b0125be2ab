"""Bearer-token auth and TLS of the gRPC server, over real loopback channels against `FakeRuntime`.

What a deployment can rely on: with a token, every KunjaxService call without the right `authorization: Bearer`
metadata ends UNAUTHENTICATED with a message (and is counted), while health checks and reflection stay open;
with a certificate and key, clients that trust it round-trip and plaintext clients do not; half a TLS setup or
an unusable token fails at start-up with a message naming the argument.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving._generated.jetstream_proto import jetstream_pb2 as js
from serving._generated.jetstream_proto import jetstream_pb2_grpc as js_grpc
from serving._generated.kunjax.serving.v2 import generate_pb2 as pb
from serving.client import KunjaxClient
from serving.fake_runtime import FakeRuntime
from serving.server import ServerHandle, serve

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token"


@pytest.fixture
def runtime() -> Iterator[FakeRuntime]:
    rt = FakeRuntime(vocab_size=100, max_model_len=64)
    yield rt
    rt.shutdown(grace_s=0.0)


@pytest.fixture
def authed(runtime: FakeRuntime) -> Iterator[ServerHandle]:
    handle = serve(runtime, auth_token=TOKEN, health_poll_s=0.01)
    yield handle
    handle.stop(grace=0.1)


# ---- auth ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("token", "message"), [(None, "missing credentials"), ("wrong", "invalid bearer token"),
                                                (TOKEN + "x", "invalid bearer token")],
                         ids=["missing", "wrong", "prefix-of-longer"])
def test_calls_without_the_right_token_are_unauthenticated(authed: ServerHandle, token: str | None,
                                                           message: str) -> None:
    with KunjaxClient(authed.target, auth_token=token, timeout_s=10) as client:
        for call in (lambda: list(client.generate([1], max_tokens=2)), client.load, client.info,
                     lambda: client.abort("x")):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert message in err.value.details()
    assert authed.metrics.registry.get_sample_value("kunjax_requests_rejected_total",
                                                    {"code": "UNAUTHENTICATED"}) == 4


@pytest.mark.parametrize("value", [f"Basic {TOKEN}", TOKEN, f"{TOKEN}-leaked"], ids=["basic", "bare", "bare-wrong"])
def test_a_non_bearer_scheme_is_refused_without_echoing_the_credential(authed: ServerHandle, value: str) -> None:
    with grpc.insecure_channel(authed.target) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/kunjax.serving.v2.KunjaxService/GetLoad")(
            b"", metadata=(("authorization", value),), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unsupported authorization scheme: send 'Bearer <token>'" in err.value.details()
    assert TOKEN not in err.value.details() and "Basic" not in err.value.details()


def test_the_right_token_works_for_every_method(authed: ServerHandle) -> None:
    with KunjaxClient(authed.target, auth_token=TOKEN, timeout_s=10) as client:
        assert client.generate_text([5], max_tokens=2) == ("<6><7>", "length")
        assert client.load()[0].kv_used == 0
        assert client.info().model == "fake"
        client.abort("nothing")


def test_unauthenticated_malformed_bytes_are_refused_before_parsing(authed: ServerHandle) -> None:
    with grpc.insecure_channel(authed.target) as channel:
        generate = channel.unary_stream("/kunjax.serving.v2.KunjaxService/Generate")
        with pytest.raises(grpc.RpcError) as err:
            list(generate(b"\xff\xff\xff", timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_need_no_token(authed: ServerHandle) -> None:
    with grpc.insecure_channel(authed.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status in (
            health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10)
        names = {svc.name for reply in replies for svc in reply.list_services_response.service}
    assert "kunjax.serving.v2.KunjaxService" in names


@pytest.mark.parametrize("token", ["", "has space", "naïve"])
def test_an_unsendable_token_fails_at_start_up(runtime: FakeRuntime, token: str) -> None:
    with pytest.raises(ValueError, match="auth token must be non-empty printable ASCII"):
        serve(runtime, auth_token=token)


# ---- TLS -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cert_and_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for `localhost` (and 127.0.0.1) with its key, made by `openssl`."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def tls_server(runtime: FakeRuntime, cert_and_key: tuple[Path, Path]) -> Iterator[ServerHandle]:
    cert, key = cert_and_key
    handle = serve(runtime, tls_cert=cert, tls_key=key, auth_token=TOKEN)
    yield handle
    handle.stop(grace=0.1)


def test_tls_round_trip_with_the_certificate_as_ca(tls_server: ServerHandle, cert_and_key: tuple[Path, Path]
                                                   ) -> None:
    assert tls_server.target.startswith("localhost:")
    with KunjaxClient(tls_server.target, tls_ca=cert_and_key[0], auth_token=TOKEN, timeout_s=10) as client:
        responses = list(client.generate([5], request_id="tls", max_tokens=3))
    assert [t for r in responses for t in r.token_ids] == [6, 7, 8]
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_tls_by_ip_address_with_a_server_name_override(tls_server: ServerHandle,
                                                       cert_and_key: tuple[Path, Path]) -> None:
    with KunjaxClient(f"127.0.0.1:{tls_server.port}", tls_ca=cert_and_key[0], tls_server_name="localhost",
                      auth_token=TOKEN, timeout_s=10) as client:
        assert client.info().model == "fake"


def test_plaintext_and_untrusting_clients_cannot_talk_to_a_tls_server(tls_server: ServerHandle) -> None:
    for client in (KunjaxClient(tls_server.target, auth_token=TOKEN, timeout_s=3),
                   KunjaxClient(tls_server.target, tls=True, auth_token=TOKEN, timeout_s=3)):  # system roots
        with client, pytest.raises(grpc.RpcError) as err:
            client.info()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_half_a_tls_setup_fails_at_start_up_naming_what_is_missing(runtime: FakeRuntime,
                                                                   cert_and_key: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    cert, key = cert_and_key
    with pytest.raises(ValueError, match="tls_cert is set but tls_key is not"):
        serve(runtime, tls_cert=cert)
    with pytest.raises(ValueError, match="tls_key is set but tls_cert is not"):
        serve(runtime, tls_key=key)
    with pytest.raises(ValueError, match="cannot read tls_key"):
        serve(runtime, tls_cert=cert, tls_key=tmp_path / "absent.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="is not a PEM file"):
        serve(runtime, tls_cert=tmp_path / "junk.pem", tls_key=key)


def test_jetstream_decode_needs_the_token_too(authed: ServerHandle) -> None:
    request = js.DecodeRequest(max_tokens=2, token_content=js.DecodeRequest.TokenContent(token_ids=[5]))
    for token, ok in ((None, False), ("wrong", False), (TOKEN, True)):
        with KunjaxClient(authed.target, auth_token=token) as client:
            stub = js_grpc.OrchestratorStub(client.channel)
            if ok:
                samples = [s for r in stub.Decode(request, timeout=10) for s in r.stream_content.samples]
                assert [t for s in samples for t in s.token_ids] == [6, 7]
            else:
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Decode(request, timeout=10))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_http_api_uses_the_same_tls_and_token(runtime: FakeRuntime, cert_and_key: tuple[Path, Path]) -> None:
    """`--http-port` serves HTTPS with the gRPC server's certificate and needs the same bearer token."""
    import ssl

    import openai

    cert, key = cert_and_key
    handle = serve(runtime, tls_cert=cert, tls_key=key, auth_token=TOKEN, http_port=0, model_name="fake")
    try:
        base = f"https://localhost:{handle.http_port}/v1"
        with openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(cert))) as http:
            client = openai.OpenAI(base_url=base, api_key=TOKEN, http_client=http, max_retries=0, timeout=10)
            r = client.completions.create(model="fake", prompt=[5], max_tokens=3)
            assert r.choices[0].text == "<6><7><8>"
            with pytest.raises(openai.AuthenticationError):
                client.with_options(api_key="wrong").models.list()
        for url in (base, f"http://localhost:{handle.http_port}/v1"):  # system roots; plaintext to a TLS port
            with pytest.raises(openai.APIConnectionError):
                openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0, timeout=5).models.list()
    finally:
        handle.stop(grace=0.1)
