"""Checkpoints in and out: Hugging Face safetensors dirs and kunjax's own orbax dirs, behind one API.

* `detect_format(path)` -> "hf" | "kunjax";
* `load_config(path)` -> `ModelConfig`; `load_params(path, cfg, shardings, dtype)` -> the param tree of
  `kunjax.model`, each leaf placed on its sharding and cast to `dtype`;
* `save_checkpoint(path, cfg, params, tokenizer_file)` writes the kunjax format;
* `load_tokenizer(path)` -> `Tokenizer` or None.

Invariant: every missing, truncated, corrupt or mismatched file surfaces as a `CheckpointError` (a
`ValueError`) whose message names the file and what is wrong, before any device memory is spent on a
checkpoint that cannot load; a config the runtime cannot serve is a `kunjax.config.ConfigError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kunjax.checkpoint.hf import is_hf_dir, load_hf_params
from kunjax.checkpoint.native import (
    CONFIG_FILE,
    FORMAT,
    load_native_config,
    load_native_params,
    save_checkpoint,
)
from kunjax.checkpoint.safetensors_io import CheckpointError
from kunjax.config import ConfigError, ModelConfig
from kunjax.memory import param_shapes
from kunjax.tokenizer import TOKENIZER_FILE, Tokenizer

__all__ = ["CheckpointError", "detect_format", "load_config", "load_params", "load_tokenizer",
           "save_checkpoint"]


def detect_format(path: str | os.PathLike[str]) -> str:
    """ "kunjax" for a dir written by `save_checkpoint`, "hf" for config.json + safetensors weights."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (expected a Hugging Face or kunjax checkpoint dir)")
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable or not valid JSON ({e})") from e
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return "kunjax"
    if is_hf_dir(path):
        return "hf"
    raise CheckpointError(f"{path}: {CONFIG_FILE} but no *.safetensors weights, and not a kunjax checkpoint "
                          f"(kunjax does not read pytorch_model.bin)")


def load_config(path: str | os.PathLike[str]) -> ModelConfig:
    if detect_format(path) == "kunjax":
        return load_native_config(path)
    return ModelConfig.from_hf_dir(path)


def _check_shardings(path: str | os.PathLike[str], cfg: ModelConfig, shardings: dict[str, Any]) -> None:
    def keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in tree.items():
            out |= keys(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k}
        return out

    want, got = keys(param_shapes(cfg)), keys(shardings)
    if want != got:
        raise CheckpointError(f"load_params({path}): the shardings tree does not match the model's params "
                              f"(missing {sorted(want - got)}, unexpected {sorted(got - want)})")


def load_params(path: str | os.PathLike[str], cfg: ModelConfig, shardings: dict[str, Any],
                dtype: Any) -> dict[str, Any]:
    """The param tree of `cfg` from either format, each leaf on `shardings` (same tree shape), as `dtype`."""
    _check_shardings(path, cfg, shardings)
    if detect_format(path) == "kunjax":
        return load_native_params(path, cfg, shardings, dtype)
    return load_hf_params(path, cfg, shardings, dtype)


def load_tokenizer(path: str | os.PathLike[str], cfg: ModelConfig | None = None) -> Tokenizer | None:
    """The tokenizer saved in a checkpoint dir (either format), or None when it has no tokenizer.json.

    BOS/EOS ids missing from the tokenizer files come from `cfg`, read from the dir when not given.
    """
    path = Path(path)
    if not (path / TOKENIZER_FILE).is_file():
        return None
    if cfg is None:
        try:
            cfg = load_config(path)
        except (CheckpointError, ConfigError):
            cfg = None  # a tokenizer-only dir, or a model we cannot serve: the tokenizer still loads
    try:
        return Tokenizer.from_dir(path, cfg)
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from e  # the message already names the file
