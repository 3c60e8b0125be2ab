"""Chat templates as Hugging Face checkpoints ship them, rendered like `transformers`' `apply_chat_template`
(the oracle: the same template through `transformers`' own tokenizer)."""

from __future__ import annotations

import json

import pytest

from kunjax.chat_template import ChatTemplateError, read_chat_template, render_chat
from kunjax.tokenizer import Tokenizer

# Llama-2-chat's shape: BOS, system folded into the first user turn, raise_exception on a bad order.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Weather? ünïcode"}]


def _tokenizer_dir(tmp_path, config: dict):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_renders_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = _tokenizer_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                  "chat_template": LLAMA2, "tokenizer_class": "PreTrainedTokenizerFast"})
    ours = Tokenizer.from_dir(d)
    assert ours.chat_template == LLAMA2
    assert ours.special_token_texts == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    expected = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert render_chat(LLAMA2, MESSAGES, special_tokens=ours.special_token_texts) == expected
    assert expected \
        == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Weather? ünïcode [/INST]"


def test_raise_exception_and_broken_templates_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(LLAMA2, [{"role": "assistant", "content": "x"}], special_tokens={"bos_token": "<s>"})
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for m in messages %}", MESSAGES)
    with pytest.raises(ChatTemplateError, match="failed on these messages"):
        render_chat("{{ messages[0]['content'] + 1 }}", MESSAGES)


def test_the_sandbox_refuses_unsafe_attribute_access():
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", MESSAGES)


def test_template_sources_named_list_and_jinja_file(tmp_path):
    assert read_chat_template(tmp_path, {}) is None
    assert read_chat_template(tmp_path, {"chat_template": "A"}) == "A"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert read_chat_template(tmp_path, {"chat_template": named}) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert read_chat_template(tmp_path, {"chat_template": "A"}) == "J"


def test_generation_prompt_and_tojson_keep_text():
    template = ("{% for m in messages %}{{ m['role'] }}={{ m['content'] | tojson }};{% endfor %}"
                "{% if add_generation_prompt %}assistant={% endif %}{{ extra }}")
    msgs = [{"role": "user", "content": "é\"x"}]
    assert render_chat(template, msgs, add_generation_prompt=True, extra="!") == 'user="é\\"x";assistant=!'
    assert render_chat(template, msgs, add_generation_prompt=False) == 'user="é\\"x";'
