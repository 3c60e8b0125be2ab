"""The OpenAI wire format: request bodies of `/v1/completions` and `/v1/chat/completions` in, kunjax requests out;
runtime events in, OpenAI response objects and stream chunks out; errors as OpenAI error bodies.

Owns validation of every field a client may send (a wrong type, a value out of range, an option kunjax cannot
honour, or an unknown field each get an `APIError` naming the field, which the HTTP layer turns into a 400 with an
OpenAI-shaped body), the mapping of OpenAI's sampling fields onto `kunjax.SamplingParams` (which validates the
values), the chat template rendering (`kunjax.chat_template`) and the shapes of the responses. Pure functions
and records: no I/O, no event loop, no runtime calls (the HTTP layer looks up token texts for logprobs and passes
them in).

Choices: a completion request with several prompts and `n` makes `len(prompts) * n` kunjax requests, choice
`i * n + j` being prompt i's j-th sample; with a `seed`, sample j uses `seed + j` (so `n` seeded samples differ
and each is reproducible). `usage.prompt_tokens` counts each prompt once. kunjax extensions, as vLLM spells them,
are accepted in the body (the `openai` client's `extra_body`): `top_k`, `min_p`, `min_tokens`, `ignore_eos`,
`stop_token_ids`, `skip_special_tokens`, `include_stop_str_in_output`, and for chat `add_generation_prompt` and
`chat_template_kwargs`. `max_tokens` left out of a completion request is OpenAI's 16; an explicit null (as in
vLLM), or leaving it out of a chat request, generates until the context (`--max-model-len`) is full. Refused
(400): `echo`, `suffix`, `best_of` other than `n`, non-zero penalties, `logit_bias`, tools and function calling,
`response_format` other than text, non-text message parts.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from kunjax.api import TokenEvent
from kunjax.chat_template import ChatTemplateError, render_chat
from kunjax.sampling_params import MAX_SEED, SamplingParams

MAX_CHOICES = 64  # prompts x n per request
MAX_TOP_LOGPROBS_CHAT = 20  # OpenAI's bound on `top_logprobs` (the engine's --max-logprobs may be lower)
MAX_STOP = 16  # stop strings per request

# Fields the OpenAI API defines that change nothing here (accounting, storage, routing hints).
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
            "safety_identifier"}
_SAMPLING_EXTRAS = {"top_k", "min_p", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
                    "include_stop_str_in_output"}
_COMMON = {"model", "n", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop",
           "logprobs", "frequency_penalty", "presence_penalty", "logit_bias"} | _IGNORED | _SAMPLING_EXTRAS
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                         "function_call", "response_format", "add_generation_prompt", "chat_template_kwargs"}
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}


class APIError(Exception):
    """An OpenAI-shaped error: HTTP `status`, and the body `{"error": {message, type, param, code}}`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: Mapping[str, str] | None = None):  # noqa: A002
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one OpenAI request asks of the runtime: one kunjax request per choice, and how to answer."""

    chat: bool
    model: str
    prompts: tuple[str | tuple[int, ...], ...]  # one per prompt (chat: the rendered conversation)
    n: int  # samples per prompt: choice i * n + j
    params: tuple[SamplingParams, ...]  # per sample j (its seed is seed + j)
    add_special_tokens: bool  # False for a rendered chat template (it writes its own)
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token; None: no logprobs at all

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def choice(self, index: int) -> tuple[str | tuple[int, ...], SamplingParams]:
        return self.prompts[index // self.n], self.params[index % self.n]


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(message, param=param)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _int(body: Mapping[str, Any], key: str, default: int | None, lo: int | None = None,
         hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if not _is_int(value):
        raise _bad(f"{key} must be an integer, got {value!r}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise _bad(f"{key} must be in {bounds}, got {value}", key)
    return int(value)


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise _bad(f"{key} must be a finite number, got {value!r}", key)
    return float(value)


def _bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"{key} must be true or false, got {value!r}", key)
    return value


def _check_fields(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(f"unrecognized request argument supplied: {unknown[0]}", unknown[0])


def _check_model(body: Mapping[str, Any], model_name: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required: a model id from /v1/models", "model")
    if model != model_name:
        raise APIError(f"The model `{model}` does not exist; this server serves `{model_name}` (see /v1/models)",
                       status=404, param="model", code="model_not_found")
    return model


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key, 0.0) != 0.0:
            raise _bad(f"{key} is not supported by this server (only 0)", key)
    if body.get("logit_bias"):
        raise _bad("logit_bias is not supported by this server", "logit_bias")


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _bad("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise _bad(f"stream_options must be an object with include_usage, got {options!r}", "stream_options")
    return _bool(options, "include_usage", False)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"stop must be a non-empty string or a list of them, got {body.get('stop')!r}", "stop")
    if len(stop) > MAX_STOP:
        raise _bad(f"stop has {len(stop)} strings (at most {MAX_STOP})", "stop")
    return tuple(stop)


def _sampling(body: Mapping[str, Any], *, max_tokens: int | None, logprobs: int | None,
              n: int) -> tuple[SamplingParams, ...]:
    """One `SamplingParams` per sample of a prompt; `SamplingParams` validates the values and names the field."""
    seed = _int(body, "seed", None, lo=0, hi=MAX_SEED - 1)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not isinstance(stop_ids, list):
        raise _bad(f"stop_token_ids must be a list of integers, got {stop_ids!r}", "stop_token_ids")
    common = dict(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0),
                  top_p=_number(body, "top_p", 1.0), top_k=_int(body, "top_k", 0),
                  min_p=_number(body, "min_p", 0.0), stop=_stop(body), stop_token_ids=stop_ids,
                  ignore_eos=_bool(body, "ignore_eos", False), min_tokens=_int(body, "min_tokens", 0),
                  skip_special_tokens=_bool(body, "skip_special_tokens", True),
                  include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False), logprobs=logprobs)
    try:
        return tuple(SamplingParams(**common, seed=None if seed is None else (seed + j) % MAX_SEED)
                     for j in range(n))
    except ValueError as e:
        raise _bad(str(e), str(e).split(" ", 1)[0]) from e


def _n(body: Mapping[str, Any], prompts: int) -> int:
    n = _int(body, "n", 1, lo=1, hi=MAX_CHOICES)
    if n * prompts > MAX_CHOICES:
        raise _bad(f"{prompts} prompts x n={n} is {n * prompts} choices (at most {MAX_CHOICES})", "n")
    return n


def completion_plan(body: Any, *, model_name: str) -> Plan:
    """The plan of a `/v1/completions` body; `APIError` says what is wrong."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    _check_fields(body, COMPLETION_FIELDS)
    model = _check_model(body, model_name)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[str | tuple[int, ...]] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [tuple(int(t) for t in prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)):
        prompts = [tuple(int(t) for t in p) for p in prompt]
    else:
        raise _bad("prompt must be a non-empty string, a list of strings, a list of token ids or a list of lists "
                   f"of token ids, got {prompt!r:.80}", "prompt")
    if any(p == "" for p in prompts):
        raise _bad("prompt is empty", "prompt")
    if _bool(body, "echo", False):
        raise _bad("echo is not supported by this server", "echo")
    if body.get("suffix"):
        raise _bad("suffix is not supported by this server", "suffix")
    _refuse_unsupported(body)
    n = _n(body, len(prompts))
    best_of = _int(body, "best_of", None, lo=1)
    if best_of is not None and best_of != n:
        raise _bad(f"best_of must equal n (this server returns every sample), got best_of={best_of}, n={n}",
                   "best_of")
    stream = _bool(body, "stream", False)
    logprobs = _int(body, "logprobs", None, lo=0)
    return Plan(chat=False, model=model, prompts=tuple(prompts), n=n,
                params=_sampling(body, max_tokens=_int(body, "max_tokens", 16 if "max_tokens" not in body else None,
                                                       lo=1), logprobs=logprobs, n=n),
                add_special_tokens=True, stream=stream, include_usage=_stream_options(body, stream),
                logprobs=logprobs)


def _message_text(message: Mapping[str, Any], i: int) -> str | None:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"messages[{i}].content: only text parts are supported, got {kind!r}",
                           f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation as plain `{"role", "content"[, "name"]}` dicts, text parts joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {role!r}", f"messages[{i}].role")
        if m.get("tool_calls"):
            raise _bad("tool calls are not supported by this server", f"messages[{i}].tool_calls")
        plain = {"role": role, "content": _message_text(m, i) or ""}
        if isinstance(m.get("name"), str):
            plain["name"] = m["name"]
        out.append(plain)
    return out


def chat_plan(body: Any, *, model_name: str, chat_template: str | None,
              special_tokens: Mapping[str, str] | None = None) -> Plan:
    """The plan of a `/v1/chat/completions` body, its conversation rendered by `chat_template`; `APIError` says
    what is wrong, including that the model has no chat template."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    _check_fields(body, CHAT_FIELDS)
    model = _check_model(body, model_name)
    messages = chat_messages(body)
    if body.get("tools") or body.get("functions"):
        raise _bad("tools and function calling are not supported by this server", "tools")
    if body.get("tool_choice") not in (None, "none"):
        raise _bad("tool_choice is not supported by this server", "tool_choice")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("response_format: only {\"type\": \"text\"} is supported by this server", "response_format")
    _refuse_unsupported(body)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _bad("chat_template_kwargs must be an object", "chat_template_kwargs")
    if chat_template is None:
        raise _bad(f"the model `{model}` has no chat template (no chat_template in its tokenizer_config.json and no "
                   "chat_template.jinja): use /v1/completions, or start the server with --chat-template",
                   "messages")
    try:
        prompt = render_chat(chat_template, messages, special_tokens=special_tokens,
                             **{**kwargs, "add_generation_prompt": _bool(body, "add_generation_prompt", True)})
    except ChatTemplateError as e:
        raise _bad(f"the chat template cannot render these messages: {e}", "messages") from e
    if not prompt:
        raise _bad("the chat template rendered these messages as an empty prompt", "messages")
    n = _n(body, 1)
    stream = _bool(body, "stream", False)
    want = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS_CHAT)
    if top is not None and not want:
        raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (top or 0) if want else None
    max_tokens = _int(body, "max_completion_tokens", None, lo=1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, lo=1)
    return Plan(chat=True, model=model, prompts=(prompt,), n=n,
                params=_sampling(body, max_tokens=max_tokens, logprobs=logprobs, n=n), add_special_tokens=False,
                stream=stream, include_usage=_stream_options(body, stream), logprobs=logprobs)


# ---- responses ---------------------------------------------------------------------------------------------


def logprob_ids(ev: TokenEvent, top: int) -> list[int]:
    """Every id whose text the logprobs of `ev` show (sampled and top alternatives)."""
    ids = list(ev.token_ids)
    for lps in ev.logprobs:
        ids.extend(_best(lps, top))
    return ids


def _best(lps: Mapping[int, float], top: int) -> list[int]:
    return [t for t, _ in sorted(lps.items(), key=lambda kv: -kv[1])[:top]]


def _lp(value: float | None) -> float:
    return -9999.0 if value is None or not math.isfinite(value) else value  # JSON has no -inf; OpenAI's floor


def completion_logprobs(ev: TokenEvent, top: int, texts: Mapping[int, str], offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object for the tokens of `ev`; `offset`: characters of this choice's
    text before them (`text_offset` counts within the generated text)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tok, lps in zip(ev.token_ids, ev.logprobs, strict=False):
        tokens.append(texts[tok])
        token_lps.append(_lp(lps.get(tok)))
        tops.append({texts[t]: _lp(lps[t]) for t in _best(lps, top)} if top else None)
        offsets.append(offset)
        offset += len(texts[tok])
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(ev: TokenEvent, top: int, texts: Mapping[int, str]) -> list[dict[str, Any]]:
    """The chat `logprobs.content` entries for the tokens of `ev`."""
    def entry(t: int, lp: float | None) -> dict[str, Any]:
        return {"token": texts[t], "logprob": _lp(lp), "bytes": list(texts[t].encode())}

    return [{**entry(tok, lps.get(tok)), "top_logprobs": [entry(t, lps[t]) for t in _best(lps, top)]}
            for tok, lps in zip(ev.token_ids, ev.logprobs, strict=False)]


def usage(finals: Sequence[TokenEvent], n: int) -> dict[str, Any]:
    """OpenAI usage over the final events of every choice (choice i * n + j; each prompt counted once)."""
    prompt = sum(ev.prompt_tokens for ev in finals[::n])
    completion = sum(ev.completion_tokens for ev in finals)
    cached = sum(ev.cached_tokens for ev in finals[::n])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(ev: TokenEvent) -> str:
    """OpenAI's finish reason for a final event that ended normally ("stop" or "length")."""
    return "length" if ev.finish_reason == "length" else "stop"


def failure(ev: TokenEvent) -> APIError | None:
    """The error to answer for a request the runtime ended abnormally (aborted by a shutdown, or failed)."""
    if ev.finish_reason == "abort":
        return APIError(f"request {ev.request_id} was aborted (the server is shutting down)", status=503,
                        type="server_error", code="aborted")
    if ev.finish_reason == "error" and ev.error_code == "unavailable":
        return APIError(f"request {ev.request_id} failed: {ev.error or 'the server is unavailable'}", status=503,
                        type="server_error", code="unavailable")
    if ev.finish_reason == "error":
        return APIError(f"request {ev.request_id} failed: {ev.error or 'unknown error'}", status=500,
                        type="server_error", code="internal_error")
    return None
