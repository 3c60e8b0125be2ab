"""Multi-host on loopback: 2 processes x 4 CPU devices on `jax.distributed` (gloo), against one 8-device process.

* The demo passages and 32 mixed prompts: greedy outputs equal the single-process run's, token for token, with
  the leader's books checked against both processes' arrays after every step.
* KunServe across hosts: 2 instances, one per process; a burst makes the monitor drop them into one pipeline
  group spanning both processes; the exchange and the restore happen; outputs equal the single-process run's
  and the recitations are exact; both processes' live bytes come back to where they started.
* `kunjax serve` with a follower killed mid-stream: every stream ends with UNAVAILABLE within the peer timeout
  and a bound, health turns NOT_SERVING, and the leader exits with status 75; with the leader killed, the
  follower exits non-zero within a bound.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jax
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import kunjax.demo as demo
from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.multihost import EXIT_PEER_LOST
from kunjax.sampling_params import SamplingParams
from tests.e2e.serve_process import start_serve

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(tmp_path: Path, job: dict, timeout_s: float = 900) -> dict:
    """Run the job on 2 worker processes of 4 CPU devices each; the leader's result."""
    job_path, out = tmp_path / "job.json", tmp_path / "result.json"
    job_path.write_text(json.dumps(job))
    coord = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]  # noqa: SIM115 (closed below)
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--coordinator", coord, "--process-id", str(i),
                               "--devices", "4", "--job", str(job_path), "--out", str(out)],
                              stdout=logs[i], stderr=subprocess.STDOUT, env=env, cwd=ROOT) for i in range(2)]
    try:
        codes = [p.wait(timeout=timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    text = "".join(f"--- process {i}\n" + (tmp_path / f"process{i}.log").read_text()[-4000:] for i in range(2))
    assert codes == [0, 0], text
    return json.loads(out.read_text())


def single_process(model: str, config: dict, prompts: list, params: list[dict], devices: int) -> list[list[int]]:
    eng = LLMEngine(model, config_from_kwargs(**config), devices=jax.devices()[:devices])
    eng.warmup()
    ids = [eng.add_request(p, SamplingParams(**kw)) for p, kw in zip(prompts, params, strict=True)]
    outputs: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        if not eng.requests:
            break
    return [outputs[rid] for rid in ids]


def mixed_prompts(n: int, seed: int) -> tuple[list, list[dict]]:
    """Random token prompts of 3-90 tokens, a third of them sharing a prefix, outputs of 4-40 tokens, greedy."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 1000) for _ in range(40)]
    prompts, params = [], []
    for i in range(n):
        body = [rng.randrange(3, 1000) for _ in range(rng.randint(3, 50))]
        prompts.append(shared[:rng.randint(16, 40)] + body if i % 3 == 0 else body)
        params.append({"max_tokens": rng.randint(4, 40), "temperature": 0.0, "ignore_eos": True})
    return prompts, params


@pytest.mark.slow
def test_two_processes_generate_what_one_process_does(tmp_path):
    passages = demo.recitation_prompts(8)
    extra, extra_params = mixed_prompts(32, seed=5)
    prompts = [p for p, _ in passages] + extra
    params = [{"max_tokens": 200, "temperature": 0.0}] * len(passages) + extra_params
    config = {"max_model_len": 256, "max_num_seqs": 8, "max_num_batched_tokens": 64}
    result = run_group(tmp_path, {"model": "demo", "config": config, "prompts": prompts, "params": params})
    assert result["owners"] == [0, 0, 0, 0, 1, 1, 1, 1]
    expected = single_process("demo", config, prompts, params, devices=8)
    wrong = [i for i, (a, b) in enumerate(zip(result["outputs"], expected, strict=True)) if a != b]
    assert not wrong, f"prompts {wrong} differ from the single-process run"
    assert result["live_bytes_before"] == result["live_bytes_after"]


@pytest.mark.slow
def test_a_burst_fuses_instances_of_two_processes_and_restores(tmp_path):
    passages = demo.recitation_prompts(8)
    prompts = [p for p, _ in passages]
    params = [{"max_tokens": 200, "temperature": 0.0}] * len(prompts)
    # One instance per process, 24 KV blocks of 16 tokens each: the eight passages need about twice that.
    config = {"num_instances": 2, "policy": "kunserve", "num_blocks": 24, "block_size": 16, "max_num_seqs": 8,
              "max_num_batched_tokens": 64, "max_model_len": 256, "restore_window_steps": 4, "min_group_steps": 4,
              "exchange_blocks_per_step": 4, "remote_rows": 8}
    result = run_group(tmp_path, {"model": "demo", "config": config, "prompts": prompts, "params": params})
    assert result["owners"] == [0, 1]  # instance 0 on process 0, instance 1 on process 1
    assert [0, 1] in result["groups"], result["events"]  # fused across the two processes
    stats = result["stats"]
    assert stats["drops"] >= 1 and stats["restores"] == stats["drops"] and not result["unfinished"]
    assert "exchange_done" in result["events"] and stats["blocks_exchanged"] > 0
    expected = single_process("demo", config, prompts, params, devices=2)
    assert result["outputs"] == expected
    texts = [demo_text(ids) for ids in result["outputs"]]
    assert texts == [passage for _, passage in passages]
    assert result["live_bytes_before"] == result["live_bytes_after"]  # on both processes: nothing leaked


def demo_text(ids: list[int]) -> str:
    return demo_tokenizer().decode(ids)


@functools.cache
def demo_tokenizer():
    from kunjax import checkpoint
    from kunjax.engine import resolve_model_path

    return checkpoint.load_tokenizer(resolve_model_path("demo"))


@pytest.mark.slow
def test_a_lost_follower_fails_streams_with_unavailable_and_the_leader_exits(tmp_path):
    from serving.client import KunjaxClient

    with serve_pair(tmp_path) as (leader, target, follower):
        threading.Thread(target=lambda: [None for _ in iter(leader.stderr.readline, "")], daemon=True).start()
        results: dict[int, tuple[int, object, float]] = {}
        started = [threading.Event(), threading.Event()]

        def stream(i: int) -> None:
            n = 0
            try:
                with KunjaxClient(target, timeout_s=120) as client:
                    for resp in client.generate([7 + i, 11, 13], max_tokens=500, temperature=0.0, ignore_eos=True):
                        n += len(resp.token_ids)
                        started[i].set()
                results[i] = (n, grpc.StatusCode.OK, time.monotonic())
            except grpc.RpcError as e:
                results[i] = (n, e.code(), time.monotonic())
            started[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert all(e.wait(timeout=120) for e in started)  # both streams generate (two instances, one per process)
        assert not results, results
        killed = time.monotonic()
        follower.send_signal(signal.SIGKILL)
        saw_not_serving = False
        with grpc.insecure_channel(target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while leader.poll() is None and time.monotonic() - killed < 30:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                    saw_not_serving |= status == health_pb2.HealthCheckResponse.NOT_SERVING
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        for t in threads:
            t.join(timeout=30)
        code = leader.wait(timeout=30)
        exited = time.monotonic() - killed
        assert code == EXIT_PEER_LOST
        assert exited < 3 + 10, f"the leader took {exited:.1f}s to exit"
        assert sorted(results) == [0, 1]
        for n, status, at in results.values():
            assert n > 0 and status == grpc.StatusCode.UNAVAILABLE, results
            assert at - killed < 3 + 8
        assert saw_not_serving


@pytest.mark.slow
def test_a_lost_leader_makes_the_follower_exit(tmp_path):
    with serve_pair(tmp_path) as (leader, _, follower):
        leader.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = follower.wait(timeout=60)
        assert code != 0, (tmp_path / "follower.log").read_text()[-2000:]
        assert time.monotonic() - killed < 3 + 8


@contextlib.contextmanager
def serve_pair(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str, subprocess.Popen]]:
    """`(leader, its gRPC target, follower)`: a two-process `kunjax serve` on loopback (4 CPU devices and one
    instance each, peer timeout 3 s), the follower's output in tmp_path/follower.log; both killed at the end."""
    coord = f"127.0.0.1:{free_port()}"
    flags = ["--coordinator", coord, "--num-processes", "2", "--cpu-devices", "4", "--peer-timeout-s", "3",
             "--num-instances", "2", "--max-model-len", "512", "--max-num-batched-tokens", "64"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(tmp_path / "follower.log", "w") as follower_log:
        follower = subprocess.Popen([sys.executable, "-m", "kunjax", "serve", *flags, "--process-id", "1"],
                                    stdout=follower_log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        leader = None
        try:
            leader, target, _ = start_serve([*flags, "--process-id", "0"])
            yield leader, target, follower
        finally:
            for p in (leader, follower):
                if p is not None and p.poll() is None:
                    p.kill()
        follower_log.close()
