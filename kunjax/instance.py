"""One serving instance: a model replica on its sub-mesh, its paged KV pool, its scheduler and its step.

Owns the device side of one instance: the weights (placed on the instance's mesh), the KV pool array
`[NB, L, 2, BS, K, D]` (block-major, all layers in a block; K split over `tp`), and the jitted step, compiled
ahead of time for a bounded set of padded token counts (`EngineConfig.token_buckets()`); after `warmup()`
nothing compiles. The host side (scheduler, allocator) decides each step's batch; the device step receives
only small int32/float32 metadata, donates the pool, and returns the sampled ids.

A step is split in two so that instances run concurrently from one controller thread: `dispatch()` schedules
and launches the device work without waiting (JAX dispatch is asynchronous), `complete()` reads the sampled ids
back to the host once and applies them.

With a policy that keeps layer groups of a request in different places (`layerkv`), the step's tables are per
layer group (`[G, S, MB]` slot ids of the pool's slot view, `kunjax.model.slot_view`) and the policy's
`StepHooks` supply them and run after the dispatch; every other policy compiles the plain `[S, MB]` step.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kunjax.block_manager import NULL_BLOCK, BlockAllocator
from kunjax.config import EngineConfig, ModelConfig
from kunjax.model import Params, forward_paged, write_kv
from kunjax.request import Request
from kunjax.sampling import pack_sampling, sample
from kunjax.scheduler import Scheduler, SchedulerOutput
from pallas_kernels import resolve_backend
from sharding.layouts import kv_pool_sharding, param_shardings, replicated

# Most token ids a request can have masked while it is below `min_tokens` (its EOS ids and stop token ids).
MAX_SUPPRESSED = 16


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: jnp.dtype, tp: int = 1) -> int:
    """Bytes of one KV block (all L layers, K and V) on one device of a `tp`-way instance."""
    return cfg.num_layers * 2 * block_size * (cfg.num_kv_heads // tp) * cfg.head_dim * jnp.dtype(dtype).itemsize


def tree_bytes_per_device(tree) -> int:
    """Bytes one device holds of a sharded tree (the largest per-device share)."""
    per_dev: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_dev[shard.device] = per_dev.get(shard.device, 0) + shard.data.nbytes
    return max(per_dev.values(), default=0)


def num_kv_blocks(cfg: ModelConfig, ecfg: EngineConfig, mesh: Mesh, weight_bytes: int) -> int:
    """Blocks of the instance's pool: explicit, from the CPU byte budget, or from device memory stats."""
    if ecfg.num_blocks is not None:
        return ecfg.num_blocks
    block = kv_block_bytes(cfg, ecfg.block_size, jnp.dtype(ecfg.dtype), ecfg.tp)
    budget = ecfg.kv_cache_bytes
    if budget is None and ecfg.device_memory_bytes is not None:
        # A simulated device (CPU): the pool gets what the weights and the activation reserve leave.
        budget = ecfg.device_memory_bytes - weight_bytes - ecfg.activation_reserve_bytes
    if budget is None:
        stats = mesh.devices.flat[0].memory_stats()
        if stats and "bytes_limit" in stats:
            # Weights are already resident; keep a reserve for activations of the largest bucket.
            reserve = 256 * 2**20
            budget = int(stats["bytes_limit"] * ecfg.kv_memory_fraction) - weight_bytes - reserve
        else:
            budget = 64 * 2**20  # CPU default: a configured budget is how CPU runs create memory pressure
    n = budget // block
    if n < 2:
        raise ValueError(f"KV budget of {budget} bytes per device holds {n} blocks of {block} bytes: "
                         f"raise --kv-cache-bytes or lower --block-size")
    return int(n)


@dataclasses.dataclass
class StepInputs:
    """Host arrays of one step, padded to a compiled bucket (T tokens, S = max_num_seqs rows)."""

    tokens: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    seq_ids: np.ndarray  # [T] int32
    valid: np.ndarray  # [T] bool
    slot_mapping: np.ndarray  # [T] int32 flat KV slot, or [G, T] per layer group in the slot view (layerkv);
    # padding -> null block
    block_tables: np.ndarray  # [S, MB] int32 blocks, or [G, S, MB] slots per layer group (layerkv)
    context_lens: np.ndarray  # [S] int32
    logits_indices: np.ndarray  # [S] int32
    temperature: np.ndarray  # [S] float32
    top_k: np.ndarray  # [S] int32
    top_p: np.ndarray  # [S] float32
    min_p: np.ndarray  # [S] float32
    seeds: np.ndarray  # [S] uint32
    counters: np.ndarray  # [S] int32
    suppress_ids: np.ndarray  # [S, MAX_SUPPRESSED] int32 ids masked out (EOS/stop ids before min_tokens); -1 pad

    def as_tuple(self) -> tuple[np.ndarray, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def _step(cfg: ModelConfig, num_logprobs: int, attention_backend: str, params: Params, kv_pool: jax.Array,
          tokens, positions, seq_ids, valid, slot_mapping, block_tables, context_lens, logits_indices, temperature,
          top_k, top_p, min_p, seeds, counters, suppress_ids):
    logits, new_kv = forward_paged(cfg, params, kv_pool, tokens, positions, seq_ids, valid, block_tables,
                                   context_lens, logits_indices, attention_backend)
    kv_pool = write_kv(kv_pool, new_kv, slot_mapping)
    sampled = sample_rows(logits, suppress_ids, temperature, top_k, top_p, min_p, seeds, counters, num_logprobs)
    return kv_pool, sampled


def sample_rows(logits: jax.Array,  # [S, V] float32
                suppress_ids: jax.Array,  # [S, MAX_SUPPRESSED] int32, -1 pad
                temperature, top_k, top_p, min_p, seeds, counters,  # [S] each
                num_logprobs: int):
    """Mask each row's suppressed ids, then sample: the tail of every step (instance or pipeline group)."""
    # Rows below their min_tokens cannot pick their EOS / stop ids (those ids then report logprob -inf).
    s, v = logits.shape
    rows = jnp.broadcast_to(jnp.arange(s)[:, None], suppress_ids.shape)
    banned = jnp.zeros((s, v), bool).at[rows, jnp.where(suppress_ids >= 0, suppress_ids, v)].set(True, mode="drop")
    logits = jnp.where(banned, -jnp.inf, logits)
    return sample(logits, temperature, top_k, top_p, min_p, seeds, counters, num_logprobs)


def suppressed_ids(req: Request) -> list[int]:
    """Ids a request may not sample yet: its stop ids and EOS ids while it is below `min_tokens`."""
    if req.num_output_tokens >= req.params.min_tokens:
        return []
    return sorted(set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else set(req.eos_token_ids)))


@dataclasses.dataclass
class PendingStep:
    plan: SchedulerOutput
    outputs: tuple  # device arrays: (tokens [S], logprob [S], top_ids [S, N], top_logprobs [S, N])
    started: float = 0.0  # time.perf_counter() when the step was scheduled


class StepHooks(Protocol):
    """What a policy with layer-wise residency (`kunjax.policies.layerkv`) adds to an instance's step."""

    def group_tables(self, req: Request) -> list[list[int]] | None:
        """Per layer group, the slot (`kunjax.model.slot_view`) of each of `req`'s logical blocks this step;
        None when every group is in `req.blocks`."""

    def after_dispatch(self, plan: SchedulerOutput) -> None:
        """Called right after the step is dispatched (copies dispatched here run after it on the device)."""


class Instance:
    # Layer groups of the step's block tables: 1 (every layer of a request in the same blocks) unless a policy
    # with layer-wise residency sets it, with `step_hooks`, before warm-up (kunjax.policies.layerkv).
    num_layer_groups: int = 1
    step_hooks: StepHooks | None = None
    last_step: tuple[int, float] | None = None  # (tokens, seconds from schedule to sampled ids) of the last step

    def __init__(self, index: int, mesh: Mesh, cfg: ModelConfig, ecfg: EngineConfig, params: Params):
        self.index = index
        self.mesh = mesh
        self.cfg = cfg
        self.ecfg = ecfg
        self.params = params
        self.dtype = jnp.dtype(ecfg.dtype)
        self.max_blocks_per_seq = ecfg.max_blocks_per_seq(cfg)
        self.weight_bytes = tree_bytes_per_device(params)
        self.num_blocks = num_kv_blocks(cfg, ecfg, mesh, self.weight_bytes)
        self.pool_sharding = kv_pool_sharding(mesh)
        pool_shape = (self.num_blocks, cfg.num_layers, 2, ecfg.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_pool = jax.jit(lambda: jnp.zeros(pool_shape, self.dtype), out_shardings=self.pool_sharding)()
        self.allocator = BlockAllocator(self.num_blocks)
        self.scheduler = Scheduler(self.allocator, block_size=ecfg.block_size, max_num_seqs=ecfg.max_num_seqs,
                                   max_num_batched_tokens=ecfg.max_num_batched_tokens,
                                   enable_prefix_caching=ecfg.enable_prefix_caching)
        self.buckets = ecfg.token_buckets()
        self._compiled: dict[int, jax.stages.Compiled] = {}
        self.steps = 0
        self.group = None  # the pipeline group this instance is fused into (kunserve), else None

    # ---- compilation --------------------------------------------------------------------------------
    def _abstract_inputs(self, t: int) -> StepInputs:
        s, mb, g = self.ecfg.max_num_seqs, self.max_blocks_per_seq, self.num_layer_groups
        i32, f32 = np.int32, np.float32
        lead = (g,) if g > 1 else ()
        return StepInputs(
            tokens=np.zeros(t, i32), positions=np.zeros(t, i32), seq_ids=np.zeros(t, i32),
            valid=np.zeros(t, bool), slot_mapping=np.zeros((*lead, t), i32),
            block_tables=np.zeros((*lead, s, mb), i32),
            context_lens=np.zeros(s, i32), logits_indices=np.zeros(s, i32), temperature=np.zeros(s, f32),
            top_k=np.zeros(s, i32), top_p=np.ones(s, f32), min_p=np.zeros(s, f32),
            seeds=np.zeros(s, np.uint32), counters=np.zeros(s, i32),
            suppress_ids=np.full((s, MAX_SUPPRESSED), -1, i32))

    def warmup(self) -> float:
        """Compile the step for every token bucket; returns seconds spent."""
        t0 = time.perf_counter()
        backend = resolve_backend(self.ecfg.attention_backend, self.mesh.devices)  # auto -> a validated kernel
        fn = functools.partial(_step, self.cfg, self.ecfg.max_logprobs, backend)
        rep = replicated(self.mesh)
        p_shard = param_shardings(self.mesh, self.params)
        n_meta = len(dataclasses.fields(StepInputs))
        jitted = jax.jit(fn, donate_argnums=(1,), in_shardings=(p_shard, self.pool_sharding) + (rep,) * n_meta,
                         out_shardings=(self.pool_sharding, rep))
        abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                       self.params)
        abstract_pool = jax.ShapeDtypeStruct(self.kv_pool.shape, self.kv_pool.dtype, sharding=self.pool_sharding)
        for t in self.buckets:
            if t not in self._compiled:
                meta = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)
                        for a in self._abstract_inputs(t).as_tuple()]
                self._compiled[t] = jitted.lower(abstract_params, abstract_pool, *meta).compile()
        return time.perf_counter() - t0

    # ---- one step -----------------------------------------------------------------------------------
    def _bucket(self, num_tokens: int) -> int:
        for b in self.buckets:
            if b >= num_tokens:
                return b
        raise AssertionError(f"{num_tokens} tokens exceed the step budget {self.buckets[-1]}")

    def build_inputs(self, plan: SchedulerOutput) -> StepInputs:
        bs = self.ecfg.block_size
        inp = self._abstract_inputs(self._bucket(plan.num_tokens))
        row = 0
        for i, seq in enumerate(plan.seqs):
            req = seq.request
            n, start = seq.num_tokens, seq.start
            pos = np.arange(start, start + n, dtype=np.int32)
            blocks = np.asarray(req.blocks, np.int32)
            inp.tokens[row:row + n] = req.token_ids[start:start + n]
            inp.positions[row:row + n] = pos
            inp.seq_ids[row:row + n] = i
            inp.valid[row:row + n] = True
            g_count = self.num_layer_groups
            if g_count == 1:
                inp.slot_mapping[row:row + n] = blocks[pos // bs] * bs + pos % bs
                inp.block_tables[i, :len(blocks)] = blocks
                tables = []
            elif (tables := self.step_hooks.group_tables(req)) is None:
                # Whole blocks: group g of block p is slot p * G + g of the slot view (`kunjax.model.slot_view`).
                tables = [blocks * g_count + g for g in range(g_count)]
            for g, table in enumerate(tables):  # [G] slot tables, one per layer group
                slots = np.asarray(table, np.int32)
                inp.slot_mapping[g, row:row + n] = slots[pos // bs] * bs + pos % bs
                inp.block_tables[g, i, :len(slots)] = slots
            inp.context_lens[i] = start
            inp.logits_indices[i] = row + n - 1
            banned = suppressed_ids(req)
            inp.suppress_ids[i, :len(banned)] = banned
            row += n
        inp.slot_mapping[..., row:] = NULL_BLOCK * bs
        reqs = [seq.request for seq in plan.seqs]
        sampling = pack_sampling([r.params for r in reqs], [r.seed for r in reqs],
                                 [r.num_output_tokens for r in reqs], self.ecfg.max_num_seqs)
        return dataclasses.replace(inp, **sampling._asdict())

    def dispatch(self) -> PendingStep | None:
        """Schedule and launch one step without waiting for the device; None when idle."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.seqs:
            return None
        inp = self.build_inputs(plan)
        compiled = self._compiled.get(len(inp.tokens))
        if compiled is None:
            raise RuntimeError(f"instance {self.index}: step bucket {len(inp.tokens)} was not warmed up")
        self.kv_pool, outputs = compiled(self.params, self.kv_pool, *inp.as_tuple())
        if self.step_hooks is not None:
            self.step_hooks.after_dispatch(plan)
        self.steps += 1
        return PendingStep(plan, outputs, started)

    def complete(self, pending: PendingStep) -> list[tuple[Request, int, float, np.ndarray, np.ndarray]]:
        """Commit the step's KV and return `(request, token, logprob, top_ids, top_logprobs)` per sample."""
        tokens, logprob, top_ids, top_lps = (np.asarray(x) for x in pending.outputs)
        self.last_step = (pending.plan.num_tokens, time.perf_counter() - pending.started)
        sampled = []
        for i, seq in enumerate(pending.plan.seqs):
            self.scheduler.commit(seq)
            if seq.sample:
                sampled.append((seq.request, int(tokens[i]), float(logprob[i]), top_ids[i], top_lps[i]))
        return sampled

    # ---- books --------------------------------------------------------------------------------------
    def kv_pool_bytes_per_device(self) -> int:
        return tree_bytes_per_device(self.kv_pool)

    def load(self) -> dict[str, int]:
        a = self.allocator
        return {"instance": self.index, "free": a.num_free, "used": a.num_used, "cached": a.num_cached,
                "total": a.total, "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "demand_blocks": self.scheduler.demand_blocks()}
