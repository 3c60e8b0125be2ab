"""The engine: admits and routes requests, steps every serving unit through the executor, applies tokens.

Owns request admission (validation, tokenization, routing), the step loop over units, applying sampled tokens
(stop conditions, detokenization, finish), and carrying out the policy's transitions. A serving unit
(`kunjax.unit`) is a pipeline of k stages: a replica is k = 1, a group fused from k replicas under a policy that
fuses replicas is k > 1; the engine treats both alike.

One `step()`: every unit with work runs its k ticks (tick t of every unit is launched before any unit's tick t is
read, so units overlap on their own devices, and a unit's tokens are applied before its next tick is scheduled);
the memory operations the books decided go to the executor before the tick that depends on them; pipeline units
run one round of their live KV exchange; requests whose prompt a prefill unit computed move to a decode unit
(`--roles`, `kunjax.disagg`); the policy looks at the units and returns transitions (fuse, split), which the
engine applies. Every stamp reads the injected clock; every device action goes through the executor.

The router (`kunjax.routing`) picks among the replicas and admitting pipelines that take new requests (not
decode units, not quarantined ones). When the executor fails — a tick, a memory operation, a drop or a restore —
the unit's KV is suspect: its requests are recomputed (`_lose_unit`, `docs/reliability.md`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kunjax import checkpoint, faults, policies
from kunjax.blocks import BlockAllocator
from kunjax.clock import WALL, Clock, VirtualClock
from kunjax.config import ConfigError, EngineConfig, ModelConfig, SchedulerConfig, parse_roles
from kunjax.detokenizer import IncrementalDetokenizer
from kunjax.disagg import Handoff
from kunjax.engine_view import EngineView
from kunjax.executor import Executor, ExecutorLost
from kunjax.executor.faulty import wrap as wrap_faults
from kunjax.fusion import fuse_books, install_prefix, move_home_copies, plan_move_home, plan_prefix_home, split_books
from kunjax.hardware import HardwareProfile
from kunjax.hostcache import HostCache
from kunjax.memory import extension_blocks, kv_block_bytes, split_vocab
from kunjax.mempool import MemoryPool
from kunjax.microbatch import MicroBatch
from kunjax.overlap import OverlapLoop
from kunjax.plan import MAX_SUPPRESSED, CopyBlocks, Fuse, MemoryOp, Sampled, Split, Transfer, UnitShape
from kunjax.policies.base import FuseUnits, SplitUnit, TransitionOutcome
from kunjax.policies.swap import host_blocks
from kunjax.progress import say
from kunjax.request import Request, RequestOutput, RequestStatus, StepOutputs, delta_output
from kunjax.routing import Router
from kunjax.sampling_params import SamplingParams
from kunjax.tokenizer import Tokenizer
from kunjax.transfers import PrefixPuller
from kunjax.unit import ServingUnit

log = logging.getLogger("kunjax")


def resolve_model_path(model: str | Path) -> Path:
    """`"demo"` -> the built-in demo checkpoint (trained and cached on first use); else a directory."""
    if str(model) == "demo":
        from kunjax.demo import ensure_demo_model

        return ensure_demo_model(log=say, progress=True)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model {str(model)!r}: no such directory (give a Hugging Face model directory, "
                          f"a kunjax checkpoint, or 'demo')")
    return path


def _jax_executor(model_path: Path, cfg: ModelConfig, ecfg: EngineConfig, devices) -> Executor:
    """The JAX executor; in a multi-host group (`kunjax.multihost`) the leader's, which the followers replay."""
    from kunjax import multihost
    from kunjax.executor.jax_executor import JaxExecutor
    from sharding.layouts import LayoutError, check_tp

    try:
        check_tp(ecfg.tp, num_kv_heads=cfg.num_kv_heads, num_heads=cfg.num_heads,
                 intermediate_size=cfg.intermediate_size)
        cluster = multihost.current()
        if cluster is not None:
            multihost.check_config(ecfg)
            return multihost.leader_executor(cluster, model_path, cfg, ecfg, devices)
        return JaxExecutor(model_path, cfg, ecfg, devices)
    except LayoutError as e:
        raise ConfigError(str(e)) from e


# A unit whose ticks or memory operations failed this many times in a row takes no new request for a while (its
# queue goes elsewhere): 1 s, doubling with each further failure, at most 60 s; then it is tried again.
QUARANTINE_AFTER = 2
QUARANTINE_S = (1.0, 60.0)
NO_LOGPROBS: list[dict[int, float]] = []  # shared by every delta without logprobs: never mutated
MAX_CHARS_PER_TOKEN = 64  # a longer text prompt cannot fit the context: refused before tokenizing


class LLMEngine:
    def __init__(self, model: str | Path | ModelConfig = "demo", config: EngineConfig | None = None,
                 devices: Sequence | None = None, *, executor: str | Executor = "jax", clock: Clock | None = None,
                 profile: HardwareProfile | None = None, time_shape: ModelConfig | None = None):
        """`model`: a Hugging Face or kunjax checkpoint directory, "demo", or (for the arithmetic and cost-model
        executors) just a `ModelConfig`. `executor`: "jax" (the model on `devices`, default all), "arith" (tokens
        by arithmetic, no model; `kunjax.executor.arith`), "sim" (durations from `profile`, no model;
        `kunjax.executor.sim`), or an `Executor` built for the same configs. `profile` with "jax": the real model,
        but time advanced by the cost model of `profile` for the shape `time_shape` (default: the model's own) on
        a virtual clock. `clock`: the wall clock, except a virtual one by default whenever time is modelled."""
        self.config = config or EngineConfig()
        if isinstance(model, ModelConfig):
            self.model_path, self.model_config, self.tokenizer = None, model, None
        else:
            self.model_path = resolve_model_path(model)
            self.model_config = checkpoint.load_config(self.model_path)
            self.tokenizer: Tokenizer | None = checkpoint.load_tokenizer(self.model_path)
        ecfg, cfg = self.config, self.model_config
        self.max_model_len = ecfg.resolved_max_model_len(cfg)
        modelled = executor in ("arith", "sim") or (executor == "jax" and profile is not None)
        self.clock: Clock = clock or (VirtualClock() if modelled else WALL)
        multihost = False
        if executor == "arith":
            from kunjax.executor.arith import ArithmeticExecutor

            executor = ArithmeticExecutor(cfg, ecfg, self.clock)
        elif executor == "sim":
            from kunjax.executor.sim import CostModelExecutor

            if profile is None:
                raise ConfigError("the cost-model executor needs a hardware profile")
            executor = CostModelExecutor(cfg, ecfg, self.clock, profile)
        elif executor == "jax":
            if self.model_path is None:
                raise ConfigError("the JAX executor needs a checkpoint directory or 'demo', not a ModelConfig")
            executor = _jax_executor(self.model_path, cfg, ecfg, devices)
            from kunjax import multihost as mh

            multihost = mh.current() is not None
            if profile is not None:
                from kunjax.cost_model import CostModel
                from kunjax.executor.sim import ModelledTimeExecutor

                cost = CostModel(time_shape or cfg, profile, dtype=ecfg.dtype, tp=ecfg.tp,
                                 block_size=ecfg.block_size)
                executor = ModelledTimeExecutor(executor, cost, self.clock)
        elif isinstance(executor, str):
            raise ConfigError(f"unknown executor {executor!r}: jax, arith or sim")
        try:
            injected = faults.resolve(ecfg.faults)
        except ValueError as e:  # $KUNJAX_FAULTS is only read here
            raise ConfigError(str(e)) from e
        self.executor: Executor = wrap_faults(executor, injected, self.clock)
        self.load_seconds = executor.load_seconds
        self.warmup_seconds = 0.0
        n, nb = self.executor.num_instances, self.executor.num_blocks
        self.policy = policies.create(ecfg, cfg, num_instances=n, num_blocks=nb,
                                      block_bytes=kv_block_bytes(cfg, ecfg.block_size, ecfg.dtype, ecfg.tp))
        self.caps = self.policy.capabilities()
        sched = ecfg.scheduler
        # cached context spills to the host tier (not beside layerkv, whose host tier counts layer-group slots)
        spill = sched.enable_prefix_caching and sched.prefix_cache_host and self.caps.layer_groups == 1
        host = self.caps.host_blocks
        if spill:
            host = max(host, host_blocks(ecfg, nb, kv_block_bytes(cfg, ecfg.block_size, ecfg.dtype, ecfg.tp),
                                         "KV block"))
        self.mempool = MemoryPool(n, host)
        self.replica_shape = UnitShape(
            k=1, tp=ecfg.tp, tokens=ecfg.scheduler.max_num_batched_tokens, buckets=ecfg.scheduler.token_buckets(),
            seqs=ecfg.scheduler.max_num_seqs, max_blocks=ecfg.max_blocks_per_seq(cfg), num_base=nb,
            layer_groups=self.caps.layer_groups)
        self.replica_blocks = nb - self.caps.staging_blocks  # the allocator's range; staging stays outside it
        self.router = Router(sched.routing, ecfg.block_size, sched.routing_sync_steps, sched.enable_prefix_caching,
                             sched.routing_slack_steps)
        cost = None  # prices transfers against recomputing, when time is modelled
        if profile is not None:
            from kunjax.cost_model import CostModel

            cost = CostModel(time_shape or cfg, profile, dtype=ecfg.dtype, tp=ecfg.tp, block_size=ecfg.block_size)
        self.hostcache = HostCache(self.mempool, ecfg.block_size, cost) if spill else None
        self.puller: PrefixPuller | None = None
        if sched.enable_prefix_caching and sched.prefix_transfer_blocks:
            self.puller = PrefixPuller(self.mempool, lambda: self.units.values(), ecfg.block_size,
                                       sched.prefix_transfer_blocks, cost)
        try:
            self.roles = parse_roles(ecfg.roles, n)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.handoff: Handoff | None = None
        if "prefill" in self.roles:
            if ecfg.pd_stream_groups > cfg.num_layers:
                raise ConfigError(f"--pd-stream-groups {ecfg.pd_stream_groups}: the model has {cfg.num_layers} "
                                  f"layers to stream")
            self.handoff = Handoff(self.mempool, ecfg.block_size,
                                   kv_block_bytes(cfg, ecfg.block_size, ecfg.dtype, ecfg.tp), cost,
                                   ecfg.pd_stream_groups, lambda: getattr(self.executor, "transfer_measured_s", None))
        self.units: dict[int, ServingUnit] = {}
        for i in range(n):
            self._add_unit(self._replica(i))
        self._uids = itertools.count(n)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._rng = random.Random(ecfg.seed)
        eos = set(cfg.eos_token_ids) | (set(self.tokenizer.eos_token_ids) if self.tokenizer else set())
        self.eos_token_ids = frozenset(eos)
        self.step_no = 0
        self.layout_version = 0  # counts fuses and splits (readers of a snapshot of the units check it)
        self.failures: collections.Counter[str] = collections.Counter()  # executor failures recovered, by kind
        self._lost: set[int] = set()  # units whose device state a failure made suspect in this step
        self._failed: list[RequestOutput] = []  # requests a failure ended, not yet returned by `step`
        self._held: list[RequestOutput] = []  # outputs of ticks drained outside a step, first out of the next one
        self._health: dict[int, list[float]] = {}  # uid -> [failures in a row, quarantined until (clock)]
        self.view = EngineView(self)
        self.policy.attach(self.view)
        self.overlap: OverlapLoop | None = None  # `--async-scheduling` (kunjax/overlap.py)
        if sched.async_scheduling:
            self.overlap = OverlapLoop(self, multihost=multihost, faulty=bool(injected),
                                       prefix_transfers=self.puller is not None, handoff=self.handoff is not None,
                                       block_size=ecfg.block_size)
            if self.overlap.never is not None:
                log.warning("--async-scheduling: every step runs serially (%s)", self.overlap.never)

    # ---- units --------------------------------------------------------------------------------------
    def _replica(self, i: int) -> ServingUnit:
        unit = ServingUnit(i, (i,), self.replica_shape, [BlockAllocator(self.replica_blocks)], self.policy,
                           block_size=self.config.block_size,
                           enable_prefix_caching=self.config.scheduler.enable_prefix_caching, now=self.clock.now)
        if self.puller is not None:
            unit.prefix_sources.append(self.puller.pull)
        unit.role = self.roles[i]
        return unit

    def _add_unit(self, unit: ServingUnit) -> None:
        self.units[unit.uid] = unit
        self.mempool.units[unit.uid] = unit
        self.router.add_unit(unit)
        if self.hostcache is not None:
            self.hostcache.attach(unit)

    def _drop_unit(self, unit: ServingUnit) -> None:
        self._health.pop(unit.uid, None)
        del self.units[unit.uid]
        del self.mempool.units[unit.uid]
        self.router.drop_unit(unit)
        if self.hostcache is not None:
            self.hostcache.detach(unit)

    @property
    def num_instances(self) -> int:
        return self.executor.num_instances

    def unit_of_instance(self, i: int) -> ServingUnit:
        return next(u for u in self.units.values() if i in u.members)

    @property
    def groups(self) -> list[ServingUnit]:
        """The pipeline units (k > 1) serving now."""
        return [u for u in self.units.values() if u.k > 1]

    def group_shape(self, members: tuple[int, ...]) -> UnitShape | None:
        """The shape of the pipeline unit `members` would fuse into; None when the policy does not fuse or the drop
        would free no KV block."""
        opts = self.caps.pipeline
        if opts is None:
            return None
        ecfg, cfg = self.config, self.model_config
        k = len(members)
        tokens = max(ecfg.scheduler.max_num_seqs, opts.microbatch_tokens)
        num_ext = extension_blocks(cfg, ecfg, k, tokens)
        if num_ext < 1:
            return None
        # Two tick shapes: a decode-sized one (the smallest step bucket with a row per sequence) and the full
        # micro-batch; a decode tick padded to the full budget ran ~4x slower on CPU.
        small = min((b for b in ecfg.scheduler.token_buckets() if b >= ecfg.scheduler.max_num_seqs), default=tokens)
        return UnitShape(k=k, tp=ecfg.tp, tokens=tokens, buckets=tuple(sorted({min(small, tokens), tokens})),
                         seqs=ecfg.scheduler.max_num_seqs, max_blocks=ecfg.max_blocks_per_seq(cfg),
                         num_base=self.executor.num_blocks * k, num_ext=num_ext, remote_rows=opts.remote_rows,
                         copy_blocks=opts.exchange_blocks, split_vocab=split_vocab(cfg, k),
                         remote_transport=opts.remote_transport)

    def warmup(self, on_progress: Callable[[int, int], None] | None = None) -> float:
        """Prepare (compile) every replica's step and every group the policy may fuse; returns seconds.
        `on_progress(done, total)` is called before the first and after each replica and each group (a user waits
        a minute on CPU)."""
        t0 = time.perf_counter()
        units = [(u.uid, u.members, u.shape) for u in self.units.values() if u.k == 1]
        candidates = [(m, s) for m in self.policy.candidates() if (s := self.group_shape(m)) is not None]
        total = len(units) + len(candidates)
        steps = [([u], []) for u in units] + [([], [c]) for c in candidates]
        if on_progress is not None:
            on_progress(0, total)
        for done, (replica, group) in enumerate(steps, start=1):
            self.executor.warmup(replica, group)
            if on_progress is not None:
                on_progress(done, total)
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds

    # ---- admission ----------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int], add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """(text, ids) of a prompt; a text is tokenized, after a size check that needs no tokenizer (a text of more
        than `MAX_CHARS_PER_TOKEN` characters per token of the context cannot fit), with the tokenizer's BOS/EOS
        unless `add_special_tokens` is False (a rendered chat template writes its own). Reads no engine state but
        constants: the engine thread calls it outside its lock, so a huge prompt never stalls other streams."""
        if isinstance(prompt, str):
            if not prompt:  # (a tokenizer would make it a lone BOS)
                raise ValueError("prompt is empty")
            limit = MAX_CHARS_PER_TOKEN * self.max_model_len
            if len(prompt) > limit:
                raise ValueError(f"prompt text has {len(prompt)} characters, more than {MAX_CHARS_PER_TOKEN} per "
                                 f"token of the {self.max_model_len}-token context (--max-model-len) can hold")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json: pass prompts as lists of token ids")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return None, [int(t) for t in prompt]

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, session_id: str | None = None,
                    encoded: tuple[str | None, list[int]] | None = None) -> str:
        """Validate, tokenize and route one request; raises ValueError with a message on bad input. `session_id`
        groups the turns of one conversation (`--routing session` keeps them on one unit); `encoded`: what
        `encode(prompt)` gave, when the caller tokenized it already."""
        params = params or SamplingParams()
        text, ids = encoded if encoded is not None else self.encode(prompt)
        cfg = self.model_config
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model context (--max-model-len) is "
                             f"{self.max_model_len}, leaving no room to generate")
        params.validate_for(cfg.vocab_size, self.config.max_logprobs)
        if params.min_tokens and len(set(params.stop_token_ids) | self.eos_token_ids) > MAX_SUPPRESSED:
            raise ValueError(f"min_tokens with more than {MAX_SUPPRESSED} stop token ids + EOS ids is not supported")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        max_total = self.max_model_len if params.max_tokens is None else min(
            self.max_model_len, len(ids) + params.max_tokens)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(request_id=request_id, prompt=text, token_ids=list(ids), num_prompt_tokens=len(ids),
                      params=params, seed=seed, eos_token_ids=self.eos_token_ids, max_total_len=max_total,
                      arrival_time=self.clock.now(), logprobs=[] if params.logprobs is not None else None)
        if self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer.from_params(self.tokenizer, list(ids), params)
        elif params.stop:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        self._route(req, session_id)  # raises ValueError if it could never fit
        self.requests[request_id] = req
        return request_id

    def _route(self, req: Request, session_id: str | None = None) -> None:
        need = -(-req.max_total_len // self.config.block_size)
        if need > self.replica_blocks - 1:  # also for pipelines: a restore must be able to take it home
            raise ValueError(f"request {req.request_id} may need {need} KV blocks ({req.max_total_len} tokens) but "
                             f"an instance pool has {self.replica_blocks - 1}")
        units = [u for u in self.units.values() if not self.quarantined(u)] or list(self.units.values())
        units = [u for u in units if u.role != "decode"] or units  # decode units only take handed-over requests
        replicas = [u for u in units if u.k == 1]
        pipes = [u for u in units if u.k > 1 and u.admitting] or ([] if replicas else [u for u in units if u.k > 1])
        unit = self.router.pick(req, replicas + pipes, self.unit_of_instance, session_id)
        req.tables = [[] for _ in range(unit.k)]
        unit.add(req)
        self.router.routed(req, unit)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None or req.finished:
            return None
        self.units[req.unit].abort(req)
        req.status, req.finish_reason, req.finish_time = RequestStatus.FINISHED, "abort", self.clock.now()
        return delta_output(req, [], "", [])  # text held back as a possible stop-string start is dropped

    # ---- stepping -----------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        """Work is left: a request, or a pipeline unit (idle ones step towards their restore)."""
        return self.has_requests() or bool(self.groups)

    def has_requests(self) -> bool:
        return any(u.has_work for u in self.units.values())

    def _issue(self) -> None:
        if self.mempool.has_ops:
            ops = self.mempool.take_ops()
            try:
                self.executor.apply(ops)
            except ExecutorLost:  # the whole executor is gone, not one unit: nothing to recover
                raise
            except Exception as e:  # some of them may not have happened: whatever they touched is suspect
                for u in self._units_of(ops):
                    self._lose_unit(u, "memory", f"a memory operation failed: {type(e).__name__}: {e}")

    def _units_of(self, ops: Sequence[MemoryOp]) -> list[ServingUnit]:
        uids: dict[int, None] = {}
        for op in ops:
            if isinstance(op, CopyBlocks):
                uids[op.unit] = None
            elif isinstance(op, Transfer):
                uids[self.unit_of_instance(op.src).uid] = uids[self.unit_of_instance(op.dst).uid] = None
            elif not isinstance(op, Fuse | Split):
                uids[self.unit_of_instance(op.instance).uid] = None
        return [self.units[uid] for uid in uids if uid in self.units]

    def _lose_unit(self, unit: ServingUnit, kind: str, error: str) -> None:
        """A failure at the executor (a tick, a memory operation, a restore) may have left `unit`'s KV in any
        state: the micro-batches in its pipe are dropped, every request holding KV there is recomputed from its
        tokens (a retry that changes no output: sampling is keyed by seed and token count) or, after
        `--step-retries` failures, ends with `error`; its cached prefixes are forgotten. Its waiting requests and
        the other units are untouched."""
        log.error("unit %d (instances %s): %s; recomputing its requests", unit.uid, list(unit.members), error)
        self.failures[kind] += 1
        self._lost.add(unit.uid)
        for mb in unit.at_stage:
            for it in mb.items if mb is not None else ():
                it.req.in_flight = False
        unit.at_stage = [None] * unit.k
        for req in unit.aborted_in_flight:
            unit.release(req)
        unit.aborted_in_flight.clear()
        now = self.clock.now()
        for req in [*unit.running, *unit.swapped]:
            (unit.running if req in unit.running else unit.swapped).remove(req)
            unit.hooks.forget(unit, req)  # the policy's own state of it (host copies, migrations) goes too
            req.num_failures += 1
            if req.num_failures <= self.config.step_retries:
                unit.release(req)  # a recompute, not counted as a preemption
                unit.add(req)
                continue
            unit.release(req)
            req.status, req.finish_reason, req.finish_time = RequestStatus.FINISHED, "error", now
            req.error = f"{error} (failed {req.num_failures} times)"
            self.requests.pop(req.request_id, None)
            self._failed.append(delta_output(req, [], "", []))
        if unit.enable_prefix_caching:
            unit.index.clear()
        health = self._health.setdefault(unit.uid, [0, 0.0])
        health[0] += 1
        if health[0] >= QUARANTINE_AFTER:
            first, longest = QUARANTINE_S
            pause = min(first * 2 ** (health[0] - QUARANTINE_AFTER), longest)
            health[1] = now + pause
            log.error("unit %d failed %d times in a row: no new requests for %.0f s", unit.uid, health[0], pause)
            self._reroute(unit)
        recover = getattr(self.executor, "recover", None)  # (an executor whose arrays a failure can leave unusable)
        if recover is not None:
            recover(unit.uid)

    def quarantined(self, unit: ServingUnit) -> bool:
        health = self._health.get(unit.uid)
        return health is not None and health[1] > self.clock.now()

    def _reroute(self, unit: ServingUnit) -> None:
        """`unit`'s queued requests (no KV yet) go to the healthy units, if there are any."""
        if all(self.quarantined(u) for u in self.units.values()):
            return
        for req in list(unit.waiting):
            unit.waiting.remove(req)
            self._route(req)

    def step(self) -> StepOutputs:
        """One step of every unit with work; returns an output (a delta) for every request that advanced (with
        `--async-scheduling`, overlapped steps return a tick's tokens one step after it was launched)."""
        outputs = StepOutputs(self._held)
        self._held = []
        self._lost.clear()
        ov = self.overlap
        why = ov.serial_reason() if ov is not None else "off"
        if why is None:
            ov.step(outputs)
        else:
            if ov is not None:
                ov.note_serial(why)
                ov.drain(outputs)
            self._serial_ticks(outputs)
        if self.handoff is not None:
            self._hand_off()
        for u in self.groups:
            self.view.exchange_round(u)
        self._issue()
        self.step_no += 1
        for tr in self.policy.after_step(self.view):
            if ov is not None:
                ov.drain(outputs)  # a transition needs every tick collected (in this step's outputs)
            self.transition(tr)
        self._issue()
        self.router.end_step(self.step_no)
        self.executor.end_step()
        if self._failed:
            outputs += self._failed
            self._failed = []
        return outputs

    def _serial_ticks(self, outputs: StepOutputs) -> None:
        """Every unit's k ticks, each tick's tokens applied before the unit's next one is scheduled."""
        units = [u for u in self.units.values() if u.has_work]  # an idle unit has nothing to schedule or run
        pending: dict[int, tuple[MicroBatch | None, Any]] = {}
        arrays = self.executor.needs_arrays
        launch, after_launch, issue = self.executor.launch, self.policy.after_launch, self._issue
        lost = self._lost
        for t in range(max((u.k for u in units), default=0)):
            for u in units:
                if t >= u.k or u.uid in lost:
                    continue
                if u.uid in pending:
                    self._finish_tick(u, *pending.pop(u.uid), outputs)
                    if u.uid in lost:
                        continue
                leaving, active = u.advance()
                if not active:
                    continue
                work = u.tick_work()
                inputs = u.tick_inputs() if arrays else None
                issue()  # what scheduling decided (swaps, reloads) goes before the tick
                if u.uid in lost:
                    continue
                try:
                    pending[u.uid] = (leaving, launch(u.uid, work, inputs))
                except ExecutorLost:  # the whole executor is gone, not one unit: nothing to recover
                    raise
                except Exception as e:
                    self._lose_unit(u, "step", f"a device step failed: {type(e).__name__}: {e}")
                    continue
                if u.at_stage[0] is not None:
                    after_launch(u, u.at_stage[0])
                issue()  # what must follow the tick (layerkv's offloads)
        for u in units:
            if u.uid in pending and u.uid not in lost:
                self._finish_tick(u, *pending.pop(u.uid), outputs)

    def _hand_off(self) -> None:
        """Requests whose prompt a prefill unit computed move to a decode unit (`kunjax.disagg`)."""
        decodes = [u for u in self.units.values() if u.role == "decode"]
        for u in [u for u in self.units.values() if u.role == "prefill" and u.uid not in self._lost]:
            for req in self.handoff.ready(u):
                if self.handoff.send(req, u, decodes) is None:
                    break  # no decode unit has room: the rest wait too

    def _finish_tick(self, unit: ServingUnit, leaving: MicroBatch | None, launched: Any,
                     outputs: StepOutputs) -> None:
        try:
            result = self.executor.collect(launched, leaving is not None)
        except ExecutorLost:  # the whole executor is gone, not one unit: nothing to recover
            raise
        except Exception as e:
            self._lose_unit(unit, "step", f"a device step failed: {type(e).__name__}: {e}")
            return
        if self._health:
            self._health.pop(unit.uid, None)  # it works again
        self.policy.observe_tick(unit, unit.last_tick[0], result.seconds)
        if leaving is None:
            return
        s = result.sampled
        now = self.clock.now()  # the tick's tokens all arrived when it was collected
        append, requests = self._append_token, self.requests
        for req, token, logprob, row in unit.exit(leaving, s.tokens, s.logprobs):
            if append(unit, req, token, logprob, s, row, now, outputs):
                requests.pop(req.request_id, None)

    def _append_token(self, unit: ServingUnit, req: Request, token: int, logprob: float, sampled: Sampled,
                      row: int, now: float, outputs: StepOutputs) -> bool:
        """`token` joins `req`: logprobs, text, stop conditions; its output goes to `outputs` (the final output
        built at once, a delta recorded to be built when read). True when `req` finished here."""
        if req.first_token_time is None:
            req.first_token_time = now
        req.token_ids.append(token)
        p = req.params
        new_lps = NO_LOGPROBS
        if req.logprobs is not None:
            new_lps = []
            entry = {token: logprob}
            for tid, lp in zip(sampled.top_ids[row, :p.logprobs].tolist(),
                               sampled.top_logprobs[row, :p.logprobs].tolist(), strict=True):
                entry.setdefault(int(tid), float(lp))
            req.logprobs.append(entry)
            new_lps.append(entry)
            req.cumulative_logprob += logprob
        detok = req.detokenizer
        text = ""
        reason: tuple[str, int | str | None] | None = None
        if detok is not None:
            text, hit = detok.add(token)
            if hit:  # a stop string completed (min_tokens already applied)
                reason = ("stop", detok.stop_reason)
        num_tokens = len(req.token_ids)
        if reason is None and num_tokens - req.num_prompt_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                reason = ("stop", token)
            elif not p.ignore_eos and token in req.eos_token_ids:
                reason = ("stop", None)
        if reason is None and num_tokens >= req.max_total_len:
            reason = ("length", None)
        if reason is not None:
            if detok is not None:
                text += detok.finish()  # flush text held back as a possible stop-string start
            req.finish_reason, req.stop_reason = reason
            req.finish_time = now
            if req.in_flight:  # (overlapped loop) its row in the next tick is wasted: it leaves as an abort does
                unit.abort(req)
                req.status = RequestStatus.FINISHED
            else:
                unit.finish(req)
            outputs.append(delta_output(req, [token], text, [] if new_lps is NO_LOGPROBS else new_lps))
            return True
        outputs.add_delta(req, token, text, new_lps)
        return False

    # ---- transitions --------------------------------------------------------------------------------
    def transition(self, tr: FuseUnits | SplitUnit) -> TransitionOutcome | None:
        """Apply a policy's transition at this step boundary and tell the policy; None when a split could not
        happen yet (its requests' KV does not fit the members' own pools) or when it failed at the executor and
        was rolled back (the policy was told)."""
        if isinstance(tr, FuseUnits):
            outcome = self.fuse(tr.members, tr.reason)
        else:
            outcome = self.split(self.units[tr.uid], tr.reason)
        if outcome is not None:
            self.policy.transition_done(outcome)
        return outcome

    def _drain(self) -> None:
        """Collect and apply the overlapped loop's ticks in flight (a transition needs them); their outputs come
        first out of the next step."""
        if self.overlap is not None and self.overlap.flights:
            held = StepOutputs()
            self.overlap.drain(held)
            self._held += list(held)

    def fuse(self, members: tuple[int, ...], reason: str = "") -> TransitionOutcome | None:
        """Drop the replicated weights of replicas `members` into one pipeline unit (DESIGN.md §6.3); None when the
        executor failed and rolled back (the replicas serve on, untouched)."""
        self._drain()
        shape = self.group_shape(members)
        if shape is None:
            raise ValueError(f"instances {members} cannot fuse (no pipeline policy, or nothing would be freed)")
        olds = [self.unit_of_instance(i) for i in members]
        if any(u.k != 1 for u in olds):
            raise RuntimeError(f"instances {members} are already in a group")
        t0 = self.clock.now()  # a transition stops the engine: on a virtual clock the executor charges it
        parked = sum(self.hostcache.park(u) for u in olds) if self.hostcache is not None else 0
        self._issue()
        uid = next(self._uids)
        try:
            self.executor.apply([Fuse(uid, members, shape)])
        except ExecutorLost:  # the whole executor is gone, not one unit: nothing to recover
            raise
        except Exception as e:  # the executor rolled the weights back; no book has changed
            self.failures["fuse"] += 1
            if self.hostcache is not None:  # the replicas serve on: their spilled nodes come back
                for u in olds:
                    self.hostcache.unpark(u)
            self.policy.transition_failed("fuse", None, members, f"{type(e).__name__}: {e}")
            return None
        unit = fuse_books(uid, olds, shape, self.policy, block_size=self.config.block_size,
                          enable_prefix_caching=self.config.scheduler.enable_prefix_caching, now=self.clock.now)
        for u in olds:
            self._drop_unit(u)
        self._add_unit(unit)
        self.layout_version += 1
        seconds = self.clock.now() - t0
        return TransitionOutcome("fuse", uid, members, seconds, {
            "reason": reason, "k": shape.k, "extension_blocks": shape.num_ext,
            "stale_requests": unit.num_remote_dependent, "queued": len(unit.waiting),
            "spilled_blocks_parked": parked})

    def split(self, unit: ServingUnit, reason: str = "") -> TransitionOutcome | None:
        """Restore a drained pipeline unit into its members' replicas; None (nothing changed) when its requests'
        KV does not fit the members' own pools yet."""
        self._drain()
        assert not unit.in_flight and not unit.num_remote_dependent, f"unit {unit.uid} is not drained"
        plan = self.plan_home(unit)
        if plan is None:
            return None
        t0 = self.clock.now()
        copies = move_home_copies(unit, plan)
        placed, prefix_copies = plan_prefix_home(unit, plan, self.executor.num_blocks)
        self.mempool.copy_blocks(unit, copies + prefix_copies)
        was_lost = unit.uid in self._lost
        self._issue()
        error = None
        if unit.uid in self._lost and not was_lost:  # a move-home copy failed (its requests are being recomputed)
            error = "a move-home copy failed"
        else:
            try:
                self.executor.apply([Split(unit.uid, unit.members)])
            except ExecutorLost:  # the whole executor is gone, not one unit: nothing to recover
                raise
            except Exception as e:  # rolled back to the group, but what its extension held is gone
                error = f"{type(e).__name__}: {e}"
                self._lose_unit(unit, "split", f"a restore failed: {error}")
        if error is not None:
            self.policy.transition_failed("split", unit, unit.members, error)
            return None
        replicas = [self._replica(i) for i in unit.members]
        split_books(unit, plan, replicas)
        install_prefix(placed, unit.index.root, replicas)
        self._drop_unit(unit)
        for r in replicas:
            self._add_unit(r)
        self.layout_version += 1
        seconds = self.clock.now() - t0
        return TransitionOutcome("split", unit.uid, unit.members, seconds, {
            "reason": reason, "moved_requests": len(plan), "moved_blocks": len(copies),
            "cached_blocks_kept": len(placed),
            "requeued": sum(len(r.waiting) for r in replicas), "blocks_exchanged": unit.blocks_exchanged,
            "remote_ticks": unit.remote_ticks})

    def plan_home(self, unit: ServingUnit) -> dict[Request, tuple[int, list[int]]] | None:
        """The move home of a pipeline unit's requests (`fusion.plan_move_home`); when cached prefix blocks are in
        its way, the least recently used are evicted until it fits (the replicas matter more than the cache)."""
        nb, seats = self.executor.num_blocks, self.config.scheduler.max_num_seqs
        plan = plan_move_home(unit, nb, seats)
        while plan is None and unit.index.evict(max(1, unit.index.num_cached // 4)):
            plan = plan_move_home(unit, nb, seats)
        return plan

    # ---- introspection ------------------------------------------------------------------------------
    def check_books(self) -> None:
        """Every unit's books balance, and each block's refcount equals the requests holding it plus the policy's
        own references (`reserved_blocks`); the host tiers and the policy's books too."""
        for u in self.units.values():
            u.check(lambda s, u=u: self.policy.reserved_blocks(u, s))
        self.mempool.check()
        if self.hostcache is not None:
            self.hostcache.check(self.units.values())
        self.policy.check()
        held = {r.request_id for u in self.units.values() for r in (*u.running, *u.waiting, *u.swapped)}
        assert held == set(self.requests), (
            f"requests lost or misfiled: {sorted(set(self.requests) ^ held)[:5]}")
        tree = self.router.tree
        if tree is not None and not tree.pending:
            tree.check((u.uid, u.index) for u in self.units.values() if u.enable_prefix_caching)


def config_from_kwargs(**kwargs) -> EngineConfig:
    """An `EngineConfig` from flat options (every flag's name): each goes to its concern — the engine, the
    scheduler, or the chosen policy's own options; an option of another policy is refused, naming it."""
    policy = kwargs.get("policy", EngineConfig.policy)
    if policy not in policies.REGISTRY:
        EngineConfig(policy=policy)  # raises the message that names --policy
    concerns = {"scheduler": SchedulerConfig, "policy_options": policies.options_class(policy)}
    nested = {name: {} for name in concerns}
    engine: dict[str, object] = {}
    for name, value in kwargs.items():
        owner = next((c for c, cls in concerns.items() if cls is not None and name in option_names(cls)), None)
        if owner is not None:
            nested[owner][name] = value
        elif name in option_names(EngineConfig):
            engine[name] = value
        else:
            other = next((p for p in policies.REGISTRY if name in option_names(policies.options_class(p))), None)
            if other is not None:
                raise ConfigError(f"--{name.replace('_', '-')} is an option of --policy {other}, not of {policy}")
            raise TypeError(f"unknown engine option {name!r}; valid: {sorted(all_option_names())}")
    opts_cls = concerns["policy_options"]
    return EngineConfig(**engine, scheduler=SchedulerConfig(**nested["scheduler"]),
                        policy_options=opts_cls(**nested["policy_options"]) if opts_cls is not None else None)


def option_names(cls: type | None) -> set[str]:
    """The flag names of one concern's options (nested concerns excluded)."""
    if cls is None:
        return set()
    return {f.name for f in dataclasses.fields(cls) if not f.metadata.get("nested")}


def all_option_names() -> set[str]:
    return (option_names(EngineConfig) | option_names(SchedulerConfig)
            | {n for p in policies.REGISTRY for n in option_names(policies.options_class(p))})
