"""A pipeline group at run time: its compiled functions (`GroupRuntime`) and its live state (`PipelineGroup`).

`GroupRuntime` is built and compiled ahead of time for every candidate group (aligned blocks of instances), so
a drop, a tick, an exchange or a restore never compiles while serving. `PipelineGroup` owns the group's device
arrays (stage-sharded weights, pipeline-format pool, extension segment, in-flight activations) and its
`GroupBooks`, and runs one engine step as k ticks followed by one bounded round of the live KV exchange.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kunjax.config import EngineConfig, ModelConfig
from kunjax.elastic.group import GroupBooks
from kunjax.elastic.monitor import RestoreWatch
from kunjax.elastic.pipeline import (
    STAGE,
    GroupShapes,
    compile_copy_blocks,
    compile_tick,
    stage_specs,
)
from kunjax.elastic.reshard import GroupReshard
from kunjax.instance import kv_block_bytes
from kunjax.model import flatten_params as flatten
from kunjax.model import unflatten_params as unflatten
from pallas_kernels import resolve_backend
from sharding.layouts import make_mesh


def _leaf_bytes(shape: Sequence[int], dtype) -> int:
    return int(np.prod(shape)) * jnp.dtype(dtype).itemsize


def _local_bytes(shape: Sequence[int], dtype, spec: P, k: int) -> int:
    return _leaf_bytes(shape, dtype) // (k if STAGE in tuple(spec) else 1)


@dataclasses.dataclass
class GroupRuntime:
    members: tuple[int, ...]
    mesh: Mesh
    shapes: GroupShapes
    reshard: GroupReshard
    freed_bytes: int  # weight bytes per device the drop releases (from the shapes; tests measure it)
    ticks: dict[tuple[bool, int], jax.stages.Compiled] = dataclasses.field(default_factory=dict)  # (remote, T)
    copy: jax.stages.Compiled | None = None
    acts_zeros: jax.stages.Compiled | None = None
    compile_seconds: float = 0.0

    @property
    def k(self) -> int:
        return len(self.members)


def plan_runtime(members: tuple[int, ...], devices: Sequence[jax.Device], cfg: ModelConfig, ecfg: EngineConfig,
                 params_shapes: dict[str, Any], pool_shape: Sequence[int]) -> GroupRuntime | None:
    """Shapes of a group of `members` (one device each); None when the drop would free no KV block."""
    k = len(members)
    if cfg.num_layers % k:
        return None
    mesh = make_mesh(list(devices), (STAGE,), (k,))
    dtype = jnp.dtype(ecfg.dtype)
    flat = flatten(params_shapes)
    specs = flatten(stage_specs(cfg, unflatten(flat), k))
    leaf_shapes = {p: (tuple(shape), dtype) for p, shape in flat.items()}
    before = sum(_leaf_bytes(s, d) for s, d in leaf_shapes.values())
    after = sum(_local_bytes(s, d, specs[p], k) for p, (s, d) in leaf_shapes.items())
    # A tick moves T tokens through all L layers (L/k per stage, k stages at once), so k ticks (one engine step)
    # do the work of the k members' steps when T is the members' step budget.
    tokens = max(ecfg.max_num_seqs, ecfg.microbatch_tokens or ecfg.max_num_batched_tokens)
    # Two tick shapes: one for decode-heavy ticks (the smallest step bucket that holds a row per sequence) and
    # the full micro-batch; a decode tick padded to the full budget ran ~4x slower on CPU.
    small = min((b for b in ecfg.token_buckets() if b >= ecfg.max_num_seqs), default=tokens)
    buckets = tuple(sorted({min(small, tokens), tokens}))
    acts_bytes = tokens * cfg.hidden_size * dtype.itemsize
    pblock = kv_block_bytes(cfg, ecfg.block_size, dtype) // k
    num_ext = (before - after - acts_bytes) // pblock
    if num_ext < 1:
        return None
    shapes = GroupShapes(k=k, num_base=pool_shape[0] * k, num_ext=int(num_ext), tokens=tokens, buckets=buckets,
                         seqs=ecfg.max_num_seqs, max_blocks=ecfg.max_blocks_per_seq(cfg),
                         remote_rows=ecfg.remote_rows, remote_transport=ecfg.remote_transport,
                         copy_blocks=ecfg.exchange_blocks_per_step,
                         num_logprobs=ecfg.max_logprobs,
                         attention_backend=resolve_backend(ecfg.attention_backend, devices))
    reshard = GroupReshard(mesh, leaf_shapes, specs, pool_shape, dtype, int(num_ext))
    return GroupRuntime(members, mesh, shapes, reshard, before - after)


def compile_runtime(rt: GroupRuntime, cfg: ModelConfig, ecfg: EngineConfig) -> None:
    """Compile everything a group runs: reshards, both tick variants, the block copy, the activation buffer."""
    t0 = time.perf_counter()
    gs, mesh, k = rt.shapes, rt.mesh, rt.k
    rt.reshard.compile()
    dtype = jnp.dtype(ecfg.dtype)
    stage = NamedSharding(mesh, P(STAGE))
    params = unflatten({p: jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, rt.reshard.stage_specs[p]))
                        for p, (s, d) in rt.reshard.leaf_shapes.items()})
    tail = tuple(rt.reshard.pool_shape[2:])
    lk = cfg.num_layers // k
    pool = jax.ShapeDtypeStruct((k * gs.num_base, lk, *tail), dtype, sharding=stage)
    ext = jax.ShapeDtypeStruct((k * gs.num_ext, lk, *tail), dtype, sharding=stage)
    acts_shape = (k * gs.tokens, cfg.hidden_size)
    acts = jax.ShapeDtypeStruct(acts_shape, dtype, sharding=stage)
    for rows in gs.buckets:
        example, _ = GroupBooks(gs, ecfg.block_size, 0).tick_inputs(rows)
        for remote in (False, True):
            rt.ticks[(remote, rows)] = compile_tick(cfg, gs, mesh, params, pool, ext, acts, example, remote)
    rt.copy = compile_copy_blocks(gs, mesh, pool, ext)
    rt.acts_zeros = jax.jit(lambda: jnp.zeros(acts_shape, dtype), out_shardings=stage).lower().compile()
    rt.compile_seconds = time.perf_counter() - t0


class PipelineGroup:
    """A live pipeline group: device arrays + books; `step()` is k ticks and one exchange round."""

    def __init__(self, gid: int, rt: GroupRuntime, books: GroupBooks, params, pool: jax.Array, ext: jax.Array,
                 acts: jax.Array, watch: RestoreWatch):
        self.gid = gid
        self.rt = rt
        self.books = books
        self.params, self.pool, self.ext, self.acts = params, pool, ext, acts
        self.watch = watch
        self.ticks = 0
        self.remote_ticks = 0
        self.created = time.perf_counter()
        self.exchange_done = False
        self.restore_requested = False  # restore as soon as the KV fits home (KunServeController.begin_restore)
        self.deferred_at: int | None = None  # engine step of the last logged restore deferral

    @property
    def members(self) -> tuple[int, ...]:
        return self.rt.members

    @property
    def k(self) -> int:
        return self.rt.k

    # ---- serving ------------------------------------------------------------------------------------
    def launch_tick(self) -> tuple | None:
        """Schedule the entering micro-batch and launch one tick without waiting; None when the pipe is empty.

        Returns what `finish_tick` needs when a micro-batch leaves the last stage this tick."""
        books = self.books
        entering = books.schedule() if books.admitting else None
        books.at_stage = [entering] + books.at_stage[:-1]
        if not books.in_flight:
            return None
        inp, remote = books.tick_inputs()
        rows = len(inp.tokens_in)
        self.pool, self.ext, self.acts, sampled = self.rt.ticks[(remote, rows)](
            self.params, self.pool, self.ext, self.acts, *inp.as_tuple())
        self.ticks += 1
        self.remote_ticks += int(remote)
        leaving = books.at_stage[-1]
        books.at_stage[-1] = None  # (its requests stay in flight until finish_tick reads their tokens)
        return None if leaving is None else (leaving, sampled)

    def finish_tick(self, launched: tuple | None) -> list[tuple]:
        """Read the leaving micro-batch's tokens (the one host sync of a tick) and commit it."""
        if launched is None:
            return []
        leaving, sampled = launched
        tokens, logprob, top_ids, top_lps = (np.asarray(x) for x in sampled)
        return self.books.exit(leaving, tokens, logprob, top_ids, top_lps)

    def step(self, on_samples: Callable[[list[tuple]], None]) -> None:
        """k ticks, then one exchange round. Each tick's samples go to `on_samples` before the next tick is
        scheduled: a request that just left the pipe re-enters with its new token (or not at all if finished).
        (The engine interleaves several groups' ticks itself, so their device work overlaps.)"""
        for _ in range(self.k):
            sampled = self.finish_tick(self.launch_tick())
            if sampled:
                on_samples(sampled)
        self.exchange_round()

    # ---- block copies -------------------------------------------------------------------------------
    def copy_blocks(self, copies: list[tuple[int, int, int, int, int, int]]) -> None:
        """Run `(src_stage, src_id, dst_stage, dst_id, lo, hi)` copies in calls of at most X per pair."""
        gs = self.rt.shapes
        k, x = gs.k, gs.copy_blocks
        pending = list(copies)
        while pending:
            send = np.full((k, k, x), -1, np.int32)
            recv = np.full((k, k, x), -1, np.int32)
            lo = np.zeros((k, k, x), np.int32)
            hi = np.zeros((k, k, x), np.int32)
            used = np.zeros((k, k), np.int32)
            rest = []
            for c in pending:
                src, src_id, dst, dst_id, c_lo, c_hi = c
                j = used[src, dst]
                if j >= x:
                    rest.append(c)
                    continue
                send[src, dst, j], recv[dst, src, j], lo[dst, src, j], hi[dst, src, j] = src_id, dst_id, c_lo, c_hi
                used[src, dst] += 1
            self.pool, self.ext = self.rt.copy(self.pool, self.ext, send, recv, lo, hi)
            pending = rest

    def exchange_round(self) -> int:
        """One bounded batch of the live KV exchange; returns blocks moved."""
        copies = self.books.plan_exchange(self.rt.shapes.copy_blocks)
        if copies:
            self.copy_blocks(copies)
            self.books.blocks_exchanged += len(copies)
        self.books.commit_exchange()
        return len(copies)

    def info(self) -> dict[str, Any]:
        b = self.books
        return {"group": self.gid, "members": list(self.members), "k": self.k, "admitting": b.admitting,
                "running": len(b.running), "waiting": len(b.waiting), "free": b.free_blocks,
                "total": b.total_blocks, "demand_blocks": b.demand_blocks(),
                "remote_dependent": b.num_remote_dependent, "blocks_exchanged": b.blocks_exchanged,
                "ticks": self.ticks, "remote_ticks": self.remote_ticks}

