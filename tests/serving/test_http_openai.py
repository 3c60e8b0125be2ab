"""The OpenAI-compatible HTTP front end over a real loopback socket, driven by the official `openai` client
(unmodified), against `FakeRuntime`'s hand-computable outputs (its module docstring has the arithmetic: a text
prompt is one id per character, `ord(c) % vocab`; output token i is `(last prompt id + i + 1) % vocab`, shown as
`<id>`; logprobs: 0.0 for the sampled id, -j for id + j).

What an OpenAI client can rely on: completions and chat completions, streamed and not, with `n`, logprobs,
stop ids, usage (in the last SSE chunk with `include_usage`); OpenAI-shaped 400/401/404/429 errors; a client that
disconnects has its requests aborted (the fake's blocks go back to zero); health and metrics shared with gRPC.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import openai
import pytest

from kunjax.api import InvalidRequest
from serving.client import KunjaxClient
from serving.fake_runtime import FakeRuntime
from serving.server import ServerHandle, serve
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

VOCAB = 100
MODEL = "fake-model"
TOKEN = "http-s3cret"
CONCAT = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}|{% endfor %}"
          "{% if add_generation_prompt %}A:{% endif %}")


def out(prompt: str, k: int, start: int = 0) -> str:
    """The fake's text for the first k tokens after a text prompt (from token `start`)."""
    last = ord(prompt[-1]) % VOCAB
    return "".join(f"<{(last + i + 1) % VOCAB}>" for i in range(start, k))


class Served:
    def __init__(self, runtime: FakeRuntime, handle: ServerHandle, token: str | None):
        self.runtime, self.handle = runtime, handle
        self.base = f"http://127.0.0.1:{handle.http_port}"
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key=token or "unused", max_retries=0,
                                    timeout=20)

    def kv_used(self) -> int:
        return sum(x.kv_used for x in self.runtime.load())


@pytest.fixture
def make_served() -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(*, token: str | None = TOKEN, max_message_bytes: int = 1 << 20, runtime_class: type = FakeRuntime,
             **kwargs: object) -> Served:
        runtime = runtime_class(**{"vocab_size": VOCAB, "max_model_len": 10_000, "step_interval_s": 0.002, **kwargs})
        handle = serve(runtime, health_poll_s=0.01, http_port=0, model_name=MODEL, auth_token=token,
                       max_message_bytes=max_message_bytes)
        made.append(Served(runtime, handle, token))
        return made[-1]

    yield make
    for s in made:
        s.client.close()
        s.handle.stop(grace=0.5)
        s.runtime.shutdown(grace_s=0.0)


def test_completion_with_n_logprobs_and_usage(make_served):
    s = make_served()
    r = s.client.completions.create(model=MODEL, prompt="hi", max_tokens=3, n=2, logprobs=2, seed=7,
                                    temperature=0.5)
    assert r.object == "text_completion" and r.model == MODEL
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert (c.text, c.finish_reason) == (out("hi", 3), "length")
        first = (ord("i") + 1) % VOCAB
        assert c.logprobs.tokens == [f"<{first + i}>" for i in range(3)]
        assert c.logprobs.token_logprobs == [0.0, 0.0, 0.0]
        assert c.logprobs.top_logprobs[0] == {f"<{first}>": 0.0, f"<{first + 1}>": -1.0}
        assert c.logprobs.text_offset == [0, len(f"<{first}>"), len(f"<{first}><{first + 1}>")]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 6, 8)


def test_several_prompts_and_token_id_prompts(make_served):
    s = make_served()
    r = s.client.completions.create(model=MODEL, prompt=["ab", "xyz"], max_tokens=2, n=2)
    assert [c.text for c in r.choices] == [out("ab", 2)] * 2 + [out("xyz", 2)] * 2
    assert r.usage.prompt_tokens == 5  # each prompt once, not once per sample
    r = s.client.completions.create(model=MODEL, prompt=[[5, 9], [7]], max_tokens=1)
    assert [c.text for c in r.choices] == ["<10>", "<8>"]


def test_stop_token_ends_with_finish_stop(make_served):
    s = make_served()
    last = ord("q") % VOCAB
    r = s.client.completions.create(model=MODEL, prompt="q", max_tokens=10,
                                    extra_body={"stop_token_ids": [last + 3]})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (out("q", 3), "stop")


def test_streamed_completion_and_usage_in_the_last_chunk(make_served):
    s = make_served()
    chunks = list(s.client.completions.create(model=MODEL, prompt="hey", max_tokens=4, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == out("hey", 4)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 3
    no_usage = list(s.client.completions.create(model=MODEL, prompt="hey", max_tokens=2, stream=True))
    assert all(c.usage is None for c in no_usage) and all(c.choices for c in no_usage)


def test_chat_completion_renders_the_template(make_served):
    s = make_served(chat_template=CONCAT)
    messages = [{"role": "system", "content": "be"}, {"role": "user", "content": [{"type": "text", "text": "yo"}]}]
    prompt = "system:be|user:yo|A:"
    r = s.client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, logprobs=True,
                                         top_logprobs=2)
    c = r.choices[0]
    assert (c.message.role, c.message.content, c.finish_reason) == ("assistant", out(prompt, 3), "length")
    assert r.usage.prompt_tokens == len(prompt)
    first = (ord(":") + 1) % VOCAB
    assert [e.token for e in c.logprobs.content] == [f"<{first + i}>" for i in range(3)]
    assert [(t.token, t.logprob) for t in c.logprobs.content[0].top_logprobs] == [(f"<{first}>", 0.0),
                                                                                  (f"<{first + 1}>", -1.0)]
    chunks = list(s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, n=2, stream=True,
                                                   stream_options={"include_usage": True}))
    for i in range(2):
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].index == i]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == out(prompt, 3)
    assert chunks[-1].usage.completion_tokens == 6


def test_chat_without_a_template_is_a_clear_400(make_served):
    s = make_served()  # the fake, like the demo model, has no chat template
    with pytest.raises(openai.BadRequestError) as err:
        s.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in err.value.message and err.value.body["param"] == "messages"


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "", "max_tokens": 1}, "prompt is empty"),
    ({"prompt": [], "max_tokens": 1}, "prompt must be"),
    ({"prompt": "hi", "n": 0}, "n must be"),
    ({"prompt": "hi", "logprobs": 9}, "logprobs must be in [0, max_logprobs=5]"),
    ({"prompt": "hi", "echo": True}, "echo is not supported"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty is not supported"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options is only allowed"),
    ({"prompt": "hi", "extra_body": {"bogus": 1}}, "unrecognized request argument supplied: bogus"),
    ({"prompt": [[5, 1000]], "max_tokens": 1}, "outside the vocabulary"),
    ({"prompt": "hi", "seed": -3}, "seed must be"),
])
def test_bad_completion_requests_get_openai_shaped_400s(make_served, kwargs, needle):
    s = make_served()
    with pytest.raises(openai.BadRequestError) as err:
        s.client.completions.create(model=MODEL, **kwargs)
    assert err.value.status_code == 400 and needle in err.value.message
    assert err.value.body["type"] == "invalid_request_error"
    assert s.kv_used() == 0


@pytest.mark.parametrize(("body", "needle"), [
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role must be one of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "only text parts"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs needs logprobs"),
    ({"messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools and function calling"),
])
def test_bad_chat_requests_get_openai_shaped_400s(make_served, body, needle):
    s = make_served(chat_template=CONCAT)
    with pytest.raises(openai.BadRequestError) as err:
        s.client.chat.completions.create(model=MODEL, **body)
    assert needle in err.value.message


def test_malformed_json_and_oversized_bodies(make_served):
    s = make_served(max_message_bytes=4096)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for data, status, needle in ((b"{not json", 400, "not valid JSON"), (b"[1, 2]", 400, "JSON object"),
                                 (json.dumps({"model": MODEL, "prompt": "x" * 5000}).encode(), 413, "limit")):
        req = urllib.request.Request(f"{s.base}/v1/completions", data=data, headers=auth)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == status
        assert needle in json.loads(err.value.read())["error"]["message"]


def test_missing_or_wrong_token_is_401_and_health_is_open(make_served):
    s = make_served()
    client = openai.OpenAI(base_url=f"{s.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert err.value.status_code == 401 and err.value.body["message"] == "invalid bearer token"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert s.kv_used() == 0
    req = urllib.request.Request(f"{s.base}/v1/models")  # no Authorization header at all
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=10)
    assert raw.value.code == 401 and "missing credentials" in json.loads(raw.value.read())["error"]["message"]
    assert json.loads(urllib.request.urlopen(f"{s.base}/health", timeout=10).read()) == {"status": "ok"}


def test_models_lists_the_model_and_unknown_ones_are_404(make_served):
    s = make_served()
    assert [m.id for m in s.client.models.list().data] == [MODEL]
    assert s.client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        s.client.completions.create(model="gpt-4o", prompt="hi", max_tokens=1)
    assert err.value.body["code"] == "model_not_found" and "gpt-4o" in err.value.message
    with pytest.raises(openai.NotFoundError):
        s.client.models.retrieve("gpt-4o")


def test_overload_is_429_with_retry_after(make_served):
    s = make_served(max_queued=2, token=None)
    busy = s.client.completions.create(model=MODEL, prompt="hi", max_tokens=None, stream=True, n=2)
    next(iter(busy))
    with pytest.raises(openai.RateLimitError) as err:
        s.client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert err.value.status_code == 429 and int(err.value.response.headers["retry-after"]) >= 1
    busy.close()
    assert wait_until(lambda: s.kv_used() == 0, timeout_s=5.0)


def test_a_client_that_disconnects_mid_stream_has_its_request_aborted(make_served):
    s = make_served(step_interval_s=0.01)
    stream = s.client.completions.create(model=MODEL, prompt="hi", max_tokens=None, stream=True)
    it = iter(stream)
    next(it), next(it)
    assert s.kv_used() > 0
    stream.close()  # the connection goes
    assert wait_until(lambda: s.kv_used() == 0, timeout_s=5.0)
    scraped = urllib.request.urlopen(f"{s.base}/metrics", timeout=10).read().decode()
    assert re.search(r'^kunjax_requests_total\{finish_reason="cancelled"\} 1\.0$', scraped, re.M), scraped[:1500]


def test_a_client_that_disconnects_before_a_whole_response_has_its_request_aborted(make_served):
    s = make_served(step_interval_s=0.01, token=None)
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": None}).encode()
    with socket.create_connection(("127.0.0.1", s.handle.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: s.kv_used() > 0, timeout_s=5.0)
    assert wait_until(lambda: s.kv_used() == 0, timeout_s=5.0)


def test_http_and_grpc_share_the_runtime_and_metrics(make_served):
    s = make_served(token=None)
    r = s.client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
    with KunjaxClient(s.handle.target, timeout_s=10) as grpc_client:
        text, reason = grpc_client.generate_text("hi", max_tokens=3)
    assert (text, reason) == (r.choices[0].text, r.choices[0].finish_reason) == (out("hi", 3), "length")
    with pytest.raises(openai.BadRequestError):
        s.client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    scraped = urllib.request.urlopen(f"{s.base}/metrics", timeout=10).read().decode()
    assert re.search(r'^kunjax_requests_total\{finish_reason="length"\} 2\.0$', scraped, re.M), scraped[:1500]
    assert re.search(r'^kunjax_requests_rejected_total\{code="INVALID_ARGUMENT"\} 1\.0$', scraped, re.M)


def test_health_turns_503_while_draining(make_served):
    s = make_served(token=None)
    s.handle.begin_drain()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{s.base}/health", timeout=10)
    assert err.value.code == 503
    with pytest.raises(openai.InternalServerError) as refused:
        s.client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "5"


def test_max_tokens_left_out_is_16_and_null_runs_to_the_context(make_served):
    s = make_served(max_model_len=40)
    assert s.client.completions.create(model=MODEL, prompt="hi").usage.completion_tokens == 16
    endless = s.client.completions.create(model=MODEL, prompt="hi", max_tokens=None)
    assert (endless.usage.completion_tokens, endless.choices[0].finish_reason) == (38, "length")
    chat = make_served(max_model_len=40, chat_template=CONCAT)
    r = chat.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert r.usage.completion_tokens == 40 - len("user:x|A:")


class NoTokenizerRuntime(FakeRuntime):
    def token_texts(self, token_ids):
        raise InvalidRequest("this model has no tokenizer.json: token texts are unknown")


def test_logprobs_without_token_texts_are_a_clear_400_not_a_crash(make_served):
    s = make_served(runtime_class=NoTokenizerRuntime, token=None)
    with pytest.raises(openai.BadRequestError) as err:
        s.client.completions.create(model=MODEL, prompt=[5], max_tokens=2, logprobs=1)
    assert "no tokenizer.json" in err.value.body["message"]
    with pytest.raises(openai.APIError, match="no tokenizer.json"):
        list(s.client.completions.create(model=MODEL, prompt=[5], max_tokens=2, logprobs=1, stream=True))
    assert s.client.completions.create(model=MODEL, prompt=[5], max_tokens=2).choices[0].text == "<6><7>"
    assert wait_until(lambda: s.kv_used() == 0, timeout_s=5.0)
