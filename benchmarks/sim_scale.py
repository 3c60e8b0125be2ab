"""KunServe's claim at the scale it was made for, on simulated time: every policy on simulated H100s.

    python benchmarks/sim_scale.py --setup 8b            # 8 x H100, Llama-3-8B, 8 replicas: 3 traces x 3 loads
    python benchmarks/sim_scale.py --setup 70b           # 32 x H100, Llama-3-70B, 8 replicas of TP4
    python benchmarks/sim_scale.py --setup sensitivity   # 8b, Azure at 3x: interconnect and pipeline terms x0.5, x2

Each cell is one `kunjax bench --executor sim` run (no model, no weights: the engine's own router, scheduler,
books and all five policies, with durations from the `h100-sxm` profile), written to OUT/<cell>/ with its
summary.json, CSVs and plots; the table (OUT/<setup>.md, printed) compares the best baseline's P99 TTFT with
kunserve's, the P99 TPOT cost, SLO attainment, and how much KV was free while requests queued (the bench's own
diagnosis: a window that queues with free KV is compute-bound, and no memory policy can help it).

Workloads: the bundled Azure 2023 conversation trace, the Mooncake synthetic trace (`--mooncake`, default
`../shared/traces/mooncake_synthetic.jsonl`) and a synthetic Gamma process with CV 4 and Azure-like lengths;
each fitted by the bench to its burstiest `--duration-s` window, time-scaled so the peak KV demand (tokens
requested within `--demand-window-s`) is 1.5x, 2x and 3x the instances' KV capacity. Deterministic: a cell run
twice writes the same summary.json. Cells already done (a summary.json in place) are not rerun unless --force.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("recompute", "swap", "migrate", "layerkv", "kunserve")
SETUPS = {  # name -> (description, bench flags)
    "8b": ("8 x H100 SXM, Llama-3-8B, 8 replicas",
           ["--model-shape", "llama-3-8b", "--num-instances", "8", "--tp", "1"]),
    "70b": ("32 x H100 SXM, Llama-3-70B, 8 replicas of TP4",
            ["--model-shape", "llama-3-70b", "--num-instances", "8", "--tp", "4"]),
}
RATIOS = (1.5, 2.0, 3.0)
SENSITIVITY_RATIO = 3.0  # the Azure load where memory binds on 8 x H100 (at 1.5x and 2x nothing is dropped)
# Sensitivity: profile coefficients multiplied. Interconnect: the bandwidths a drop's exchange and restore,
# remote attention and activation hops move bytes over; pipeline: the fixed costs only pipelines pay (every
# hop's and remote message's link latency, every fuse's and split's overhead).
SENSITIVITY = {
    "interconnect-x0.5": {"link_bytes_per_s": 0.5, "network_bytes_per_s": 0.5},
    "interconnect-x2": {"link_bytes_per_s": 2.0, "network_bytes_per_s": 2.0},
    "pipeline-x0.5": {"link_latency_s": 0.5, "transition_overhead_s": 0.5},
    "pipeline-x2": {"link_latency_s": 2.0, "transition_overhead_s": 2.0},
}
# And kunserve with its CPU-sized defaults for the live exchange and remote attention (16 blocks, 16 rows a step).
KNOBS = {"kunserve-cpu-defaults": ["--exchange-blocks-per-step", "16", "--remote-rows", "16"]}


def trace_flags(name: str, mooncake: Path) -> list[str]:
    if name == "azure":
        return ["--trace", "azure-conv"]
    if name == "mooncake":
        return ["--trace", str(mooncake)]
    if name == "gamma":  # Azure-conversation-like lengths (mean 1155 / 211 tokens), arrivals with CV 4
        return ["--trace", "synthetic", "--arrival", "gamma", "--burstiness", "4", "--num-requests", "20000",
                "--rate", "5.5", "--prompt-len", "lognormal:1155:1.0", "--output-len", "lognormal:211:1.3"]
    raise ValueError(name)


def common_flags(args: argparse.Namespace) -> list[str]:
    return ["--executor", "sim", "--dtype", "bfloat16", "--max-model-len", "8192", "--max-num-seqs", "512",
            "--max-num-batched-tokens", "8192", "--duration-s", str(args.duration_s), "--max-requests",
            str(args.max_requests), "--demand-window-s", str(args.demand_window_s), "--slo-ttft-s",
            str(args.slo_ttft_s), "--slo-tpot-s", str(args.slo_tpot_s), "--no-progress",
            # kunserve at GPU scale: the live exchange and remote attention sized for NVLink, not for the CPU
            # demo (its defaults, 16 blocks and 16 rows a step, would take minutes to move a drop's KV).
            "--exchange-blocks-per-step", str(args.exchange_blocks_per_step), "--remote-rows", str(args.remote_rows),
            # The memory policies compared on their own: the traces' prompts are synthesized ids that share no
            # prefix, so caching never hits, and its host tier would only add spill copies (docs/simulator.md).
            "--no-enable-prefix-caching"]


def cells(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, bench flags) of every cell of --setup."""
    out = []
    if args.setup == "sensitivity":
        from kunjax.hardware import load_profile

        base = load_profile("h100-sxm")
        args.out.mkdir(parents=True, exist_ok=True)
        for name, factors in {"base": {}, **SENSITIVITY, **dict.fromkeys(KNOBS, {})}.items():
            path = args.out / f"h100-sxm-{name}.json"
            (base.scaled(**factors) if factors else base).save(path)
            out.append((f"sensitivity-{name}", [*SETUPS["8b"][1], *trace_flags("azure", args.mooncake),
                                                "--target-peak-ratio", str(SENSITIVITY_RATIO), "--profile", str(path),
                                                *KNOBS.get(name, [])]))
        return out
    for trace in args.traces:
        for ratio in (2.0,) if args.quick else RATIOS:
            out.append((f"{args.setup}-{trace}-{ratio:g}x", [*SETUPS[args.setup][1], *trace_flags(trace, args.mooncake),
                                                            "--target-peak-ratio", str(ratio), "--profile",
                                                            "h100-sxm"]))
    return out


def run_cell(name: str, flags: list[str], args: argparse.Namespace) -> dict:
    out = args.out / name
    if not args.force and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    cmd = [sys.executable, "-m", "kunjax", "bench", *common_flags(args), *flags, "--out", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    (args.out / f"{name}.log").write_text(" ".join(cmd) + "\n\n" + res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"{name}: kunjax bench exited {res.returncode}:\n{res.stderr[-3000:]}")
    print(f"{name}: done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return json.loads((out / "summary.json").read_text())


def row(name: str, s: dict) -> str:
    pol, cmp_ = s["policies"], s["comparison"]
    best, ks = pol[cmp_["best_baseline"]], pol["kunserve"]
    free = [(pol[p].get("queue_pressure") or {}).get("mean_free_kv_share_while_queued") for p in POLICIES]
    free_text = "/".join("-" if f is None else f"{100 * f:.0f}" for f in free)
    drops = sum(e["kind"] == "drop" for e in ks.get("events", []))
    return (f"| {name} | {s['workload']['requests']} | {cmp_['best_baseline']} | {best['ttft_p99_s']:.2f} | "
            f"{ks['ttft_p99_s']:.2f} | **{cmp_['ttft_p99_ratio_best_baseline_over_subject']:.2f}x** | "
            f"{cmp_['tpot_p99_ratio_subject_over_best_baseline']:.2f}x | {100 * best['slo_attainment']:.0f}% | "
            f"{100 * ks['slo_attainment']:.0f}% | {drops} | {free_text} |")


HEADER = ("| cell | requests | best baseline | its P99 TTFT (s) | kunserve P99 TTFT (s) | best / kunserve | "
          "P99 TPOT kunserve / best | SLO met, best | SLO met, kunserve | drops | KV free while queued, % "
          "(recompute/swap/migrate/layerkv/kunserve) |\n|" + "---|" * 11)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", choices=(*SETUPS, "sensitivity"), default="8b")
    p.add_argument("--traces", default="azure,mooncake,gamma", type=lambda s: s.split(","))
    p.add_argument("--mooncake", type=Path, default=ROOT.parent / "shared" / "traces" / "mooncake_synthetic.jsonl")
    p.add_argument("--out", type=Path, default=Path("sim-scale"))
    p.add_argument("--duration-s", type=float, default=30.0, help="replay window, seconds of arrivals")
    p.add_argument("--max-requests", type=int, default=20000)
    p.add_argument("--demand-window-s", type=float, default=30.0,
                   help="KV demand counts the tokens requested within this many seconds (about a request's "
                        "lifetime under overload)")
    p.add_argument("--slo-ttft-s", type=float, default=5.0)
    p.add_argument("--slo-tpot-s", type=float, default=0.2)
    p.add_argument("--exchange-blocks-per-step", type=int, default=4096,
                   help="kunserve: KV blocks the live exchange moves per step (default 4096: 8 GiB of an 8B "
                        "model's KV, ~20 ms over NVLink)")
    p.add_argument("--remote-rows", type=int, default=256,
                   help="kunserve: rows per stage and destination sent to remote attention per tick")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once")
    p.add_argument("--force", action="store_true", help="rerun cells that already have a summary.json")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: the Azure trace at 2x only, 5 s of arrivals, at most 300 requests")
    args = p.parse_args(argv)
    if args.quick:
        args.traces, args.duration_s, args.max_requests, args.demand_window_s = ["azure"], 5.0, 300, 5.0
    unknown = set(args.traces) - {"azure", "mooncake", "gamma"}
    if unknown:
        p.error(f"--traces: unknown {sorted(unknown)}; give azure, mooncake, gamma")
    if "mooncake" in args.traces and args.setup != "sensitivity" and not args.mooncake.is_file():
        p.error(f"--mooncake: no such file {args.mooncake}")
    todo = cells(args)
    with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
        summaries = list(pool.map(lambda c: run_cell(*c, args), todo))
    desc = (SETUPS["8b"][0] + f", Azure conversation at {SENSITIVITY_RATIO:g}x" if args.setup == "sensitivity"
            else SETUPS[args.setup][0])
    lines = [f"**{desc}** (simulated h100-sxm; `python benchmarks/sim_scale.py --setup {args.setup}`)", "",
             HEADER, *(row(name, s) for (name, _), s in zip(todo, summaries, strict=True))]
    text = "\n".join(lines) + "\n"
    (args.out / f"{args.setup}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
