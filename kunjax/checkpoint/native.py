"""kunjax's own checkpoint format: a directory with `config.json`, an orbax param tree and the tokenizer.

Layout:
  config.json      {"format": "kunjax", "model": ModelConfig.to_dict()}
  params/          the layer-stacked param tree of `kunjax.model`, saved by orbax `StandardCheckpointer`
  tokenizer.json   (+ tokenizer_config.json / special_tokens_map.json when they sat beside it), optional

Owns writing and reading that layout. Invariants: `config.json` is written last (atomically), so a directory
with it holds complete params; a restore goes straight into the caller's shardings and dtype (orbax reads each
device's slice; no host-side full copy); the stored shapes are checked against the config before anything is
read, and every failure is a `CheckpointError` naming the directory and what is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from kunjax.checkpoint.safetensors_io import CheckpointError
from kunjax.config import ConfigError, ModelConfig
from kunjax.memory import flatten_params, param_shapes

FORMAT = "kunjax"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _check_shapes(where: str, actual: dict[str, tuple[int, ...]], cfg: ModelConfig) -> None:
    expected = flatten_params(param_shapes(cfg))
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where}: param tree does not match the model config (missing leaves "
                              f"{missing}, unexpected leaves {extra})")
    for name, shape in expected.items():
        if tuple(actual[name]) != tuple(shape):
            raise CheckpointError(f"{where}: param {name!r} has shape {list(actual[name])}, expected "
                                  f"{list(shape)} for the model config")


def load_native_config(path: str | os.PathLike[str]) -> ModelConfig:
    cfg_path = Path(path) / CONFIG_FILE
    try:
        data = json.loads(cfg_path.read_text())
    except OSError as e:
        raise CheckpointError(f"{cfg_path}: cannot read ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{cfg_path}: not a kunjax checkpoint config (expected "
                              f'{{"format": "{FORMAT}", "model": {{...}}}})')
    try:
        return ModelConfig.from_dict(data["model"])
    except (TypeError, ConfigError) as e:  # missing/unknown fields: written by another version, or edited
        raise CheckpointError(f"{cfg_path}: bad model config ({e})") from e


def save_checkpoint(path: str | os.PathLike[str], cfg: ModelConfig, params: dict[str, Any],
                    tokenizer_file: str | os.PathLike[str] | None = None) -> None:
    """Write `params` (the tree of `cfg`, any sharding) and `cfg` as a kunjax checkpoint at `path`."""
    path = Path(path).absolute()  # orbax wants absolute paths
    _check_shapes(f"save_checkpoint({path})", {k: tuple(np.shape(v)) for k, v in flatten_params(params).items()},
                  cfg)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).unlink(missing_ok=True)  # incomplete until the config is back
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(path / PARAMS_DIR, params, force=True)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()
    if tokenizer_file is not None:
        src = Path(tokenizer_file)
        if not src.is_file():
            raise CheckpointError(f"{src}: tokenizer file not found")
        shutil.copyfile(src, path / "tokenizer.json")
        for name in TOKENIZER_FILES[1:]:  # special-token settings that belong with it
            if (src.parent / name).is_file():
                shutil.copyfile(src.parent / name, path / name)
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "model": cfg.to_dict()}, indent=2) + "\n")
    os.replace(tmp, path / CONFIG_FILE)


def _stored_shapes(ckptr: ocp.StandardCheckpointer, params_dir: Path) -> dict[str, tuple[int, ...]]:
    meta: Any = ckptr.metadata(params_dir)
    # orbax >= 0.11 wraps the tree as StepMetadata.item_metadata(.tree); older versions return it bare.
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    return {k: tuple(v.shape) for k, v in flatten_params(dict(meta)).items()}


def load_native_params(path: str | os.PathLike[str], cfg: ModelConfig, shardings: dict[str, Any],
                       dtype: Any) -> dict[str, Any]:
    """Restore the param tree of `cfg` from a kunjax checkpoint straight onto `shardings`, cast to `dtype`."""
    params_dir = Path(path).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing (not a complete kunjax checkpoint)")
    jdtype = jax.numpy.dtype(dtype)
    target = jax.tree.map(lambda shape, s: jax.ShapeDtypeStruct(shape, jdtype, sharding=s),
                          param_shapes(cfg), shardings, is_leaf=lambda x: isinstance(x, tuple))
    ckptr = ocp.StandardCheckpointer()
    try:
        try:
            stored = _stored_shapes(ckptr, params_dir)
        except Exception as e:  # orbax raises many types for unreadable metadata
            raise CheckpointError(f"{params_dir}: cannot read the orbax metadata ({type(e).__name__}: "
                                  f"{e})") from e
        _check_shapes(str(params_dir), stored, cfg)
        try:
            restored = ckptr.restore(params_dir, target)
        except Exception as e:  # missing or corrupt array files surface as assorted orbax/tensorstore errors
            first = (str(e).strip().splitlines() or [""])[0][:300]  # the full TensorStore dump is in __cause__
            raise CheckpointError(f"{params_dir}: restore failed, files missing or corrupt "
                                  f"({type(e).__name__}: {first})") from e
    finally:
        ckptr.close()
    return jax.tree.map(lambda x: x, dict(restored))  # a plain nested dict of jax.Array
