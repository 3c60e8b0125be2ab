"""`kunjax bench --server`: the same replay over gRPC against a `kunjax serve` child process."""

from __future__ import annotations

import csv
import json

from kunjax.cli import main
from tests.e2e.serve_process import start_serve


def test_bench_replays_over_grpc_and_labels_the_run_with_the_servers_policy(tmp_path, capsys):
    proc, target, _ = start_serve(["--cpu-devices", "2", "--num-instances", "2", "--policy", "recompute",
                                   "--max-model-len", "256"])
    try:
        code = main(["bench", "--server", target, "--out", str(tmp_path), "--num-requests", "12", "--rate", "6",
                     "--prompt-len", "uniform:8:300", "--output-len", "uniform:2:10", "--length-scale", "1",
                     "--time-scale", "1",
                     "--duration-s", "10", "--drain-timeout-s", "60", "--no-progress"])
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert code == 0
    out = capsys.readouterr()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["policies"]) == ["recompute"] and summary["mode"] == f"server {target}"
    s = summary["policies"]["recompute"]
    assert s["completed"] == s["requests"] == 12 and s["failed"] == 0
    # The server's context is 256 tokens: the longest synthetic requests were clipped to it.
    assert summary["workload"]["max_model_len"] == 256 and summary["workload"]["clipped_requests"] > 0
    with open(tmp_path / "requests_recompute.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(int(r["prompt_tokens"]) + int(r["output_tokens"]) <= 256 for r in rows)
    # The queue time comes over gRPC (Usage.queue_time_s) and never exceeds the TTFT.
    assert all(0 <= float(r["queue_s"]) <= float(r["ttft_s"]) for r in rows)
    assert (tmp_path / "timeline_recompute.csv").stat().st_size > 0
    assert "block size is not reported" not in out.err  # GetServerInfo carries it
