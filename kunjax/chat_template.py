"""Chat templates: a model's Jinja template that turns a list of chat messages into one prompt text.

Owns reading the template the way Hugging Face checkpoints ship it (`chat_template` in `tokenizer_config.json`,
a string or a list of named templates of which "default" is used, or a `chat_template.jinja` file beside it,
which wins) and rendering it as `transformers`' `apply_chat_template` does: a sandboxed Jinja environment
(`trim_blocks`, `lstrip_blocks`), the variables `messages`, `add_generation_prompt`, the tokenizer's special
tokens by name (`bos_token`, `eos_token`, ...) and any extra keyword the caller passes, plus `raise_exception`
and `strftime_now` and a `tojson` filter that keeps non-ASCII text.

The rendered text already holds whatever special tokens the template writes (often the BOS), so it is tokenized
without adding special tokens (`GenerateRequest.add_special_tokens=False`). Never tokenizes; a template that
fails or calls `raise_exception` raises `ChatTemplateError` with the template's own message.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """The template cannot render these messages (its own `raise_exception`, or a Jinja error); says why."""


def read_chat_template(path: str | Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The chat template of a checkpoint dir whose `tokenizer_config.json` holds `tokenizer_config`, or None."""
    file = Path(path) / CHAT_TEMPLATE_FILE
    if file.is_file():
        return file.read_text()
    value = tokenizer_config.get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e}") from e


def render_chat(source: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                special_tokens: Mapping[str, str | None] | None = None, **extra: Any) -> str:
    """The prompt text for `messages` (each a dict with at least "role" and "content") under template `source`."""
    import jinja2

    template = _compile(source)
    variables = {**{k: v for k, v in (special_tokens or {}).items() if v is not None}, **extra,
                 "messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt}
    try:
        return template.render(**variables)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e
