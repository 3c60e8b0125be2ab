"""`kunjax serve --policy kunserve` as a real process under a burst of gRPC streams.

A simulated device budget leaves each of the two instances room for about three of the demo's passages; all 36
recitations arrive at once. The server must drop on its own (monitor + planner), serve every stream with the
exact recitation (the memorized model is the oracle), report the transitions through `GetLoad` and Prometheus,
and restore the replicas once the burst is over.
"""

from __future__ import annotations

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from kunjax.checkpoint import load_config
from kunjax.demo import ensure_demo_model, recitation_prompts
from kunjax.memory import kv_block_bytes
from serving.client import KunjaxClient
from tests.e2e.serve_process import start_serve
from tests.helpers import fp32_weight_bytes

BLOCKS = 24  # KV blocks per instance under the budget below (16 tokens each)


@pytest.fixture(scope="module")
def server():
    model = ensure_demo_model()
    cfg = load_config(model)
    weights = fp32_weight_bytes(cfg)
    device = int(weights / 0.45)
    reserve = device - weights - BLOCKS * kv_block_bytes(cfg, 16, "float32")
    proc, target, metrics = start_serve(
        ["--model", str(model), "--cpu-devices", "2", "--policy", "kunserve", "--device-memory-bytes", str(device),
         "--activation-reserve-bytes", str(reserve), "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
         "--max-model-len", "256", "--restore-window-steps", "4", "--min-group-steps", "4"])
    yield proc, target, metrics
    proc.kill()
    proc.wait(timeout=30)


def test_a_burst_of_streams_drops_recites_exactly_and_restores(server):
    _, target, metrics = server
    pairs = recitation_prompts()
    with KunjaxClient(target, timeout_s=300) as client:
        assert all(x.kv_total == BLOCKS - 1 for x in client.load())

        def recite(i: int) -> tuple[str, str]:
            return client.generate_text(pairs[i][0], max_tokens=200, temperature=0.0)

        with ThreadPoolExecutor(len(pairs)) as pool:
            results = list(pool.map(recite, range(len(pairs))))
        wrong = [i for i, (text, reason) in enumerate(results) if (text, reason) != (pairs[i][1], "stop")]
        assert not wrong, f"passages {wrong} were not recited exactly"
        status = client.policy_status()
        assert status.counters["drops"] >= 1, status
        assert any(e.kind == "drop" and e.seconds > 0 for e in status.events)
        deadline = time.monotonic() + 60
        while client.policy_status().counters["restores"] < status.counters["drops"]:  # idle ones restore
            assert time.monotonic() < deadline, client.policy_status()
            time.sleep(0.2)
        assert all(x.mode == "replica" for x in client.load())
    scraped = urllib.request.urlopen(metrics, timeout=10).read().decode()
    assert re.search(r'^kunjax_policy_stat\{name="drops"\} [1-9]', scraped, re.M), scraped[:3000]
