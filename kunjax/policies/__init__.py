"""Memory-overload policies, selected by name (`--policy`), each a small module on the memory pool API.

* `recompute` (`recompute.py`): preempt the latest arrival, free its KV, re-prefill it later (vLLM's default).
* `swap` (`swap.py`): move the victim's KV to the host tier, bring it back before new admissions (InferCept's cap).
* `migrate` (`migrate.py`): move running requests' KV from the most to the least loaded instance while they
  keep decoding: copy in rounds, stop for a short final one (Llumnix's live migration, load as freeness).
* `layerkv` (`layerkv.py`, `layer_slots.py`): admit a prefill with only some layer groups of its KV on device
  (the rest on the host tier, reloaded into a staging region for each step), SLO-gated; promote when memory frees.
* `kunserve` (`kunjax/elastic/`): drop replicated weights into pipeline groups, restore after the burst.

A policy acts through two seams, never through a fork of the engine:
* per instance, the scheduler's preemption hooks (`Recompute` is the protocol: `begin_step`, `preempt`, `resume`,
  `may_admit`, `forget`), installed on `Instance.scheduler.policy`;
* per engine, an optional `PolicyRuntime` (`warmup`, `after_step`, `check`, `stats`, `events`) the engine calls
  at warm-up, after every step, when it checks its books, and when serving reports load.
  Optional: `reserved_blocks(instance) -> Counter` (device blocks the policy itself references, e.g. a
  migration's destination copies), which `check_books` adds to the requests' holdings.
`layerkv` also changes where a request's KV may live, so it installs, before warm-up, a `Scheduler` subclass
(growth, release and commit of layered requests) and `Instance.step_hooks` (per-layer-group tables of the step).

`install(engine)` builds both for `engine.config.policy` (kunserve's controller is built by the engine itself).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kunjax.engine import LLMEngine

# Policy name -> module with `install(engine) -> PolicyRuntime | None`; recompute needs none.
MODULES = {"swap": "kunjax.policies.swap", "migrate": "kunjax.policies.migrate", "layerkv": "kunjax.policies.layerkv"}


class PolicyRuntime(Protocol):
    """What the engine calls of a policy that works across instances or owns memory beyond the device pools."""

    mempool: Any  # kunjax.mempool.MemPool | None

    def warmup(self) -> None: ...
    def after_step(self) -> None: ...
    def check(self) -> None: ...  # assert the policy's books (both tiers); called by LLMEngine.check_books
    def stats(self) -> dict[str, Any]: ...


def install(engine: LLMEngine) -> PolicyRuntime | None:
    module = MODULES.get(engine.config.policy)
    if module is None:
        return None
    return importlib.import_module(module).install(engine)
