"""Dropping parameters is resharding (DESIGN.md §4-6, §12): the device-memory transitions between k replicas and
the pipeline group they fuse into, on `('stage', 'tp')` meshes (`sharding.layouts`).

* **Drop weights** — the k replicas of each leaf are wrapped, without a copy, as one array on the group mesh that
  is replicated over `stage` (`make_array_from_single_device_arrays` over every member's tp shards), then a
  compiled identity whose output sharding is the leaf's group spec keeps each device's slice (a local slice, no
  collectives). Leaf by leaf, each replica leaf released at once, so the transient peak is one leaf's slice.
  `jax.device_put` is not used: it stages through the host.
* **Restore weights** — a compiled identity to the replicated-over-`stage` spec is the all-gather; each member's
  shards are then re-wrapped, without a copy, as the member's own arrays. Bit-identical to before the drop.
* **Pool formats** — the full-layer pool `[NB, L, ...]` and the pipeline pool `[NB·k, L/k, ...]` are the same
  bytes: a reshape inside a compiled `shard_map` with the pool donated, so the buffer is reused, not copied
  (`old[b, s·L/k + j] == new[b·k + s, j]`).
* **Extension** — the bytes the drop frees, allocated as `[NE, L/k, ...]` pipeline blocks per device after the
  weights are released.

Every function is compiled ahead of time per group (`GroupReshard.compile`), so a transition compiles nothing.
Takes meshes, shapes and ints; knows nothing of models or engines.

With several processes (`jax.distributed`, one per host) a group may span them: each process wraps only its own
shards, every process holding a member runs the same compiled functions (the collectives cross hosts), and a
member whose devices are all on another process is `None` here (its replica dict, its pool, its restored leaves).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.layouts import KV_POOL_SPEC, group_mesh, replica_spec


def live_bytes_per_device() -> dict[jax.Device, int]:
    """Bytes of every live array shard per device, each buffer counted once (what the device really holds)."""
    seen: set[tuple[jax.Device, int]] = set()
    out: dict[jax.Device, int] = {}
    for arr in jax.live_arrays():
        if arr.is_deleted():
            continue
        for shard in arr.addressable_shards:
            key = (shard.device, shard.data.unsafe_buffer_pointer())
            if key in seen:
                continue
            seen.add(key)
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def leaf_bytes_per_device(shape: Sequence[int], dtype, spec: P, mesh_shape: dict[str, int]) -> int:
    """Bytes one device holds of a leaf of `shape` laid out by `spec` on a mesh of `mesh_shape` axis sizes."""
    n = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    for axis in spec:
        for name in (axis if isinstance(axis, tuple) else (axis,)):
            if name is not None:
                n //= mesh_shape[name]
    return n


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _identity(x):
    return x


def _to_pipeline(k: int, pool):  # local [NB, L, ...] -> [NB·k, L/k, ...]
    return pool.reshape(pool.shape[0] * k, pool.shape[1] // k, *pool.shape[2:])


def _to_full(k: int, pool):  # local [NB·k, L/k, ...] -> [NB, L, ...]
    return pool.reshape(pool.shape[0] // k, pool.shape[1] * k, *pool.shape[2:])


def is_local(mesh: Mesh) -> bool:
    """Whether this process holds any of `mesh`'s devices (always, with one process)."""
    me = jax.process_index()
    return any(d.process_index == me for d in mesh.devices.flat)


def _shards_on(arr: jax.Array | None, devices: Sequence[jax.Device]) -> list[jax.Array]:
    """`arr`'s shards on this process's devices among `devices` (in that order). With several processes
    (`jax.distributed`), an array over a mesh spanning them is assembled from each process's own shards; a member
    whose devices are all elsewhere has no array here (None)."""
    me = jax.process_index()
    mine = [d for d in devices if d.process_index == me]
    if not mine:
        return []
    by_dev = {s.device: s.data for s in arr.addressable_shards}
    return [by_dev[d] for d in mine]


def _on_members(full: jax.Array, shape, spec: P, meshes: Sequence[Mesh]) -> list[jax.Array | None]:
    """A group-wide array -> one array per member mesh made of its shards there (None for a member of another
    process)."""
    return [jax.make_array_from_single_device_arrays(shape, NamedSharding(m, spec),
                                                     _shards_on(full, list(m.devices.flat)))
            if is_local(m) else None for m in meshes]


class GroupReshard:
    """The compiled transitions of one group: weights and pools between the members' layout and the group's.

    `member_meshes` are the members' one-stage `('stage', 'tp')` meshes in stage order; `leaf_shapes` maps each
    flattened param path to `(shape, dtype)`; `specs` to its spec on the group mesh (`layouts.param_specs` with
    the group's vocabulary split); `pool_shape` is one member's full-layer pool `[NB, L, 2, BS, K, D]`.
    """

    def __init__(self, member_meshes: Sequence[Mesh], leaf_shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                 specs: dict[str, P], pool_shape: Sequence[int], pool_dtype, num_ext: int):
        self.member_meshes = list(member_meshes)
        self.mesh = group_mesh(self.member_meshes)
        self.k, self.tp = self.mesh.devices.shape
        self.leaf_shapes = leaf_shapes
        self.specs = specs
        self.pool_shape = tuple(pool_shape)
        self.pool_dtype = jnp.dtype(pool_dtype)
        self.num_ext = num_ext
        self.pool_sharding = NamedSharding(self.mesh, KV_POOL_SPEC)
        self._drop: dict[str, jax.stages.Compiled] = {}
        self._gather: dict[str, jax.stages.Compiled] = {}
        self.compiled = False

    def freed_bytes_per_device(self) -> int:
        """Weight bytes a device holds as a replica minus what it keeps in the group (from the shapes)."""
        sizes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape, strict=True))
        before = sum(leaf_bytes_per_device(s, d, replica_spec(self.specs[p]), sizes)
                     for p, (s, d) in self.leaf_shapes.items())
        after = sum(leaf_bytes_per_device(s, d, self.specs[p], sizes) for p, (s, d) in self.leaf_shapes.items())
        return before - after

    # ---- compilation --------------------------------------------------------------------------------
    def compile(self) -> None:
        by_kind: dict[tuple, tuple[jax.stages.Compiled, jax.stages.Compiled]] = {}
        for path, (shape, dtype) in self.leaf_shapes.items():
            spec = self.specs[path]
            key = (shape, str(dtype), spec)
            if key not in by_kind:
                sharded = NamedSharding(self.mesh, spec)
                rep = NamedSharding(self.mesh, replica_spec(spec))
                drop = jax.jit(_identity, out_shardings=sharded).lower(_abstract(shape, dtype, rep)).compile()
                gather = jax.jit(_identity, out_shardings=rep).lower(_abstract(shape, dtype, sharded)).compile()
                by_kind[key] = (drop, gather)
            self._drop[path], self._gather[path] = by_kind[key]
        nb, n_layers = self.pool_shape[:2]
        k = self.k
        full = _abstract((k * nb, n_layers, *self.pool_shape[2:]), self.pool_dtype, self.pool_sharding)
        pipe = _abstract((k * nb * k, n_layers // k, *self.pool_shape[2:]), self.pool_dtype, self.pool_sharding)

        def local(fn):
            return jax.jit(jax.shard_map(functools.partial(fn, k), mesh=self.mesh, in_specs=KV_POOL_SPEC,
                                         out_specs=KV_POOL_SPEC), donate_argnums=0)

        self._pool_to_pipe = local(_to_pipeline).lower(full).compile()
        self._pool_to_full = local(_to_full).lower(pipe).compile()
        ext_shape = (k * self.num_ext, n_layers // k, *self.pool_shape[2:])
        self._ext_zeros = jax.jit(lambda: jnp.zeros(ext_shape, self.pool_dtype),
                                  out_shardings=self.pool_sharding).lower().compile()
        self.compiled = True

    # ---- weights ------------------------------------------------------------------------------------
    def _leaf_to_group(self, path: str, parts: list[jax.Array]) -> jax.Array:
        """One leaf's member copies (stage order) -> the leaf sharded over the group."""
        shards = [s for part, m in zip(parts, self.member_meshes, strict=True)
                  for s in _shards_on(part, list(m.devices.flat))]
        full = jax.make_array_from_single_device_arrays(
            self.leaf_shapes[path][0], NamedSharding(self.mesh, replica_spec(self.specs[path])), shards)
        del shards
        return self._drop[path](full)

    def _leaf_to_members(self, path: str, sharded: jax.Array) -> list[jax.Array]:
        """One group-sharded leaf -> a full copy on each member's mesh (stage order)."""
        full = self._gather[path](sharded)
        return _on_members(full, self.leaf_shapes[path][0], replica_spec(self.specs[path]), self.member_meshes)

    def drop_weights(self, replicas: Sequence[dict[str, jax.Array] | None],
                     between: Callable[[int], None] | None = None) -> dict[str, jax.Array]:
        """Replicas (one flat {path: array} per member, stage order; None for a member of another process) ->
        group-sharded leaves.

        Each replica dict is emptied leaf by leaf as it is resharded, so the full copies are released at once.
        `between(n)` runs after the n-th leaf; if it (or a reshard) raises, the leaves done so far are gathered
        back into the replica dicts, so they hold every leaf again, and the error propagates (a half-way drop
        rolls back).
        """
        out: dict[str, jax.Array] = {}
        try:
            for path in self.leaf_shapes:
                out[path] = self._leaf_to_group(path, [None if r is None else r[path] for r in replicas])
                for r in replicas:  # the full copies go now (a failed reshard above keeps them)
                    if r is not None:
                        del r[path]
                if between is not None:
                    between(len(out))
        except BaseException:
            for path in list(out):
                for r, arr in zip(replicas, self._leaf_to_members(path, out.pop(path)), strict=True):
                    if r is not None:
                        r[path] = arr
            raise
        return out

    def gather_weights(self, sharded: dict[str, jax.Array],
                       between: Callable[[int], None] | None = None) -> list[dict[str, jax.Array]]:
        """Group-sharded leaves -> one flat {path: array on the member's mesh} per member (stage order).

        `sharded` is emptied leaf by leaf, so only one leaf is ever held in both layouts. `between(n)` runs after
        the n-th leaf; if it (or a gather) raises, the leaves gathered so far are resharded back into `sharded`
        and the error propagates (a half-way restore rolls back).
        """
        per_member: list[dict[str, jax.Array]] = [{} for _ in range(self.k)]
        done: list[str] = []
        try:
            for path in list(self.leaf_shapes):
                for h, arr in enumerate(self._leaf_to_members(path, sharded[path])):
                    per_member[h][path] = arr
                del sharded[path]  # the stage-sharded leaf goes now (a failed gather above keeps it)
                done.append(path)
                if between is not None:
                    between(len(done))
        except BaseException:
            for path in done:
                sharded[path] = self._leaf_to_group(path, [m.pop(path) for m in per_member])
            raise
        return per_member

    # ---- pools --------------------------------------------------------------------------------------
    def pools_to_pipeline(self, pools: list[jax.Array]) -> jax.Array:
        """Member pools `[NB, L, ...]` (stage order; the list is emptied) -> one `[k·NB·k, L/k, ...]` array."""
        nb = self.pool_shape[0]
        shards = [s for p, m in zip(pools, self.member_meshes, strict=True)
                  for s in _shards_on(p, list(m.devices.flat))]
        pools.clear()
        full = jax.make_array_from_single_device_arrays((self.k * nb, *self.pool_shape[1:]), self.pool_sharding,
                                                        shards)
        del shards
        return self._pool_to_pipe(full)

    def pool_to_members(self, pipe: jax.Array) -> list[jax.Array]:
        """The group's pipeline pool (donated) -> each member's full-layer pool on the member's mesh."""
        return _on_members(self._pool_to_full(pipe), self.pool_shape, KV_POOL_SPEC, self.member_meshes)

    def new_extension(self) -> jax.Array:
        return self._ext_zeros()
