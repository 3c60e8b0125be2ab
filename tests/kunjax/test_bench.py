"""`kunjax bench`: the metrics' arithmetic by hand, the timeline's accounting, bad flags named, and a short
in-process run of two policies through the CLI writing every file."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from kunjax.api import InstanceLoad
from kunjax.bench.metrics import RequestRecord, Slo, percentile, summarize
from kunjax.bench.replay import timeline_row
from kunjax.bench.report import comparison, diagnose, queue_pressure
from kunjax.cli import main
from kunjax.engine import config_from_kwargs


def _rec(i: int, arrival: float, first: float | None, end: float | None, out: int, reason: str,
         scheduled: float | None = None) -> RequestRecord:
    return RequestRecord(index=i, request_id=f"r{i}", arrival_s=arrival, prompt_tokens=10, max_tokens=out,
                         scheduled_s=scheduled, first_token_s=first, end_s=end, output_tokens=out,
                         finish_reason=reason)


RECORDS = [
    _rec(0, 0.0, 1.0, 3.0, 5, "length", scheduled=0.5),  # TTFT 1, TPOT (3-1)/4 = 0.5, e2e 3, queue 0.5
    _rec(1, 1.0, 1.5, 2.0, 1, "length", scheduled=1.2),  # TTFT 0.5, one token: no TPOT, e2e 1
    _rec(2, 2.0, 6.0, 10.0, 3, "stop", scheduled=5.0),  # TTFT 4, TPOT 2, e2e 8
    _rec(3, 3.0, None, 12.0, 0, "timeout"),  # failed
]


def test_percentiles_interpolate_like_numpy():
    xs = [3.0, 0.5, 1.0, 7.0, 2.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert math.isnan(percentile([], 50))


def test_request_times_follow_their_definitions():
    r0, r1, r2, r3 = RECORDS
    assert (r0.queue_s, r0.ttft_s, r0.tpot_s, r0.e2e_s) == (0.5, 1.0, 0.5, 3.0)
    assert r1.tpot_s is None
    assert r2.tpot_s == 2.0
    assert not r3.completed and r3.ttft_s is None


def test_summary_by_hand():
    s = summarize(RECORDS, Slo(ttft_s=2.0, tpot_s=1.0))
    assert (s["completed"], s["failed"], s["requests"]) == (3, 1, 4)
    assert s["ttft_p50_s"] == pytest.approx(1.0)  # TTFTs of completed requests: 0.5, 1, 4
    assert s["ttft_p99_s"] == pytest.approx(1.0 + 3.0 * 0.98)
    assert s["tpot_p99_s"] == pytest.approx(0.5 + 1.5 * 0.99)  # TPOTs: 0.5, 2
    assert s["e2e_p99_s"] == pytest.approx(3.0 + 5.0 * 0.98)  # e2e: 1, 3, 8
    assert s["percentiles"]["queue_s"]["p50"] == pytest.approx(0.5)  # queues: 0.2, 0.5, 3
    # r0 and r1 meet both objectives (r1 has no TPOT); r2 misses TTFT; r3 failed. Makespan: 12 s.
    assert s["slo_attainment"] == pytest.approx(2 / 4)
    assert s["goodput_req_s"] == pytest.approx(2 / 12)
    assert s["throughput_tok_s"] == pytest.approx((5 + 1 + 3) / 12)
    assert s["finish_reasons"] == {"length": 2, "stop": 1, "timeout": 1}


def test_comparison_uses_the_baseline_with_the_lowest_p99_ttft():
    base = {"ttft_p99_s": 8.0, "tpot_p99_s": 0.2}
    c = comparison({"recompute": base, "swap": {"ttft_p99_s": 6.0, "tpot_p99_s": 0.25},
                    "kunserve": {"ttft_p99_s": 3.0, "tpot_p99_s": 0.3}}, "kunserve")
    assert c == {"subject": "kunserve", "best_baseline": "swap",
                 "ttft_p99_ratio_best_baseline_over_subject": pytest.approx(2.0),
                 "tpot_p99_ratio_subject_over_best_baseline": pytest.approx(1.2)}
    assert comparison({"recompute": base}, "kunserve") is None


def test_queue_pressure_tells_a_compute_bound_window_from_a_memory_bound_one():
    def rows(*samples):  # (queued requests, free tokens) against a 1000-token capacity
        return [{"queue_len": q, "kv_free_tokens": f, "kv_capacity_tokens": 1000} for q, f in samples]

    memory_bound = queue_pressure(rows((0, 900), (5, 20), (9, 0), (3, 40)))  # the queue waits for KV
    compute_bound = queue_pressure(rows((4, 500), (8, 300), (0, 800)))  # queued with KV to spare
    assert memory_bound == {"queued_samples": 3, "mean_free_kv_share_while_queued": pytest.approx(0.02)}
    assert compute_bound["mean_free_kv_share_while_queued"] == pytest.approx(0.4)
    assert queue_pressure(rows((0, 100))) is None
    assert diagnose({"recompute": memory_bound, "kunserve": compute_bound}, "kunserve") is None
    note = diagnose({"recompute": compute_bound, "swap": compute_bound, "kunserve": memory_bound}, "kunserve")
    assert note is not None and "40%" in note and "compute" in note
    idle = queue_pressure(rows((2, 999), (1, 1000)))  # queued for a moment, the KV nearly empty
    assert "nearly all of the KV was free" in diagnose({"recompute": idle, "kunserve": idle}, "kunserve")


def test_timeline_counts_a_pipeline_group_once():
    def load(i, mode="replica", used=10, free=90, waiting=0, demand=0, group=-1, stage=-1, total=100):
        return InstanceLoad(instance=i, mode=mode, kv_free=free, kv_used=used, kv_cached=0, kv_total=total,
                            running=1, waiting=waiting, queued_tokens=0, group=group, stage=stage,
                            demand_blocks=demand)

    loads = [load(0, waiting=2, demand=13),
             load(1, "pipeline", used=150, free=100, waiting=5, demand=170, group=0, stage=0, total=250),
             load(2, "pipeline", used=150, free=100, waiting=5, demand=170, group=0, stage=1, total=250)]
    row = timeline_row(3.0, loads, block_size=16, inflight=9, events=[{"kind": "drop", "group": 0,
                                                                        "members": [1, 2]}])
    assert row["queue_len"] == 2 + 5
    assert row["kv_demand_tokens"] == (13 + 170) * 16  # the runtime's demand in blocks; a group's counted once
    assert row["kv_capacity_tokens"] == 100 * 16 + 250 * 16
    assert row["groups"] == 1 and row["events"] == "drop group 0 [1, 2]"
    assert row["i1_mode"] == "pipeline:g0s0"


def test_help_explains_every_bench_option():
    from kunjax.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["bench"]
    text = sub.format_help()
    for flag in ("--trace", "--policies", "--out", "--server", "--slo-ttft-s", "--slo-tpot-s", "--duration-s",
                 "--target-peak-ratio", "--device-memory-bytes", "--policy", "--executor", "--clock", "--profile",
                 "--model-shape"):
        assert flag in text
    for action in sub._actions:
        assert action.help, f"{action.option_strings} has no help"


@pytest.mark.parametrize("args, message", [
    (["--policies", "recompute,bogus"], "--policies: unknown policy 'bogus'"),
    (["--trace", "/nonexistent/trace.csv"], "--trace: /nonexistent/trace.csv: no such file"),
    (["--slo-ttft-s", "0"], "--slo-ttft-s must be > 0"),
    (["--prompt-len", "gauss:3"], "--prompt-len: unknown length distribution"),
    (["--server", "localhost"], "--server must be HOST:PORT"),
    (["--server", "localhost:1", "--policies", "kunserve"], "--policies cannot be used with --server"),
    (["--length-scale", "big"], "--length-scale must be 'auto' or a number"),
    (["--weight-fraction", "1.5"], "--weight-fraction must be in (0, 1)"),
    (["--max-num-batched-tokens", "4"], "--max-num-batched-tokens (4) must be >= --max-num-seqs"),
    (["--profile", "h100-sxm"], "--profile needs simulated time (--executor sim or --clock simulated)"),
    (["--executor", "sim", "--profile", "b300"], "--profile: unknown hardware profile 'b300'"),
    (["--routing-modes", "random"], "--routing-modes: unknown mode 'random'"),
    (["--routing-modes", "session,session"], "--routing-modes: a mode is listed twice"),
    (["--executor", "sim", "--model-shape", "gpt-5"], "--model-shape: unknown model shape 'gpt-5'"),
    (["--executor", "sim", "--model", "/nonexistent/model"], "--model: unknown model shape '/nonexistent/model'"),
])
def test_bad_flags_exit_2_naming_the_flag(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--out", str(tmp_path), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_unreadable_trace_is_named_with_its_header(capsys, tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit) as e:
        main(["bench", "--out", str(tmp_path), "--trace", str(bad)])
    assert e.value.code == 2
    assert f"--trace: {bad}: unrecognised trace header ['a', 'b']" in capsys.readouterr().err


SMALL_RUN = ["--cpu-devices", "2", "--num-instances", "2", "--num-requests", "16", "--rate", "8",
             "--prompt-len", "uniform:16:64", "--output-len", "uniform:4:12", "--time-scale", "1",
             "--duration-s", "10", "--drain-timeout-s", "60", "--no-progress"]


def run_bench(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "kunjax", "bench", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def check_outputs(out, policies: list[str]) -> dict:
    """The files of a run exist and summary.json has the promised schema; returns the summary."""
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"policies", "workload", "devices", "model"}
    assert list(summary["policies"]) == policies
    for name, s in summary["policies"].items():
        assert set(s) >= {"ttft_p50_s", "ttft_p99_s", "tpot_p99_s", "e2e_p99_s", "completed", "failed",
                          "slo_attainment", "throughput_tok_s"}
        assert s["completed"] == s["requests"] == summary["workload"]["requests"] and s["failed"] == 0
        with open(out / f"requests_{name}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == s["requests"]
        assert all(int(r["output_tokens"]) == int(r["max_tokens"]) for r in rows)  # lengths as the trace says
        with open(out / f"timeline_{name}.csv") as f:
            timeline = list(csv.DictReader(f))
        assert timeline and {"t_s", "kv_demand_tokens", "queue_len", "i0_kv_free"} <= set(timeline[0])
        assert s["policy_stats"]["preemptions"] >= 0  # the policy's own figures during the replay
    return summary


def test_in_process_run_of_two_policies_writes_every_file(tmp_path):
    res = run_bench("--policies", "recompute,kunserve", "--out", str(tmp_path), *SMALL_RUN)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = check_outputs(tmp_path, ["recompute", "kunserve"])
    assert summary["workload"]["time_scale"] == 1.0 and summary["workload"]["requests"] == 16
    assert summary["devices"]["memory"]["device_memory_bytes"] > 0
    with open(tmp_path / "requests_recompute.csv") as f:
        queue = [float(r["queue_s"]) for r in csv.DictReader(f)]
    assert all(0 <= q < 60 for q in queue)  # the engine's queue time, from the final event
    for png in ("ttft_cdf.png", "ttft_p99.png", "timeline.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "P99 TTFT, best baseline (recompute) / kunserve" in res.stdout
    assert "time scale 1 (given" in res.stderr and "device memory budget" in res.stderr


def test_the_replay_runs_on_a_virtual_clock_with_the_arithmetic_executor():
    """The same event loop on simulated time: a burst of 400 requests through every request's lifetime, with the
    times the modelled steps give (deterministic), not the host's."""
    import dataclasses

    from kunjax.bench.replay import SAMPLE_PERIOD_S, replay
    from kunjax.bench.targets import InProcessTarget
    from kunjax.engine import LLMEngine
    from kunjax.workloads import synthesize_prompts, synthetic
    from tests.helpers import SPLIT

    def run() -> tuple[list[RequestRecord], list[dict], float]:
        cfg = config_from_kwargs(num_instances=2, policy="kunserve", block_size=8, num_blocks=40, max_num_seqs=16,
                                 max_num_batched_tokens=128, max_model_len=128, restore_window_steps=8,
                                 min_group_steps=4)
        engine = LLMEngine(dataclasses.replace(SPLIT, num_layers=8), cfg, executor="arith")
        w = synthetic(num_requests=400, rate=2000.0, prompt_len="uniform:8:48", output_len="uniform:4:24", seed=3)
        res = replay(InProcessTarget(engine), w, synthesize_prompts(w, SPLIT.vocab_size, seed=3), label="arith",
                     block_size=8, drain_timeout_s=1e6, progress=False)
        return res.records, res.timeline, res.replay_s

    records, timeline, replay_s = run()
    assert all(r.completed for r in records) and sum(r.output_tokens for r in records) == sum(
        r.max_tokens for r in records)
    assert all(r.submit_s == pytest.approx(r.arrival_s, abs=0.05) for r in records)  # open loop, on time
    assert max(r.ttft_s for r in records) > 0.1  # the burst queued: times are the modelled ones
    assert len(timeline) >= int(replay_s / SAMPLE_PERIOD_S)
    again, _, replay_again = run()
    assert replay_again == replay_s and [r.ttft_s for r in again] == [r.ttft_s for r in records]


SIM_RUN = ["--executor", "sim", "--profile", "h100-sxm", "--model-shape", "llama-3-8b", "--num-instances", "4",
           "--dtype", "bfloat16", "--max-num-seqs", "64", "--max-num-batched-tokens", "1024",
           "--max-model-len", "4096", "--num-requests", "300", "--rate", "400", "--prompt-len", "uniform:256:2048",
           "--output-len", "uniform:32:256", "--max-requests", "300", "--no-progress"]


def test_a_simulated_run_at_gpu_scale_is_byte_identical_when_repeated(tmp_path):
    """--executor sim: an 8B model on 4 simulated H100s, no weights, every policy; the same command twice writes
    the same summary.json (host timings go to host.json)."""
    policies = ["recompute", "swap", "migrate", "layerkv", "kunserve"]
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        res = run_bench("--out", str(out), *SIM_RUN)
        assert res.returncode == 0, res.stderr[-3000:]
    summary = check_outputs(a, policies)
    assert summary["time"]["profile"]["name"] == "h100-sxm" and summary["devices"]["platform"] == "simulated"
    assert summary["model"]["path"] == "(model shape only, no weights)"
    assert "wall_s" not in summary and all("wall_s" not in s for s in summary["policies"].values())
    assert set(json.loads((a / "host.json").read_text())["policies"]) == set(policies)
    text_a = (a / "summary.json").read_text().replace(str(a), "OUT")
    assert text_a == (b / "summary.json").read_text().replace(str(b), "OUT")
    # GPU scale: an 8B model's pools hold hundreds of thousands of tokens, and decode steps take milliseconds
    assert summary["policies"]["recompute"]["kv_capacity_tokens"] > 1e6
    assert 0.005 < summary["policies"]["recompute"]["tpot_p99_s"] < 0.5


def test_the_workload_does_not_depend_on_which_policy_runs_first(tmp_path):
    """The workload is fitted to the instances' KV pools, which layerkv's staging region is part of: listed first,
    layerkv must not shrink everyone's workload (it once did: 139 requests instead of 172)."""
    runs = {}
    for order in ("layerkv,recompute", "recompute,layerkv"):
        out = tmp_path / order.split(",")[0]
        res = run_bench("--out", str(out), *SIM_RUN, "--policies", order)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[order] = json.loads((out / "summary.json").read_text())
    a, b = runs.values()
    assert a["workload"] == b["workload"]
    assert a["workload"]["capacity_tokens"] == a["policies"]["recompute"]["kv_capacity_tokens"]
    assert a["policies"]["layerkv"]["kv_capacity_tokens"] < a["workload"]["capacity_tokens"]  # its staging
    for p in ("recompute", "layerkv"):
        assert a["policies"][p] == b["policies"][p]


def test_routing_modes_side_by_side_with_their_prefix_hit_rates(tmp_path):
    """--routing-modes: one run per mode on identical inputs (Mooncake's shared prefixes), labelled by mode; each
    run reports its prefix hit rate and prefill tokens saved; caching off saves nothing, and the prompt tree
    reuses at least as much as routing by session."""
    res = run_bench("--out", str(tmp_path), "--trace", "mooncake", "--policies", "recompute", "--routing-modes",
                    "no-cache,least-load,session,prompt-tree", "--executor", "sim", "--profile", "h100",
                    "--model-shape", "llama-3-8b", "--dtype", "bfloat16", "--max-model-len", "8192",
                    "--max-num-seqs", "256", "--max-num-batched-tokens", "8192", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = check_outputs(tmp_path, ["no-cache", "least-load", "session", "prompt-tree"])
    rate = {k: s["prefix_hit_rate"] for k, s in summary["policies"].items()}
    assert rate["no-cache"] == 0 and rate["prompt-tree"] >= rate["session"] > rate["least-load"] > 0, rate
    assert "prefix hit rate" in res.stdout and "prefill tokens saved" in res.stdout
    with open(tmp_path / "requests_prompt-tree.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["cached_tokens"]) for r in rows) == summary["policies"]["prompt-tree"]["cached_prompt_tokens"]
    assert all(r["session_id"].startswith("prefix-") for r in rows)


@pytest.mark.timeout(1800)  # two benches of the real model; beside the README test on 2 cores, over 10 minutes
def test_the_real_model_on_a_simulated_clock_gives_identical_figures_twice(tmp_path):
    """--clock simulated: the demo model's real tokens on this CPU, timed as an H100 would run an 8B model;
    twice the same summary, per-request and timeline CSVs (kunserve's drops included)."""
    a, b = tmp_path / "a", tmp_path / "b"
    burst = ["--cpu-devices", "2", "--num-instances", "2", "--num-requests", "80", "--rate", "40", "--prompt-len",
             "uniform:64:200", "--output-len", "uniform:16:64", "--target-peak-ratio", "3", "--max-requests", "80",
             "--duration-s", "5", "--drain-timeout-s", "60", "--no-progress"]
    for out in (a, b):
        res = run_bench("--policies", "recompute,kunserve", "--out", str(out), "--clock", "simulated", "--profile",
                        "h100-sxm", "--model-shape", "llama-3-8b", *burst, timeout=850)
        assert res.returncode == 0, res.stderr[-3000:]
    summary = check_outputs(a, ["recompute", "kunserve"])
    assert "drop" in {e["kind"] for e in summary["policies"]["kunserve"]["events"]}
    assert summary["devices"]["platform"] == "cpu" and summary["time"]["clock"] == "simulated"
    s = summary["policies"]["recompute"]
    assert 0.004 < s["tpot_p99_s"] < 0.1  # an H100's 8B decode step, not the CPU's
    for name in ("summary.json", "requests_kunserve.csv", "timeline_kunserve.csv", "requests_recompute.csv"):
        assert (a / name).read_text().replace(str(a), "OUT") == (b / name).read_text().replace(str(b), "OUT"), name


def test_the_fit_says_when_max_requests_cannot_hold_the_target_peak():
    from kunjax.bench.command import _fit_lines
    from kunjax.workloads.synthetic import synthetic
    from kunjax.workloads.transforms import fit

    w = synthetic(num_requests=2000, rate=10.0, prompt_len="fixed:100", output_len="fixed:100")
    ok = fit(w, capacity_tokens=20_000, target_peak_ratio=2.0, max_requests=1000, demand_window_s=5.0)
    assert ok.choices["requests"] <= 1000 and not any("--max-requests" in x for x in _fit_lines(ok.choices))
    # 2x a 200k-token capacity within 5 s takes 2000 requests of 200 tokens: 300 cannot hold it.
    short = fit(w, capacity_tokens=200_000, target_peak_ratio=2.0, max_requests=300, demand_window_s=5.0)
    lines = _fit_lines(short.choices)
    if short.choices["requests"] > 300:  # the window kept the requests by compressing time further
        assert any("more than --max-requests 300" in x for x in lines)
    else:  # or it kept the limit and missed the peak
        assert any("not the target 2x" in x for x in lines)
    over = {**ok.choices, "requests": 1500}
    assert any("more than --max-requests 1000" in x for x in _fit_lines(over))


def test_the_cost_model_executor_takes_the_shape_of_a_model_directory(tmp_path):
    """--executor sim --model DIR: no weights are loaded, the directory's config.json is the simulated shape."""
    model = tmp_path / "hf-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 4096, "hidden_size": 256,
        "intermediate_size": 688, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}))
    res = run_bench("--executor", "sim", "--model", str(model), "--policies", "recompute", "--out",
                    str(tmp_path / "out"), "--num-instances", "2", "--num-requests", "8", "--rate", "8",
                    "--prompt-len", "uniform:8:24", "--output-len", "uniform:2:6", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    shape = json.loads((tmp_path / "out" / "summary.json").read_text())["time"]["model_shape"]
    assert shape["hidden_size"] == 256 and shape["num_layers"] == 6 and shape["vocab_size"] == 4096


def test_conversations_replay_with_their_sessions_and_a_mean_jct(tmp_path):
    """--trace conversations: each turn carries its conversation as its session; the history makes caching pay
    (session routing reuses more than least-load; caching off reuses nothing); the cache table shows mean JCT."""
    res = run_bench("--out", str(tmp_path), "--trace", "conversations", "--conversations", "60", "--rate", "2",
                    "--length-scale", "1", "--policies", "recompute", "--routing-modes", "no-cache,least-load,session",
                    "--executor", "sim", "--profile", "h100", "--model-shape", "llama-3-8b", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = check_outputs(tmp_path, ["no-cache", "least-load", "session"])
    rate = {k: s["prefix_hit_rate"] for k, s in summary["policies"].items()}
    assert rate["no-cache"] == 0 and rate["session"] > rate["least-load"] > 0, rate
    assert all(s["jct_mean_s"] > 0 for s in summary["policies"].values())
    assert "mean JCT" in res.stdout
    with open(tmp_path / "requests_session.csv") as f:
        assert all(r["session_id"].startswith("conv-") for r in csv.DictReader(f))


def test_a_closed_loop_turn_is_sent_after_the_previous_answer_with_it_in_its_prompt():
    """--closed-loop: turn t + 1 goes its think time after turn t ends, its prompt turn t's prompt and generated
    answer then its new message, so the cache serves it all but the new message; a turn whose predecessor
    failed is not sent."""
    import dataclasses

    from kunjax.bench.replay import replay
    from kunjax.bench.targets import InProcessTarget
    from kunjax.engine import LLMEngine
    from kunjax.workloads import Workload, conversations, synthesize_prompts
    from tests.helpers import SPLIT

    w = conversations(num_conversations=6, rate=2.0, turns="uniform:2:4", system_tokens=32, user_len="uniform:8:24",
                      output_len="uniform:4:12", think_s=0.5, block_tokens=8, seed=1, closed_loop=True)
    reqs = w.requests
    assert reqs[0].follows == -1 and sum(r.follows >= 0 for r in reqs) == len(reqs) - 6
    for r in reqs:
        if r.follows >= 0:
            prev = reqs[r.follows]
            assert prev.session == r.session and prev.arrival_s < r.arrival_s and r.new_tokens % 8 == 0 < r.new_tokens
    cfg = config_from_kwargs(num_instances=1, block_size=8, num_blocks=200, max_num_seqs=8, max_num_batched_tokens=64,
                             max_model_len=256)
    engine = LLMEngine(dataclasses.replace(SPLIT, num_layers=4), cfg, executor="arith")
    target = InProcessTarget(engine)
    sent: dict[str, list[int]] = {}
    start = target.start

    def recording(record, prompt_ids, t0):
        sent[record.request_id] = list(prompt_ids)
        start(record, prompt_ids, t0)

    target.start = recording
    prompts = synthesize_prompts(w, SPLIT.vocab_size, seed=2)
    records = replay(target, w, prompts, label="closed", block_size=8, drain_timeout_s=1e6, progress=False).records
    assert all(r.completed for r in records)
    for r, req in zip(records, reqs, strict=True):
        if req.follows < 0:
            assert sent[r.request_id] == prompts[r.index]
            continue
        prev = records[req.follows]
        history = sent[prev.request_id] + prev.output_ids
        assert sent[r.request_id] == history + prompts[r.index][-req.new_tokens:]
        assert r.arrival_s == pytest.approx(prev.end_s + req.think_s, abs=1e-6)  # after the answer, not before
        assert r.cached_tokens >= len(history) // 8 * 8 - 8  # the answer's blocks too (one may still be partial)

    bad = Workload(requests=(dataclasses.replace(reqs[0], prompt_tokens=300), dataclasses.replace(
        reqs[1], follows=0, think_s=0.1, new_tokens=8)), source="test", prefix_block_tokens=8)
    long = [list(range(3, 303)), prompts[1]]  # the first is longer than the model's 256 tokens: rejected
    records = replay(InProcessTarget(engine), bad, long, label="bad", block_size=8, drain_timeout_s=1e6,
                     progress=False).records
    assert records[0].finish_reason == "rejected"
    assert records[1].finish_reason == "error" and "ended with rejected" in records[1].error
    assert records[1].submit_s is None


def test_closed_loop_needs_conversations_without_a_fitted_window(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--trace", "conversations", "--closed-loop", "--executor", "sim", "--profile", "h100",
              "--model-shape", "llama-3-8b"])
    assert "--closed-loop: only for --trace conversations, with --no-fit" in capsys.readouterr().err


def test_timeline_legend_sits_above_the_panels_and_names_every_event_kind():
    """No legend box inside a panel (it hid kunserve's restores) and no per-event text (clipped, overlapping):
    events are coloured lines, their kinds and counts in the one legend above the panels."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kunjax.bench.report import timeline_figure

    rows = [{"t_s": t, "kv_demand_tokens": 100 * t, "kv_capacity_tokens": 2000, "kv_free_tokens": 2000 - 100 * t,
             "queue_len": t % 5} for t in range(20)]
    events = [{"t_s": 13.5, "kind": "drop"}, {"t_s": 14.0, "kind": "drop"}, {"t_s": 16.3, "kind": "exchange_done"},
              {"t_s": 19.0, "kind": "restore"}, {"t_s": 19.2, "kind": "restore"}]
    fig = timeline_figure({"recompute": ([], rows, []), "kunserve": ([], rows, events)})
    try:
        for ax in fig.axes:
            assert ax.get_legend() is None and not ax.texts
        (legend,) = fig.legends
        labels = [t.get_text() for t in legend.get_texts()]
        assert {"drop (2)", "exchange_done (1)", "restore (2)", "KV demand (tokens)"} <= set(labels)
        fig.canvas.draw()
        assert legend.get_window_extent().y0 >= max(ax.get_window_extent().y1 for ax in fig.axes)
    finally:
        plt.close(fig)


def test_replay_progress_says_when_the_arrivals_are_over(monkeypatch, capsys):
    """Past the window of arrivals the line says the requests are draining, not '44.1s / 15s of arrivals'."""
    from kunjax.bench.replay import _Progress

    monkeypatch.setenv("KUNJAX_PROGRESS", "plain")
    p = _Progress("swap", 172, 15.0, True)
    p.bar.interval_s = 0.0
    p.show(10.7, 120, 13)
    p.show(44.1, 172, 48)
    p.show(45.6, 172, 172, final=True)
    lines = capsys.readouterr().err.splitlines()
    assert any(ln.startswith("[swap] replay: 13/172 requests, 107 in flight, replay clock 10.7s of 15s of arrivals")
               for ln in lines), lines
    assert any(ln.startswith("[swap] replay: 48/172 requests, 124 in flight, all arrived, replay clock 44.1s")
               for ln in lines), lines
    assert lines[-1] == "[swap] replay: 172/172 requests done, the last at 45.6s (15s of arrivals)"
    assert not any(" / 15s" in ln for ln in lines)
