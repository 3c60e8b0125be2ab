"""Injected device failures over real gRPC: a request the runtime cannot serve after its retries gets its last
message with FINISH_REASON_ERROR and the call ends with INTERNAL; every other stream finishes with the right
tokens; the failing unit is quarantined, its counters show in GetLoad, and nothing leaks (the tiny model on 2
CPU devices)."""

from __future__ import annotations

import concurrent.futures

import grpc
import jax

from kunjax.checkpoint import load_config
from kunjax.engine import LLMEngine, config_from_kwargs
from serving._generated.kunjax.serving.v2 import generate_pb2 as pb
from tests.helpers import load_single_device_params, naive_greedy, served_engine, wait_until, write_tiny_model

MAX_TOKENS = 8


def test_a_failing_unit_ends_its_requests_with_internal_and_the_others_are_served(tmp_path):
    path = write_tiny_model(tmp_path)
    cfg = config_from_kwargs(num_instances=2, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=64,
                             max_model_len=128, block_size=8, step_retries=1, faults="step@1:times=0")
    engine = LLMEngine(path, cfg, devices=jax.devices()[:2])
    prompts = [[3 + i, 9, 27, 5 + i, 40, 11] for i in range(6)]
    cfg_model = load_config(path)
    expected = naive_greedy(cfg_model, load_single_device_params(path, cfg_model), prompts, MAX_TOKENS)
    with served_engine(engine, timeout_s=60.0) as (_, _, client):

        def one(prompt):
            chunks = []
            try:
                for resp in client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True):
                    chunks.append(resp)
            except grpc.RpcError as e:
                return chunks, e.code(), e.details()
            return chunks, grpc.StatusCode.OK, ""

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(one, prompts))
        failed = [(c, d) for c, code, d in results if code == grpc.StatusCode.INTERNAL]
        served = [(i, c) for i, (c, code, _) in enumerate(results) if code == grpc.StatusCode.OK]
        assert failed, "nothing ran on the failing instance"
        assert len(failed) + len(served) == len(prompts), [r[1] for r in results]
        for chunks, details in failed:
            assert chunks[-1].finish_reason == pb.FINISH_REASON_ERROR and chunks[-1].error == details
            assert "a device step failed" in details and "failed 2 times" in details
        for i, chunks in served:
            assert [t for c in chunks for t in c.token_ids] == expected[i]
        # the failing unit is out of rotation for a while: a new request goes to the healthy one
        _, reason = client.generate_text(prompts[0], max_tokens=MAX_TOKENS, temperature=0.0,
                                                  ignore_eos=True)
        assert reason == "length"
        status = client.policy_status()
        assert status.counters["failures_step"] >= 2
        assert any(u.detail.get("quarantined") == "true" for u in status.units)
        # load is a snapshot at most about 0.1 s (or a step) old: wait for one taken after the last request ended
        assert wait_until(lambda: all(ld.kv_used == 0 and ld.running == 0 for ld in client.load()), 5.0), \
            client.load()
