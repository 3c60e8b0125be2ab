"""Per-request measurements of a replay and the summary statistics computed from them.

Owns the definitions, so the CSVs, `summary.json` and the printed table agree:

* every time is seconds since the replay started; a request's *arrival* is its scheduled arrival (replay start
  + the workload's offset), so a late submission counts against the runtime, as it would for a real client;
* queue = first scheduled by the engine - arrival (submit + the engine's reported queue time; empty for a request
  never scheduled);
* TTFT = first output token received - arrival; e2e = last event received - arrival;
* TPOT = (e2e - TTFT) / (output tokens - 1), defined for requests with at least 2 output tokens;
* completed = finished with reason "stop" or "length"; every other outcome (abort, error, timeout, rejected)
  is failed. Latency percentiles are over completed requests;
* SLO attainment = completed requests with TTFT <= the TTFT SLO and TPOT <= the TPOT SLO (a one-token
  request meets the TPOT SLO) / all requests; goodput = those requests / makespan (requests/s);
* throughput = output tokens of completed requests / makespan (tokens/s); makespan = replay start to the last
  request's end.

Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

COMPLETED_REASONS = ("stop", "length")
PERCENTILES = (50, 90, 99)
METRICS = ("queue_s", "ttft_s", "tpot_s", "e2e_s")


@dataclasses.dataclass
class RequestRecord:
    """One request of a replay: what was asked and what was measured (times since the replay start)."""

    index: int
    request_id: str
    arrival_s: float  # scheduled arrival
    prompt_tokens: int
    max_tokens: int
    submit_s: float | None = None  # when the runtime accepted it
    scheduled_s: float | None = None  # when the engine first scheduled it (submit + the engine's queue time)
    first_token_s: float | None = None
    end_s: float | None = None
    output_tokens: int = 0
    finish_reason: str | None = None  # stop | length | abort | error | timeout | rejected
    error: str = ""
    session_id: str = ""  # the conversation it belongs to, when the trace says (sent with the request)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (the runtime's usage, at the end)
    output_ids: list[int] | None = None  # the generated ids, kept when a later turn's prompt needs them

    @property
    def completed(self) -> bool:
        return self.finish_reason in COMPLETED_REASONS

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def queue_s(self) -> float | None:
        return None if self.scheduled_s is None else max(self.scheduled_s - self.arrival_s, 0.0)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.end_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)


@dataclasses.dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float

    def met(self, r: RequestRecord) -> bool:
        if not r.completed or r.ttft_s is None or r.ttft_s > self.ttft_s:
            return False
        tpot = r.tpot_s
        return tpot is None or tpot <= self.tpot_s


def percentile(xs: Sequence[float], q: float) -> float:
    """Linearly interpolated percentile, q in [0, 100]; NaN for no data."""
    s = sorted(xs)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _values(records: Sequence[RequestRecord], metric: str) -> list[float]:
    return [v for r in records if r.completed and (v := getattr(r, metric)) is not None]


def summarize(records: Sequence[RequestRecord], slo: Slo) -> dict[str, object]:
    """The policy's summary: the keys of `summary.json`'s per-policy entry (module docstring for definitions)."""
    done = [r for r in records if r.completed]
    ends = [r.end_s for r in records if r.end_s is not None]
    makespan = max(ends) if ends else math.nan
    out_tokens = sum(r.output_tokens for r in done)
    met = sum(slo.met(r) for r in records)
    reasons: dict[str, int] = {}
    for r in records:
        key = r.finish_reason or "unfinished"
        reasons[key] = reasons.get(key, 0) + 1
    pct = {m: {f"p{q}": percentile(_values(records, m), q) for q in PERCENTILES} for m in METRICS}
    for m in METRICS:
        vals = _values(records, m)
        pct[m]["mean"] = sum(vals) / len(vals) if vals else math.nan
        pct[m]["count"] = len(vals)
    rate = (lambda x: x / makespan) if makespan > 0 else (lambda x: math.nan)
    cached, prompt = sum(r.cached_tokens for r in done), sum(r.prompt_tokens for r in done)
    return {
        "ttft_p50_s": pct["ttft_s"]["p50"], "ttft_p99_s": pct["ttft_s"]["p99"],
        "tpot_p99_s": pct["tpot_s"]["p99"], "e2e_p99_s": pct["e2e_s"]["p99"],
        "completed": len(done), "failed": len(records) - len(done),
        "slo_attainment": met / len(records) if records else math.nan,
        "throughput_tok_s": rate(out_tokens),
        "goodput_req_s": rate(met), "slo_met": met, "requests": len(records), "output_tokens": out_tokens,
        "makespan_s": makespan, "finish_reasons": reasons, "percentiles": pct,
        # prefix caching: prompt tokens of the completed requests served from cache (prefill not computed)
        "prompt_tokens_completed": prompt, "cached_prompt_tokens": cached,
        "prefix_hit_rate": cached / prompt if prompt else math.nan,
        "jct_mean_s": pct["e2e_s"]["mean"],  # job completion time as MemServe reports it: mean e2e
    }
