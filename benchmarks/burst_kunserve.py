"""A request burst replayed against `--policy recompute` and `--policy kunserve`, side by side in one run.

    python benchmarks/burst_kunserve.py                               # CPU, 4 simulated devices, demo model
    python benchmarks/burst_kunserve.py --trace ../shared/traces/azure_llm_2023_conv.csv --out burst.json

Both policies get the same model, the same per-device memory budget, the same prompts and the same arrival
times. The budget is set so the weights are `--weight-fraction` of each device's memory and the KV pool gets the
rest (`EngineConfig.device_memory_bytes`). The workload: Poisson background arrivals at `--background-rate`
throughout, and after `--lead-seconds` a burst whose total KV need (prompt + output tokens, in blocks) is
`--burst-factor` times the instances' KV capacity, arriving within `--burst-seconds`; the background goes on for
`--tail-seconds` after it, then nothing arrives while the queue drains. Under recompute the burst queues (and
the latest arrival is preempted when blocks run out); under kunserve, overloaded instances fuse into pipeline
groups whose freed weight memory becomes extra KV blocks, and the replicas are restored after the burst.

Prompt and output lengths are synthetic (seeded, uniform) by default, or taken from the
`(ContextTokens, GeneratedTokens)` columns of an Azure-LLM-2023-format CSV (`--trace`), scaled so that the
trace's 99th percentiles map to `--max-prompt-len` / `--max-output-len` and clipped to the configured ranges.
Prompt tokens are random ids (seeded); decoding is greedy with EOS ignored, so every request produces exactly
its output length, and the two policies' outputs can be compared token for token.

The replay is wall-clock driven: before every engine step it adds the requests whose arrival offset has
passed; when the engine is idle it sleeps until the next arrival. Latencies count from each request's
scheduled arrival (replay start + offset), so the wait for the engine's current step to end before the request
is added counts too. TTFT: scheduled arrival to the first output token; TPOT: (finish - first token) / (output
tokens - 1). Load and warm-up (ahead-of-time compilation) are excluded and reported separately. After the last
request finishes the engine keeps stepping idle (not measured) so that kunserve's restore can complete.
Each policy is replayed `--repeats` times, alternating which goes first; the printed P99 TTFT ratio is the
median of the per-repeat ratios. Per-step times (with and without a fused group), the process's CPU time and
the host's load average are printed too, so a run disturbed by other work on the machine shows as such.

This is a measurement, not a test: nothing is asserted. On CPU the simulated devices share the host's cores,
so absolute times mean little; compare the two policies' figures, which come from the same run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import faulthandler
import gc
import json
import math
import os
import random
import sys
import time
from pathlib import Path

POLICIES = ("recompute", "kunserve")


@dataclasses.dataclass(frozen=True)
class Arrival:
    request_id: str
    offset: float  # seconds after the replay start
    prompt: list[int]
    max_tokens: int
    burst: bool


@dataclasses.dataclass
class Timing:
    """One request's measured times (`time.monotonic()` seconds) and outcome under one policy."""

    scheduled: float  # replay start + arrival offset
    added: float  # when add_request was called
    first_token: float | None = None
    finish: float | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    preemptions: int = 0


def _percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ---- workload ------------------------------------------------------------------------------------------------
def synthetic_lengths(rng: random.Random, args: argparse.Namespace):
    while True:
        yield (rng.randint(args.min_prompt_len, args.max_prompt_len),
               rng.randint(args.min_output_len, args.max_output_len))


def trace_lengths(path: Path, args: argparse.Namespace):
    """(prompt, output) lengths from an Azure-2023-format CSV, scaled to the demo model, from row `--trace-start`
    on (cycling): the trace's 99th percentiles map to the configured maxima, then lengths are clipped."""
    with open(path, newline="") as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    if not rows:
        raise SystemExit(f"{path}: no rows")
    p_scale = args.max_prompt_len / max(_percentile([float(c) for c, _ in rows], 99), 1.0)
    o_scale = args.max_output_len / max(_percentile([float(g) for _, g in rows], 99), 1.0)
    i = args.trace_start % len(rows)
    while True:
        ctx, gen = rows[i]
        yield (min(max(round(ctx * p_scale), args.min_prompt_len), args.max_prompt_len),
               min(max(round(gen * o_scale), args.min_output_len), args.max_output_len))
        i = (i + 1) % len(rows)


def build_workload(args: argparse.Namespace, capacity_blocks: int, block_size: int, vocab: int) -> list[Arrival]:
    """Background Poisson arrivals over the whole window, plus a burst sized by its total KV need."""
    rng = random.Random(args.seed)
    lengths = trace_lengths(args.trace, args) if args.trace else synthetic_lengths(rng, args)
    span = args.lead_seconds + args.burst_seconds + args.tail_seconds
    offsets: list[float] = []
    t = rng.expovariate(args.background_rate) if args.background_rate > 0 else span
    while t < span:
        offsets.append(t)
        t += rng.expovariate(args.background_rate)
    burst_pairs, need = [], 0
    while need < args.burst_factor * capacity_blocks:
        p, o = next(lengths)
        burst_pairs.append((p, o))
        need += math.ceil((p + o) / block_size)
    burst_offsets = sorted(args.lead_seconds + rng.random() * args.burst_seconds for _ in burst_pairs)
    background_pairs = [next(lengths) for _ in offsets]
    items = [(off, pair, False) for off, pair in zip(offsets, background_pairs, strict=True)]
    items += [(off, pair, True) for off, pair in zip(burst_offsets, burst_pairs, strict=True)]
    items.sort(key=lambda x: x[0])
    return [Arrival(f"r{i:04d}", off, [rng.randrange(3, vocab) for _ in range(p)], o, burst)
            for i, (off, (p, o), burst) in enumerate(items)]


# ---- one policy ----------------------------------------------------------------------------------------------
def waiting_requests(eng) -> int:
    return sum(len(u.waiting) for u in eng.units.values())


def replay(eng, workload: list[Arrival], args: argparse.Namespace, compiles: list[int]) -> dict:
    """Drive `eng` through `workload` by the wall clock; returns per-request timings and the run's counters."""
    from kunjax.sampling_params import SamplingParams

    timings: dict[str, Timing] = {}
    requests = {}
    events: list[dict] = []
    seen_events: set[int] = set()
    peak_waiting, steps, timed_out = 0, 0, False
    step_seconds: dict[str, list[float]] = {"replicas": [], "fused": []}  # by whether a group existed
    compiles_before = compiles[0]
    cpu0, load0 = time.process_time(), os.getloadavg()[0]
    start = time.monotonic()
    nxt = 0
    while True:
        now = time.monotonic()
        while nxt < len(workload) and start + workload[nxt].offset <= now:
            a = workload[nxt]
            params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
            eng.add_request(a.prompt, params, request_id=a.request_id)
            timings[a.request_id] = Timing(scheduled=start + a.offset, added=time.monotonic())
            requests[a.request_id] = eng.requests[a.request_id]
            nxt += 1
        if now - start > args.max_replay_seconds:
            timed_out = True
            break
        if eng.has_unfinished():
            fused = bool(eng.groups)
            faulthandler.dump_traceback_later(args.step_timeout, exit=False)
            t0 = time.monotonic()
            outs = eng.step()
            t = time.monotonic()
            faulthandler.cancel_dump_traceback_later()
            steps += 1
            step_seconds["fused" if fused or eng.groups else "replicas"].append(t - t0)
            for out in outs:
                tm = timings[out.request_id]
                if tm.first_token is None and out.outputs[0].delta_token_ids:
                    tm.first_token = t
                if out.finished:
                    tm.finish, tm.output_ids = t, list(out.outputs[0].token_ids)
            peak_waiting = max(peak_waiting, waiting_requests(eng))
            for ev in eng.policy.events:
                if id(ev) not in seen_events:
                    seen_events.add(id(ev))
                    events.append({"t": round(t - start, 3), "kind": ev.kind, "group": ev.group,
                                   "members": list(ev.members), "step": ev.step,
                                   "ms": round(ev.seconds * 1e3, 1), "detail": ev.detail})
        elif nxt < len(workload):
            time.sleep(max(0.0, start + workload[nxt].offset - time.monotonic()))
        else:
            break
    makespan = time.monotonic() - start
    cpu_s, load1 = time.process_time() - cpu0, os.getloadavg()[0]
    compiles_during = compiles[0] - compiles_before
    for rid, req in requests.items():
        timings[rid].preemptions = req.num_preemptions
    settle_steps = 0
    if not timed_out:  # idle steps so a pending restore completes; not measured
        while eng.groups and settle_steps < args.settle_steps:
            eng.step()
            settle_steps += 1
        for ev in eng.policy.events:
            if id(ev) not in seen_events:
                seen_events.add(id(ev))
                events.append({"t": round(time.monotonic() - start, 3), "kind": ev.kind, "group": ev.group,
                               "members": list(ev.members), "step": ev.step, "ms": round(ev.seconds * 1e3, 1),
                               "detail": ev.detail, "after_drain": True})
    return {"timings": timings, "events": events, "peak_waiting": peak_waiting, "steps": steps,
            "makespan_s": makespan, "timed_out": timed_out, "compiles_during_replay": compiles_during,
            "settle_steps": settle_steps, "cpu_s": cpu_s, "loadavg_1min": (load0, load1),
            "step_seconds": step_seconds,
            "elastic": eng.policy.stats()}


def summarize(policy: str, run: dict, workload: list[Arrival]) -> dict:
    tms: dict[str, Timing] = run["timings"]
    ttft = [tm.first_token - tm.scheduled for tm in tms.values() if tm.first_token is not None]
    tpot = [(tm.finish - tm.first_token) / (len(tm.output_ids) - 1) for tm in tms.values()
            if tm.finish is not None and tm.first_token is not None and len(tm.output_ids) > 1]
    burst_ids = {a.request_id for a in workload if a.burst}
    burst_ttft = [tm.first_token - tm.scheduled for rid, tm in tms.items()
                  if rid in burst_ids and tm.first_token is not None]
    done = [tm for tm in tms.values() if tm.finish is not None]
    out_tokens = sum(len(tm.output_ids) for tm in done)
    s = {"policy": policy, "requests": len(workload), "added": len(tms), "completed": len(done),
         "without_first_token": len(tms) - len(ttft),  # non-zero only when the replay timed out
         "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
         "burst_ttft_p50_s": _percentile(burst_ttft, 50), "burst_ttft_p99_s": _percentile(burst_ttft, 99),
         "tpot_p50_s": _percentile(tpot, 50), "tpot_p99_s": _percentile(tpot, 99),
         "add_lag_mean_s": sum(tm.added - tm.scheduled for tm in tms.values()) / max(len(tms), 1),
         "preemptions": sum(tm.preemptions for tm in tms.values()), "peak_waiting": run["peak_waiting"],
         "steps": run["steps"], "makespan_s": run["makespan_s"], "output_tokens": out_tokens,
         "output_tok_s": out_tokens / run["makespan_s"] if run["makespan_s"] > 0 else float("nan"),
         "timed_out": run["timed_out"], "compiles_during_replay": run["compiles_during_replay"],
         "process_cpu_s": run["cpu_s"], "loadavg_1min_start_end": run["loadavg_1min"]}
    for mode, xs in run["step_seconds"].items():
        s[f"steps_{mode}"] = len(xs)
        s[f"step_mean_s_{mode}"] = sum(xs) / len(xs) if xs else float("nan")
    if policy == "kunserve":
        st = run["elastic"]
        s.update(drops=st["drops"], restores=st["restores"], groups_left=st["groups"],
                 blocks_exchanged=st["blocks_exchanged"], settle_steps=run["settle_steps"], events=run["events"])
    return s


# ---- main ----------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="model directory or 'demo' (default)")
    ap.add_argument("--devices", type=int, default=4, help="devices = instances (CPU: simulated; default 4)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, run in this order")
    ap.add_argument("--repeats", type=int, default=2,
                    help="replays per policy, alternating the order (recompute first, then kunserve first, ...); "
                         "the ratio printed is the median over repeats (default 2)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--weight-fraction", type=float, default=0.45,
                    help="weights' share of each device's memory budget; the KV pool gets the rest (default 0.45)")
    ap.add_argument("--activation-reserve-bytes", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--microbatch-tokens", type=int, default=None,
                    help="kunserve: padded tokens of a pipeline micro-batch (default: the engine's)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the lengths, arrival times and prompt tokens")
    ap.add_argument("--background-rate", type=float, default=1.0, help="background requests/s (Poisson)")
    ap.add_argument("--lead-seconds", type=float, default=5.0, help="background-only time before the burst")
    ap.add_argument("--burst-seconds", type=float, default=2.0, help="window in which the burst arrives")
    ap.add_argument("--tail-seconds", type=float, default=5.0, help="background-only time after the burst")
    ap.add_argument("--burst-factor", type=float, default=2.0,
                    help="the burst's total KV need (prompt + output blocks) / the instances' KV capacity")
    ap.add_argument("--min-prompt-len", type=int, default=32)
    ap.add_argument("--max-prompt-len", type=int, default=256)
    ap.add_argument("--min-output-len", type=int, default=16)
    ap.add_argument("--max-output-len", type=int, default=128)
    ap.add_argument("--trace", type=Path, default=None,
                    help="Azure-2023-format CSV (TIMESTAMP,ContextTokens,GeneratedTokens) for the lengths")
    ap.add_argument("--trace-start", type=int, default=0, help="first trace row used")
    ap.add_argument("--max-replay-seconds", type=float, default=300.0,
                    help="stop a policy's replay after this long and report what finished")
    ap.add_argument("--step-timeout", type=float, default=120.0,
                    help="dump every thread's stack if one engine step takes longer (a hang shows where)")
    ap.add_argument("--settle-steps", type=int, default=256,
                    help="kunserve: idle steps after the drain, at most, for a pending restore (not measured)")
    ap.add_argument("--compile-cache-dir", default=str(Path("~/.cache/kunjax/jax-compile-cache").expanduser()),
                    help="persistent XLA compilation cache ('none' disables it)")
    ap.add_argument("--verbose", action="store_true", help="log kunjax's INFO messages (kunserve transitions)")
    ap.add_argument("--out", type=Path, default=None, help="also write a JSON summary here")
    args = ap.parse_args()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or any(p not in POLICIES for p in policies):
        ap.error(f"--policies takes a comma-separated subset of {','.join(POLICIES)}")
    args.policies = policies
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if not 0 < args.weight_fraction < 1:
        ap.error("--weight-fraction must be in (0, 1)")
    if args.min_prompt_len < 1 or args.min_prompt_len > args.max_prompt_len:
        ap.error("need 1 <= --min-prompt-len <= --max-prompt-len")
    if args.min_output_len < 1 or args.min_output_len > args.max_output_len:
        ap.error("need 1 <= --min-output-len <= --max-output-len")
    if args.max_prompt_len + args.max_output_len > args.max_model_len:
        ap.error("--max-prompt-len + --max-output-len must fit --max-model-len")
    if args.trace is not None and not args.trace.is_file():
        ap.error(f"--trace {args.trace}: no such file")
    return args


def fmt_s(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}s"


def median(xs: list[float]) -> float:
    return _percentile(xs, 50)


def print_report(results: dict[str, list[dict]], same_outputs: list[tuple[int, int]]) -> dict:
    """The side-by-side table, kunserve's transitions, and the ratios; returns the figures for the JSON."""
    print()
    print(f"{'policy':<13} {'done':>9} {'P50 TTFT':>9} {'P99 TTFT':>9} {'P99 TPOT':>9} {'preempt':>8} "
          f"{'peak queue':>10} {'makespan':>9} {'out tok/s':>9} {'warm-up':>8}")
    for p, runs in results.items():
        for r, s in enumerate(runs):
            print(f"{p + ' #' + str(r + 1):<13} {s['completed']:>4}/{s['requests']:<4} {fmt_s(s['ttft_p50_s']):>9} "
                  f"{fmt_s(s['ttft_p99_s']):>9} {fmt_s(s['tpot_p99_s']):>9} {s['preemptions']:>8} "
                  f"{s['peak_waiting']:>10} {s['makespan_s']:>8.1f}s {s['output_tok_s']:>9.1f} "
                  f"{s['warmup_s']:>7.1f}s" + ("  TIMED OUT" if s["timed_out"] else ""))
    for p, runs in results.items():
        for r, s in enumerate(runs):
            steps = ", ".join(f"{s[f'steps_{m}']} {m} at {s[f'step_mean_s_{m}'] * 1e3:.0f} ms"
                              for m in ("replicas", "fused") if s[f"steps_{m}"])
            print(f"{p + ' #' + str(r + 1):<13} steps: {steps} (mean); process CPU {s['process_cpu_s']:.0f}s in "
                  f"{s['makespan_s']:.0f}s; host load average {s['loadavg_1min_start_end'][0]:.1f} -> "
                  f"{s['loadavg_1min_start_end'][1]:.1f}")
            if s["compiles_during_replay"]:
                print(f"  note: {s['compiles_during_replay']} XLA compile(s) during this replay (timings include "
                      f"them)")
    for r, s in enumerate(results.get("kunserve", [])):
        print(f"kunserve #{r + 1}: drops {s['drops']}, restores {s['restores']}, groups still fused "
              f"{s['groups_left']}, KV blocks exchanged {s['blocks_exchanged']}")
        for ev in s["events"]:
            detail = {k: v for k, v in ev["detail"].items() if k != "reason"}
            print(f"  t={ev['t']:7.2f}s step {ev['step']:4d}: {ev['kind']:<16} group {ev['group']} "
                  f"{ev['members']} {ev['ms']:8.1f} ms {detail}")
    figures: dict = {}
    if "recompute" in results and "kunserve" in results:
        pairs = list(zip(results["recompute"], results["kunserve"], strict=True))
        ratios = [rc["ttft_p99_s"] / ks["ttft_p99_s"] if ks["ttft_p99_s"] > 0 else float("nan") for rc, ks in pairs]
        for (same, n), r in zip(same_outputs, range(len(pairs)), strict=True):
            print(f"#{r + 1}: identical greedy outputs recompute vs kunserve: {same}/{n}")
        print(f"P99 TTFT ratio recompute / kunserve: {median(ratios):.2f}x"
              + (f" (median of {', '.join(f'{x:.2f}x' for x in ratios)})" if len(ratios) > 1 else ""))
        figures = {"ttft_p99_ratio_recompute_over_kunserve": median(ratios), "ttft_p99_ratios": ratios,
                   "identical_outputs": [list(x) for x in same_outputs]}
    return figures


def main() -> int:
    args = parse_args()
    import jax

    jax.config.update("jax_num_cpu_devices", max(args.devices, 1))
    if args.compile_cache_dir.lower() != "none":
        jax.config.update("jax_compilation_cache_dir", args.compile_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import numpy as np

    from kunjax import checkpoint
    from kunjax.config import EngineConfig
    from kunjax.engine import LLMEngine, config_from_kwargs, resolve_model_path
    from kunjax.memory import param_shapes

    compiles = [0]

    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[0] += 1

    jax.monitoring.register_event_duration_secs_listener(on_event)

    t_all = time.perf_counter()
    model_path = resolve_model_path(args.model)  # trains the demo model on first use (cached)
    cfg = checkpoint.load_config(model_path)
    devices = jax.devices()[:args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"--devices {args.devices}: only {len(devices)} {devices[0].platform} device(s)")
    shapes = jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    weight_bytes = sum(int(np.prod(s)) for s in shapes) * np.dtype(args.dtype).itemsize
    device_bytes = int(weight_bytes / args.weight_fraction) + args.activation_reserve_bytes

    def engine_config(policy: str) -> EngineConfig:
        own = {"microbatch_tokens": args.microbatch_tokens} if policy == "kunserve" else {}
        return config_from_kwargs(num_instances=args.devices, dtype=args.dtype, block_size=args.block_size,
                                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len, device_memory_bytes=device_bytes,
                                  activation_reserve_bytes=args.activation_reserve_bytes, policy=policy, **own)

    workload: list[Arrival] | None = None
    setup: dict = {}
    results: dict[str, list[dict]] = {p: [] for p in args.policies}
    same_outputs: list[tuple[int, int]] = []
    for rep in range(args.repeats):
        order = args.policies if rep % 2 == 0 else args.policies[::-1]  # alternate, so order effects cancel
        outputs: dict[str, dict[str, list[int]]] = {}
        for policy in order:
            eng = LLMEngine(model_path, engine_config(policy), devices=devices)
            warmup_s = eng.warmup()
            if workload is None:
                capacity = sum(u.total_blocks for u in eng.units.values())
                workload = build_workload(args, capacity, args.block_size, cfg.vocab_size)
                setup = describe(args, cfg, eng, workload, capacity, device_bytes)
            if policy == "kunserve" and rep == 0:
                gains = {k: eng.policy.gain_blocks(k) for k in eng.policy.sizes}
                print(f"kunserve: candidate groups {[list(m) for m in eng.policy.candidates()]}; extension blocks "
                      f"per group (pipeline blocks of L/k layers) {gains}")
            print(f"[{policy} #{rep + 1}] load {eng.load_seconds:.1f}s, warm-up (compile) {warmup_s:.1f}s; "
                  f"replaying ...", flush=True)
            run = replay(eng, workload, args, compiles)
            summary = summarize(policy, run, workload)
            summary.update(load_s=eng.load_seconds, warmup_s=warmup_s)
            results[policy].append(summary)
            outputs[policy] = {rid: tm.output_ids for rid, tm in run["timings"].items() if tm.finish is not None}
            print(f"[{policy} #{rep + 1}] {summary['completed']}/{summary['requests']} completed in "
                  f"{summary['makespan_s']:.1f}s" + (" (TIMED OUT)" if summary["timed_out"] else ""), flush=True)
            del eng, run
            gc.collect()  # the next engine gets the same devices' memory
        if "recompute" in outputs and "kunserve" in outputs:
            common = set(outputs["recompute"]) & set(outputs["kunserve"])
            same_outputs.append((sum(outputs["recompute"][r] == outputs["kunserve"][r] for r in common),
                                 len(common)))
    figures = {"setup": setup, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "results": results}
    figures.update(print_report(results, same_outputs))
    wall = time.perf_counter() - t_all
    figures["wall_s"] = wall
    print(f"total wall time {wall:.0f}s (model load, warm-ups and replays)")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    return 0


def describe(args: argparse.Namespace, cfg, eng, workload: list[Arrival], capacity: int, device_bytes: int) -> dict:
    """Print and return the setup: memory budget, KV capacity, the workload's size."""
    n_burst = sum(a.burst for a in workload)
    kv_need = sum(math.ceil((len(a.prompt) + a.max_tokens) / args.block_size) for a in workload if a.burst)
    ex = eng.executor
    setup = {"platform": ex.devices_of(0)[0].platform, "devices": args.devices,
             "model": f"{cfg.architecture}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
                      f"vocab {cfg.vocab_size}, {args.dtype}",
             "weight_bytes_per_device": ex.weight_bytes, "device_memory_bytes": device_bytes,
             "kv_blocks_per_instance": ex.num_blocks, "kv_capacity_blocks": capacity,
             "block_size": args.block_size, "requests": len(workload), "burst_requests": n_burst,
             "burst_kv_blocks": kv_need,
             "lengths": f"trace {args.trace} from row {args.trace_start}" if args.trace else "synthetic",
             "prompt_tokens": sum(len(a.prompt) for a in workload),
             "output_tokens": sum(a.max_tokens for a in workload)}
    print(f"model: {setup['model']}; {args.devices} {setup['platform']} device(s) = instances; weights "
          f"{ex.weight_bytes / 2**20:.2f} MiB of a {device_bytes / 2**20:.2f} MiB budget per device "
          f"({ex.weight_bytes / device_bytes:.0%}); {ex.num_blocks} KV blocks x {args.block_size} tokens "
          f"per instance")
    print(f"workload ({setup['lengths']} lengths, seed {args.seed}): {len(workload)} requests, {n_burst} in the "
          f"burst at {args.lead_seconds:g}-{args.lead_seconds + args.burst_seconds:g}s needing {kv_need} KV blocks "
          f"= {kv_need / capacity:.2f}x the {capacity} blocks of all instances; background "
          f"{args.background_rate:g} req/s over {args.lead_seconds + args.burst_seconds + args.tail_seconds:g}s; "
          f"{setup['prompt_tokens']} prompt + {setup['output_tokens']} output tokens")
    return setup


if __name__ == "__main__":
    sys.exit(main())
