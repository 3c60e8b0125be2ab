"""Load from a second process: 256 concurrent streams on the demo model, half cancelled, no block leaked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax

from kunjax.demo import ensure_demo_model, recitation_prompts
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.engine_thread import EngineThread
from serving.client import KunjaxClient
from serving.server import serve

STREAMS = 256
MAX_TOKENS = 24


def test_256_concurrent_streams_half_cancelled_leak_nothing():
    engine = LLMEngine(ensure_demo_model(), config_from_kwargs(num_instances=2, max_num_seqs=32,
                                                               max_num_batched_tokens=128, max_model_len=256),
                       devices=jax.devices()[:2])
    runtime = EngineThread(engine, max_queued=2 * STREAMS)
    handle = serve(runtime)
    try:
        deadline = time.monotonic() + 300
        while not runtime.ready():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        prompts = [p for p, _ in recitation_prompts()]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        res = subprocess.run([sys.executable, str(Path(__file__).with_name("load_client.py")), handle.target,
                              str(STREAMS), str(MAX_TOKENS)], input=json.dumps(prompts), capture_output=True,
                             text=True, timeout=900, env=env)
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["open_at_once"] == STREAMS
        assert summary["kept"] == summary["kept_finished"] == STREAMS // 2
        assert summary["kept_tokens"] == [MAX_TOKENS] * (STREAMS // 2)
        assert summary["cancelled"] == STREAMS // 2
        with KunjaxClient(handle.target) as client:
            # Not aborted, the cancelled streams would still owe ~128 x 200 tokens: minutes on this CPU.
            deadline = time.monotonic() + 15
            while True:
                load = client.load()
                if all(x.kv_used == 0 and x.running == 0 and x.waiting == 0 for x in load):
                    break
                assert time.monotonic() < deadline, f"blocks not freed after cancellation: {load}"
                time.sleep(0.05)
        engine.check_books()
    finally:
        handle.stop(grace=1.0)
        runtime.shutdown(grace_s=1.0)
