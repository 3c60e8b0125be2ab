"""Model shapes without weights: a `ModelConfig` by name or from any Hugging Face `config.json`.

What a simulation needs of a model is its shape (layers, widths, heads, vocabulary), not its weights. Every name
here is the architecture fields of the public `config.json` of that model on the Hugging Face Hub, read through
`ModelConfig.from_hf` like a real checkpoint, so what the engine refuses for a checkpoint it refuses here too.
`model_shape` also takes a directory holding a `config.json` or the path of the file itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kunjax.config import ConfigError, ModelConfig


def _llama3(hidden: int, inter: int, layers: int, heads: int) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "bos_token_id": 128000, "eos_token_id": 128001,
            "tie_word_embeddings": False}


def _qwen25(hidden: int, inter: int, layers: int, heads: int, kv: int) -> dict[str, Any]:
    return {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 32768, "bos_token_id": 151643, "eos_token_id": 151643,
            "tie_word_embeddings": False, "use_sliding_window": False}


# name -> the architecture fields of the model's public config.json (Hugging Face Hub)
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": _llama3(4096, 14336, 32, 32),  # meta-llama/Meta-Llama-3-8B
    "llama-3-70b": _llama3(8192, 28672, 80, 64),  # meta-llama/Meta-Llama-3-70B
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4),  # Qwen/Qwen2.5-7B
    "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8),  # Qwen/Qwen2.5-14B
    "qwen2.5-72b": _qwen25(8192, 29568, 80, 64, 8),  # Qwen/Qwen2.5-72B
    "mistral-7b": {  # mistralai/Mistral-7B-v0.1
        "architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 32768, "sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False},
}


def model_shape(name_or_path: str | Path) -> ModelConfig:
    """A `ModelConfig` from a name in `SHAPES` (case-insensitive), a directory with a `config.json`, or a
    `config.json` file; a `ConfigError` naming the choices otherwise."""
    key = str(name_or_path).lower()
    if key in SHAPES:
        return ModelConfig.from_hf(SHAPES[key])
    path = Path(name_or_path)
    if path.is_dir():
        return ModelConfig.from_hf_dir(path)
    if path.is_file():
        try:
            return ModelConfig.from_hf(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    raise ConfigError(f"unknown model shape {str(name_or_path)!r}: give one of {', '.join(SHAPES)}, or a "
                      f"Hugging Face config.json (or its directory)")
