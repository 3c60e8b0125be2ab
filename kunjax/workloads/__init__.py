"""Workloads for replay benchmarks: trace loaders, a synthetic generator, transforms that fit a workload to a
machine, and prompt synthesis (`kunjax bench` replays them; see `kunjax/bench/`).

    w = load_trace("azure-conv")                        # a bundled trace, or any path (.csv, .jsonl, .gz)
    fitted = fit(w, capacity_tokens=21_000, max_model_len=512)
    prompts = synthesize_prompts(fitted.workload, vocab_size=1024, excluded_ids={0, 1, 2})
"""

from kunjax.workloads.conversations import conversations
from kunjax.workloads.prompts import synthesize_prompts
from kunjax.workloads.synthetic import LengthDist, synthetic
from kunjax.workloads.trace import (
    BUNDLED_TRACES,
    TraceFormatError,
    TraceRequest,
    Workload,
    load_trace,
    resolve_trace,
)
from kunjax.workloads.transforms import (
    FitResult,
    burstiest_window,
    clip_lengths,
    find_burstiest,
    fit,
    peak_demand,
    scale_lengths,
    scale_rate,
    time_scale,
    window,
)

__all__ = [
    "BUNDLED_TRACES", "FitResult", "LengthDist", "TraceFormatError", "TraceRequest", "Workload",
    "burstiest_window", "clip_lengths", "conversations", "find_burstiest", "fit", "load_trace", "peak_demand",
    "resolve_trace", "scale_lengths", "scale_rate", "synthesize_prompts", "synthetic", "time_scale", "window",
]
