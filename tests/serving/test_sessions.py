"""`GenerateRequest.session_id` over real gRPC: with `--routing session` a conversation's turns run on the unit
that served it before, where its history is cached (the tiny model on 2 CPU devices)."""

from __future__ import annotations

import jax

from kunjax.engine import LLMEngine, config_from_kwargs
from tests.helpers import served_engine, write_tiny_model


def test_a_sessions_turns_share_a_unit_and_its_cached_history(tmp_path):
    cfg = config_from_kwargs(num_instances=2, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=64,
                             max_model_len=128, block_size=8, enable_prefix_caching=True, routing="session")
    engine = LLMEngine(write_tiny_model(tmp_path), cfg, devices=jax.devices()[:2])
    with served_engine(engine, timeout_s=60.0) as (_, _, client):
        history = list(range(1, 41))  # 5 blocks
        usage = []
        for turn in range(3):
            prompt = history + [50 + turn] * 3
            responses = list(client.generate(prompt, session_id="conversation-1", max_tokens=2, temperature=0.0))
            usage.append(responses[-1].usage.cached_tokens)
            client.generate_text([7 + turn] * 12, session_id=f"other-{turn}", max_tokens=2)  # load elsewhere
        assert engine.router.session_hits >= 2  # turns 2 and 3 found their session
        assert usage[0] == 0 and usage[1] >= 40 and usage[2] >= 40, usage  # the history came from cache
