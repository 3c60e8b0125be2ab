"""What a bench run leaves behind: per-request and timeline CSVs, the plots, the table and the comparison.

Owns the file formats under `--out` and the one figure of merit printed at the end: the ratio of the best
baseline's P99 TTFT (among the policies other than the subject, `--subject`, the lowest one) to the subject's,
with the subject's P99 TPOT relative to that baseline's (its cost). matplotlib is imported only here and only
when plotting (Agg backend), so nothing else needs it; without it the PNGs are skipped with a note.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from kunjax.bench.metrics import RequestRecord

REQUEST_COLUMNS = ("index", "request_id", "arrival_s", "submit_s", "scheduled_s", "first_token_s", "end_s",
                   "prompt_tokens", "max_tokens", "output_tokens", "queue_s", "ttft_s", "tpot_s", "e2e_s",
                   "finish_reason", "error", "session_id", "cached_tokens")


def _cell(v: object) -> object:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6f}"
    return v


def write_requests_csv(path: Path, records: Sequence[RequestRecord]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(REQUEST_COLUMNS)
        for r in records:
            w.writerow([_cell(getattr(r, c)) for c in REQUEST_COLUMNS])


def write_timeline_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns) or ["t_s"])
        w.writeheader()
        for row in rows:
            w.writerow({k: _cell(v) for k, v in row.items()})


# ---- the table and the comparison --------------------------------------------------------------------------
def _s(x: object) -> str:
    return "n/a" if not isinstance(x, int | float) or math.isnan(x) else f"{x:.2f}s"


def format_table(summaries: Mapping[str, Mapping[str, object]]) -> str:
    w = max((10, *map(len, summaries)))
    head = (f"{'policy':<{w}} {'done':>9} {'failed':>6} {'P50 TTFT':>9} {'P99 TTFT':>9} {'P99 TPOT':>9} "
            f"{'P99 e2e':>9} {'SLO met':>8} {'goodput':>9} {'out tok/s':>9} {'wall':>7}")
    lines = [head, "-" * len(head)]
    for name, s in summaries.items():
        lines.append(
            f"{name:<{w}} {s['completed']:>4}/{s['requests']:<4} {s['failed']:>6} {_s(s['ttft_p50_s']):>9} "
            f"{_s(s['ttft_p99_s']):>9} {_s(s['tpot_p99_s']):>9} {_s(s['e2e_p99_s']):>9} "
            f"{s['slo_attainment']:>8.1%} {s['goodput_req_s']:>7.2f}/s {s['throughput_tok_s']:>9.1f} "
            f"{s.get('wall_s', math.nan):>6.0f}s")
    return "\n".join(lines)


def format_cache_table(summaries: Mapping[str, Mapping[str, object]]) -> str:
    """Per run: the share of the completed requests' prompt tokens served from the prefix cache, and that many
    prefill tokens not computed."""
    w = max((10, *map(len, summaries)))
    head = (f"{'run':<{w}} {'prefix hit rate':>15} {'prefill tokens saved':>21} {'of prompt tokens':>17} "
            f"{'mean JCT':>9}")
    lines = [head, "-" * len(head)]
    for name, s in summaries.items():
        lines.append(f"{name:<{w}} {s.get('prefix_hit_rate', math.nan):>15.1%} "
                     f"{s.get('cached_prompt_tokens', 0):>21} {s.get('prompt_tokens_completed', 0):>17} "
                     f"{_s(s.get('jct_mean_s', math.nan)):>9}")
    return "\n".join(lines)


def comparison(summaries: Mapping[str, Mapping[str, float]], subject: str) -> dict[str, object] | None:
    """The `subject` policy against the best baseline (lowest P99 TTFT among the others); None without both."""
    if subject not in summaries:
        return None
    baselines = {k: v for k, v in summaries.items() if k != subject and not math.isnan(v["ttft_p99_s"])}
    if not baselines:
        return None
    best = min(baselines, key=lambda k: baselines[k]["ttft_p99_s"])
    ks, b = summaries[subject], baselines[best]
    ratio = b["ttft_p99_s"] / ks["ttft_p99_s"] if ks["ttft_p99_s"] > 0 else math.nan
    cost = ks["tpot_p99_s"] / b["tpot_p99_s"] if b["tpot_p99_s"] > 0 else math.nan
    return {"subject": subject, "best_baseline": best, "ttft_p99_ratio_best_baseline_over_subject": ratio,
            "tpot_p99_ratio_subject_over_best_baseline": cost}


COMPUTE_BOUND_FREE_SHARE = 0.2  # mean free KV share while requests queue above which a run is compute-bound


def queue_pressure(timeline: Sequence[Mapping[str, object]]) -> dict[str, float] | None:
    """What held the queue back: over the timeline samples with requests queued, the mean share of the KV
    capacity that was free. Near 0 the queue waited for memory (what the memory policies act on); well above 0 it
    waited for compute (step token budget, sequence slots), which no memory policy relieves. None if nothing
    queued."""
    rows = [r for r in timeline if int(r["queue_len"]) > 0 and float(r["kv_capacity_tokens"]) > 0]
    if not rows:
        return None
    shares = [float(r["kv_free_tokens"]) / float(r["kv_capacity_tokens"]) for r in rows]
    return {"queued_samples": len(rows), "mean_free_kv_share_while_queued": sum(shares) / len(shares)}


def diagnose(pressure: Mapping[str, Mapping[str, float] | None], subject: str) -> str | None:
    """A warning when the baselines' queues (every policy's but `subject`'s) formed with KV to spare: the window
    overloads compute, not memory."""
    shares = {k: p["mean_free_kv_share_while_queued"] for k, p in pressure.items() if p and k != subject}
    if not shares or min(shares.values()) <= COMPUTE_BOUND_FREE_SHARE:
        return None
    worst = min(shares, key=shares.__getitem__)
    amount = "nearly all" if shares[worst] >= 0.995 else f"{shares[worst]:.0%} or more"
    return (f"while requests queued, {amount} of the KV was free on average (least under {worst}): this "
            f"window overloads compute (step token budget, sequence slots) before memory, so the "
            f"memory policies can differ little; a memory-bound comparison needs a larger --target-peak-ratio or "
            f"longer requests, or more compute per step (--max-num-batched-tokens, --max-num-seqs)")


def format_comparison(c: Mapping[str, object]) -> str:
    return (f"P99 TTFT, best baseline ({c['best_baseline']}) / {c['subject']}: "
            f"{c['ttft_p99_ratio_best_baseline_over_subject']:.2f}x; P99 TPOT cost, {c['subject']} / "
            f"{c['best_baseline']}: {c['tpot_p99_ratio_subject_over_best_baseline']:.2f}x")


# ---- plots ---------------------------------------------------------------------------------------------------
def write_plots(out: Path, runs: Mapping[str, tuple[Sequence[RequestRecord], Sequence[Mapping[str, object]],
                                                    Sequence[Mapping[str, object]]]],
                summaries: Mapping[str, Mapping[str, object]], subject: str) -> list[str]:
    """`ttft_cdf.png`, `ttft_p99.png` (the subject's bar in red), `timeline.png` from {policy: (records, timeline
    rows, events)}; returns the files written, or raises ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (records, _, _) in runs.items():
        xs = sorted(r.ttft_s for r in records if r.completed and r.ttft_s is not None)
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name, drawstyle="steps-post")
    ax.set(xlabel="TTFT (s)", ylabel="fraction of completed requests", title="TTFT CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ttft_cdf.png", dpi=110)
    plt.close(fig)
    written.append("ttft_cdf.png")

    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(summaries) + 2), 4))
    names = list(summaries)
    vals = [float(summaries[n]["ttft_p99_s"]) for n in names]
    bars = ax.bar(names, [0.0 if math.isnan(v) else v for v in vals],
                  color=["tab:red" if n == subject else "tab:blue" for n in names])
    for b, v in zip(bars, vals, strict=True):
        ax.annotate("n/a" if math.isnan(v) else f"{v:.2f}s", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set(ylabel="P99 TTFT (s)", title="P99 TTFT by policy")
    fig.tight_layout()
    fig.savefig(out / "ttft_p99.png", dpi=110)
    plt.close(fig)
    written.append("ttft_p99.png")

    fig = timeline_figure(runs)
    fig.savefig(out / "timeline.png", dpi=100)
    plt.close(fig)
    written.append("timeline.png")
    return written


EVENT_COLORS = {"drop": "tab:purple", "restore": "tab:orange"}


def timeline_figure(runs: Mapping[str, tuple[Sequence[RequestRecord], Sequence[Mapping[str, object]],
                                             Sequence[Mapping[str, object]]]]):
    """One panel per policy: KV demand, capacity and free (left axis), the queue (right axis), and each policy
    event (drop, restore, migration, ...) as a vertical line coloured by its kind. Nothing is drawn over the
    curves but the lines: the series and the event kinds, with their counts, share one legend above the panels,
    so no label is clipped, overlaps another or hides a marker."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    kinds = list(dict.fromkeys(str(ev["kind"]) for _, _, events in runs.values() for ev in events))
    others = iter(c for c in ("tab:gray", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "black")
                  if c not in EVENT_COLORS.values())
    colors = {k: EVENT_COLORS.get(k) or next(others, "grey") for k in kinds}
    counts = {k: sum(str(ev["kind"]) == k for _, _, events in runs.values() for ev in events) for k in kinds}
    n = len(runs)
    fig, axes = plt.subplots(n, 1, figsize=(10, 3.0 * n + 0.8), squeeze=False, sharex=True, layout="constrained")
    handles: list = []
    for ax, (name, (_, rows, events)) in zip(axes[:, 0], runs.items(), strict=True):
        t = [float(r["t_s"]) for r in rows]
        lines = [ax.plot(t, [float(r["kv_demand_tokens"]) for r in rows], label="KV demand (tokens)",
                         color="tab:red")[0],
                 ax.plot(t, [float(r["kv_capacity_tokens"]) for r in rows], label="KV capacity", color="black",
                         lw=1)[0],
                 ax.plot(t, [float(r["kv_free_tokens"]) for r in rows], label="KV free", color="tab:green",
                         lw=1)[0]]
        ax.set_ylabel("tokens")
        q = ax.twinx()
        lines.append(q.plot(t, [float(r["queue_len"]) for r in rows], label="queue (requests, right axis)",
                            color="tab:blue", ls="--")[0])
        q.set_ylabel("queued requests")
        for ev in events:
            ax.axvline(float(ev["t_s"]), color=colors[str(ev["kind"])], ls=":", lw=2)
        ax.set_title(name if events else f"{name} (no policy events)", fontsize=10)
        ax.grid(alpha=0.3)
        handles = handles or lines
    axes[-1, 0].set_xlabel("time since replay start (s)")
    handles += [Line2D([], [], color=colors[k], ls=":", lw=2, label=f"{k} ({counts[k]})") for k in kinds]
    fig.legend(handles=handles, loc="outside upper center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    return fig
