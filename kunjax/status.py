"""The engine's state as `kunjax.api` records: what a runtime reports (`info`, `load`, `policy_status`).

Pure reads of an `LLMEngine`, called with the engine quiescent (the engine thread holds its lock; the bench calls
them between steps). Owns the numbering of the policy's events (`EventLog`): the policy keeps a bounded deque;
each event gets one number, in order, however often it is read. Nothing here names a policy: what a policy wants
shown comes from its own `stats()`, `settings()` and `unit_state()`.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from kunjax.api import MAX_POLICY_EVENTS, InstanceLoad, PolicyEvent, PolicyStatus, RuntimeInfo, UnitStatus

if TYPE_CHECKING:
    from kunjax.engine import LLMEngine
    from kunjax.unit import ServingUnit


def role(unit: ServingUnit, instance: int) -> str:
    """"replica", or "pipeline group G stage S"."""
    return "replica" if unit.k == 1 else f"pipeline group {unit.uid} stage {unit.members.index(instance)}"


def runtime_info(engine: LLMEngine, versions: dict[str, str]) -> RuntimeInfo:
    cfg = engine.model_config
    layouts = tuple(f"instance {i}: {role(engine.unit_of_instance(i), i)}, tp={engine.config.tp} on "
                    f"{engine.executor.describe(i)}" for i in range(engine.num_instances))
    return RuntimeInfo(model=str(engine.model_path or "(model shape only, no weights)"), architecture=cfg.architecture,
                       num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, max_model_len=engine.max_model_len,
                       instances=layouts, policy=engine.config.policy, versions=versions,
                       block_size=engine.config.block_size, eos_token_ids=tuple(sorted(engine.eos_token_ids)),
                       policy_settings={k: str(v) for k, v in engine.policy.settings().items()},
                       kv_pool_blocks=(engine.executor.num_blocks - 1) * engine.num_instances,  # less the null block
                       chat_template=engine.tokenizer.chat_template if engine.tokenizer else None,
                       special_token_texts=dict(engine.tokenizer.special_token_texts) if engine.tokenizer else {})


def instance_loads(engine: LLMEngine) -> list[InstanceLoad]:
    """One row per instance; a stage of a pipeline reports its stage's KV books and the unit's requests."""
    out = []
    for i in range(engine.num_instances):
        u = engine.unit_of_instance(i)
        stage = u.members.index(i)
        a = u.stages[stage]
        pipeline = u.k > 1
        out.append(InstanceLoad(
            instance=i, mode=u.mode, kv_free=a.num_free, kv_used=a.num_used, kv_cached=a.num_cached,
            kv_total=a.total, running=len(u.running), waiting=len(u.waiting),
            queued_tokens=sum(len(r.token_ids) - r.num_computed for r in u.waiting),
            group=u.uid if pipeline else -1, stage=stage if pipeline else -1, demand_blocks=u.demand_blocks(),
            swapped=len(u.swapped)))
    return out


class EventLog:
    """The policy's recent events, each numbered once (`PolicyEvent.seq`) in the order they happened."""

    def __init__(self) -> None:
        self.events: collections.deque[PolicyEvent] = collections.deque(maxlen=MAX_POLICY_EVENTS)
        self._seq = 0
        self._last: object | None = None  # the newest policy event numbered

    def update(self, engine: LLMEngine) -> None:
        """Number the events the policy appended since the last call. It appends in order to a bounded deque: the
        new ones are after the newest numbered (all of them when that one was evicted)."""
        events = engine.policy.events
        if not events or events[-1] is self._last:
            return
        new = []
        for ev in reversed(events):
            if ev is self._last:
                break
            new.append(ev)
        for ev in reversed(new):
            self._seq += 1
            self.events.append(PolicyEvent(
                seq=self._seq, kind=ev.kind, group=ev.group, members=tuple(ev.members), step=ev.step,
                seconds=float(ev.seconds), detail={str(k): str(v) for k, v in ev.detail.items()},
                time_unix_s=float(ev.time_unix_s)))
        self._last = events[-1]


def policy_status(engine: LLMEngine, log: EventLog) -> PolicyStatus:
    log.update(engine)
    units = sorted(engine.units.values(), key=lambda u: u.members)
    counters = {"preemptions": sum(u.num_preemptions for u in units)}
    counters.update({f"failures_{kind}": n for kind, n in engine.failures.items()})  # device failures recovered
    if engine.hostcache is not None:
        counters.update(engine.hostcache.stats())
    if engine.puller is not None:
        counters.update(engine.puller.stats())
    if engine.handoff is not None:
        counters.update(engine.handoff.stats())
    counters.update({k: int(v) for k, v in engine.policy.stats().items()
                     if isinstance(v, int | float) and not isinstance(v, bool)})
    return PolicyStatus(
        policy=engine.config.policy, counters=counters, events=tuple(log.events),
        units=tuple(UnitStatus(unit=u.uid, mode=u.mode, members=u.members, running=len(u.running),
                               waiting=len(u.waiting), remote_dependent=u.num_remote_dependent,
                               detail={k: str(v) for k, v in engine.policy.unit_state(u).items()}
                               | ({"quarantined": "true"} if engine.quarantined(u) else {})
                               | ({"role": u.role} if u.role != "mixed" else {}))
                    for u in units))
