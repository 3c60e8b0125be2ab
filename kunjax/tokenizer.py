"""Text <-> token ids: a thin wrapper over a Hugging Face `tokenizers.Tokenizer` read from `tokenizer.json`.

Owns the special-token facts the runtime needs (BOS, the set of EOS ids that stop generation, which ids are
special) and the BOS rule: when `tokenizer_config.json` says `add_bos_token`, an encoding with special tokens
starts with exactly one BOS whether or not the tokenizer's own post-processor adds it (and with none when it
says `add_bos_token: false`). Where the tokenizer
files say nothing, the model config's `bos_token_id` / `eos_token_ids` (from `config.json` and
`generation_config.json`) fill in. It also carries the model's chat template text and the special tokens' texts a
template reads (`kunjax.chat_template` renders it). It never pads, truncates or applies chat templates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from kunjax.chat_template import read_chat_template
from kunjax.config import ModelConfig

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")  # the names chat templates read


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """`"<s>"` or `{"content": "<s>", ...}` (both spellings occur in tokenizer_config.json)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode plus the special-token ids; build with `Tokenizer.from_dir`."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = (), add_bos: bool | None = None,
                 append_eos_id: int | None = None, chat_template: str | None = None,
                 special_token_texts: dict[str, str] | None = None):
        self._tok = tok
        self.chat_template = chat_template  # Jinja source (`kunjax.chat_template`), None when the model has none
        self.special_token_texts = dict(special_token_texts or {})  # "bos_token" -> "<s>", ... (what templates read)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self._add_bos = add_bos  # None: leave BOS to the tokenizer's post-processor
        self._append_eos_id = append_eos_id  # `add_eos_token`: the tokenizer's EOS ends every encoding
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        special.update(self.eos_token_ids)
        if bos_token_id is not None:
            special.add(bos_token_id)
        self._special = frozenset(special)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], cfg: ModelConfig | None = None) -> Tokenizer:
        """Read `tokenizer.json` (+ `tokenizer_config.json` / `special_tokens_map.json` when present)."""
        path = Path(path)
        tok_path = path / TOKENIZER_FILE
        if not tok_path.is_file():
            raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception for unparsable files
            raise ValueError(f"{tok_path}: cannot load tokenizer ({e})") from e
        # tokenizer_config.json takes precedence over special_tokens_map.json, as in transformers.
        settings = _read_json(path / "special_tokens_map.json") | _read_json(path / "tokenizer_config.json")

        def token_id(key: str) -> int | None:
            text = _token_text(settings.get(key))
            return None if text is None else tok.token_to_id(text)

        bos = token_id("bos_token")
        if "bos_token" not in settings and cfg is not None:  # an explicit `"bos_token": null` means none
            bos = cfg.bos_token_id
        eos_ids = list(cfg.eos_token_ids) if cfg is not None else []
        eos = token_id("eos_token")
        if eos is not None:
            eos_ids.append(eos)
        add_bos = settings.get("add_bos_token")
        texts = {key: text for key in SPECIAL_TOKEN_KEYS if (text := _token_text(settings.get(key))) is not None}
        if "bos_token" not in texts and bos is not None and (bos_text := tok.id_to_token(bos)) is not None:
            texts["bos_token"] = bos_text
        return cls(tok, bos_token_id=bos, eos_token_ids=eos_ids,
                   add_bos=bool(add_bos) if add_bos is not None else None,
                   append_eos_id=eos if settings.get("add_eos_token") else None,
                   chat_template=read_chat_template(path, _read_json(path / "tokenizer_config.json")),
                   special_token_texts=texts)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if not add_special_tokens or self.bos_token_id is None:
            pass
        elif self._add_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        elif (self._add_bos is False and ids[:1] == [self.bos_token_id]
              and self._tok.encode(text, add_special_tokens=False).ids[:1] != [self.bos_token_id]):
            del ids[0]  # the post-processor adds a BOS that tokenizer_config.json switches off
        if add_special_tokens and self._append_eos_id is not None and ids[-1:] != [self._append_eos_id]:
            ids.append(self._append_eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))
