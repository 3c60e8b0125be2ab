"""Workloads: every trace format read from its header, the synthetic generator's statistics, the transforms that
fit a workload to a machine, and prompts synthesized to exact lengths."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from kunjax.workloads import (
    LengthDist,
    TraceFormatError,
    TraceRequest,
    Workload,
    burstiest_window,
    clip_lengths,
    find_burstiest,
    fit,
    load_trace,
    peak_demand,
    scale_lengths,
    scale_rate,
    synthesize_prompts,
    synthetic,
    time_scale,
    window,
)

AZURE_2023 = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:48.0000000,10,5
"""
AZURE_2024 = """TIMESTAMP,ContextTokens,GeneratedTokens
2024-05-10 00:00:00.009930+00:00,2162,5
2024-05-10 00:00:01.509930+00:00,30,200
"""
BURSTGPT = """Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type
5,1,0.3,ChatGPT,472,18,490,Conversation log
45,2,1.1,ChatGPT,1087,0,1087,Conversation log
118,3,0.8,GPT-4,417,38,455,API log
"""


def _workload(*reqs: tuple[float, int, int]) -> Workload:
    return Workload(requests=tuple(TraceRequest(a, p, o) for a, p, o in reqs), source="test")


# ---- loaders -------------------------------------------------------------------------------------------------
def test_azure_2023_rows_become_sorted_offsets_from_the_first_request(tmp_path):
    path = tmp_path / "conv.csv"
    path.write_text(AZURE_2023)
    w = load_trace(path)
    assert w.source.startswith("azure-2023 trace")
    assert [r.arrival_s for r in w.requests] == pytest.approx([0.0, 48.0 - 46.68059, 50.995169 - 46.68059])
    assert [(r.prompt_tokens, r.output_tokens) for r in w.requests] == [(374, 44), (10, 5), (396, 109)]


def test_azure_2024_timestamps_with_offsets_and_gzip(tmp_path):
    path = tmp_path / "week.csv.gz"
    path.write_bytes(gzip.compress(AZURE_2024.encode()))
    w = load_trace(path)
    assert w.source.startswith("azure-2024 trace")
    assert [r.arrival_s for r in w.requests] == pytest.approx([0.0, 1.5])
    assert w.requests[1].output_tokens == 200


def test_burstgpt_skips_failed_requests_and_says_how_many(tmp_path):
    path = tmp_path / "burst.csv"
    path.write_text(BURSTGPT)
    w = load_trace(path)
    assert w.source.startswith("burstgpt trace")
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in w.requests] == [(0.0, 472, 18),
                                                                                     (113.0, 417, 38)]
    assert any("skipped 1 failed request" in n for n in w.notes)


def test_mooncake_jsonl_keeps_shared_prefix_ids(tmp_path):
    lines = [{"timestamp": 0, "input_length": 1000, "output_length": 6, "hash_ids": [0, 1]},
             {"timestamp": 2500, "input_length": 600, "output_length": 4, "hash_ids": [0, 2]}]
    path = tmp_path / "mooncake.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    w = load_trace(path)
    assert w.source.startswith("mooncake trace")
    assert [r.arrival_s for r in w.requests] == [0.0, 2.5]
    assert [r.prefix_ids for r in w.requests] == [(0, 1), (0, 2)]
    assert w.prefix_block_tokens == 512


def test_unknown_header_names_the_file_and_the_columns_seen(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("time,prompt,completion\n1,2,3\n")
    with pytest.raises(TraceFormatError) as e:
        load_trace(path)
    assert str(path) in str(e.value) and "'time', 'prompt', 'completion'" in str(e.value)
    assert "TIMESTAMP,ContextTokens,GeneratedTokens" in str(e.value)


def test_a_bad_row_is_reported_with_its_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(AZURE_2023 + "2023-11-16 18:16:00.0,many,3\n")
    with pytest.raises(TraceFormatError, match=r"bad.csv:5: column 'ContextTokens': not a number: 'many'"):
        load_trace(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(TraceFormatError, match="no such file"):
        load_trace(tmp_path / "nope.csv")


def test_the_bundled_azure_conversation_trace():
    w = load_trace("azure-conv")
    # The file holds 19,366 data rows (its last line has no newline, so `wc -l` shows one fewer).
    assert len(w) == 19_366
    assert 3500 < w.duration_s < 3600
    assert w.requests[0] == TraceRequest(0.0, 374, 44)


# ---- synthetic -----------------------------------------------------------------------------------------------
def _cv(w: Workload) -> float:
    gaps = np.diff([r.arrival_s for r in w.requests])
    return float(np.std(gaps) / np.mean(gaps))


def test_poisson_arrivals_have_the_rate_and_cv_1():
    w = synthetic(num_requests=20_000, rate=5.0, seed=1)
    assert len(w) == 20_000
    assert len(w) / w.duration_s == pytest.approx(5.0, rel=0.03)
    assert _cv(w) == pytest.approx(1.0, abs=0.03)


def test_gamma_arrivals_have_the_burstiness_knob_as_cv():
    w = synthetic(num_requests=20_000, rate=5.0, arrival="gamma", burstiness=3.0, seed=1)
    assert len(w) / w.duration_s == pytest.approx(5.0, rel=0.1)
    assert _cv(w) == pytest.approx(3.0, rel=0.1)
    smooth = synthetic(num_requests=20_000, rate=5.0, arrival="gamma", burstiness=0.5, seed=1)
    assert _cv(smooth) == pytest.approx(0.5, rel=0.05)


def test_synthetic_is_deterministic_and_lengths_follow_their_distributions():
    a = synthetic(duration_s=60, rate=3, prompt_len="uniform:10:20", output_len="fixed:7", seed=4)
    assert a == synthetic(duration_s=60, rate=3, prompt_len="uniform:10:20", output_len="fixed:7", seed=4)
    assert all(r.arrival_s < 60 for r in a.requests)
    assert {r.output_tokens for r in a.requests} == {7}
    assert min(r.prompt_tokens for r in a.requests) >= 10 and max(r.prompt_tokens for r in a.requests) <= 20
    ln = LengthDist.parse("lognormal:200:1.0").sample(np.random.default_rng(0), 50_000)
    assert ln.mean() == pytest.approx(200, rel=0.03) and ln.std() / ln.mean() == pytest.approx(1.0, rel=0.08)


@pytest.mark.parametrize("text, message", [
    ("gauss:3", "unknown length distribution 'gauss'"),
    ("uniform:5", "uniform takes 2 parameter"),
    ("uniform:9:3", "need LO <= HI"),
    ("fixed:x", "must be numbers"),
    ("fixed:0", "must be >= 1"),
])
def test_bad_length_distributions_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        LengthDist.parse(text)


# ---- transforms ----------------------------------------------------------------------------------------------
def _steady_with_burst() -> Workload:
    """1 request/s of 100 tokens for 100 s, plus 20 requests of 1000 tokens between t=60 and t=62."""
    reqs = [(float(t), 90, 10) for t in range(100)]
    reqs += [(60 + i * 0.1, 900, 100) for i in range(20)]
    return _workload(*sorted(reqs))


def test_burstiest_window_is_the_one_with_the_most_requested_tokens():
    w = _steady_with_burst()
    start, tokens = find_burstiest(w, 2.0)
    assert start == 60.0 and tokens == 20 * 1000 + 2 * 100
    cut = burstiest_window(w, 2.0)
    assert cut.requests[0].arrival_s == 0.0 and len(cut) == 22
    # Many small requests beat a few large ones when counting arrivals instead of tokens.
    many = _workload(*[(i * 0.01, 1, 1) for i in range(50)], (10.0, 5000, 5000), (10.1, 5000, 5000))
    assert find_burstiest(many, 1.0, by="requests")[0] == 0.0
    assert find_burstiest(many, 1.0, by="tokens")[0] == 10.0


def test_peak_demand_counts_the_tokens_arriving_within_the_demand_window():
    w = _steady_with_burst()
    tokens, at = peak_demand(w, 2.0)  # (t - 2, t]: the burst's 20 requests and the steady ones at 61 and 62
    assert tokens == 20 * 1000 + 2 * 100 and at == pytest.approx(61.9)


def test_time_scale_window_and_rate_scale():
    w = _workload(*[(float(t), 5, 5) for t in range(10)])
    assert [r.arrival_s for r in time_scale(w, 0.5).requests] == [t / 2 for t in range(10)]
    cut = window(w, 3.0, 4.0)
    assert [r.arrival_s for r in cut.requests] == [0.0, 1.0, 2.0, 3.0]
    thin = scale_rate(w, 0.3)
    assert len(thin) == 3 and thin == scale_rate(w, 0.3)
    double = scale_rate(w, 2.0)
    assert len(double) == 20
    assert [r.arrival_s for r in double.requests[:4]] == [0.0, 0.5, 1.0, 1.5]  # copies spread over the gap
    assert "rate scaled by 2" in double.notes[-1]


def test_lengths_are_scaled_and_clipped_keeping_the_prompt_output_ratio():
    w = _workload((0.0, 300, 100), (1.0, 50, 10), (2.0, 1000, 1))
    clipped, n = clip_lengths(w, 200)
    assert n == 2
    assert [(r.prompt_tokens, r.output_tokens) for r in clipped.requests] == [(150, 50), (50, 10), (199, 1)]
    assert [(r.prompt_tokens, r.output_tokens) for r in scale_lengths(w, 0.1).requests] == [(30, 10), (5, 1),
                                                                                           (100, 1)]


def test_fit_reaches_the_target_peak_ratio_within_the_duration():
    w = synthetic(duration_s=3600, rate=2.0, arrival="gamma", burstiness=2.0, prompt_len="uniform:100:400",
                  output_len="uniform:20:80", seed=3)
    res = fit(w, capacity_tokens=20_000, target_peak_ratio=2.0, max_duration_s=30, max_model_len=512,
              demand_window_s=10)
    peak, _ = peak_demand(res.workload, 10)
    assert peak / 20_000 == pytest.approx(2.0, rel=0.1)
    assert res.choices["peak_ratio"] == pytest.approx(peak / 20_000, abs=1e-3)
    assert res.workload.duration_s <= 30
    assert all(r.prompt_tokens + r.output_tokens <= 512 for r in res.workload.requests)
    for key in ("window_start_trace_s", "window_trace_s", "time_scale", "length_scale", "clipped_requests",
                "demand_window_s", "capacity_tokens", "requests", "peak_demand_tokens"):
        assert key in res.choices
    small = fit(w, capacity_tokens=20_000, max_duration_s=30, max_requests=50, demand_window_s=10)
    assert len(small.workload) <= 50


def test_fit_scales_lengths_so_the_median_request_is_half_the_context_never_up():
    w = _workload(*[(float(t), 1000 + t, 100) for t in range(200)])
    res = fit(w, capacity_tokens=5000, max_model_len=512, max_duration_s=20, demand_window_s=5)
    assert res.choices["length_scale"] == pytest.approx(256 / np.median([1100 + t for t in range(200)]),
                                                                rel=1e-5)
    short = fit(_workload((0.0, 10, 10), (1.0, 10, 10)), 100, max_model_len=512, demand_window_s=1)
    assert math.isclose(short.choices["length_scale"], 1.0)


def test_fit_honours_a_given_window_start_and_time_scale():
    w = _steady_with_burst()
    res = fit(w, capacity_tokens=1000, max_duration_s=20, window_start_s=10.0, time_scale_factor=2.0,
              demand_window_s=4)
    assert res.choices["window_start_trace_s"] == 10.0 and res.choices["window_trace_s"] == 10.0
    assert [r.arrival_s for r in res.workload.requests] == [2.0 * i for i in range(10)]
    assert res.choices["time_scale_rule"] == "given"


# ---- prompts -------------------------------------------------------------------------------------------------
def test_prompts_have_exact_lengths_avoid_excluded_ids_and_are_deterministic():
    w = _workload((0.0, 5, 1), (1.0, 300, 1), (2.0, 1, 1))
    prompts = synthesize_prompts(w, vocab_size=50, excluded_ids={0, 1, 2}, seed=7)
    assert [len(p) for p in prompts] == [5, 300, 1]
    assert all(3 <= t < 50 for p in prompts for t in p)
    assert prompts == synthesize_prompts(w, vocab_size=50, excluded_ids={0, 1, 2}, seed=7)
    assert prompts != synthesize_prompts(w, vocab_size=50, excluded_ids={0, 1, 2}, seed=8)


def test_shared_prefix_ids_become_shared_token_prefixes():
    w = Workload(requests=(TraceRequest(0.0, 10, 1, (4, 5)), TraceRequest(1.0, 7, 1, (4, 6)),
                           TraceRequest(2.0, 10, 1, (9,))), source="test", prefix_block_tokens=4)
    a, b, c = synthesize_prompts(w, vocab_size=1000, seed=0)
    assert a[:4] == b[:4] and a[4:8] != b[4:8]
    assert a[:4] != c[:4]
    assert [len(a), len(b), len(c)] == [10, 7, 10]


def test_conversations_resend_their_history_and_share_system_prompts():
    from kunjax.workloads import conversations, synthesize_prompts

    w = conversations(num_conversations=30, rate=2.0, turns="uniform:2:5", system_prompts=3, system_tokens=64,
                      user_len="uniform:5:40", output_len="uniform:3:30", think_s=4.0, block_tokens=16, seed=1)
    assert w == conversations(num_conversations=30, rate=2.0, turns="uniform:2:5", system_prompts=3,
                              system_tokens=64, user_len="uniform:5:40", output_len="uniform:3:30", think_s=4.0,
                              block_tokens=16, seed=1), "not deterministic"
    assert [r.arrival_s for r in w.requests] == sorted(r.arrival_s for r in w.requests)
    turns: dict[str, list] = {}
    for r in w.requests:
        turns.setdefault(r.session, []).append(r)
        assert r.prompt_tokens == 16 * len(r.prefix_ids)
    assert len(turns) == 30 and all(2 <= len(t) <= 5 for t in turns.values())
    for ts in turns.values():
        for a, b in zip(ts, ts[1:], strict=False):
            # the next turn resends this one's prompt, then this turn's answer (output rounded to blocks), then more
            assert b.prefix_ids[:len(a.prefix_ids)] == a.prefix_ids
            assert len(b.prefix_ids) >= len(a.prefix_ids) + -(-a.output_tokens // 16) + 1
    systems = {r.prefix_ids[:4] for ts in turns.values() for r in ts[:1]}
    assert len(systems) <= 3  # every conversation opens with one of the shared system prompts
    prompts = synthesize_prompts(w, vocab_size=1000, seed=0)
    first, second = [i for i, r in enumerate(w.requests) if r.session == w.requests[0].session][:2]
    assert prompts[second][:len(prompts[first])] == prompts[first]  # equal ids, equal tokens
