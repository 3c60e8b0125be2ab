"""Simulated time against measured time on this machine: the same `kunjax bench` twice, once on the wall clock and
once on the simulated clock with a measured profile (default: the bundled `cpu` profile from `kunjax calibrate`).

    python benchmarks/sim_validation.py --out sim-validation          # demo model, bundled trace, five policies
    python benchmarks/sim_validation.py --repeats 3 -- --trace azure-conv   # three measured runs: median, range
    python benchmarks/sim_validation.py --profile my-cpu.json -- --target-peak-ratio 3
    python benchmarks/sim_validation.py --repeats 0 --with-measured run1 run2 -- --trace azure-conv  # pool runs
    python benchmarks/sim_validation.py --repeats 0 --with-measured run1 --simulated run1/simulated   # no run

Both runs use identical inputs (the bench fits the workload to the KV capacity, which does not depend on the
clock), the real JAX engine and its real tokens; only the clock differs. The table compares, per policy, P50
and P99 TTFT and P99 TPOT (simulated / measured - 1) and writes OUT/validation.json and OUT/validation.png.
The wall run is as noisy as the machine (the host's load average before and after is printed), so run it on a
quiet machine, and with `--repeats N` run it N times, each with the policies in a rotated order (a policy that
runs first in a bench measured slower than the same schedule run later): the error is then against the median
of the measured runs, and their range is printed (the simulated run is deterministic: once is enough). Flags
after `--` go to every bench run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("recompute", "swap", "migrate", "layerkv", "kunserve")
METRICS = (("ttft_p50_s", "P50 TTFT"), ("ttft_p99_s", "P99 TTFT"), ("tpot_p99_s", "P99 TPOT"))


def bench(out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "kunjax", "bench", "--no-progress", "--out", str(out), *extra]
    print("$", " ".join(cmd), f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    res = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    (out.parent / f"{out.name}.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"kunjax bench failed ({res.returncode}):\n{res.stderr[-3000:]}")
    print(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "", flush=True)
    return json.loads((out / "summary.json").read_text())


def workload(summary: dict) -> dict:
    """A bench summary's workload, its trace file named without its directory (runs from another checkout of the
    same trace replay the same workload)."""
    w = dict(summary["workload"])
    if isinstance(w.get("source"), str):
        w["source"] = re.sub(r"\S*/", "", w["source"])
    return w


def split_policies(extra: list[str]) -> tuple[list[str], list[str]]:
    """The policies a bench flag list names (`--policies a,b` or `--policies=a,b`; default all) and the rest."""
    policies, rest, it = list(POLICIES), [], iter(extra)
    for flag in it:
        if flag == "--policies":
            policies = next(it, "").split(",")
        elif flag.startswith("--policies="):
            policies = flag.split("=", 1)[1].split(",")
        else:
            rest.append(flag)
    return [p for p in policies if p], rest


def compare(walls: list[dict], sim: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Per policy and metric: the median of the measured runs, their range, the simulated value and its error
    against the median."""
    out = {}
    for p in POLICIES:
        if any(p not in w["policies"] for w in walls) or p not in sim["policies"]:
            continue
        s = sim["policies"][p]
        out[p] = {}
        for m, _ in METRICS:
            runs = sorted(w["policies"][p][m] for w in walls)
            med = statistics.median(runs)
            out[p][m] = {"measured": med, "measured_min": runs[0], "measured_max": runs[-1], "simulated": s[m],
                         "error": s[m] / med - 1 if med else float("nan")}
    return out


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot")
        return
    fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 3.8))
    pols = list(result)
    for ax, (m, label) in zip(axes, METRICS, strict=True):
        x = range(len(pols))
        med = [result[p][m]["measured"] for p in pols]
        spread = [[v - result[p][m]["measured_min"] for v, p in zip(med, pols, strict=True)],
                  [result[p][m]["measured_max"] - v for v, p in zip(med, pols, strict=True)]]
        ax.bar([i - 0.2 for i in x], med, 0.4, yerr=spread, capsize=3, label="measured (wall: median, range)")
        ax.bar([i + 0.2 for i in x], [result[p][m]["simulated"] for p in pols], 0.4, label="simulated (cpu profile)")
        ax.set_xticks(list(x), pols, rotation=20)
        ax.set(title=label, ylabel="seconds")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("sim-validation"))
    p.add_argument("--profile", default="cpu")
    p.add_argument("--simulated", type=Path, default=None, metavar="DIR",
                   help="take the simulated run from this earlier bench OUT directory (DIR/summary.json) instead of "
                        "running it")
    p.add_argument("--repeats", type=int, default=1, help="measured (wall-clock) runs; the error is against their "
                                                          "median")
    p.add_argument("--with-measured", type=Path, nargs="+", default=[], metavar="DIR",
                   help="earlier validation OUT directories whose measured runs (DIR/wall*/summary.json) join this "
                        "one's; only runs of the same workload are taken (--repeats 0: none measured now)")
    args = p.parse_args(argv)
    if args.repeats < 0 or (args.repeats == 0 and not args.with_measured):
        p.error(f"--repeats must be >= 1 (or 0 with --with-measured), got {args.repeats}")
    args.out.mkdir(parents=True, exist_ok=True)
    policies, rest = split_policies(extra)
    walls = [bench(args.out / ("wall" if args.repeats == 1 else f"wall{i + 1}"),
                   [*rest, "--policies", ",".join(policies[i % len(policies):] + policies[:i % len(policies)])])
             for i in range(args.repeats)]
    if args.simulated is not None:
        sim = json.loads((args.simulated / "summary.json").read_text())
    else:
        sim = bench(args.out / "simulated", ["--clock", "simulated", "--profile", args.profile, *extra])
    if any(workload(w) != workload(sim) for w in walls):
        raise SystemExit("the runs replayed different workloads")
    for d in args.with_measured:
        found = sorted(d.glob("wall*/summary.json"))
        same = [w for w in map(lambda f: json.loads(f.read_text()), found) if workload(w) == workload(sim)]
        print(f"{d}: {len(same)} of {len(found)} measured runs replayed this workload")
        walls.extend(same)
    if not walls:
        raise SystemExit("no measured run of this workload")
    result = compare(walls, sim)
    (args.out / "validation.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "validation.png")
    print(f"{'policy':10}" + "".join(f" {label + ' measured':>17} {'simulated':>10} {'error':>7}"
                                     for _, label in METRICS))
    for pol, r in result.items():
        print(f"{pol:10}" + "".join(f" {r[m]['measured']:>16.2f}s {r[m]['simulated']:>9.2f}s "
                                     f"{100 * r[m]['error']:>+6.0f}%" for m, _ in METRICS))
    if len(walls) > 1:
        print(f"measured range over {len(walls)} runs (min-max):")
        for pol, r in result.items():
            print(f"{pol:10}" + "".join(f" {label}: {r[m]['measured_min']:.2f}-{r[m]['measured_max']:.2f}s"
                                         for m, label in METRICS))
    errs = [abs(r[m]["error"]) for r in result.values() for m in ("ttft_p50_s", "tpot_p99_s")]
    print(f"largest |error| of P50 TTFT and P99 TPOT over the policies: {100 * max(errs):.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
