"""`kunjax bench`: replay a workload against several policies on identical inputs and report.

Owns the command's flags, the order of a run and every choice it prints and records. A run:

1. loads the workload (a trace file, a bundled trace's short name, or the synthetic generator);
2. in-process (default): configures the devices, sets a CPU device-memory budget when none is given (weights are
   `--weight-fraction` of it, as the burst benchmark under `benchmarks/` does, so a burst overloads the KV pool),
   and for each policy builds an engine, compiles it (warm-up, not measured), sends one short request per instance,
   replays, and shuts it down; with `--server`, replays against that server once (its policy is the label);
3. fits the workload to the instances' device KV pools (`kunjax.workloads.fit`; the pools are the same whatever
   the policy, including the part one sets aside, so the order of `--policies` does not change the workload), and
   synthesizes the prompts once, so every policy gets the same requests at the same times with the same token ids;
4. writes `OUT/summary.json` (on simulated time, only simulated figures: the same command gives the same bytes),
   `OUT/host.json` (this host's wall times), `OUT/requests_<policy>.csv`, `OUT/timeline_<policy>.csv` and the
   PNG plots, and
   prints the table and the subject policy's (`--subject`) P99 TTFT ratio against the best baseline.

Never leaves a half-configured run: every flag is checked before JAX starts, and a bad value exits with status
2 and a message naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kunjax.bench.metrics import Slo
from kunjax.progress import warm_up

if TYPE_CHECKING:
    from kunjax.bench.targets import Target
    from kunjax.config import EngineConfig
    from kunjax.workloads import Workload

# Defaults chosen for the CPU demo (8 simulated devices on a 2-core host; see `kunjax bench --help`).
DEFAULT_SLO_TTFT_S = 10.0
DEFAULT_SLO_TPOT_S = 1.0
DEFAULT_DURATION_S = 15.0
DEFAULT_MAX_REQUESTS = 600
DEFAULT_DEMAND_WINDOW_S = 15.0
DEFAULT_DRAIN_TIMEOUT_S = 120.0
DEFAULT_WEIGHT_FRACTION = 0.45


# The bench flags `--help` shows; the others (synthetic and conversation workloads, the fit's fine controls, gRPC
# credentials) appear with `--help-all`.
COMMON_BENCH_FLAGS = ("policies", "subject", "out", "server", "progress", "trace", "fit", "target_peak_ratio",
                      "duration_s", "max_requests", "slo_ttft_s", "slo_tpot_s")


def add_bench_arguments(p: argparse.ArgumentParser, show_all: bool = True) -> None:
    """The bench's own flags; without `show_all`, `--help` lists only `COMMON_BENCH_FLAGS` (all are accepted)."""
    _add_bench_arguments(p)
    if not show_all:
        for action in p._actions:
            if action.option_strings and action.dest not in (*COMMON_BENCH_FLAGS, "help", "help_all"):
                action.help = argparse.SUPPRESS


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from kunjax.config import POLICIES

    run = p.add_argument_group("run")
    run.add_argument("--policies", default=None, metavar="LIST",
                     help=f"comma-separated policies to replay in this order, each on its own engine with identical "
                          f"inputs (default: all of {','.join(POLICIES)}; --policy is ignored)")
    run.add_argument("--routing-modes", default=None, metavar="LIST",
                     help="comma-separated routing modes to compare, each policy once per mode with prefix caching "
                          "on: prompt-tree, least-load, session, and no-cache (least-load with caching off, the "
                          "baseline); runs are labelled MODE (one policy) or POLICY@MODE; the table adds each "
                          "run's prefix hit rate and prefill tokens saved")
    run.add_argument("--subject", default=POLICIES[-1], choices=POLICIES,
                     help=f"the policy compared against the best of the others (lowest P99 TTFT) in the summary and "
                          f"the printed ratio (default: {POLICIES[-1]})")
    run.add_argument("--out", type=Path, default=Path("out/bench"),
                     help="directory for summary.json, the CSVs and the PNGs (default: out/bench)")
    run.add_argument("--server", default=None, metavar="HOST:PORT",
                     help="replay over gRPC against a running `kunjax serve` (its policy labels the run) instead "
                          "of building engines here")
    run.add_argument("--auth-token-file", type=Path, default=None, help="with --server: file holding the bearer token")
    run.add_argument("--tls-ca", type=Path, default=None, help="with --server: PEM CA to verify a TLS server with")
    run.add_argument("--drain-timeout-s", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                     help="after the last arrival, how long unfinished requests may run before they are aborted "
                          f"and counted as failed (default: {DEFAULT_DRAIN_TIMEOUT_S:g})")
    run.add_argument("--weight-fraction", type=float, default=DEFAULT_WEIGHT_FRACTION,
                     help="CPU, when no --device-memory-bytes/--kv-cache-bytes/--num-blocks is given: the simulated "
                          "per-device budget is set so the weights are this share of it; the KV pool gets the rest "
                          f"after --activation-reserve-bytes (default: {DEFAULT_WEIGHT_FRACTION:g})")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="show a progress line on stderr (default: on)")

    wl = p.add_argument_group("workload")
    wl.add_argument("--trace", default="synthetic",
                    help="a trace file (Azure LLM 2023/2024 CSV, BurstGPT CSV, Mooncake JSONL; .gz accepted), "
                         "'azure-conv' (the bundled Azure 2023 conversation trace), 'mooncake' (the bundled Mooncake "
                         "synthetic trace, shared prompt prefixes), 'conversations' (multi-turn chats sharing system "
                         "prompts and history: --conversations ...) or 'synthetic' (default)")
    wl.add_argument("--num-requests", type=int, default=200, help="synthetic: requests to generate (default: 200)")
    wl.add_argument("--rate", type=float, default=4.0, help="synthetic: mean arrival rate, requests/s (default: 4)")
    wl.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson",
                    help="synthetic: arrival process (default: poisson)")
    wl.add_argument("--burstiness", type=float, default=1.0,
                    help="synthetic, --arrival gamma: coefficient of variation of the gaps; > 1 is burstier "
                         "(default: 1)")
    wl.add_argument("--prompt-len", default="uniform:32:256",
                    help="synthetic: prompt lengths, fixed:N | uniform:LO:HI | lognormal:MEAN:CV | exponential:MEAN "
                         "(default: uniform:32:256)")
    wl.add_argument("--output-len", default="uniform:16:128",
                    help="synthetic: output lengths (default: uniform:16:128)")
    wl.add_argument("--conversations", type=int, default=50,
                    help="conversations: how many (--rate is then conversations/s; default: 50)")
    wl.add_argument("--turns", default="uniform:2:8", help="conversations: turns per conversation (default: "
                                                           "uniform:2:8)")
    wl.add_argument("--system-prompts", type=int, default=4,
                    help="conversations: distinct system prompts shared by all conversations (default: 4)")
    wl.add_argument("--system-tokens", type=int, default=256, help="conversations: system prompt length (default: 256)")
    wl.add_argument("--user-len", default="uniform:16:128",
                    help="conversations: each new user message's length (default: uniform:16:128)")
    wl.add_argument("--think-s", type=float, default=10.0,
                    help="conversations: mean seconds from one turn's arrival to the next (default: 10); with "
                         "--closed-loop, from one turn's answer to the next turn")
    wl.add_argument("--closed-loop", action="store_true",
                    help="conversations: send each turn after the previous one's answer, with that answer in its "
                         "prompt (so the cache can serve it); needs --no-fit")
    wl.add_argument("--workload-seed", type=int, default=0,
                    help="seeds the synthetic workload and the prompts' token ids (default: 0)")
    wl.add_argument("--rate-scale", type=float, default=None,
                    help="multiply the request rate first, by deterministic thinning (< 1) or replication (> 1)")

    ft = p.add_argument_group("fitting the workload to the machine (kunjax.workloads.fit)")
    ft.add_argument("--fit", action=argparse.BooleanOptionalAction, default=True,
                    help="pick a window and a time scale so the peak KV demand is --target-peak-ratio x the KV "
                         "capacity (default: on; --no-fit replays the workload as it is, lengths still clipped)")
    ft.add_argument("--target-peak-ratio", type=float, default=2.0,
                    help="peak KV demand / the instances' KV capacity (default: 2)")
    ft.add_argument("--duration-s", type=float, default=DEFAULT_DURATION_S,
                    help=f"replay window, seconds of arrivals (default: {DEFAULT_DURATION_S:g}, sized so five "
                         f"policies fit in 15 minutes on a 2-core CPU)")
    ft.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS,
                    help=f"shorten the window until it holds at most this many requests "
                         f"(default: {DEFAULT_MAX_REQUESTS})")
    ft.add_argument("--demand-window-s", type=float, default=DEFAULT_DEMAND_WINDOW_S,
                    help="KV demand at t counts the tokens of the requests that arrived in the last this-many "
                         f"seconds (about a request's lifetime on the machine; default: {DEFAULT_DEMAND_WINDOW_S:g})")
    ft.add_argument("--length-scale", default="auto",
                    help="multiply token counts: 'auto' (default) scales so the median request (prompt + output) "
                         "is half of --max-model-len (never up), 1 only clips; longer requests are then clipped to "
                         "--max-model-len, keeping their prompt/output ratio")
    ft.add_argument("--window-start-s", type=float, default=None,
                    help="start the window here (trace seconds) instead of at the burstiest window")
    ft.add_argument("--time-scale", type=float, default=None,
                    help="replay seconds per trace second, instead of the one that reaches --target-peak-ratio")

    slo = p.add_argument_group("service-level objectives")
    slo.add_argument("--slo-ttft-s", type=float, default=DEFAULT_SLO_TTFT_S,
                     help=f"TTFT objective, seconds (default: {DEFAULT_SLO_TTFT_S:g}, for the demo model on 8 "
                          f"simulated devices of a shared 2-core CPU: ~5x its TTFT there without a queue)")
    slo.add_argument("--slo-tpot-s", type=float, default=DEFAULT_SLO_TPOT_S,
                     help=f"TPOT objective, seconds per output token (default: {DEFAULT_SLO_TPOT_S:g}, for the same "
                          f"setup: ~3x its TPOT there at low load)")


# ---- flag checks -------------------------------------------------------------------------------------------
def _policies(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    from kunjax.config import POLICIES

    if args.server is not None:
        if args.policies is not None:
            parser.error("--policies cannot be used with --server: the server runs one policy (its own --policy)")
        return []
    if args.policies is None:
        return list(POLICIES)
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not names:
        parser.error(f"--policies: give a comma-separated list of {','.join(POLICIES)}")
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        parser.error(f"--policies: unknown policy {unknown[0]!r} (available: {', '.join(POLICIES)})")
    if len(set(names)) != len(names):
        parser.error("--policies: a policy is listed twice")
    return names


NO_CACHE = "no-cache"


def _routing_modes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    from kunjax.routing import ROUTING_MODES

    if args.routing_modes is None:
        return []
    if args.server is not None:
        parser.error("--routing-modes cannot be used with --server: the server routes as it was started")
    names = [m.strip() for m in args.routing_modes.split(",") if m.strip()]
    known = (*ROUTING_MODES, NO_CACHE)
    bad = [m for m in names if m not in known]
    if not names or bad:
        parser.error(f"--routing-modes: unknown mode {bad[0]!r} (available: {', '.join(known)})" if bad else
                     f"--routing-modes: give a comma-separated list of {','.join(known)}")
    if len(set(names)) != len(names):
        parser.error("--routing-modes: a mode is listed twice")
    return names


def runs_of(policies: list[str], modes: list[str]) -> list[tuple[str, str, dict[str, object]]]:
    """(label, policy, scheduler overrides) of every run: each policy, or each policy under each routing mode."""
    if not modes:
        return [(p, p, {}) for p in policies]
    out = []
    for p in policies:
        for m in modes:
            label = m if len(policies) == 1 else f"{p}@{m}"
            over = ({"enable_prefix_caching": False, "routing": "least-load"} if m == NO_CACHE
                    else {"enable_prefix_caching": True, "routing": m})
            out.append((label, p, over))
    return out


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = ("drain_timeout_s", "rate", "burstiness", "target_peak_ratio", "duration_s", "demand_window_s",
                "slo_ttft_s", "slo_tpot_s", "num_requests", "max_requests")
    for name in positive:
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {v}")
    for name in ("rate_scale", "time_scale"):
        v = getattr(args, name)
        if v is not None and not (v > 0 and math.isfinite(v)):
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {v}")
    if not 0 < args.weight_fraction < 1:
        parser.error(f"--weight-fraction must be in (0, 1), got {args.weight_fraction}")
    if args.arrival == "poisson" and args.burstiness != 1.0:
        parser.error("--burstiness needs --arrival gamma (Poisson arrivals have burstiness 1)")
    if args.length_scale != "auto":
        try:
            ok = float(args.length_scale) > 0
        except ValueError:
            ok = False
        if not ok:
            parser.error(f"--length-scale must be 'auto' or a number > 0, got {args.length_scale!r}")
    if args.server is not None and (":" not in args.server or not args.server.rsplit(":", 1)[1].isdigit()):
        parser.error(f"--server must be HOST:PORT, got {args.server!r}")
    if args.server is None and (args.auth_token_file or args.tls_ca):
        parser.error("--auth-token-file and --tls-ca need --server")


def _load_workload(parser: argparse.ArgumentParser, args: argparse.Namespace):
    from kunjax.workloads import LengthDist, TraceFormatError, conversations, load_trace, scale_rate, synthetic

    if args.closed_loop and (args.trace != "conversations" or args.fit):
        parser.error("--closed-loop: only for --trace conversations, with --no-fit (a fitted window would cut "
                     "conversations apart)")
    if args.trace == "conversations":
        for flag in ("turns", "user_len", "output_len"):
            try:
                LengthDist.parse(getattr(args, flag))
            except ValueError as e:
                parser.error(f"--{flag.replace('_', '-')}: {e}")
        try:
            w = conversations(num_conversations=args.conversations, rate=args.rate, turns=args.turns,
                              system_prompts=args.system_prompts, system_tokens=args.system_tokens,
                              user_len=args.user_len, output_len=args.output_len, think_s=args.think_s,
                              seed=args.workload_seed, closed_loop=args.closed_loop)
        except ValueError as e:
            parser.error(f"conversations: {e}")
    elif args.trace == "synthetic":
        for flag in ("prompt_len", "output_len"):
            try:
                LengthDist.parse(getattr(args, flag))
            except ValueError as e:
                parser.error(f"--{flag.replace('_', '-')}: {e}")
        w = synthetic(num_requests=args.num_requests, rate=args.rate, arrival=args.arrival,
                      burstiness=args.burstiness, prompt_len=args.prompt_len, output_len=args.output_len,
                      seed=args.workload_seed)
    else:
        try:
            w = load_trace(args.trace)
        except TraceFormatError as e:
            parser.error(f"--trace: {e}")
    if args.rate_scale is not None:
        try:
            w = scale_rate(w, args.rate_scale)
        except ValueError as e:
            parser.error(f"--rate-scale: {e}")
    if args.window_start_s is not None and not 0 <= args.window_start_s <= w.duration_s:
        parser.error(f"--window-start-s must be within the workload's 0-{w.duration_s:.1f}s, "
                     f"got {args.window_start_s:g}")
    return w


# ---- the run -------------------------------------------------------------------------------------------------
# Policy figures that are levels, not counts (the others are cumulative: a replay reports its difference).
LEVELS = ("host_used", "host_total", "migrations_in_flight", "layered")


# Per-policy figures measured on this host's wall clock: not part of a simulated run's summary (host.json).
HOST_FIELDS = ("wall_s", "warmup_s", "load_s")


def _is_count(name: str) -> bool:
    return name not in LEVELS

def _say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _memory_budget(parser: argparse.ArgumentParser, args: argparse.Namespace, jax) -> tuple[int | None, dict]:
    """The CPU device-memory budget default (None where the user or the device decides) and its explanation."""
    import numpy as np

    from kunjax import checkpoint
    from kunjax.config import ConfigError
    from kunjax.engine import resolve_model_path
    from kunjax.memory import param_shapes

    platform_name = jax.devices()[0].platform
    given = {k: getattr(args, k) for k in ("device_memory_bytes", "kv_cache_bytes", "num_blocks")}
    if platform_name != "cpu" or any(v is not None for v in given.values()):
        src = next((f"--{k.replace('_', '-')} {v}" for k, v in given.items() if v is not None), "device memory")
        return None, {"rule": f"KV pool from {src}"}
    try:
        cfg = checkpoint.load_config(resolve_model_path(args.model))
    except (ConfigError, ValueError, OSError) as e:
        parser.error(f"--model: {e}")
    shapes = jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    weights = sum(int(np.prod(s)) for s in shapes) * np.dtype(args.dtype).itemsize // args.tp
    budget = int(weights / args.weight_fraction) + args.activation_reserve_bytes
    return budget, {"rule": f"CPU default: weights are --weight-fraction {args.weight_fraction:g} of the budget, "
                            f"the KV pool gets the rest after --activation-reserve-bytes "
                            f"{args.activation_reserve_bytes}",
                    "device_memory_bytes": budget, "weight_bytes_per_device": weights}


def _warm(target: Target, n: int, vocab: list[int]) -> None:
    """One short request per instance through the whole path (not measured), so no first-use cost is timed."""
    from kunjax.bench.metrics import RequestRecord

    clock = target.clock
    t0 = clock.now()
    recs = [RequestRecord(index=i, request_id=f"warmup-{os.getpid()}-{time.monotonic_ns()}-{i}", arrival_s=0.0,
                          prompt_tokens=8, max_tokens=4) for i in range(n)]
    for i, r in enumerate(recs):
        target.start(r, [vocab[(i * 8 + j) % len(vocab)] for j in range(8)], t0)
    give_up = time.monotonic() + 300
    while not all(r.done for r in recs) and time.monotonic() < give_up:
        target.advance(clock.now() + 1.0)


def _fit_lines(c: dict) -> list[str]:
    """The fit's choices in words (all of them are in summary.json too)."""
    lines = []
    if "length_scale" in c:
        rule = c.get("length_scale_rule", "--length-scale")
        lines.append(f"lengths scaled by {c['length_scale']:.4g} ({rule}); {c['clipped_requests']} request(s) "
                     f"clipped to {c['max_model_len']} tokens")
    elif "clipped_requests" in c:
        lines.append(f"{c['clipped_requests']} request(s) clipped to {c['max_model_len']} tokens ({c['fit']})")
    if "time_scale" in c:
        start, span = c["window_start_trace_s"], c["window_trace_s"]
        lines.append(f"window: trace seconds {start:.1f}-{start + span:.1f} ({c['window_rule']}), time scale "
                     f"{c['time_scale']:.4g} ({c['time_scale_rule']}; rate x{c['rate_multiplier']:.3g}) -> "
                     f"{c['duration_s']:g}s of arrivals")
        lines.append(f"{c['requests']} requests, {c['prompt_tokens']} prompt + {c['output_tokens']} output tokens; "
                     f"peak KV demand {c['peak_demand_tokens']} tokens at {c['peak_at_s']:.1f}s = "
                     f"{c['peak_ratio']:.2f}x the {c['capacity_tokens']}-token KV capacity (demand: tokens "
                     f"arriving within {c['demand_window_s']:g}s; target {c['target_peak_ratio']:g}x)")
        if abs(c["peak_ratio"] / c["target_peak_ratio"] - 1) > 0.2:
            lines.append(f"the peak is {c['peak_ratio']:.2f}x, not the target {c['target_peak_ratio']:g}x: the "
                         f"workload holds too few tokens, or --time-scale / --window-start-s fix the choice")
        if c["requests"] > c.get("max_requests", c["requests"]):
            lines.append(f"the window holds {c['requests']} requests, more than --max-requests "
                         f"{c['max_requests']}: a {c['target_peak_ratio']:g}x peak within {c['demand_window_s']:g}s "
                         f"needs that many, so the window shrank to {c['duration_s']:g}s of arrivals; raise "
                         f"--max-requests or lower --target-peak-ratio")
    return lines


def _clean(x):
    """JSON-ready: NaN/inf -> None, tuples -> lists, Paths -> str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


@dataclasses.dataclass
class BenchRun:
    """One invocation: the workload as loaded, then as fitted (once, for every policy), and the results so far."""

    parser: argparse.ArgumentParser
    args: argparse.Namespace
    slo: Slo
    workload: Workload
    fitted: Workload | None = None
    prompts: list[list[int]] = dataclasses.field(default_factory=list)
    vocab: list[int] = dataclasses.field(default_factory=list)  # ids prompts may use
    setup: dict[str, object] = dataclasses.field(default_factory=dict)  # every choice, for summary.json
    runs: dict[str, tuple] = dataclasses.field(default_factory=dict)  # policy -> (records, timeline, events)
    summaries: dict[str, dict] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # policy -> why it has no result

    def prepare(self, target: Target) -> None:
        """Fit the workload to the instances' KV pools and synthesize the prompts."""
        from kunjax.workloads import clip_lengths, fit, synthesize_prompts

        args, info = self.args, target.info()
        capacity = info.kv_capacity_tokens
        if args.fit:
            length_scale = args.length_scale if args.length_scale == "auto" else float(args.length_scale)
            try:
                result = fit(self.workload, capacity, target_peak_ratio=args.target_peak_ratio,
                             max_duration_s=args.duration_s, max_requests=args.max_requests,
                             max_model_len=info.max_model_len, length_scale=length_scale,
                             demand_window_s=args.demand_window_s, window_start_s=args.window_start_s,
                             time_scale_factor=args.time_scale)
            except ValueError as e:  # e.g. a given window with no request in it
                self.parser.error(f"fitting the workload (--window-start-s/--time-scale/--duration-s): {e}")
            fitted, choices = result.workload, result.choices
        else:
            fitted, clipped = clip_lengths(self.workload, info.max_model_len)
            choices = {"fit": "off (--no-fit)", "max_model_len": info.max_model_len, "clipped_requests": clipped}
        excluded = set(info.excluded_ids)
        self.fitted = fitted
        self.prompts = synthesize_prompts(fitted, info.vocab_size, excluded, seed=args.workload_seed)
        self.vocab = [i for i in range(info.vocab_size) if i not in excluded]
        self.setup.update(fit=choices, prompts=(
            f"synthesized token ids: uniform over the model's {info.vocab_size}-id vocabulary minus "
            f"{len(excluded)} special ids, seeded per request (--workload-seed {args.workload_seed}); greedy, "
            f"max_tokens = the trace's output length with ignore_eos, so every request produces its trace length"))
        for line in _fit_lines(choices):
            _say(f"fit: {line}")
        for note in info.notes:
            _say(f"note: {note}")
        _say(f"prompts: {self.setup['prompts']}")
        _say(f"replaying {len(fitted)} requests over {fitted.duration_s:.1f}s "
             f"({fitted.prompt_tokens} prompt + {fitted.output_tokens} output tokens) against each policy")

    def run_policy(self, name: str, target: Target, t_policy: float, extra: dict[str, object]) -> None:
        """Warm the target's path, replay, summarize and write this policy's CSVs."""
        from kunjax.bench.metrics import summarize
        from kunjax.bench.replay import replay
        from kunjax.bench.report import queue_pressure, write_requests_csv, write_timeline_csv

        if self.fitted is None:
            self.prepare(target)
        info = target.info()
        allocatable = sum(x.kv_total for x in target.load())  # the pool less what this policy sets aside
        _warm(target, max(1, len(info.instances)), self.vocab)
        before = target.policy_stats()
        res = replay(target, self.fitted, self.prompts, label=name, block_size=info.block_size,
                     drain_timeout_s=self.args.drain_timeout_s, progress=self.args.progress,
                     id_prefix=f"bench-{name}")
        s = summarize(res.records, self.slo)
        after = target.policy_stats()
        # Counters are cumulative since the runtime started: the replay's share is the difference (levels such
        # as host_used are reported as they stood at the end).
        policy_stats = {k: v - before.get(k, 0) if _is_count(k) else v for k, v in sorted(after.items())}
        s.update(extra, replay_s=res.replay_s, timed_out=res.timed_out, events=res.events, policy_stats=policy_stats,
                 queue_pressure=queue_pressure(res.timeline),
                 kv_capacity_tokens=allocatable * info.block_size, instances=list(info.instances))
        self.runs[name] = (res.records, res.timeline, res.events)
        self.summaries[name] = s
        write_requests_csv(self.args.out / f"requests_{name}.csv", res.records)
        write_timeline_csv(self.args.out / f"timeline_{name}.csv", res.timeline)
        self.setup.setdefault("model", {"path": info.model, "vocab_size": info.vocab_size,
                                        "max_model_len": info.max_model_len})
        self.setup.setdefault("versions", info.versions)
        s["wall_s"] = time.monotonic() - t_policy
        _say(f"[{name}] {s['completed']}/{s['requests']} completed, P99 TTFT {s['ttft_p99_s']:.2f}s, "
             f"{len(res.events)} policy event(s), {s['wall_s']:.0f}s for this policy")
        _say(f"[{name}] policy figures during the replay: "
             + (", ".join(f"{k} {v}" for k, v in policy_stats.items() if v) or "all zero"))

    def run_in_process(self, policies: list[str], base: EngineConfig, modes: Sequence[str] = ()) -> None:
        """Each policy (under each routing mode, `--routing-modes`) on its own engine over the configured devices,
        one after another."""
        from kunjax.bench.targets import InProcessTarget
        from kunjax.config import ConfigError
        from kunjax.options import configure_jax, engine_config_from_args, flag_message, make_engine, time_settings

        executor, profile, shape = time_settings(self.parser, self.args)
        jax = configure_jax(self.parser, self.args)
        if executor == "sim":
            budget, budget_info = None, {"rule": f"KV pool from profile {profile.name}'s device memory "
                                                 f"(--kv-memory-fraction of {profile.memory_bytes} bytes)"}
        else:
            budget, budget_info = _memory_budget(self.parser, self.args, jax)
        configs = {}
        for label, name, over in runs_of(policies, list(modes)):  # every run's options, before any engine
            try:
                cfg = engine_config_from_args(self.args, policy=name, allowed_policies=tuple(policies))
                cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, **over))
                configs[label] = dataclasses.replace(cfg, **(
                    {"device_memory_bytes": budget} if budget is not None else {}))
            except (ConfigError, ValueError) as e:
                self.parser.error(f"--policies {name}: {flag_message(str(e))}")
        if budget is not None:
            _say(f"device memory budget {budget / 2**20:.2f} MiB per device ({budget_info['rule']}; "
                 f"--device-memory-bytes to change)")
        if executor == "sim":
            self.setup["devices"] = {"platform": "simulated", "memory": budget_info, "engine": dataclasses.asdict(base)}
        else:
            self.setup["devices"] = {"platform": jax.devices()[0].platform, "count": len(jax.devices()),
                                     "memory": budget_info, "engine": dataclasses.asdict(base)}
        if profile is not None:
            self.setup["time"] = {"executor": executor, "clock": "simulated", "profile": profile.to_dict(),
                                  "model_shape": shape.to_dict() if shape is not None else "the --model's own"}
            _say(f"simulated time: {profile.name} ({profile.kind} profile"
                 + (f"; model shape {self.args.model_shape or 'llama-3-8b'}" if shape is not None else "")
                 + "); summary.json holds only simulated figures (host timings go to host.json)")
        for name in configs:
            t_policy = time.monotonic()
            engine = target = None
            try:
                engine = make_engine(self.parser, self.args, configs[name])
                warmup_s = warm_up(engine)
                blocks = engine.executor.num_blocks
                _say(f"[{name}] {engine.num_instances} instance(s), {blocks} KV blocks x "
                     f"{configs[name].block_size} tokens each; compiled in {warmup_s:.1f}s")
                target = InProcessTarget(engine)
                self.run_policy(name, target, t_policy, {"load_s": engine.load_seconds, "warmup_s": warmup_s,
                                                         "kv_blocks_per_instance": blocks})
            except Exception as e:  # one policy failing must not lose the others' results
                self.errors[name] = f"{type(e).__name__}: {e}"
                _say(f"[{name}] FAILED, going on with the other policies:\n{traceback.format_exc()}")
            finally:
                if target is not None:
                    target.close()
                del target, engine
                gc.collect()  # the next engine gets the same devices' memory

    def run_remote(self, remote_target: Callable[..., Target]) -> None:
        """One replay against `--server` (through `remote_target`, which the CLI supplies); its policy labels the
        results."""
        import grpc

        args = self.args
        try:
            token = args.auth_token_file.read_text().strip() if args.auth_token_file is not None else None
        except OSError as e:
            self.parser.error(f"--auth-token-file: {e}")
        t_policy = time.monotonic()
        try:
            target = remote_target(args.server, block_size=args.block_size, auth_token=token, tls_ca=args.tls_ca)
            info = target.info()
        except grpc.RpcError as e:
            self.parser.error(f"--server {args.server}: {e.code().name}: {e.details()}")
        _say(f"server {args.server}: policy {info.policy}, model {info.model}, {len(info.instances)} instance(s)")
        self.setup["devices"] = {"server": args.server, "instances": list(info.instances)}
        try:
            self.run_policy(info.policy, target, t_policy, {"server": args.server})
        finally:
            target.close()

    def finish(self, t_start: float, load0: float) -> int:
        """Plots, summary.json, the table and the comparison; 1 if a policy failed."""
        from kunjax import __version__
        from kunjax.bench.report import (
            comparison,
            diagnose,
            format_cache_table,
            format_comparison,
            format_table,
            write_plots,
        )

        args = self.args
        cmp = comparison(self.summaries, args.subject)
        diagnosis = diagnose({k: s.get("queue_pressure") for k, s in self.summaries.items()}, args.subject)
        plots: list[str] = []
        try:
            plots = write_plots(args.out, self.runs, self.summaries, args.subject) if self.runs else []
        except ImportError:
            _say("note: matplotlib cannot be imported (a dependency of kunjax: reinstall it): the PNG plots were "
                 "skipped")
        wall = time.monotonic() - t_start
        host = {"cpus": os.cpu_count(), "loadavg_1min_start": load0, "loadavg_1min_end": os.getloadavg()[0],
                "wall_s": wall, "policies": {k: {h: s[h] for h in HOST_FIELDS if h in s}
                                             for k, s in self.summaries.items()}}
        simulated = "time" in self.setup
        summaries = ({k: {f: v for f, v in s.items() if f not in HOST_FIELDS} for k, s in self.summaries.items()}
                     if simulated else self.summaries)
        summary = {
            "policies": summaries,
            "workload": {"trace": args.trace, **self.setup.get("fit", {}), "prompts": self.setup.get("prompts")},
            "devices": self.setup.get("devices"),
            "time": self.setup.get("time", {"clock": "wall"}),
            "model": self.setup.get("model"),
            "slo": {"ttft_s": self.slo.ttft_s, "tpot_s": self.slo.tpot_s},
            "comparison": cmp,
            "diagnosis": diagnosis,
            "errors": self.errors,
            "mode": f"server {args.server}" if args.server else "in-process",
            "command": shlex.join(sys.argv),
            "versions": {"kunjax": __version__, "python": platform.python_version(),
                         **self.setup.get("versions", {})},
            "plots": plots,
        }
        if not simulated:
            summary.update(host={k: host[k] for k in ("cpus", "loadavg_1min_start", "loadavg_1min_end")},
                           wall_s=wall)
        (args.out / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")
        (args.out / "host.json").write_text(json.dumps(_clean(host), indent=2) + "\n")
        print(format_table(self.summaries))
        if any(x.get("cached_prompt_tokens") for x in self.summaries.values()):
            print(format_cache_table(self.summaries))
        if cmp is not None:
            print(format_comparison(cmp))
        if diagnosis is not None:
            print(f"note: {diagnosis}")
        for name, why in self.errors.items():
            print(f"{name}: FAILED ({why})")
        print(f"wrote {args.out}/summary.json, requests_*.csv, timeline_*.csv"
              + (f", {', '.join(plots)}" if plots else "") + f" in {wall:.0f}s "
              f"(host load average {load0:.1f} -> {os.getloadavg()[0]:.1f})")
        return 1 if self.errors else 0


def cmd_bench(parser: argparse.ArgumentParser, args: argparse.Namespace,
              remote_target: Callable[..., Target] | None = None) -> int:
    """Run `kunjax bench`. `remote_target(address, block_size=, auth_token=, tls_ca=)` builds the target of
    `--server` (a gRPC client: `serving.bench_target.GrpcTarget`, passed in by the CLI)."""
    from kunjax.config import ConfigError
    from kunjax.options import engine_config_from_args, flag_message

    t_start, load0 = time.monotonic(), os.getloadavg()[0]
    policies = _policies(parser, args)
    modes = _routing_modes(parser, args)
    _check_flags(parser, args)
    workload = _load_workload(parser, args)
    try:  # the engine and scheduler options (each policy's own are checked per policy, before any engine)
        base = engine_config_from_args(args, allowed_policies=tuple(policies) or (args.policy,))
    except (ConfigError, ValueError) as e:
        parser.error(flag_message(str(e)))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out: {e}")
    run = BenchRun(parser, args, Slo(args.slo_ttft_s, args.slo_tpot_s), workload)
    _say(f"workload: {workload.source}; {len(workload)} requests over {workload.duration_s:.1f}s")
    _say(f"SLO: TTFT <= {run.slo.ttft_s:g}s and TPOT <= {run.slo.tpot_s:g}s (--slo-ttft-s, --slo-tpot-s); "
         f"unfinished requests are aborted {args.drain_timeout_s:g}s after the last arrival (--drain-timeout-s)")
    if args.server is not None:
        if remote_target is None:
            parser.error("--server: this entry point has no gRPC client (run it as `kunjax bench`)")
        run.run_remote(remote_target)
    else:
        run.run_in_process(policies, base, modes)
    return run.finish(t_start, load0)
