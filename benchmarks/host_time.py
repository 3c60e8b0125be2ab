"""Host time per engine step: where the engine's one Python thread spends a decode step, phase by phase, at 8, 64
and 256 running sequences, for a replica and for a 4-stage pipeline group.

    python benchmarks/host_time.py                          # the arithmetic executor: no device, all host
    python benchmarks/host_time.py --executor jax           # the demo model on 4 CPU devices
    python benchmarks/host_time.py --executor sim           # the cost-model executor: host work, caches warm
    python benchmarks/host_time.py --profile top.txt        # and a cProfile of the 256-sequence replica steps
    python benchmarks/host_time.py --executor jax --stages 1 --loop both   # serial vs overlapped, side by side
    python benchmarks/host_time.py --stages 1 --seqs 256 --repeat 3        # the issue's check, three times

Each configuration admits N requests (32-token prompts, outputs longer than the run, EOS ignored), runs until all
N are decoding, then times `--steps` engine steps. A timer wraps each phase (for this measurement only):

* schedule — `ServingUnit.advance`: scheduling, admission and the micro-batch entering the pipe;
* pack — `tick_work` and `tick_inputs`: the tick's counts and its padded input arrays;
* launch — `Executor.launch`: on the JAX executor the dispatch (host), on the arithmetic one its whole
  computation (standing in for the device);
* collect — `Executor.collect`: on the JAX executor, waiting for the device and reading the tokens back;
* apply — `ServingUnit.exit` and the engine's token append (stop checks, outputs), less detokenize;
* detokenize — the incremental detokenizers (a model with a tokenizer only);
* issue — memory operations handed to the executor;
* other — the rest of `LLMEngine.step` (the router, the policy's step hooks, the loop itself);
* read (not part of the step) — a streaming reader building every output of the step (`list(outputs)`): a
  running request's delta is recorded by the step and built into its `RequestOutput` when read.

Host time per step = the step less launch and collect on the arithmetic executor (its launch is the "device"),
less collect on the JAX executor (the dispatch is host work; the wait is the device's).

`--executor sim` runs the same engine on the cost-model executor (`kunjax.executor.sim`: the same Llama-3-8B
shape, durations from the `h100-sxm` profile on the virtual clock, no computation), with each tick's host arrays
built as an executor that reads them needs them: the host work of a step with nothing else on the host's core
between steps. The arithmetic executor's "device" is numpy on the host's own core: at 256 sequences it streams
a few MB of simulated KV per tick through the caches, so the host's first passes over the requests after each
tick start from cold caches, which a real accelerator (its own memory) would not cause. The two executors give
the host time with caches as the arithmetic device leaves them, and warm.

The phase timers cost about 1 µs per wrapped call (a few hundred calls a step at 256 sequences: `_append_token`
is one call per sequence), which the phases then report as host time. `--timers device` wraps only `launch` and
`collect` (two calls a step), so its `host` carries almost no timer overhead: the honest total. `--timers both`
(the default) measures each configuration twice, phases first, then device only (a fresh engine each): the
phases say where the time goes, the `device`-timed row how much there is.

`--gc serve` (the default) tunes the collector once the requests run as `kunjax serve` does after its warm-up
(`kunjax.engine_thread.quiet_gc`: `gc.freeze()`, so a full collection does not walk the imported modules, the
engine and its books, and a first-generation threshold a step's short-lived objects do not reach); `--gc freeze`
only freezes (what `serve` did before `quiet_gc`: use it for code older than that); `--gc default` leaves the
collector as it is.
The `gc` columns count the collections during the timed steps and the time in them (JAX's own callback, which
runs on every collection, included).

`--loop serial` (default) runs the serial step, `overlap` the overlapped one (`--async-scheduling`,
kunjax/overlap.py), `both` one after the other for each configuration, in one process. On the JAX executor
`device idle` is the share of each cycle (a step plus the reader's `read`) the device waits for the host:
serially, everything but the wait in `collect` (the device is idle while the host works); overlapped, the gap
between collecting tick t and launching t+1 (patch and dispatch), plus the host work done while t+1 ran whenever
the host then found t+1 already finished (its `collect` waited under 0.2 ms: how long the device had been idle is
unknown, so all of that host work is counted as idle; `done first` counts those steps). Times are wall clock on a
shared machine: compare the phases and the configurations of one run.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import io
import itertools
import os
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("schedule", "pack", "launch", "collect", "apply", "detokenize", "issue", "other")


class Timers:
    """Seconds per phase, accumulated by wrapped callables; a phase nested in another is not counted twice."""

    def __init__(self):
        self.s: collections.Counter[str] = collections.Counter()
        self._stack: list[list[float]] = []  # per open phase: [start, seconds of phases nested in it]

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                start, inner = self._stack.pop()
                dt = time.perf_counter() - start
                self.s[phase] += dt - inner
                if self._stack:
                    self._stack[-1][1] += dt
        return timed


def build(executor: str, k: int, n: int, steps: int, overlap: bool = False):
    """An engine with `n` running decodes on one unit of `k` stages (a replica, or a group fused from k);
    `overlap`: the overlapped step loop."""
    from kunjax.engine import LLMEngine, config_from_kwargs
    from kunjax.model_shapes import model_shape

    blocks = n * -(-(32 + 64 + steps) // 16) // k + 64  # per instance: the unit's share of every sequence's KV
    options = dict(num_instances=k, block_size=16, num_blocks=blocks, max_num_seqs=n, max_num_batched_tokens=max(
        n, 512), max_model_len=512, min_token_bucket=16, enable_prefix_caching=False, async_scheduling=overlap)
    if k > 1:
        options.update(policy="kunserve", kunserve_max_group=k, restore_window_steps=10**9)
    if executor in ("arith", "sim"):
        from kunjax.hardware import load_profile

        model = model_shape("llama-3-8b")
        profile = load_profile("h100-sxm") if executor == "sim" else None
        eng = LLMEngine(model, config_from_kwargs(**options), executor=executor, profile=profile)
        eng.executor.needs_arrays = True  # (sim: the tick's host arrays built as a device executor needs them)
    else:
        import jax

        from kunjax.demo import ensure_demo_model

        eng = LLMEngine(ensure_demo_model(), config_from_kwargs(**options), devices=jax.devices()[:k])
    if k > 1:
        from kunjax.policies.base import FuseUnits

        eng.transition(FuseUnits(tuple(range(k)), "host-time benchmark"))  # the policy keeps it (no restore)
    eng.warmup()
    return eng


def measure(executor: str, k: int, n: int, steps: int, profile: Path | None = None,
            overlap: bool = False, phases: bool = True, gc_mode: str = "serve") -> dict[str, float]:
    """Per-step milliseconds of one configuration; `phases` False: only `launch` and `collect` are timed;
    `gc_mode`: how the collector is set once every request runs (module docstring)."""
    from kunjax.sampling_params import SamplingParams

    eng = build(executor, k, n, steps, overlap)
    vocab = eng.model_config.vocab_size
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    for i in range(n):
        eng.add_request([(7 * i + j) % (vocab - 3) + 3 for j in range(32)], params)
    for _ in range(200):  # prefill until every request decodes
        eng.step()
        if all(len(r.token_ids) > r.num_prompt_tokens for r in eng.requests.values()):
            break
    threshold = gc.get_threshold()
    if gc_mode == "serve":
        from kunjax.engine_thread import quiet_gc

        quiet_gc()
    elif gc_mode == "freeze":
        gc.collect()
        gc.freeze()
    try:
        return _timed(eng, executor, k, n, steps, profile, phases)
    finally:  # the next configuration's engine starts from a clean heap
        gc.unfreeze()
        gc.set_threshold(*threshold)


def _timed(eng, executor: str, k: int, n: int, steps: int, profile: Path | None, phases: bool
           ) -> dict[str, float]:
    from kunjax.detokenizer import IncrementalDetokenizer
    from kunjax.engine import LLMEngine

    unit = next(iter(eng.units.values()))
    assert unit.k == k and len(unit.running) == n, f"{len(unit.running)} of {n} running on a {unit.k}-stage unit"
    t = Timers()
    ex = eng.executor
    ov = eng.overlap
    gcs = [0, 0.0]  # cyclic garbage collections during the timed steps, seconds in them (JAX's callback included)

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gcs[1] -= time.perf_counter()
        else:
            gcs[0] += 1
            gcs[1] += time.perf_counter()
    gc.callbacks.insert(0, on_gc)
    if phases:
        unit.advance = t.wrap("schedule", unit.advance)
        unit.tick_work = t.wrap("pack", unit.tick_work)
        unit.tick_inputs = t.wrap("pack", unit.tick_inputs)
        unit.exit = t.wrap("apply", unit.exit)
        if ov is not None:  # its own part of `_ahead` commits tick t early, its `_apply` hands t's tokens out
            ov._ahead = t.wrap("apply", ov._ahead)
            ov._apply = t.wrap("apply", ov._apply)
    events: list[tuple[str, float, float]] = []  # (collect | launch, start, end): the device's timeline, seen

    def traced(kind: str, fn: Callable) -> Callable:
        def call(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                events.append((kind, start, time.perf_counter()))
        return call

    ex.launch = t.wrap("launch", traced("launch", ex.launch))
    ex.collect = t.wrap("collect", traced("collect", ex.collect))
    add = IncrementalDetokenizer.add
    step = LLMEngine.step.__get__(eng)
    if phases:
        eng._append_token = t.wrap("apply", eng._append_token)
        eng._issue = t.wrap("issue", eng._issue)
        IncrementalDetokenizer.add = t.wrap("detokenize", add)
        step = t.wrap("other", step)
    prof = cProfile.Profile() if profile is not None else None
    try:
        if prof is not None:
            prof.enable()
        total = read = 0.0
        cycles: list[tuple[float, float]] = []  # per step: (start, end of its reading)
        timed: collections.Counter[str] = collections.Counter()
        gcs_timed = [0, 0.0]
        for _ in range(steps + 1):  # (one more: its collect says whether the device was still busy)
            if len(cycles) == steps:  # the phases and collections of the timed steps only
                timed, gcs_timed = collections.Counter(t.s), list(gcs)
            t0 = time.perf_counter()
            outs = step()
            t1 = time.perf_counter()
            list(outs)
            if len(cycles) < steps:
                total += t1 - t0
                read += time.perf_counter() - t1
            cycles.append((t0, time.perf_counter()))
        if prof is not None:
            prof.disable()
    finally:
        IncrementalDetokenizer.add = add
        gc.callbacks.remove(on_gc)
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        profile.write_text(out.getvalue())
    per = {p: 1e3 * timed[p] / steps for p in PHASES}
    per["step"] = 1e3 * total / steps
    per["gc"], per["gc_ms"] = gcs_timed[0] / steps, 1e3 * gcs_timed[1] / steps
    per["read"] = 1e3 * read / steps
    device = per["launch"] + per["collect"] if executor in ("arith", "sim") else per["collect"]
    per["host"] = per["step"] - device
    if not phases:  # untimed phases: only the total is known
        for p in PHASES:
            if p not in ("launch", "collect"):
                per[p] = float("nan")
    per["idle"], per["done_first"] = device_idle(events, cycles, steps)
    per["overlapped"] = ov.overlapped if ov is not None else 0
    return per


BUSY_WAIT_S = 2e-4  # a collect that waited less found its tick already finished


def device_idle(events: list[tuple[str, float, float]], cycles: list[tuple[float, float]], steps: int
                ) -> tuple[float, int]:
    """The share of the first `steps` cycles the device sat idle waiting for the host (module docstring), and in
    how many the host found the device done first. One unit: at most one tick in flight."""
    idle = total = 0.0
    done_first = 0
    for i in range(steps):
        start, end = cycles[i]
        nxt_start, nxt_end = cycles[i + 1]
        mine = [e for e in events if start <= e[1] < end]
        waits = [e for e in mine if e[0] == "collect"]
        wait = sum(e[2] - e[1] for e in waits)
        launches = [e for e in mine if e[0] == "launch"]
        cycle = end - start
        total += cycle
        if not launches or not waits or launches[-1][1] < waits[-1][2]:  # serial (or nothing in flight after)
            idle += cycle - wait
            continue
        gap = launches[-1][2] - waits[-1][2]  # collect t .. t+1 dispatched
        hidden = cycle - wait - gap  # host work while t+1 ran
        later = [e for e in events if e[0] == "collect" and nxt_start <= e[1] < nxt_end]
        if later and later[0][2] - later[0][1] >= BUSY_WAIT_S:
            idle += gap
        else:
            idle += gap + hidden
            done_first += 1
    return (idle / total if total else 0.0), done_first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--executor", choices=("arith", "sim", "jax"), default="arith",
                    help="arith: the arithmetic executor (its numpy work is the device); sim: the cost-model "
                         "executor (no computation: the host's caches stay warm); jax: the demo model")
    ap.add_argument("--seqs", default="8,64,256", help="running sequences per configuration")
    ap.add_argument("--stages", default="1,4", help="1: a replica; 4: a 4-stage pipeline group")
    ap.add_argument("--steps", type=int, default=50, help="decode steps timed per configuration (at most 300)")
    ap.add_argument("--loop", choices=("serial", "overlap", "both"), default="serial",
                    help="the serial step loop, the overlapped one (--async-scheduling), or both side by side")
    ap.add_argument("--timers", choices=("phases", "device", "both"), default="both",
                    help="time every phase, only launch and collect (no timer overhead in the host total), or "
                         "both, one after the other")
    ap.add_argument("--repeat", type=int, default=1, help="measure each configuration this many times")
    ap.add_argument("--gc", choices=("serve", "freeze", "default"), default="serve",
                    help="serve: the collector tuned as `kunjax serve` tunes it after warm-up (quiet_gc); freeze: "
                         "gc.freeze() only; default: Python's collector as it is")
    ap.add_argument("--profile", type=Path, default=None,
                    help="write a cProfile (top 25 by own time) of the largest replica configuration here")
    args = ap.parse_args(argv)
    stages = [int(s) for s in args.stages.split(",")]
    seqs = [int(s) for s in args.seqs.split(",")]
    if args.executor == "jax":
        os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={max(stages)}")
    sys.path.insert(0, str(ROOT))
    loops = ("serial", "overlap") if args.loop == "both" else (args.loop,)
    timers = ("phases", "device") if args.timers == "both" else (args.timers,)
    head = (f"| unit | seqs | loop | timers | step ms | host ms | {' | '.join(PHASES)} | read | device idle "
            f"| done first | overlapped steps | gc per step | gc ms | load |")
    print(f"host time per decode step, {args.executor} executor, {args.steps} steps each (ms per step), gc "
          f"{args.gc}; load "
          f"average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(head + "\n|" + "---|" * (13 + len(PHASES)))
    idle: dict[tuple[str, int, int], float] = {}
    for k in stages:
        for n in seqs:
            for loop, how, _ in itertools.product(loops, timers, range(args.repeat)):
                prof = (args.profile if args.profile is not None and k == 1 and n == max(seqs) and how == timers[0]
                        else None)  # (the phase-timed run when there is one, else the device-timed one)
                r = measure(args.executor, k, n, args.steps, prof, overlap=loop == "overlap", phases=how == "phases",
                            gc_mode=args.gc)
                idle[loop, k, n] = r["idle"]
                unit = "replica" if k == 1 else f"{k}-stage group"
                shown = f"{100 * r['idle']:.0f}%" if args.executor == "jax" else "-"
                print(f"| {unit} | {n} | {loop} | {how} | {r['step']:.2f} | {r['host']:.2f} | "
                      + " | ".join("-" if r[p] != r[p] else f"{r[p]:.2f}" for p in PHASES)
                      + f" | {r['read']:.2f} | {shown} | {r['done_first']} | {r['overlapped']} "
                      f"| {r['gc']:.2f} | {r['gc_ms']:.2f} | {os.getloadavg()[0]:.2f} |", flush=True)
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.profile is not None:
        print(f"\nprofile: {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
