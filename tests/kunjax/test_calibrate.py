"""`kunjax calibrate`: the fit recovers known coefficients, fits recorded CPU steps within the issue's bound on
steps it did not see, records real engine steps, and writes a profile the simulator loads."""

from __future__ import annotations

import collections
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from kunjax.calibrate import (
    StepRecord,
    fit_coefficients,
    fit_profile,
    load_records,
    measure_memory_ops,
    measure_parallelism,
    record_steps,
    relative_errors,
    split,
)
from kunjax.cost_model import CostModel, StageWork
from kunjax.hardware import HardwareProfile, load_profile
from kunjax.model_shapes import model_shape
from tests.helpers import TINY, write_tiny_model

RECORDS = Path(__file__).parent.parent / "data" / "cpu_steps.json"


def test_the_fit_recovers_the_coefficients_that_made_the_steps():
    """Steps timed by a known profile (with 3% multiplicative noise) give that profile's rates back."""
    truth = load_profile("h100-sxm")
    truth = dataclasses.replace(truth, attention_reads="kv", layer_overhead_s=0.0)
    cfg = model_shape("llama-3-8b")
    cost = CostModel(cfg, truth, dtype="bfloat16", tp=1, block_size=16)
    rng = np.random.default_rng(0)
    records = []
    for _ in range(300):
        rows = int(rng.integers(1, 64))
        prefill = int(rng.choice([0, 0, 64, 512, 2048]))
        ctx = rng.integers(0, 4096, rows)
        tokens = 1 << int(np.ceil(np.log2(max(rows + prefill, 16))))
        work = StageWork(layers=cfg.num_layers, tokens=tokens, valid_tokens=rows + prefill, sample_rows=64,
                         vocab_share=1.0, kv_tokens=int(ctx.sum()) + rows + prefill,
                         attn_pairs=int(ctx.sum()) + prefill * prefill // 2, prefill_tokens=prefill,
                         remote_rows_out=0, table_tokens=4096)
        seconds = (truth.step_overhead_s + cost.stage_seconds(*work)) * float(np.exp(rng.normal(0, 0.03)))
        records.append(StepRecord(work, seconds, "synthetic"))
    values, err = fit_coefficients(cfg, records, dtype="bfloat16", block_size=16, reads="kv")
    assert err < 0.05
    p = truth
    assert values["large-GEMM FLOP/s"] == pytest.approx(p.peak_flops["bfloat16"] * p.matmul_efficiency, rel=0.1)
    assert values["attention-read bytes/s"] == pytest.approx(p.hbm_bytes_per_s * p.attention_efficiency,
                                                             rel=0.1)
    # On one model the step overhead and the weight-streaming rate are told apart only by compute-bound steps;
    # what a decode step costs regardless of its batch (their sum) is what the data pins down.
    fixed = values["step_overhead_s"] + cost.layer_weight_bytes * cfg.num_layers / values["weight-streaming bytes/s"]
    truth_fixed = p.step_overhead_s + cost.layer_weight_bytes * cfg.num_layers / (p.hbm_bytes_per_s
                                                                                  * p.memory_efficiency)
    assert fixed == pytest.approx(truth_fixed, rel=0.03)


def test_recorded_cpu_steps_fit_within_20_percent_on_held_out_steps():
    """The committed steps (`kunjax calibrate --records`, this repo's CPU): fit on 70%, check the other 30%.

    Per step within 20% in the median: identical steps of the demo model (2-6 ms since the CPU attention backend)
    spread by 2x on this shared machine, so a step's error is mostly that jitter (five calibrations on
    2026-12-05: 15.6% to 17.9%). What the model must not have is a bias: for each scheduler shape, its decode
    steps and its prefill steps are predicted within 15% in the median."""
    cfg, records, meta = load_records(RECORDS)
    fit, held = split(records)
    assert len(held) > 100 and {r.shape for r in held} == {r.shape for r in records}
    assert not {id(r) for r in fit} & {id(r) for r in held}
    base = HardwareProfile.from_dict(meta["base_profile"])
    prof, report = fit_profile(cfg, records, dtype=meta["dtype"], block_size=16, reads=meta["attention_reads"],
                               rates=meta["rates"], base=base, name="cpu-test", device=meta["device"])
    assert prof.kind == "measured" and prof.attention_reads == "kv"
    rel = relative_errors(prof, cfg, held, dtype=meta["dtype"], block_size=16)
    err = np.abs(rel)
    assert report["held_out_median_error"] == pytest.approx(float(np.median(err)))
    assert np.median(err) <= 0.20, f"median held-out error {np.median(err):.1%}"
    groups = collections.defaultdict(list)  # (shape, decode or prefill): signed errors
    for r, e in zip(held, rel, strict=True):
        groups[(r.shape, bool(r.work.prefill_tokens))].append(e)
    assert len(groups) == 4
    for key, es in groups.items():
        assert abs(np.median(es)) <= 0.15, f"{key}: held-out median bias {np.median(es):+.1%}"
    again, _ = fit_profile(cfg, records, dtype=meta["dtype"], block_size=16, reads=meta["attention_reads"],
                           rates=meta["rates"], base=base, name="cpu-test", device=meta["device"])
    assert {**again.to_dict(), "sources": {}} == {**prof.to_dict(), "sources": {}}  # deterministic
    assert "held-out median error" in prof.sources["matmul_efficiency"]


def test_the_bundled_cpu_profile_is_measured():
    p = load_profile("cpu")
    assert p.kind == "measured" and p.attention_reads == "kv"  # the CPU backend reads the KV, not whole tables
    assert all(s.strip() for s in p.sources.values())


def test_record_steps_runs_the_real_engine(tmp_path):
    path = write_tiny_model(tmp_path / "tiny")
    shape = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)
    records, cfg, backend = record_steps(str(path), [shape], dtype="float32", repeats=1,
                                         devices=jax.devices()[:1], log=lambda *_: None)
    assert cfg == TINY and backend == "cpu"  # what `auto` picks on CPU
    assert len(records) > 20 and all(r.seconds > 0 for r in records)
    assert {r.work.tokens for r in records} <= {16, 32} and max(r.work.valid_tokens for r in records) > 4
    assert any(r.work.prefill_tokens for r in records) and any(not r.work.prefill_tokens for r in records)


def test_memory_operations_are_timed_on_the_real_executor_and_priced_per_operation(tmp_path):
    """The executor's own transfers, swaps and slot copies, timed: each kind's fixed cost per operation is what
    the profile charges once per operation on top of its bytes (what migrate and layerkv pay on small moves)."""
    path = write_tiny_model(tmp_path / "tiny")
    got = measure_memory_ops(str(path), dtype="float32", devices=jax.devices()[:2], repeats=3, log=lambda *_: None)
    assert set(got["memory_ops"]) == {"transfer", "swap_out", "swap_in", "slot_copy"}
    assert all(len(k["seconds"]) == 3 and min(k["seconds"].values()) > 0 for k in got["memory_ops"].values())
    assert got["memory_op_overhead_s"] > 0
    cfg, records, meta = load_records(RECORDS)
    base = HardwareProfile.from_dict(meta["base_profile"])
    prof, _ = fit_profile(cfg, records, dtype=meta["dtype"], block_size=16, reads=meta["attention_reads"],
                          rates={**meta["rates"], **got}, base=base, name="t", device="here")
    assert prof.memory_op_overhead_s == got["memory_op_overhead_s"]
    assert "swap_out" in prof.sources["memory_op_overhead_s"]


def test_parallelism_of_devices_sharing_a_host_is_measured_between_one_and_their_number(tmp_path):
    path = write_tiny_model(tmp_path / "tiny")
    got = measure_parallelism(str(path), dtype="float32", devices=jax.devices()[:2], profile=load_profile("cpu"),
                              rows=3, max_prompt=24, max_tokens=8, log=lambda *_: None)
    assert 1.0 <= got["concurrent_devices"] <= 2.0
    fit = got["parallel_fit"]
    assert fit["devices"] == 2 and fit["steps"] >= 8 and fit["median_error"] <= fit["median_error_at_1"]
    assert measure_parallelism(str(path), dtype="float32", devices=jax.devices()[:1],
                               profile=load_profile("cpu")) == {}  # nothing to share


def test_calibrate_from_records_writes_a_profile_the_bench_simulates_with(tmp_path):
    out = tmp_path / "p.json"
    res = subprocess.run([sys.executable, "-m", "kunjax", "calibrate", "--from-records", str(RECORDS),
                          "--out", str(out), "--name", "mycpu"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "held out" in res.stdout and load_profile(out).name == "mycpu"
    assert json.loads(out.read_text())["kind"] == "measured"
    bad = subprocess.run([sys.executable, "-m", "kunjax", "calibrate", "--from-records", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--from-records" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "kunjax", "calibrate", "--model", str(tmp_path / "no-model"),
                              "--cpu-devices", "1"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "--model" in missing.stderr and "Traceback" not in missing.stderr
