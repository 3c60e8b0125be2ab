"""`GenerateRequest.session_id` over real gRPC: with `--routing session` a conversation's turns run on the unit
that served it before, where its history is cached (the tiny model on 2 CPU devices)."""

from __future__ import annotations

import time

import jax

from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.engine_thread import EngineThread
from serving.client import KunjaxClient
from serving.server import serve
from tests.helpers import write_tiny_model


def test_a_sessions_turns_share_a_unit_and_its_cached_history(tmp_path):
    cfg = config_from_kwargs(num_instances=2, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=64,
                             max_model_len=128, block_size=8, enable_prefix_caching=True, routing="session")
    engine = LLMEngine(write_tiny_model(tmp_path), cfg, devices=jax.devices()[:2])
    rt = EngineThread(engine)
    deadline = time.monotonic() + 300
    while not rt.ready():
        assert time.monotonic() < deadline, "warm-up did not finish"
        time.sleep(0.05)
    handle = serve(rt, metrics_port=0)
    client = KunjaxClient(handle.target, timeout_s=60.0)
    try:
        history = list(range(1, 41))  # 5 blocks
        usage = []
        for turn in range(3):
            prompt = history + [50 + turn] * 3
            responses = list(client.generate(prompt, session_id="conversation-1", max_tokens=2, temperature=0.0))
            usage.append(responses[-1].usage.cached_tokens)
            client.generate_text([7 + turn] * 12, session_id=f"other-{turn}", max_tokens=2)  # load elsewhere
        assert engine.router.session_hits >= 2  # turns 2 and 3 found their session
        assert usage[0] == 0 and usage[1] >= 40 and usage[2] >= 40, usage  # the history came from cache
    finally:
        client.close()
        handle.stop(grace=1.0)
        rt.shutdown(grace_s=5)
