"""The overlapped step loop (`--async-scheduling`): a replica's next tick is scheduled and packed while its
current one runs on the device, and the current one's tokens are applied after the next one is launched.

One overlapped engine step of a replica with tick t in flight (launched by the previous step):

1. *ahead*: t's micro-batch leaves the books' pipe (`_ahead`): its KV is committed as `ServingUnit.exit` would,
   and each request that samples a token at t gets a placeholder (`PLACEHOLDER`) as its next token, unless that
   token is its last (`max_tokens`, the context); the unit schedules and packs t+1 over that state (a request
   of t decodes its placeholder at t+1; counters and `min_tokens` counts see t's token, as in the serial loop);
2. t is collected (the only wait), its sampled ids are written into t+1's `tokens_in` rows that hold a
   placeholder (one numpy fancy index: `StepInputs.tokens_in[dst] = Sampled.tokens[src]`), and t+1 is launched;
3. t's tokens are applied (`LLMEngine._append_token`: stop checks, detokenization, outputs) while t+1 runs. A
   request that stops at t (EOS, a stop id or string) has a row in t+1: it leaves the unit as an abort in flight
   does (`ServingUnit.abort`), its blocks freed when t+1 leaves, t+1's token for it dropped. The KV t+1 wrote
   for it lands in its own last, partial block, which the prefix index never holds.

So the device idles only between t's collect and t+1's launch (the patch and the dispatch); everything else the
host does for a step — apply t, return the outputs, the caller's reading, the router, the policy's `after_step`,
scheduling and packing t+2 — runs while t+1 does. Memory operations the scheduling of t+1 queued (host-tier
swap-ins of cached prefixes, spills) are issued after t's launch and before t+1's, so they are ordered after t on
the device (its pool is donated to t) and before t+1, as in the serial loop.

A step runs serially instead (`serial_reason`; any tick in flight is collected and applied first, `drain`)
when the option is off or cannot hold for this engine (an executor that reads no arrays, injected faults, a
multi-host group, a policy that does not declare `Capabilities.overlap`, layer-group tables), and, step by step,
while a pipeline unit exists, `--roles` hands requests over, prefix transfers are on, a unit has requests
swapped out, or a unit's free blocks do not cover every running request's next chunk (so scheduling cannot
preempt anything: a preemption of a request with a placeholder would requeue an unknown token). Before a
policy's transition (fuse, split) the engine drains the ticks in flight. The outputs are token-identical to the
serial loop: every tick computes the same rows from the same KV; only when the host learns of them changes.

Owns the ticks in flight between steps (`flights`); never touches device memory.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Protocol

import numpy as np

from kunjax.executor import Executor, ExecutorLost
from kunjax.microbatch import MicroBatch
from kunjax.plan import StepInputs, TickWork
from kunjax.policies.base import Capabilities, MemoryPolicy
from kunjax.request import Request, StepOutputs
from kunjax.unit import ServingUnit

PLACEHOLDER = -1  # a token id no vocabulary has: a request's next token while the tick sampling it runs


class OverlapEngine(Protocol):
    """What the overlapped loop uses of `kunjax.engine.LLMEngine`."""

    units: dict[int, ServingUnit]
    requests: dict[str, Request]
    executor: Executor
    policy: MemoryPolicy
    caps: Capabilities
    clock: Any
    _lost: set[int]
    _health: dict[int, list[float]]

    def _issue(self) -> None: ...

    def _lose_unit(self, unit: ServingUnit, kind: str, error: str) -> None: ...

    def _finish_tick(self, unit: ServingUnit, leaving: MicroBatch | None, launched: Any,
                     outputs: StepOutputs) -> None: ...

    def _append_token(self, unit: ServingUnit, req: Request, token: int, logprob: float, sampled: Any,
                      row: int, now: float, outputs: StepOutputs) -> bool: ...


@dataclasses.dataclass(slots=True)
class InFlight:
    """A replica's tick launched and not yet collected."""

    mb: MicroBatch
    launched: Any  # the executor's handle
    tokens: int  # the tick's tokens (what `MemoryPolicy.observe_tick` is told)


@dataclasses.dataclass(slots=True)
class Ahead:
    """One unit's work in an overlapped step: the tick in flight (if any) and the next one, packed."""

    flight: InFlight | None
    samples: list[tuple[Request, int]]  # t's requests that sampled: (request, row of t's `Sampled`)
    projected: list[Request]  # those given a placeholder token
    work: TickWork | None = None  # t+1 (None: nothing to run)
    inputs: StepInputs | None = None
    dst: np.ndarray | None = None  # [P] int: rows of t+1's `tokens_in` holding a placeholder
    src: np.ndarray | None = None  # [P] int: the rows of t's `Sampled.tokens` that go there


class OverlapLoop:
    """The overlapped step of an engine's replicas (module docstring); counts its steps and why others ran
    serially (`reasons`)."""

    def __init__(self, engine: OverlapEngine, *, multihost: bool, faulty: bool, prefix_transfers: bool,
                 handoff: bool, block_size: int):
        self.engine = engine
        self.block_size = block_size
        self.flights: dict[int, InFlight] = {}
        self.overlapped = 0  # steps run overlapped
        self.reasons: collections.Counter[str] = collections.Counter()  # steps run serially, by reason
        self.never = self._never(engine, multihost, faulty)
        self._step_checks: tuple[tuple[bool, str], ...] = (
            (prefix_transfers, "prefix transfers between units are on"),
            (handoff, "--roles hands requests between units"))

    @staticmethod
    def _never(engine: OverlapEngine, multihost: bool, faulty: bool) -> str | None:
        caps = engine.caps
        if not engine.executor.needs_arrays:
            return "the executor reads no step inputs to patch"
        if faulty:
            return "faults are injected"
        if multihost:
            return "a multi-host group"
        if not caps.overlap:
            return f"the {engine.policy.name} policy does not declare it safe"
        if caps.layer_groups > 1:
            return "layer-group tables"
        return None

    # ---- when ---------------------------------------------------------------------------------------
    def serial_reason(self) -> str | None:
        """Why this step must run serially; None: it may overlap."""
        if self.never is not None:
            return self.never
        for on, why in self._step_checks:
            if on:
                return why
        for u in self.engine.units.values():
            if u.k > 1:
                return "a pipeline unit exists"
            if not u.has_work:
                continue
            if u.swapped:
                return "a unit has requests swapped out"
            # Every running request's next chunk fits without preempting: a decode needs at most one new block,
            # prefill chunks at most the token budget's blocks plus one each.
            if u.num_allocatable < len(u.running) + math.ceil(u.shape.tokens / self.block_size):
                return "a unit may have to preempt"
        return None

    # ---- the overlapped step ------------------------------------------------------------------------
    def step(self, outputs: StepOutputs) -> None:
        """Collect every replica's tick t, launch its t+1 (scheduled while t ran), apply t's tokens."""
        eng = self.engine
        ex, lost = eng.executor, eng._lost
        self.overlapped += 1
        plan: dict[int, Ahead] = {}
        units = [u for u in eng.units.values() if u.has_work]
        for u in units:
            flight = self.flights.pop(u.uid, None)
            if u.uid in lost:  # lost by another unit's memory operation: its requests are being recomputed
                continue
            plan[u.uid] = self._ahead(u, flight)
            eng._issue()  # what scheduling t+1 decided (host-tier swap-ins, spills): after t, before t+1
        applies: list[tuple[ServingUnit, Ahead, Any]] = []
        for u in units:
            if u.uid in lost:
                continue
            ahead = plan[u.uid]
            sampled = None
            if ahead.flight is not None:
                try:
                    result = ex.collect(ahead.flight.launched, True)
                except ExecutorLost:  # the whole executor is gone, not one unit: nothing to recover
                    raise
                except Exception as e:
                    self._fail(u, ahead, e)
                    continue
                if eng._health:
                    eng._health.pop(u.uid, None)  # it works again
                eng.policy.observe_tick(u, ahead.flight.tokens, result.seconds)
                sampled = result.sampled
                applies.append((u, ahead, sampled))
            if ahead.work is None:
                continue
            if ahead.dst is not None and len(ahead.dst):
                ahead.inputs.tokens_in[ahead.dst] = sampled.tokens[ahead.src]
            try:
                launched = ex.launch(u.uid, ahead.work, ahead.inputs)
            except ExecutorLost:
                raise
            except Exception as e:  # t's tokens are dropped too: the retry samples them again, identically
                if applies and applies[-1][0] is u:
                    applies.pop()
                self._fail(u, ahead, e)
                continue
            mb = u.at_stage[0]
            self.flights[u.uid] = InFlight(mb, launched, u.last_tick[0])
            eng.policy.after_launch(u, mb)
            eng._issue()
        for u, ahead, sampled in applies:
            if u.uid not in lost:
                self._apply(u, ahead, sampled, outputs)
        for uid in lost:  # (a unit lost at any point above: its tick's tokens are recomputed, not applied)
            self.flights.pop(uid, None)
            if uid in plan:
                self._undo(plan[uid])

    def _ahead(self, u: ServingUnit, flight: InFlight | None) -> Ahead:
        """Tick t (`flight`) leaves the books' pipe one tick early; t+1 is scheduled and packed."""
        samples: list[tuple[Request, int]] = []
        projected: list[Request] = []
        if flight is not None:
            u.at_stage[-1] = None
            for i, it in enumerate(flight.mb.items):
                req = it.req
                req.in_flight = False
                if req.aborted:  # aborted while t ran: as `ServingUnit.exit`
                    u.aborted_in_flight.remove(req)
                    u.release(req)
                    continue
                u.commit(req, it.start + it.num_tokens)
                if it.sample:
                    samples.append((req, i))
                    if len(req.token_ids) + 1 < req.max_total_len:  # (its last token: nothing to schedule)
                        req.token_ids.append(PLACEHOLDER)
                        projected.append(req)
        ahead = Ahead(flight, samples, projected)
        preemptions = u.num_preemptions
        _, active = u.advance()
        # `serial_reason` made sure of it: a preempted request holding a placeholder would requeue an unknown token
        assert u.num_preemptions == preemptions and not u.swapped, "an overlapped step preempted"
        if not active:
            return ahead
        ahead.work = u.tick_work()
        ahead.inputs = u.tick_inputs()
        if projected:
            ahead.dst, ahead.src = patch_rows(u.at_stage[0], ahead.inputs.tokens_in, dict(samples))
        return ahead

    def _apply(self, u: ServingUnit, ahead: Ahead, sampled: Any, outputs: StepOutputs) -> None:
        """t's tokens join their requests (in micro-batch order, as the serial loop applies them)."""
        eng = self.engine
        now = eng.clock.now()
        tokens, logprobs = sampled.tokens.tolist(), sampled.logprobs.tolist()
        projected = set(ahead.projected)
        append, requests = eng._append_token, eng.requests
        for req, row in ahead.samples:
            if req in projected:
                req.token_ids.pop()  # the placeholder: `_append_token` appends the token
            if append(u, req, int(tokens[row]), float(logprobs[row]), sampled, row, now, outputs):
                requests.pop(req.request_id, None)

    def _undo(self, ahead: Ahead) -> None:
        """The unit was lost (its requests requeued or ended): take the placeholders back out."""
        for req in ahead.projected:
            if req.token_ids and req.token_ids[-1] == PLACEHOLDER:
                req.token_ids.pop()
        ahead.projected = []

    def _fail(self, u: ServingUnit, ahead: Ahead, e: Exception) -> None:
        self._undo(ahead)
        self.engine._lose_unit(u, "step", f"a device step failed: {type(e).__name__}: {e}")

    # ---- back to serial -----------------------------------------------------------------------------
    def drain(self, outputs: StepOutputs) -> None:
        """Collect and apply every tick in flight, as the serial loop would (before a serial step or a
        transition)."""
        eng = self.engine
        for uid, flight in list(self.flights.items()):
            del self.flights[uid]
            u = eng.units.get(uid)
            if u is not None and uid not in eng._lost:
                eng._finish_tick(u, flight.mb, flight.launched, outputs)

    def note_serial(self, reason: str) -> None:
        self.reasons[reason] += 1


def patch_rows(mb: MicroBatch, tokens_in: np.ndarray, src_rows: dict[Request, int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Where t's sampled ids go in t+1's inputs. `tokens_in`: [T] int32, t+1's packed tokens (placeholders where a
    request decodes the token t is sampling); `src_rows`: request -> its row in t's `Sampled`. Returns (dst [P],
    src [P]): `tokens_in[dst] = sampled.tokens[src]` fills every placeholder. A placeholder is always a request's
    last known token, so it is the last token of its item's chunk."""
    dst: list[int] = []
    src: list[int] = []
    row = 0
    for it in mb.items:
        row += it.num_tokens
        if tokens_in[row - 1] == PLACEHOLDER:
            dst.append(row - 1)
            src.append(src_rows[it.req])
    return np.asarray(dst, np.int64), np.asarray(src, np.int64)

