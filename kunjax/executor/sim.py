"""Simulated time: executors whose durations come from the cost model (`kunjax.cost_model`), on a virtual clock.

* `ModelledTime` keeps the time: which instances each serving unit runs on, how long each instance's devices
  are busy in the current engine step (its units' ticks plus the memory operations on it), and the clock. A step
  lasts as long as its busiest device (units run in parallel on their own devices), or, when the profile's
  devices share compute (`concurrent_devices`, CPU devices on one host's cores), at least their total busy
  time over that many; a fuse or split stops the engine, so it advances the clock at once.
* `CostModelExecutor` — no model, no weights: the engine's host code (router, scheduler, books, every policy with
  its drops, exchanges and restores) runs against durations from a hardware profile, at any scale. Tokens are
  synthesized from each row's sampling seed and counter (never an EOS or a suppressed id), so a request ends at
  its `max_tokens` (its trace output length); its KV is not simulated (the arithmetic executor does that), but
  every memory operation is booked and timed as usual. It reads only each tick's `TickWork`: the padded host
  arrays are never built.
* `ModelledTimeExecutor` — wraps another executor (the JAX one: real tokens, real drops, real KV moves) and
  replaces its measured durations with modelled ones, so a CPU run keeps the schedule the profiled device would.

Deterministic: nothing here reads the wall clock or a random source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kunjax.clock import Clock
from kunjax.config import ConfigError, EngineConfig, ModelConfig
from kunjax.cost_model import CostModel
from kunjax.executor import Executor, TickResult
from kunjax.hardware import HardwareProfile
from kunjax.memory import num_kv_blocks, weight_bytes_per_device
from kunjax.plan import Fuse, MemoryOp, Sampled, Split, StepInputs, TickWork, UnitShape


class ModelledTime:
    """The time of one engine on one virtual clock (see the module docstring)."""

    def __init__(self, cost: CostModel, clock: Clock, num_instances: int):
        if not clock.virtual:
            raise ValueError("modelled time needs a virtual clock (it advances it)")
        self.cost, self.clock = cost, clock
        self.members: dict[int, tuple[int, ...]] = {i: (i,) for i in range(num_instances)}
        self.busy: dict[int, float] = {}
        self.ticks = 0
        self.transition_seconds = 0.0  # all fuses and splits so far

    def apply(self, ops: Sequence[MemoryOp]) -> None:
        for op in ops:
            match op:
                case Fuse():
                    for i in op.members:
                        self.members.pop(i, None)
                    self.members[op.unit] = op.members
                    self._stop(self.cost.transition_seconds(op, len(op.members)))
                case Split():
                    k = len(self.members.pop(op.unit))
                    for i in op.members:
                        self.members[i] = (i,)
                    self._stop(self.cost.transition_seconds(op, k))
                case _:
                    members = self.members.get(getattr(op, "unit", -1), ())
                    for i, t in self.cost.op_seconds(op, members).items():
                        self.busy[i] = self.busy.get(i, 0.0) + t

    def _stop(self, seconds: float) -> None:
        self.transition_seconds += seconds
        self.clock.advance(seconds)

    def tick(self, uid: int, work: TickWork) -> float:
        members = self.members[uid]
        seconds = self.cost.tick_seconds(len(members), work)
        for i in members:
            self.busy[i] = self.busy.get(i, 0.0) + seconds
        self.ticks += 1
        return seconds

    def end_step(self) -> None:
        if self.busy:
            c = self.cost.profile.concurrent_devices  # devices sharing compute take turns
            busy = max(self.busy.values())
            self.clock.advance(max(busy, sum(self.busy.values()) / c) if c else busy)
        self.busy.clear()


_M64 = (1 << 64) - 1


class Synthesizer:
    """Tokens for the leaving rows from (seed, counter) alone: the same request gets the same tokens in any batch,
    under any policy. Never an id in `forbidden` (EOS) or one the row may not sample yet (`leaving_suppress`).
    Logprobs are 0 and the top-N ids follow the token (only when a leaving row asked for logprobs; constant arrays
    otherwise)."""

    def __init__(self, vocab: int, forbidden: frozenset[int], top_n: int, rows: int):
        self.vocab, self.forbidden = vocab, forbidden
        n = max(top_n, 1)
        self.offsets = np.arange(n, dtype=np.int32)[None, :]
        top_lps = np.tile(np.arange(n, dtype=np.float32) * np.float32(-0.5), (rows, 1))
        logprobs, no_ids = np.zeros(rows, np.float32), np.zeros((rows, n), np.int32)
        for a in (top_lps, logprobs, no_ids):
            a.flags.writeable = False  # shared by every tick
        # Views of the first m rows for every m: indexing a list is cheaper than slicing each tick.
        self.top_lps = [top_lps[:m] for m in range(rows + 1)]
        self.logprobs = [logprobs[:m] for m in range(rows + 1)]
        self.no_ids = [no_ids[:m] for m in range(rows + 1)]

    def __call__(self, work: TickWork) -> Sampled:
        vocab, forbidden = self.vocab, self.forbidden
        tokens = []
        for seed, counter, suppress in zip(work.leaving_seeds, work.leaving_counters, work.leaving_suppress,
                                           strict=True):
            x = (seed * 0x9E3779B97F4A7C15 + counter * 0xBF58476D1CE4E5B9 + 1) & _M64
            x ^= x >> 31
            x = (x * 0x94D049BB133111EB) & _M64
            x ^= x >> 29
            t = 1 + x % (vocab - 1)
            while t in forbidden or t in suppress:
                t = 1 + t % (vocab - 1)
            tokens.append(t)
        m = len(tokens)
        ids = np.array(tokens, np.int32)
        top_ids = (ids[:, None] + self.offsets) % vocab if work.leaving_top_n else self.no_ids[m]
        return Sampled(ids, self.logprobs[m], top_ids, self.top_lps[m])


class CostModelExecutor:
    """See the module docstring; `kunjax.executor.Executor` is the protocol."""

    def __init__(self, cfg: ModelConfig, ecfg: EngineConfig, clock: Clock, profile: HardwareProfile,
                 num_instances: int | None = None, devices_per_host: int = 8):
        self.cfg, self.ecfg, self.profile = cfg, ecfg, profile
        self.num_instances = num_instances or ecfg.num_instances or 8
        self.weight_bytes = weight_bytes_per_device(cfg, ecfg.dtype, ecfg.tp)
        if self.weight_bytes >= profile.memory_bytes * ecfg.kv_memory_fraction:
            raise ConfigError(f"{cfg.num_layers}-layer model: {self.weight_bytes / 2**30:.1f} GiB of weights per "
                              f"device do not fit {profile.name}'s {profile.memory_bytes / 2**30:.0f} GiB at "
                              f"--kv-memory-fraction {ecfg.kv_memory_fraction} in {ecfg.dtype}: raise --tp"
                              + (" or use --dtype bfloat16" if ecfg.dtype == "float32" else ""))
        self.num_blocks = num_kv_blocks(cfg, ecfg, self.weight_bytes, profile.memory_bytes)
        self.load_seconds = 0.0
        self.needs_arrays = False
        self.cost = CostModel(cfg, profile, dtype=ecfg.dtype, tp=ecfg.tp, block_size=ecfg.block_size,
                              devices_per_host=devices_per_host)
        per_host = max(devices_per_host // ecfg.tp, 1)
        self.instances_per_host = per_host if self.num_instances > per_host else None
        self.time = ModelledTime(self.cost, clock, self.num_instances)
        self.synthesize = Synthesizer(cfg.vocab_size, frozenset(cfg.eos_token_ids), ecfg.max_logprobs,
                                      ecfg.scheduler.max_num_seqs)

    def describe(self, instance: int) -> str:
        tp = self.ecfg.tp
        return f"sim:{self.profile.name}[{instance * tp}..{instance * tp + tp - 1}]"

    def warmup(self, units: Sequence[tuple[int, tuple[int, ...], UnitShape]],
               candidates: Sequence[tuple[tuple[int, ...], UnitShape]]) -> None:
        """Nothing to compile."""

    def apply(self, ops: Sequence[MemoryOp]) -> None:
        self.time.apply(ops)

    def launch(self, uid: int, work: TickWork, inputs: StepInputs | None) -> tuple[float, TickWork]:
        return self.time.tick(uid, work), work

    def collect(self, launched: tuple[float, TickWork], leaving: bool) -> TickResult:
        seconds, work = launched
        if not leaving:
            return TickResult(None, seconds)
        return TickResult(self.synthesize(work), seconds)

    def end_step(self) -> None:
        self.time.end_step()


class ModelledTimeExecutor:
    """Another executor's work with the cost model's durations (see the module docstring)."""

    def __init__(self, inner: Executor, cost: CostModel, clock: Clock):
        self.inner = inner
        self.time = ModelledTime(cost, clock, inner.num_instances)
        self.num_instances, self.num_blocks = inner.num_instances, inner.num_blocks
        self.weight_bytes, self.load_seconds = inner.weight_bytes, inner.load_seconds
        self.needs_arrays = inner.needs_arrays

    def __getattr__(self, name: str) -> Any:  # the inner executor's own API (e.g. the JAX executor's replicas)
        return getattr(self.inner, name)

    def describe(self, instance: int) -> str:
        return f"{self.inner.describe(instance)} (time: {self.time.cost.profile.name})"

    def warmup(self, units: Sequence[tuple[int, tuple[int, ...], UnitShape]],
               candidates: Sequence[tuple[tuple[int, ...], UnitShape]]) -> None:
        self.inner.warmup(units, candidates)

    def apply(self, ops: Sequence[MemoryOp]) -> None:
        self.inner.apply(ops)
        self.time.apply(ops)

    def launch(self, uid: int, work: TickWork, inputs: StepInputs | None) -> tuple[Any, float]:
        return self.inner.launch(uid, work, inputs), self.time.tick(uid, work)

    def collect(self, launched: tuple[Any, float], leaving: bool) -> TickResult:
        handle, seconds = launched
        return TickResult(self.inner.collect(handle, leaving).sampled, seconds)

    def end_step(self) -> None:
        self.inner.end_step()
        self.time.end_step()
