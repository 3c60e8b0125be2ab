"""Memory-overload policies, selected by name (`--policy`), each a strategy over the engine's view
(`base.MemoryPolicy`), none a fork of the engine.

* `recompute` (`base.MemoryPolicy`): preempt the latest arrival, free its KV, re-prefill it later (vLLM's default).
* `swap` (`swap.py`): move the victim's KV to the host tier, bring it back before new admissions (InferCept's cap).
* `migrate` (`migrate.py`): move running requests' KV from the most to the least loaded replica while they keep
  decoding: copy in rounds, stop for a short final one (Llumnix's live migration, load as freeness).
* `layerkv` (`layerkv.py`, `layer_slots.py`): admit a prefill with only some layer groups of its KV on device
  (the rest on the host tier, reloaded into a staging region for each step), SLO-gated; promote when memory frees.
* `kunserve` (`kunserve/`): drop replicated weights into pipeline units, restore after the burst.

`create(config, ...)` builds `config.policy` (the names are `kunjax.config.POLICIES`, which the CLI offers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kunjax.config import EngineConfig, ModelConfig, Options
    from kunjax.policies.base import MemoryPolicy

# Policy name -> "module:class".
REGISTRY = {
    "recompute": "kunjax.policies.base:MemoryPolicy",
    "swap": "kunjax.policies.swap:Swap",
    "migrate": "kunjax.policies.migrate:Migrate",
    "layerkv": "kunjax.policies.layerkv:LayerKV",
    "kunserve": "kunjax.policies.kunserve:KunServe",
}


def policy_class(name: str) -> type[MemoryPolicy]:
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def options_class(name: str) -> type[Options] | None:
    """The policy's own options dataclass (its flags), None when it has none."""
    return policy_class(name).Options


def create(config: EngineConfig, model: ModelConfig, *, num_instances: int, num_blocks: int,
           block_bytes: int) -> MemoryPolicy:
    return policy_class(config.policy)(config, model, num_instances=num_instances, num_blocks=num_blocks,
                                       block_bytes=block_bytes)
