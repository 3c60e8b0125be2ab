"""kunjax: an LLM serving runtime on JAX/XLA whose answer to memory bursts is dropping replicated parameters.

Public API (vLLM-shaped): `LLM`, `SamplingParams`, `RequestOutput`, `CompletionOutput`, `EngineConfig`,
`LLMEngine`. Heavy modules load lazily so `kunjax --help` starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "LLM": "kunjax.llm",
    "LLMEngine": "kunjax.engine",
    "EngineConfig": "kunjax.config",
    "ModelConfig": "kunjax.config",
    "SamplingParams": "kunjax.sampling_params",
    "RequestOutput": "kunjax.request",
    "CompletionOutput": "kunjax.request",
}

if TYPE_CHECKING:
    from kunjax.config import EngineConfig, ModelConfig
    from kunjax.engine import LLMEngine
    from kunjax.llm import LLM
    from kunjax.request import CompletionOutput, RequestOutput
    from kunjax.sampling_params import SamplingParams


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kunjax' has no attribute {name!r}")


__all__ = ["CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "ModelConfig", "RequestOutput", "SamplingParams"]
