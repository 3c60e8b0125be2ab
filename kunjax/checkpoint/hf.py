"""Hugging Face safetensors checkpoints -> kunjax's layer-stacked param tree, placed shard by shard.

Owns the name and layout mapping between HF Llama-family weights (`[out, in]` per layer, one tensor per
layer) and `kunjax.model`'s tree (`[in, out]`, layer axis stacked first), and the placement of each leaf onto
its target sharding. Invariants:

* every tensor the config needs is checked (present, its shard file present, right shape, readable dtype)
  before anything is placed, and any tensor the config cannot account for is refused, so a checkpoint that
  does not match its config fails with a `CheckpointError` instead of serving wrong logits;
* no leaf is stacked whole on the host and then split: `jax.make_array_from_callback` asks for each device's
  slice, and the callback copies only that slice of each layer out of the memory-mapped files, transposing
  and casting on the way; leaves are placed one at a time, so host memory peaks at one leaf's device slices.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kunjax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, TensorInfo
from kunjax.config import ModelConfig
from kunjax.memory import param_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# our layer leaf -> (HF tensor name with {i} for the layer, stored transposed ([out, in]) in HF)
LAYER_TENSORS: dict[str, tuple[str, bool]] = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", False),
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", False),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", False),
    "bo": ("model.layers.{i}.self_attn.o_proj.bias", False),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
}
TOP_TENSORS: dict[str, tuple[str, bool]] = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
# Tensors some checkpoints carry that the model recomputes or does not use.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

Index = tuple[slice, ...]


def is_hf_dir(path: Path) -> bool:
    return (path / INDEX_FILE).is_file() or any(path.glob("*.safetensors"))


class HFWeights:
    """The tensors of one HF checkpoint dir (single file or index-sharded); shard files opened on demand."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.dir = Path(directory)
        self._files: dict[str, SafetensorsFile] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self._where: dict[str, str] = {str(k): str(v) for k, v in weight_map.items()}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
            self.source = index
        elif (self.dir / SINGLE_FILE).is_file():
            self._where = dict.fromkeys(self._open(SINGLE_FILE), SINGLE_FILE)
            self.source = self.dir / SINGLE_FILE
        else:
            raise CheckpointError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} (kunjax loads only "
                                  f"safetensors weights)")

    def _open(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(self.dir / file)
        return self._files[file]

    def names(self) -> set[str]:
        return set(self._where)

    def info(self, name: str, expected: Sequence[int] | None = None) -> TensorInfo:
        """Header entry of `name`; `expected` (its HF shape) is only used to word the error if missing."""
        want = f" (expected shape {list(expected)})" if expected is not None else ""
        file = self._where.get(name)
        if file is None:
            raise CheckpointError(f"{self.source}: missing tensor {name!r}{want}")
        if not (self.dir / file).is_file():
            raise CheckpointError(f"{self.source}: tensor {name!r} is in shard {file!r}, which is missing "
                                  f"from {self.dir}")
        f = self._open(file)
        if name not in f:
            raise CheckpointError(f"{self.source}: lists tensor {name!r} in {file!r}, but that file does not "
                                  f"hold it{want}")
        return f[name]

    def tensor(self, name: str) -> np.ndarray:  # read-only memory-mapped view, HF layout
        return self._open(self._where[name]).tensor(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _sources(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[list[str], bool]]:
    """Leaf path in our tree -> (HF tensor names, one per layer for stacked leaves; transposed?)."""
    out: dict[tuple[str, ...], tuple[list[str], bool]] = {}
    for key, value in param_shapes(cfg).items():
        if key == "layers":
            for leaf in value:
                template, transpose = LAYER_TENSORS[leaf]
                out[("layers", leaf)] = ([template.format(i=i) for i in range(cfg.num_layers)], transpose)
        else:
            name, transpose = TOP_TENSORS[key]
            out[(key,)] = ([name], transpose)
    return out


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _validate(weights: HFWeights, cfg: ModelConfig, sources: dict[tuple[str, ...], tuple[list[str], bool]]) -> None:
    shapes = param_shapes(cfg)
    used: set[str] = set()
    for path, (names, transpose) in sources.items():
        shape = _get(shapes, path)
        per_tensor = shape[1:] if path[0] == "layers" else shape
        hf_shape = tuple(reversed(per_tensor)) if transpose else tuple(per_tensor)
        for name in names:
            info = weights.info(name, hf_shape)
            if info.shape != hf_shape:
                raise CheckpointError(
                    f"{weights.source}: tensor {name!r} has shape {list(info.shape)}, expected "
                    f"{list(hf_shape)} for {'/'.join(path)} {list(shape)} of the model in config.json")
            weights.tensor(name)  # rejects unsupported dtypes now, before anything is placed
            used.add(name)
    extra = sorted(n for n in weights.names() - used if not _IGNORED.fullmatch(n)
                   and not (cfg.tie_word_embeddings and n == TOP_TENSORS["lm_head"][0]))
    if extra:
        shown = ", ".join(repr(n) for n in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise CheckpointError(f"{weights.source}: tensors the config does not account for: {shown} (does "
                              f"config.json match the weights? e.g. num_hidden_layers, biases)")


def _slice_len(n: int, s: slice) -> int:
    return len(range(n)[s])


def _leaf_callback(weights: HFWeights, names: list[str], transpose: bool, stacked: bool,
                   shape: tuple[int, ...], dtype: np.dtype):
    """Callback for `make_array_from_callback`: copies one device's slice out of the memory maps."""

    def read(index: Index) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        out = np.empty(tuple(_slice_len(n, s) for n, s in zip(shape, index, strict=True)), dtype)
        if stacked:
            layers, inner = range(len(names))[index[0]], index[1:]
        else:
            layers, inner = range(1), index
        for j, i in enumerate(layers):
            t = weights.tensor(names[i])  # HF layout, memory-mapped
            if transpose:
                t = t.T  # a view: [in, out]
            dst = out[j] if stacked else out
            dst[...] = t[inner]  # copies only this slice, casting to `dtype`
        return out

    return read


def load_hf_params(path: str | os.PathLike[str], cfg: ModelConfig, shardings: dict[str, Any],
                   dtype: Any) -> dict[str, Any]:
    """Load an HF safetensors dir into the param tree of `cfg`, placed on `shardings`, cast to `dtype`."""
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    weights = HFWeights(path)
    try:
        sources = _sources(cfg)
        _validate(weights, cfg, sources)
        shapes = param_shapes(cfg)
        out: dict[str, Any] = {}
        for leaf_path, (names, transpose) in sources.items():
            shape = tuple(_get(shapes, leaf_path))
            sharding = _get(shardings, leaf_path)
            read = _leaf_callback(weights, names, transpose, leaf_path[0] == "layers", shape, np_dtype)
            # Wait for each leaf's host->device copies, so host memory holds one leaf's slices at a time.
            arr = jax.make_array_from_callback(shape, sharding, read).block_until_ready()
            node = out
            for k in leaf_path[:-1]:
                node = node.setdefault(k, {})
            node[leaf_path[-1]] = arr
        return out
    finally:
        weights.close()

