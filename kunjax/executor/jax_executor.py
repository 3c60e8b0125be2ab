"""The JAX executor: the real model on devices. Owns every device array and every compiled function.

State (nothing outside this module holds a `jax.Array` of the serving path):
* per instance (a `(1, tp)` `('stage', 'tp')` mesh): its weights and its KV pool `[NB, L, 2, BS, K, D]` while it
  serves as a replica (a one-stage unit whose id is the instance index), and its host tier: entries of KV in
  host memory (`pinned_host` where the platform has it, CPU jax included) keyed by the host books' keys;
* per pipeline group (a `(k, tp)` mesh): its stage-sharded weights, its pool in pipeline format, its extension
  segment and its in-flight activations;
* compiled functions, all built in `warmup` (a shape outside them is an error, never a silent compile): each
  replica's tick per token bucket; per candidate group, its reshards, its tick per bucket with and without
  remote attention, and its block copy; per instance, block gathers and donated scatters of power-of-two counts
  (any count moves as its binary decomposition) for swaps, transfers and layer-group slot moves.

Several processes (`jax.distributed`, `kunjax.multihost`): every process builds this executor over the global
devices and runs the calls the leader's engine makes, in the same order; each one holds the arrays of the
instances on its own devices (an instance's tp devices are on one process) and of the groups with a member there,
and skips what involves none of its devices. A group's compiled functions span the processes holding its members
(their collectives cross hosts). `is_local_unit` says whether this process computes a unit's tick.

Ordering: everything is dispatched when it is applied, never waited for (JAX runs work on a device in dispatch
order and a donation waits for earlier reads), so a memory operation applied before a tick is in place when the
tick reads. Only `collect` waits (for the sampled ids), and a fuse or split waits for its own resharding.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kunjax import checkpoint
from kunjax.config import EngineConfig, ModelConfig
from kunjax.executor import TickResult
from kunjax.executor.step import compile_copy_blocks, compile_tick, input_specs, on_mesh
from kunjax.memory import flatten_params, num_kv_blocks, param_shapes, unflatten_params
from kunjax.model import slot_view
from kunjax.plan import (
    CopyBlocks,
    DropHost,
    Fuse,
    MemoryOp,
    Sampled,
    SlotCopy,
    Split,
    StepInputs,
    SwapIn,
    SwapOut,
    TickWork,
    Transfer,
    UnitShape,
)
from pallas_kernels import resolve_backend
from sharding.layouts import (
    KV_POOL_SPEC,
    STAGE,
    LayoutError,
    instance_meshes,
    kv_pool_sharding,
    param_shardings,
    param_specs,
)
from sharding.reshard import GroupReshard, is_local

log = logging.getLogger("kunjax.executor")
MAX_COPY = 64  # largest block count moved by one compiled copy (powers of two up to it are compiled)


def tree_bytes_per_device(tree) -> int:
    """Bytes one device holds of a sharded tree (the largest per-device share)."""
    per_dev: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_dev[shard.device] = per_dev.get(shard.device, 0) + shard.data.nbytes
    return max(per_dev.values(), default=0)


def copy_sizes(n: int) -> list[int]:
    """`n` as a sum of compiled copy sizes: the binary decomposition, chunks of `MAX_COPY` first."""
    out = [MAX_COPY] * (n // MAX_COPY)
    rest = n % MAX_COPY
    bit = MAX_COPY
    while rest:
        bit //= 2
        if rest >= bit:
            out.append(bit)
            rest -= bit
    return out


class BlockCopier:
    """Compiled gathers and donated scatters of one pool's blocks (one sharding, one shape).

    With `num_groups` G > 1 the units are layer-group slots instead of whole blocks: the rows of the pool's slot
    view `[NB * G, L/G, 2, BS, K, D]` (`kunjax.model.slot_view`), slot `p * G + s` being layers `s*L/G ..` of
    block `p` (layerkv)."""

    def __init__(self, sharding: NamedSharding, num_groups: int = 1):
        self.sharding = sharding
        self._ids_sharding = NamedSharding(sharding.mesh, P())

        def gather(pool, ids):  # [NB, L, ...], [n] -> [n, L/G, 2, BS, K, D]
            return slot_view(pool, num_groups)[ids]

        def scatter(pool, ids, data):  # data [n, L/G, 2, BS, K, D]
            return slot_view(pool, num_groups).at[ids].set(data.astype(pool.dtype)).reshape(pool.shape)

        ids = self._ids_sharding
        self._gather = jax.jit(gather, in_shardings=(sharding, ids), out_shardings=sharding)
        self._scatter = jax.jit(scatter, donate_argnums=(0,), in_shardings=(sharding, ids, sharding),
                                out_shardings=sharding)

    def warmup(self, pool: jax.Array) -> jax.Array:
        """Compile every copy size ahead of serving (unit 0, in the null block, is read and written back)."""
        n = 1
        while n <= MAX_COPY:
            ids = [0] * n
            pool = self.write(pool, ids, self.read(pool, ids))
            n *= 2
        return pool

    def _ids(self, ids: Sequence[int]) -> jax.Array:  # [n] int32, replicated
        return jax.device_put(np.asarray(ids, np.int32), self._ids_sharding)

    def read(self, pool: jax.Array, ids: Sequence[int]) -> list[jax.Array]:
        """Units `ids` as device arrays [n_i, L/G, 2, BS, K, D], one per compiled copy size."""
        out, at = [], 0
        for n in copy_sizes(len(ids)):
            out.append(self._gather(pool, self._ids(ids[at:at + n])))
            at += n
        return out

    def write(self, pool: jax.Array, ids: Sequence[int], parts: Sequence[jax.Array]) -> jax.Array:
        """Scatter `parts` (as returned by `read`, possibly from another pool or the host tier) into units `ids`."""
        at = 0
        for part in parts:
            n = part.shape[0]
            pool = self._scatter(pool, self._ids(ids[at:at + n]), jax.device_put(part, self.sharding))
            at += n
        assert at == len(ids), f"wrote {at} units into {len(ids)} ids"
        return pool


def host_sharding(sharding: NamedSharding) -> NamedSharding:
    """The pool's sharding in host memory (`pinned_host` where the devices have it), else the pool's own."""
    dev = sharding.mesh.devices.flat[0]
    try:
        kinds = {m.kind for m in dev.addressable_memories()}
    except (AttributeError, NotImplementedError):
        kinds = set()
    return sharding.with_memory_kind("pinned_host") if "pinned_host" in kinds else sharding


@dataclasses.dataclass
class Replica:
    """One instance's arrays while it serves alone (its pool stays here while it is a stage of a group: None).
    An instance on another process has none here (`local` False)."""

    mesh: jax.sharding.Mesh
    params: dict | None
    pool: jax.Array | None  # [NB, L, 2, BS, K, D]
    host: dict[Hashable, list[jax.Array]]  # host tier entries: key -> parts [n_i, L/G, 2, BS, K, D] in host memory
    ticks: dict[tuple[int, int], jax.stages.Compiled] = dataclasses.field(default_factory=dict)  # (G, T)
    copiers: dict[int, BlockCopier] = dataclasses.field(default_factory=dict)  # G -> copier
    local: bool = True


@dataclasses.dataclass
class Candidate:
    """Everything a group of `members` needs, compiled ahead of its drop."""

    members: tuple[int, ...]
    shape: UnitShape
    reshard: GroupReshard
    ticks: dict[tuple[bool, int], jax.stages.Compiled] = dataclasses.field(default_factory=dict)  # (remote, T)
    copy: jax.stages.Compiled | None = None
    acts_zeros: jax.stages.Compiled | None = None
    compile_seconds: float = 0.0


@dataclasses.dataclass
class Group:
    """A live pipeline group's arrays."""

    candidate: Candidate
    params: dict | None
    pool: jax.Array | None  # [k · NB·k, L/k, 2, BS, K, D] pipeline format, P('stage')
    ext: jax.Array | None  # [k · NE, L/k, 2, BS, K, D]
    acts: jax.Array | None  # [k · T, E] activations in flight


@dataclasses.dataclass
class Launched:
    uid: int
    outputs: tuple  # device arrays (tokens [S], logprob [S], top_ids [S, N], top_logprobs [S, N])
    started: float


class JaxExecutor:
    """See the module docstring; `kunjax.executor.Executor` is the protocol."""

    def __init__(self, model_path: str | Path, cfg: ModelConfig, ecfg: EngineConfig,
                 devices: Sequence[jax.Device] | None = None, *,
                 agree_min: Callable[[str, int], int] | None = None):
        """`agree_min(name, value)`: with several processes, the smallest `value` any of them offers (every
        process calls it; `kunjax.multihost`), so all size their pools alike."""
        self.cfg, self.ecfg = cfg, ecfg
        self.dtype = jnp.dtype(ecfg.dtype)
        devices = list(devices) if devices is not None else jax.devices()
        meshes = instance_meshes(devices, ecfg.num_instances, ecfg.tp)
        self.owners = [_owner(i, m) for i, m in enumerate(meshes)]  # the process holding each instance
        hosts = len(set(self.owners))
        self.instances_per_host = len(meshes) // hosts if hosts > 1 else None  # spread evenly (instance_meshes)
        local = [i for i, m in enumerate(meshes) if is_local(m)]
        if not local:
            raise LayoutError(f"process {jax.process_index()} holds none of the {len(meshes)} instances "
                              f"(--num-instances x --tp leaves its devices out)")
        t0 = time.perf_counter()
        shapes = param_shapes(cfg)
        first = checkpoint.load_params(model_path, cfg, param_shardings(meshes[local[0]], shapes), ecfg.dtype)
        # Other replicas are device-to-device copies of the first: the checkpoint is read once (per process).
        params: list[dict | None] = [None] * len(meshes)
        for i in local:
            params[i] = first if i == local[0] else jax.device_put(first, param_shardings(meshes[i], shapes))
        self.weight_bytes = tree_bytes_per_device(first)
        # Replicas get equal pools (the smallest any device affords), so any of them can fuse into a group.
        num_blocks = min(num_kv_blocks(cfg, ecfg, self.weight_bytes, _bytes_limit(meshes[i])) for i in local)
        self.num_blocks = agree_min("num_blocks", num_blocks) if agree_min is not None else num_blocks
        self.pool_shape = (self.num_blocks, cfg.num_layers, 2, ecfg.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.replicas = [Replica(m, p, self._zeros(self.pool_shape, kv_pool_sharding(m)), {}) if p is not None
                         else Replica(m, None, None, {}, local=False) for m, p in zip(meshes, params, strict=True)]
        self.num_instances = len(self.replicas)
        self.load_seconds = time.perf_counter() - t0
        self.transfer_measured_s = 0.0  # wall time of the copies `Transfer.measure` asked to time
        self.needs_arrays = True
        self.groups: dict[int, Group] = {}
        self.candidates: dict[tuple[int, ...], Candidate] = {}
        # auto -> a validated kernel (every process tests its own first device)
        self.backend = resolve_backend(ecfg.attention_backend, list(meshes[local[0]].devices.flat)[:1])
        self._transition_hook: Callable[[int], None] | None = None

    def _zeros(self, shape, sharding) -> jax.Array:
        return jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=sharding)()

    def describe(self, instance: int) -> str:
        return ", ".join(str(d) for d in self.replicas[instance].mesh.devices.flat)

    def devices_of(self, instance: int) -> list[jax.Device]:
        return list(self.replicas[instance].mesh.devices.flat)

    def is_local_unit(self, uid: int) -> bool:
        """Whether this process computes unit `uid`'s ticks (holds one of its devices)."""
        return self.replicas[uid].local if uid < self.num_instances else uid in self.groups

    # ---- warm-up ------------------------------------------------------------------------------------
    def warmup(self, units: Sequence[tuple[int, tuple[int, ...], UnitShape]],
               candidates: Sequence[tuple[tuple[int, ...], UnitShape]]) -> None:
        """Compile each replica's tick for every bucket and its copies; every candidate group's functions."""
        for uid, members, shape in units:
            assert members == (uid,) and shape.k == 1, "replica units are their instance"
            if not self.replicas[uid].local:
                continue
            self._compile_replica(uid, shape)
            rep = self.replicas[uid]
            for g in sorted({1, shape.layer_groups}):
                rep.pool = self._copier(uid, g).warmup(rep.pool)
        for members, shape in candidates:
            if any(self.replicas[i].local for i in members):
                self._candidate(members, shape)

    def _copier(self, i: int, groups: int) -> BlockCopier:
        rep = self.replicas[i]
        if groups not in rep.copiers:
            rep.copiers[groups] = BlockCopier(kv_pool_sharding(rep.mesh), groups)
        return rep.copiers[groups]

    def _compile_replica(self, i: int, shape: UnitShape) -> None:
        rep = self.replicas[i]
        for t in shape.buckets:
            key = (shape.layer_groups, t)
            if key not in rep.ticks:
                rep.ticks[key] = compile_tick(
                    self.cfg, shape, rep.mesh, rep.params, (rep.pool,), StepInputs.empty(shape, t), False,
                    num_logprobs=self.ecfg.max_logprobs, backend=self.backend, transport=shape.remote_transport)

    def _candidate(self, members: tuple[int, ...], shape: UnitShape) -> Candidate:
        cand = self.candidates.get(members)
        if cand is not None and cand.shape == shape:
            return cand
        t0 = time.perf_counter()
        k = len(members)
        flat_shapes = flatten_params(param_shapes(self.cfg))
        specs = flatten_params(param_specs(param_shapes(self.cfg), shape.split_vocab))
        leaf_shapes = {p: (tuple(s), self.dtype) for p, s in flat_shapes.items()}
        reshard = GroupReshard([self.replicas[i].mesh for i in members], leaf_shapes, specs, self.pool_shape,
                               self.dtype, shape.num_ext)
        reshard.compile()
        mesh = reshard.mesh
        params = unflatten_params({p: jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, specs[p]))
                                   for p, (s, d) in leaf_shapes.items()})
        tail = self.pool_shape[2:]
        lk = self.cfg.num_layers // k
        pool_sh = NamedSharding(mesh, KV_POOL_SPEC)
        pool = jax.ShapeDtypeStruct((k * shape.num_base, lk, *tail), self.dtype, sharding=pool_sh)
        ext = jax.ShapeDtypeStruct((k * shape.num_ext, lk, *tail), self.dtype, sharding=pool_sh)
        acts_shape = (k * shape.tokens, self.cfg.hidden_size)
        stage = NamedSharding(mesh, P(STAGE))
        acts = jax.ShapeDtypeStruct(acts_shape, self.dtype, sharding=stage)
        cand = Candidate(members, shape, reshard)
        for rows in shape.buckets:
            for remote in (False, True):
                cand.ticks[(remote, rows)] = compile_tick(
                    self.cfg, shape, mesh, params, (pool, ext, acts), StepInputs.empty(shape, rows), remote,
                    num_logprobs=self.ecfg.max_logprobs, backend=self.backend, transport=shape.remote_transport)
        cand.copy = compile_copy_blocks(shape, mesh, pool, ext)
        cand.acts_zeros = jax.jit(lambda: jnp.zeros(acts_shape, self.dtype), out_shardings=stage).lower().compile()
        cand.compile_seconds = time.perf_counter() - t0
        log.info("group %s compiled in %.1fs", list(members), cand.compile_seconds)
        self.candidates[members] = cand
        return cand

    # ---- memory operations --------------------------------------------------------------------------
    def apply(self, ops: Sequence[MemoryOp]) -> None:
        for op in ops:
            if not self._involves_me(op):
                continue
            match op:
                case CopyBlocks():
                    self._copy_blocks(op)
                case Transfer():
                    src, dst = self.replicas[op.src], self.replicas[op.dst]
                    t0 = time.perf_counter()
                    parts = self._copier(op.src, 1).read(src.pool, list(op.src_blocks))
                    dst.pool = self._copier(op.dst, 1).write(dst.pool, list(op.dst_blocks), parts)
                    if op.measure:  # waits for the copy (the next tick on dst would wait for it anyway)
                        dst.pool.block_until_ready()
                        self.transfer_measured_s += time.perf_counter() - t0
                case SwapOut():
                    rep = self.replicas[op.instance]
                    if op.key in rep.host:
                        raise ValueError(f"{op.key!r} already has KV on the host tier of instance {op.instance}")
                    sh = host_sharding(kv_pool_sharding(rep.mesh))
                    # Asynchronous device-to-host copies: nothing waits here.
                    rep.host[op.key] = [jax.device_put(p, sh)
                                        for p in self._copier(op.instance, op.groups).read(rep.pool, list(op.blocks))]
                case SwapIn():
                    rep = self.replicas[op.instance]
                    host = self.replicas[op.instance if op.src is None else op.src].host
                    parts = host[op.key] if op.keep else host.pop(op.key)
                    rep.pool = self._copier(op.instance, op.groups).write(rep.pool, list(op.blocks), parts)
                case DropHost():
                    self.replicas[op.instance].host.pop(op.key, None)
                case SlotCopy():
                    rep = self.replicas[op.instance]
                    copier = self._copier(op.instance, op.groups)
                    rep.pool = copier.write(rep.pool, list(op.dst), copier.read(rep.pool, list(op.src)))
                case Fuse():
                    self._fuse(op)
                case Split():
                    self._split(op)
                case _:
                    raise TypeError(f"unknown memory operation {op!r}")

    def _involves_me(self, op: MemoryOp) -> bool:
        """Whether `op` touches a device of this process (with one process, always). A copy between instances of
        two processes is not supported: the engine keeps transfers and migrations within a host."""
        if isinstance(op, CopyBlocks):
            return op.unit in self.groups
        if isinstance(op, Fuse | Split):
            return any(self.replicas[i].local for i in op.members)
        if isinstance(op, Transfer) or (isinstance(op, SwapIn) and op.src is not None):
            a, b = (op.src, op.dst) if isinstance(op, Transfer) else (op.src, op.instance)
            if self.replicas[a].local != self.replicas[b].local:
                raise RuntimeError(f"instances {a} and {b} are on different processes: KV moves between hosts "
                                   f"only inside a pipeline group")
            return self.replicas[a].local
        return self.replicas[op.instance].local

    def _copy_blocks(self, op: CopyBlocks) -> None:
        """`(src_stage, src_id, dst_stage, dst_id, lo, hi)` copies in calls of at most X per (src, dst) pair."""
        g = self.groups[op.unit]
        shape = g.candidate.shape
        k, x = shape.k, shape.copy_blocks
        pending = list(op.copies)
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
            mesh = g.candidate.reshard.mesh
            send, recv, lo, hi = (on_mesh(mesh, a, P(STAGE)) for a in (send, recv, lo, hi))
            g.pool, g.ext = g.candidate.copy(g.pool, g.ext, send, recv, lo, hi)
            pending = rest

    def set_transition_hook(self, hook: Callable[[int], None] | None) -> None:
        """Call `hook(n)` after the n-th weight leaf of every fuse and split (fault injection: `kunjax.faults`);
        if it raises, the transition rolls back and the error propagates."""
        self._transition_hook = hook

    def _fuse(self, op: Fuse) -> None:
        """Drop the members' replicated weights into the group. A failure half-way through the weights rolls back:
        the replicas get every leaf back (their pools are not touched until the weights are done)."""
        cand = self._candidate(op.members, op.shape)
        reps = [self.replicas[i] for i in op.members]
        if any(r.local and r.params is None for r in reps):
            raise RuntimeError(f"instances {op.members} are already in a group")
        flat = [flatten_params(r.params) if r.local else None for r in reps]  # another process's: None
        for r in reps:
            r.params = None
        try:
            params = unflatten_params(cand.reshard.drop_weights(flat, self._transition_hook))
        except BaseException:
            for r, f in zip(reps, flat, strict=True):  # `drop_weights` put every leaf back
                r.params = unflatten_params(f) if f is not None else None
            raise
        pools = [r.pool for r in reps]
        for r in reps:
            r.pool = None
        pool = cand.reshard.pools_to_pipeline(pools)
        ext = cand.reshard.new_extension()
        acts = cand.acts_zeros()
        self.groups[op.unit] = Group(cand, params, pool, ext, acts)
        jax.block_until_ready((pool, ext, params))

    def _split(self, op: Split) -> None:
        """Gather the weights back to the members. A failure half-way through the weights rolls back to the group
        (weights and pool as they were; the extension, released first to keep the peak low, comes back zeroed:
        the engine recomputes what it held)."""
        g = self.groups.pop(op.unit)
        cand = g.candidate
        g.ext, g.acts = None, None  # the extension is empty now: release it before the weights come back
        pools = cand.reshard.pool_to_members(g.pool)
        g.pool = None
        flat = flatten_params(g.params)
        g.params = None  # `flat` is the only reference: each stage-sharded leaf goes as soon as it is gathered
        try:
            per_member = cand.reshard.gather_weights(flat, self._transition_hook)
        except BaseException:
            g.params = unflatten_params(flat)  # `gather_weights` put every leaf back
            g.pool = cand.reshard.pools_to_pipeline(pools)
            g.ext, g.acts = cand.reshard.new_extension(), cand.acts_zeros()
            self.groups[op.unit] = g
            raise
        mine = [i for i in op.members if self.replicas[i].local]
        for h, i in enumerate(op.members):
            if self.replicas[i].local:
                self.replicas[i].params = unflatten_params(per_member[h])
                self.replicas[i].pool = pools[h]
        del pools, per_member
        jax.block_until_ready([self.replicas[i].pool for i in mine])

    def recover(self, uid: int) -> None:
        """The engine dropped all KV of unit `uid` after a failure: remake (zeroed) any of its arrays the failure
        left unusable (a donated input of a failed call is deleted; its output holds the error)."""
        g = self.groups.get(uid)
        if g is None:
            rep = self.replicas[uid] if uid < self.num_instances else None
            if rep is None or not rep.local:  # a unit of other processes
                return
            if not _usable(rep.pool):
                rep.pool = self._zeros(self.pool_shape, kv_pool_sharding(rep.mesh))
            return
        r = g.candidate.reshard
        if not _usable(g.pool):
            shape = (r.k * g.candidate.shape.num_base, r.pool_shape[1] // r.k, *r.pool_shape[2:])
            g.pool = self._zeros(shape, r.pool_sharding)
        if not _usable(g.ext):
            g.ext = r.new_extension()
        if not _usable(g.acts):
            g.acts = g.candidate.acts_zeros()

    # ---- ticks --------------------------------------------------------------------------------------
    def launch(self, uid: int, work: TickWork, inputs: StepInputs | None) -> Launched:
        started = time.perf_counter()  # before the dispatch: a small CPU step may run inside the call
        if not self.is_local_unit(uid):
            raise RuntimeError(f"unit {uid} runs on another process (`is_local_unit`)")
        t = inputs.tokens_in.shape[0]
        g = self.groups.get(uid)
        if g is None:
            rep = self.replicas[uid]
            groups = inputs.block_tables.shape[1] if inputs.block_tables.ndim == 4 else 1
            compiled = rep.ticks.get((groups, t))
            if compiled is None:
                raise RuntimeError(f"instance {uid}: no step compiled for {t} tokens (G={groups})")
            rep.pool, outputs = compiled(rep.params, rep.pool, inputs)
        else:
            compiled = g.candidate.ticks[(work.remote, t)]
            inputs = on_mesh(g.candidate.reshard.mesh, inputs, input_specs(inputs))  # global, across processes
            g.pool, g.ext, g.acts, outputs = compiled(g.params, g.pool, g.ext, g.acts, inputs)
        return Launched(uid, outputs, started)

    def collect(self, launched: Launched, leaving: bool) -> TickResult:
        if not leaving:
            return TickResult(None, time.perf_counter() - launched.started)
        tokens, logprob, top_ids, top_lps = (np.asarray(x) for x in launched.outputs)
        return TickResult(Sampled(tokens, logprob, top_ids, top_lps), time.perf_counter() - launched.started)

    def end_step(self) -> None:
        pass

    # ---- introspection (tests, benchmarks) ----------------------------------------------------------
    def state(self) -> dict:
        """What this process holds, to check against the leader's books: each of its instances' mode and host-tier
        keys, its groups' members, and the live bytes on each of its devices (by device id)."""
        from sharding.reshard import live_bytes_per_device

        return {"process": jax.process_index(),
                "instances": {i: {"mode": "replica" if r.params is not None else "group",
                                  "host": sorted(repr(k) for k in r.host)}
                              for i, r in enumerate(self.replicas) if r.local},
                "groups": {uid: list(g.candidate.members) for uid, g in self.groups.items()},
                "live_bytes": {d.id: b for d, b in live_bytes_per_device().items()}}

    def unit_params(self, uid: int) -> dict:
        g = self.groups.get(uid)
        return g.params if g is not None else self.replicas[uid].params

    def group_arrays(self, uid: int) -> Group:
        return self.groups[uid]

    def freed_bytes(self, members: tuple[int, ...]) -> int:
        return self.candidates[members].reshard.freed_bytes_per_device()


def _usable(arr: jax.Array | None) -> bool:
    if arr is None or arr.is_deleted():
        return False
    try:
        arr.block_until_ready()
    except Exception:
        return False
    return True


def _owner(i: int, mesh) -> int:
    """The process holding instance `i`'s devices; tensor parallelism does not cross processes."""
    procs = {d.process_index for d in mesh.devices.flat}
    if len(procs) != 1:
        raise LayoutError(f"instance {i}'s tp devices are on processes {sorted(procs)}: an instance must be on one "
                          f"host (use --tp of at most the devices per process)")
    return procs.pop()


def _bytes_limit(mesh) -> int | None:
    stats = mesh.devices.flat[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None
