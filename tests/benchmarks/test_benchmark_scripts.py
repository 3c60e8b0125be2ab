"""The kernel and roofline benchmarks: their bytes/FLOP accounting by hand-computed numbers, and both scripts run
end to end in `--quick` mode on CPU, writing JSON whose figures are finite and positive."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.decode_roofline import LLAMA_8B, roofline_bytes
from benchmarks.kernels.common import AttentionShape, attention_flops, attention_kv_bytes, format_table, write_json
from kunjax.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def test_decode_accounting_counts_each_sequences_kv_once_and_4_flops_per_key_head_dim():
    sh = AttentionShape("decode", batch=32, heads=32, kv_heads=8, head_dim=128, context=2048)
    assert sh.rows == 32 and sh.cached == 2047
    assert sh.kv_bytes(itemsize=2) == 32 * 2048 * 8 * 128 * 2 * 2 == 268_435_456
    assert sh.flops() == 4 * 32 * 2048 * 32 * 128 == 1_073_741_824


def test_prefill_accounting_is_causal_over_the_prefix():
    sh = AttentionShape("prefill", batch=2, heads=2, kv_heads=1, head_dim=8, prefix=4, chunk=3)
    assert sh.rows == 6 and sh.keys_per_row() == [5, 6, 7, 5, 6, 7]
    assert sh.kv_bytes(itemsize=2) == 2 * (4 + 3) * 1 * 8 * 2 * 2 == 448
    assert sh.flops() == 4 * (18 * 2) * 2 * 8 == 2304
    assert attention_kv_bytes([10, 20], kv_heads=2, head_dim=4, itemsize=4) == 30 * 2 * 4 * 2 * 4
    assert attention_flops([1, 2, 3], heads=3, head_dim=5) == 4 * 6 * 3 * 5


def test_roofline_bytes_of_the_8b_decode_step():
    cfg = ModelConfig(**LLAMA_8B)
    per_layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 4096 * 14336 * 3 + 2 * 4096  # q,o; k,v; mlp; norms
    params = 32 * per_layer + 2 * 128256 * 4096 + 4096  # + embed, lm_head, final norm
    assert params == 8_030_261_248
    rb = roofline_bytes(cfg, batch=64, context=2048, itemsize=2)
    assert rb.weights == (params - 128256 * 4096) * 2
    assert rb.embedding_rows == 64 * 4096 * 2 and rb.embedding_table == 128256 * 4096 * 2
    assert rb.kv_read == 64 * 2048 * 32 * 8 * 128 * 2 * 2 == 17_179_869_184
    assert rb.kv_written == 64 * 32 * 8 * 128 * 2 * 2
    assert rb.total == 15_010_373_632 + 17_179_869_184 + 8_388_608


def test_table_and_json_output(tmp_path):
    text = format_table([{"k": "a", "v": 1.5}, {"k": "bb", "v": None}], [("kernel", "k", ""), ("value", "v", ".2f")])
    assert text.splitlines()[2].split() == ["a", "1.50"] and text.splitlines()[3].split() == ["bb", "-"]
    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1, 2.5]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [1, 2.5]}


# ---- the scripts, run as a user would (both started at once: each is mostly compile time) ---------------------

SCRIPTS = {
    "kernels": ["benchmarks/kernels/paged_attention.py", "--quick"],
    "roofline": ["benchmarks/decode_roofline.py", "--quick"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {}
    for name, cmd in SCRIPTS.items():
        out = out_dir / f"{name}.json"
        procs[name] = (subprocess.Popen([sys.executable, *cmd, "--out", str(out)], cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT), out)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()


def finish(runs, name: str) -> dict:
    proc, out = runs[name]
    stdout, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, stdout
    return json.loads(out.read_text())


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.timeout(300)
def test_kernel_benchmark_quick_run_reports_checked_figures_per_kernel_and_shape(runs):
    data = finish(runs, "kernels")
    assert positive(data["copy_bandwidth"]["bytes_per_s"])
    assert data["device"]["platform"] == "cpu" and data["quick"] is True
    kinds = {(r["kernel"], r["kind"]) for r in data["results"]}
    assert {("reference", "decode"), ("reference", "prefill"), ("cpu", "decode"), ("cpu", "prefill"),
            ("xla-sdpa", "decode"), ("xla-sdpa", "prefill"),
            ("shipped-gpu-interpret", "decode")} <= kinds  # the shipped kernels are decode-only
    for r in data["results"]:
        assert r["check"] == "ok", r
        for key in ("time_s", "kv_bytes", "flops", "kv_bytes_per_s", "flops_per_s", "fraction_of_copy"):
            assert positive(r[key]), (key, r)
        assert math.isclose(r["kv_bytes_per_s"] * r["time_s"], r["kv_bytes"], rel_tol=1e-9)
        if r["kind"] == "decode":
            assert positive(r["vs_shipped"])
    assert data["acceptance"]["applies"] is False  # the targets are for an H100/H200


@pytest.mark.timeout(300)
def test_decode_roofline_quick_run_times_the_engine_step_against_the_roofline(runs):
    data = finish(runs, "roofline")
    for key in ("step_time_s", "roofline_s", "ratio", "tokens_per_s", "roofline_bytes", "compile_s"):
        assert positive(data[key]), key
    assert math.isclose(data["ratio"], data["roofline_s"] / data["step_time_s"])
    assert math.isclose(data["roofline_s"], data["roofline_bytes"] / data["copy_bandwidth"]["bytes_per_s"])
    assert data["applies"] is False and data["pass"] is None


def test_the_acceptance_row_is_judged_against_both_targets_on_an_h100_only():
    from benchmarks.kernels.paged_attention import acceptance

    row = {"kernel": "gpu", "kind": "decode", "batch": 32, "context": 2048, "kv_heads": 8, "head_dim": 128,
           "valid": True, "check": "ok", "fraction_of_copy": 0.85, "vs_shipped": 1.4}
    h100 = {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3"}
    assert acceptance([dict(row)], h100, "bfloat16")["pass"] is True
    slow = acceptance([dict(row, vs_shipped=1.2)], h100, "bfloat16")
    assert slow["pass"] is False and slow["pass_fraction"] is True and slow["pass_vs_shipped"] is False
    assert acceptance([dict(row, valid=False, check="MISMATCH")], h100, "bfloat16")["pass"] is False
    assert acceptance([dict(row)], h100, "float32")["applies"] is False
    other = acceptance([dict(row)], {"platform": "gpu", "device_kind": "NVIDIA A100-SXM4-80GB"}, "bfloat16")
    assert other["applies"] is False and other["pass"] is None


def test_sim_scale_quick_runs_every_policy_on_simulated_h100s_and_prints_the_table(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/sim_scale.py", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / "8b.md").read_text()
    assert table == res.stdout.strip() + "\n" or table.strip() in res.stdout
    (line,) = [x for x in table.splitlines() if x.startswith("| 8b-azure-2x")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert int(cells[1]) > 0 and cells[2] in ("recompute", "swap", "migrate", "layerkv")
    assert float(cells[5].strip("*x")) > 0
    summary = json.loads((tmp_path / "8b-azure-2x" / "summary.json").read_text())
    assert set(summary["policies"]) == {"recompute", "swap", "migrate", "layerkv", "kunserve"}
    assert summary["time"]["profile"]["name"] == "h100-sxm"


def test_host_time_times_every_phase_of_a_replica_and_a_group_and_writes_a_profile(tmp_path):
    prof = tmp_path / "top.txt"
    res = subprocess.run([sys.executable, "benchmarks/host_time.py", "--seqs", "4,8", "--stages", "1,2", "--steps",
                          "3", "--profile", str(prof)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [[c.strip() for c in x.strip("|").split("|")] for x in res.stdout.splitlines()
            if x.startswith("| replica") or x.startswith("| 2-stage group")]
    # each configuration twice (--timers both): every phase timed, then only launch and collect
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (unit, n, "serial", timers) for unit in ("replica", "2-stage group") for n in ("4", "8")
        for timers in ("phases", "device")]
    for r in rows:
        step, host = float(r[4]), float(r[5])
        phases = r[6:14]
        assert step > 0 and 0 < host <= step and float(phases[2]) > 0  # launch: the arithmetic "device"
        if r[3] == "phases":  # the phases account for the whole step
            assert sum(map(float, phases)) == pytest.approx(step, rel=0.05, abs=0.05)
        else:  # only launch and collect were timed
            assert [x for i, x in enumerate(phases) if i not in (2, 3)] == ["-"] * 6
    assert "function calls" in prof.read_text() and "ncalls" in prof.read_text()
