"""Test oracles shared across test folders: a random tiny model on disk, a naive generation loop, and an open-loop
driver for engines on a virtual clock."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kunjax.checkpoint import load_params, save_checkpoint
from kunjax.config import ModelConfig
from kunjax.memory import flatten_params, param_shapes
from kunjax.model import forward_dense, init_params
from kunjax.plan import StageLoad, StepInputs, TickWork
from kunjax.sampling_params import SamplingParams

TINY = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position_embeddings=256, eos_token_ids=())


# A vocabulary every pipeline group size (2, 4, 8) divides, so the embedding and the LM head split over stages.
SPLIT = dataclasses.replace(TINY, vocab_size=128)


def tick_work_of(inputs: StepInputs) -> TickWork:
    """A tick's counts read off the padded arrays a compiled step reads: the oracle of `ServingUnit.tick_work`
    (without the leaving rows' sampling, which `check_tick_work` compares row by row)."""
    k = inputs.positions.shape[0]
    stages = []
    for s in range(k):
        valid = inputs.valid[s]
        n_valid = int(valid.sum())
        remote_in = int(inputs.recv_lens[s][inputs.send_rows[:, s] >= 0].sum()) if k > 1 else 0
        out = int((inputs.send_rows[s] >= 0).sum()) if k > 1 else 0
        if not n_valid:
            stages.append(StageLoad(remote_kv_in=remote_in))
            continue
        counts = np.bincount(inputs.seq_ids[s][valid], minlength=inputs.context_lens.shape[1])  # rows' new tokens
        rows = np.flatnonzero(counts)
        n_new = counts[rows].astype(np.int64)
        local = (inputs.context_lens[s][rows] - inputs.context_starts[s][rows]).astype(np.int64)
        pairs = int((n_new * local + n_new * (n_new + 1) // 2).sum())
        stages.append(StageLoad(n_valid, int((local + n_new).sum()), pairs, int(n_new[n_new > 1].sum()), out,
                                remote_in))
    return TickWork(int(inputs.positions.shape[1]), int(inputs.logits_indices.shape[0]),
                    int(inputs.block_tables.shape[-1]), tuple(stages), bool((inputs.send_rows >= 0).any()))


def check_tick_work(work: TickWork, inputs: StepInputs) -> None:
    """`work` (what a unit says its tick computes) is what the tick's arrays make the compiled step compute."""
    counts = work._replace(leaving_seeds=(), leaving_counters=(), leaving_suppress=())
    assert counts == tick_work_of(inputs), (counts, tick_work_of(inputs))
    m = len(work.leaving_seeds)
    assert list(work.leaving_seeds) == inputs.seeds[:m].tolist()
    assert list(work.leaving_counters) == inputs.counters[:m].tolist()
    assert [list(s) for s in work.leaving_suppress] == [[t for t in row if t >= 0] for row in
                                                       inputs.suppress_ids[:m].tolist()]


def fp32_weight_bytes(cfg: ModelConfig) -> int:
    """Bytes of a model's weights in float32, from its shapes (one replica)."""
    return sum(int(np.prod(s)) * 4 for s in flatten_params(param_shapes(cfg)).values())


def load_single_device_params(path: Path, cfg: ModelConfig):
    """A checkpoint's weights on one device, for the oracles."""
    from sharding.layouts import instance_meshes, param_shardings

    mesh = instance_meshes(jax.devices()[:1], 1, 1)[0]
    return load_params(path, cfg, param_shardings(mesh, param_shapes(cfg)), "float32")


def write_tiny_model(path: Path, cfg: ModelConfig = TINY, seed: int = 0) -> Path:
    params = init_params(cfg, seed)
    # Larger random norms make the logits peaky enough that greedy argmax is far from ties.
    params["final_norm"] = params["final_norm"] * 4.0
    save_checkpoint(path, cfg, params)
    return path


@functools.partial(jax.jit, static_argnums=0)
def _dense_logits(cfg: ModelConfig, params, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, V]
    return forward_dense(cfg, params, tokens)


def naive_greedy(cfg: ModelConfig, params, prompts: list[list[int]], max_tokens: int,
                 eos_ids: frozenset[int] = frozenset()) -> list[list[int]]:
    """Full recompute every token, no cache: the oracle for every serving path (DESIGN.md §10)."""
    total = max(len(p) for p in prompts) + max_tokens
    width = 1 << (total - 1).bit_length()  # one compile for the whole loop
    buf = np.zeros((len(prompts), width), np.int32)
    lens = np.array([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    outs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for _ in range(max_tokens):
        logits = np.asarray(_dense_logits(cfg, params, jnp.asarray(buf)))
        nxt = logits[np.arange(len(prompts)), lens - 1].argmax(-1)
        for i, t in enumerate(nxt):
            if not done[i]:
                outs[i].append(int(t))
                done[i] = int(t) in eos_ids
        buf[np.arange(len(prompts)), lens] = nxt
        lens += 1
        if done.all():
            break
    return outs


def wait_until(pred, timeout_s: float = 5.0) -> bool:
    """Poll `pred` until it holds or `timeout_s` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def run_open_loop(engine, arrivals: list[tuple[float, list[int], int]], max_steps: int = 100_000,
                  finals: dict | None = None) -> dict[str, list[int]]:
    """Open loop on the engine's virtual clock: each request arrives at its time; between arrivals an idle engine
    jumps the clock. Checks the books after every step, and that no request has an output after its final one;
    returns the outputs by request id (a virtual clock), in arrival order. `finals`, if given, gets each request's
    final `RequestOutput` (its finish reason and error)."""
    clock = engine.clock
    out: dict[str, list[int]] = {}
    finals = {} if finals is None else finals
    ids: list[str] = []
    i = 0
    for _ in range(max_steps):
        while i < len(arrivals) and arrivals[i][0] <= clock.now():
            _, prompt, n = arrivals[i]
            ids.append(engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)))
            i += 1
        if engine.has_requests():
            for o in engine.step():
                assert o.request_id not in finals, f"{o.request_id}: an output after its final one"
                if o.finished:
                    finals[o.request_id] = o
                    out[o.request_id] = o.outputs[0].token_ids
            engine.check_books()
        elif i < len(arrivals):
            clock.advance_to(arrivals[i][0])
        else:
            return {rid: out[rid] for rid in ids}
    raise AssertionError("the workload did not finish")


def one_at_a_time(engine, prompts: list[list[int]], params, targets: list[int] | None = None
                  ) -> tuple[list[list[int]], list[int]]:
    """Serve `prompts` one after the other (each finishes before the next is added), on unit `targets[i]` when
    given, checking the books after every step; returns each one's output tokens and its cached prompt tokens."""
    outputs, cached = [], []
    pick = engine.router.pick
    try:
        for i, prompt in enumerate(prompts):
            if targets is not None:
                engine.router.pick = lambda req, cands, *a, t=targets[i]: next(u for u in cands if u.uid == t)
            rid = engine.add_request(prompt, params)
            req = engine.requests[rid]
            while engine.has_requests():
                for o in engine.step():
                    if o.finished and o.request_id == rid:
                        outputs.append(o.outputs[0].token_ids)
                engine.check_books()
            cached.append(req.num_cached_tokens)
    finally:
        engine.router.pick = pick
    return outputs, cached


def burst(n: int, seed: int, vocab: int) -> list[tuple[float, list[int], int]]:
    """`n` requests arriving within one second (open loop), prompts 8-48 tokens, 4-24 output tokens."""
    rng = random.Random(seed)
    return sorted((rng.random(), [rng.randrange(1, vocab) for _ in range(rng.randint(8, 48))], rng.randint(4, 24))
                  for _ in range(n))


def started(engine, timeout_s: float = 300.0, **kwargs):
    """An `EngineThread` over `engine` (`kwargs`: its options), once its warm-up is done."""
    from kunjax.engine_thread import EngineThread

    rt = EngineThread(engine, **kwargs)
    deadline = time.monotonic() + timeout_s
    while not rt.ready():
        if time.monotonic() > deadline:
            rt.shutdown(grace_s=0)
            raise AssertionError("warm-up did not finish")
        time.sleep(0.05)
    return rt


@contextlib.contextmanager
def served_engine(engine, *, timeout_s: float = 30.0, metrics_port: int | None = 0):
    """`engine` behind a real gRPC server on loopback: yields (runtime, server handle, client); stops all three."""
    from serving.client import KunjaxClient
    from serving.server import serve

    rt = started(engine)
    handle = serve(rt, metrics_port=metrics_port)
    client = KunjaxClient(handle.target, timeout_s=timeout_s)
    try:
        yield rt, handle, client
    finally:
        client.close()
        handle.stop(grace=1.0)
        rt.shutdown(grace_s=5)
