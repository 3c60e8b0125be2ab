"""Transformations that fit a workload to a machine: time and rate scaling, windows, lengths, and `fit`.

Every transform is a pure function `Workload -> Workload` that appends one note saying what it did, so a
replay can print and record every choice. None of them draws random numbers: the same input gives the same
output.

KV demand, the quantity `fit` aims at: at time t, the tokens (prompt + output) of the requests that arrived
in the last `demand_window_s` seconds — what an ideal server would hold if every request lived that long. Its
peak over the workload is compared with the machine's KV capacity (tokens). The burstiest window is the window
of the given length with the most *requested tokens* (prompt + output of the requests arriving in it; ties go
to the earliest), not the most arrivals (`by="requests"` selects on arrivals instead).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kunjax.workloads.trace import TraceRequest, Workload


def _arrays(w: Workload) -> tuple[np.ndarray, np.ndarray]:  # arrivals [N] f64, tokens (prompt + output) [N] i64
    a = np.fromiter((r.arrival_s for r in w.requests), dtype=np.float64, count=len(w))
    t = np.fromiter((r.prompt_tokens + r.output_tokens for r in w.requests), dtype=np.int64, count=len(w))
    return a, t


def time_scale(w: Workload, factor: float) -> Workload:
    """Arrival times multiplied by `factor` (< 1 compresses time: the same requests, a higher rate)."""
    if not factor > 0:
        raise ValueError(f"time scale must be > 0, got {factor}")
    reqs = [dataclasses.replace(r, arrival_s=r.arrival_s * factor) for r in w.requests]
    return w.derive(reqs, f"time scaled by {factor:.4g} (rate x{1 / factor:.3g})")


def window(w: Workload, start_s: float, duration_s: float) -> Workload:
    """The requests arriving in `[start_s, start_s + duration_s)`, shifted so `start_s` becomes 0."""
    if not duration_s > 0:
        raise ValueError(f"window duration must be > 0, got {duration_s}")
    reqs = [dataclasses.replace(r, arrival_s=r.arrival_s - start_s) for r in w.requests
            if start_s <= r.arrival_s < start_s + duration_s]
    if not reqs:
        raise ValueError(f"no request arrives in the window [{start_s:g}s, {start_s + duration_s:g}s)")
    return w.derive(reqs, f"window [{start_s:.2f}s, {start_s + duration_s:.2f}s): {len(reqs)} of {len(w)} requests")


def find_burstiest(w: Workload, duration_s: float, by: str = "tokens") -> tuple[float, int]:
    """(start, amount) of the `duration_s` window with the most requested tokens (or arrivals, `by="requests"`).

    Candidate windows start at an arrival; ties go to the earliest. A window longer than the workload starts at 0.
    """
    return _burstiest(*_arrays(w), duration_s, by)


def _burstiest(a: np.ndarray, t: np.ndarray, duration_s: float, by: str) -> tuple[float, int]:
    if by not in ("tokens", "requests"):
        raise ValueError(f"by must be 'tokens' or 'requests', got {by!r}")
    weight = t if by == "tokens" else np.ones_like(t)
    cum = np.concatenate([[0], np.cumsum(weight)])
    end = np.searchsorted(a, a + duration_s, side="left")
    sums = cum[end] - cum[np.arange(len(a))]
    i = int(np.argmax(sums))
    return float(a[i]), int(sums[i])


def burstiest_window(w: Workload, duration_s: float, by: str = "tokens") -> Workload:
    """The window of `duration_s` with the most requested tokens (see `find_burstiest`), shifted to start at 0."""
    start, amount = find_burstiest(w, duration_s, by)
    out = window(w, start, duration_s)
    return dataclasses.replace(out, notes=(*out.notes[:-1], out.notes[-1] + f", the burstiest by {by} ({amount})"))


def peak_demand(w: Workload, demand_window_s: float) -> tuple[int, float]:
    """(tokens, time) of the peak KV demand: most tokens requested within any `demand_window_s` (module doc)."""
    if not len(w):
        return 0, 0.0
    a, t = _arrays(w)
    cum = np.concatenate([[0], np.cumsum(t)])
    first = np.searchsorted(a, a - demand_window_s, side="right")  # window (a_i - h, a_i] ends at each arrival
    sums = cum[np.arange(1, len(a) + 1)] - cum[first]
    i = int(np.argmax(sums))
    return int(sums[i]), float(a[i])


def scale_rate(w: Workload, factor: float) -> Workload:
    """Request rate multiplied by `factor` without changing the time axis; deterministic.

    Below 1, thinning keeps request i when `floor((i + 1) f) > floor(i f)` — evenly spread, exactly `round(n f)`
    kept. Above 1, each request is copied `floor((i + 1) f) - floor(i f)` times (the same rule), the copies spread
    evenly over the gap to the next arrival, so bursts keep their shape rather than stacking at one instant.
    """
    if not factor > 0:
        raise ValueError(f"rate scale must be > 0, got {factor}")
    reqs: list[TraceRequest] = []
    rs = w.requests
    for i, r in enumerate(rs):
        copies = math.floor((i + 1) * factor + 1e-9) - math.floor(i * factor + 1e-9)
        gap = (rs[i + 1].arrival_s - r.arrival_s) if i + 1 < len(rs) else 0.0
        reqs.extend(dataclasses.replace(r, arrival_s=r.arrival_s + gap * j / copies) for j in range(copies))
    if not reqs:
        raise ValueError(f"rate scale {factor:g} leaves no request of {len(w)}")
    return w.derive(reqs, f"rate scaled by {factor:.4g}: {len(reqs)} requests from {len(w)}")


def scale_lengths(w: Workload, factor: float) -> Workload:
    """Prompt and output token counts multiplied by `factor` (rounded, at least 1); prefix blocks scale too."""
    if not factor > 0:
        raise ValueError(f"length scale must be > 0, got {factor}")
    reqs = [dataclasses.replace(r, prompt_tokens=max(1, round(r.prompt_tokens * factor)),
                                output_tokens=max(1, round(r.output_tokens * factor))) for r in w.requests]
    block = max(1, round(w.prefix_block_tokens * factor)) if w.prefix_block_tokens else 0
    return w.derive(reqs, f"lengths scaled by {factor:.4g}", prefix_block_tokens=block)


def clip_lengths(w: Workload, max_model_len: int) -> tuple[Workload, int]:
    """Requests longer than `max_model_len` (prompt + output) shrunk to it, keeping their prompt/output ratio
    (prompt at least 1 and below the limit, output at least 1); returns the workload and how many were clipped."""
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    reqs, clipped = [], 0
    for r in w.requests:
        total = r.prompt_tokens + r.output_tokens
        if total <= max_model_len:
            reqs.append(r)
            continue
        clipped += 1
        p = min(max(1, round(r.prompt_tokens * max_model_len / total)), max_model_len - 1)
        reqs.append(dataclasses.replace(r, prompt_tokens=p, output_tokens=max_model_len - p))
    return w.derive(reqs, f"clipped {clipped} request(s) to {max_model_len} tokens (prompt + output)"), clipped


@dataclasses.dataclass(frozen=True)
class FitResult:
    workload: Workload
    choices: dict[str, object]  # every decision, JSON-ready


def fit(w: Workload, capacity_tokens: int, *, target_peak_ratio: float = 2.0, max_duration_s: float = 15.0,
        max_requests: int = 600, max_model_len: int | None = None, length_scale: float | str = "auto",
        demand_window_s: float = 15.0, window_start_s: float | None = None,
        time_scale_factor: float | None = None) -> FitResult:
    """Fit a workload to a machine whose KV pools hold `capacity_tokens` in all.

    1. Lengths: with `max_model_len`, `length_scale="auto"` scales token counts so the median request
       (prompt + output) is half the model's context (never up: no scaling when it is shorter), which keeps the
       shape of the length distribution up to twice the median; then longer requests are clipped
       (`clip_lengths`). A number scales by that factor instead (1: clipping only).
    2. Time: a time scale `s` (replay seconds per trace second) is found by bisection so that the peak KV demand
       (module docstring) within the chosen window is `target_peak_ratio` x `capacity_tokens`. The window is the
       burstiest (by requested tokens) of `max_duration_s / s` trace seconds, or starts at `window_start_s`
       (trace seconds) when given. `time_scale_factor` fixes `s` instead.
    3. Size: while the window holds more than `max_requests` requests, the window is shortened.
    """
    if capacity_tokens <= 0:
        raise ValueError(f"capacity_tokens must be > 0, got {capacity_tokens}")
    if not target_peak_ratio > 0 or not max_duration_s > 0 or not demand_window_s > 0 or max_requests < 1:
        raise ValueError("target_peak_ratio, max_duration_s, demand_window_s and max_requests must be positive")
    choices: dict[str, object] = {"source": w.source, "trace_requests": len(w),
                                  "trace_duration_s": round(w.duration_s, 3), "capacity_tokens": capacity_tokens,
                                  "target_peak_ratio": target_peak_ratio, "demand_window_s": demand_window_s,
                                  "window_by": "tokens"}
    # 1. lengths
    scale = 1.0
    if max_model_len is not None:
        _, tokens = _arrays(w)
        median = float(np.median(tokens))
        if length_scale == "auto":
            scale = min(1.0, max_model_len / 2 / median)
            choices["length_scale_rule"] = (f"auto: the median request ({median:.0f} tokens) becomes half the "
                                            f"model's {max_model_len}-token context")
        else:
            scale = float(length_scale)
        if scale != 1.0:
            w = scale_lengths(w, scale)
        w, clipped = clip_lengths(w, max_model_len)
        choices.update(max_model_len=max_model_len, length_scale=round(scale, 6), clipped_requests=clipped)
    elif length_scale not in ("auto", 1, 1.0):
        w = scale_lengths(w, float(length_scale))
        choices["length_scale"] = float(length_scale)
    target = target_peak_ratio * capacity_tokens
    a, t = _arrays(w)
    cum = np.concatenate([[0], np.cumsum(t)])

    def start_of(span: float) -> float:
        return window_start_s if window_start_s is not None else _burstiest(a, t, span, "tokens")[0]

    def peak_at(s: float, duration: float) -> int:
        """Peak demand of the window after time scaling by s, on the arrays (no Workload built)."""
        span, h = duration / s, demand_window_s / s  # trace seconds
        start = start_of(span)
        lo, hi = np.searchsorted(a, [start, start + span], side="left")
        if hi <= lo:
            return 0
        idx = np.arange(lo, hi)
        first = np.maximum(np.searchsorted(a, a[idx] - h, side="right"), lo)
        return int(np.max(cum[idx + 1] - cum[first]))

    duration = max_duration_s
    for _ in range(40):
        if time_scale_factor is not None:
            s = time_scale_factor
        else:  # peak demand falls as s grows (a longer time axis spreads the same tokens): bisect on log s
            lo, hi = math.log(1e-4), math.log(1e4)
            for _ in range(60):
                mid = (lo + hi) / 2
                if peak_at(math.exp(mid), duration) > target:
                    lo = mid
                else:
                    hi = mid
            s = math.exp(hi)
        start = start_of(duration / s)
        fitted = time_scale(window(w, start, duration / s), s)
        if len(fitted) <= max_requests:
            break
        duration *= 0.85 * max_requests / len(fitted) if len(fitted) > 2 * max_requests else 0.9
    peak, peak_t = peak_demand(fitted, demand_window_s)
    choices.update(
        time_scale=round(s, 6), rate_multiplier=round(1 / s, 4),
        time_scale_rule="given" if time_scale_factor is not None else
        f"bisection: peak KV demand {target_peak_ratio:g}x capacity",
        max_requests=max_requests,
        window_rule="given start" if window_start_s is not None else "burstiest by requested tokens",
        window_start_trace_s=round(start, 3), window_trace_s=round(duration / s, 3), duration_s=round(duration, 3),
        requests=len(fitted), prompt_tokens=fitted.prompt_tokens, output_tokens=fitted.output_tokens,
        peak_demand_tokens=peak, peak_at_s=round(peak_t, 3), peak_ratio=round(peak / capacity_tokens, 3))
    return FitResult(fitted, choices)
