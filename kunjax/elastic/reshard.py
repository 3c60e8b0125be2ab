"""Drop and restore as resharding: the device-memory transitions of a pipeline group (DESIGN.md §4-6, §12).

* **Drop weights** — the k instances' replicas of each leaf are wrapped, without a copy, as one replicated array
  on the group mesh (`make_array_from_single_device_arrays`), then a compiled identity whose output sharding is
  the leaf's stage spec keeps each device's slice (a local slice, no collectives). Leaf by leaf, and each
  replica leaf is released at once, so the transient peak is one leaf's slice. `jax.device_put` is not used: it
  stages through the host.
* **Restore weights** — a compiled identity to the replicated spec is the all-gather over `stage`; each device's
  shard is then re-wrapped, without a copy, as the instance's own array. Bit-identical to before the drop.
* **Pool formats** — the full-layer pool `[NB, L, ...]` and the pipeline pool `[NB·k, L/k, ...]` are the same
  bytes: a reshape inside a compiled `shard_map` with the pool donated, so the buffer is reused, not copied
  (`old[b, s·L/k + j] == new[b·k + s, j]`).
* **Extension** — the bytes the drop frees, allocated as `[NE, L/k, ...]` pipeline blocks after the weights are
  released.

Every function here is compiled ahead of time per group (`GroupReshard.compile`), so a drop or a restore at
run time compiles nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kunjax.elastic.pipeline import STAGE


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


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _identity(x):
    return x


def _to_pipeline(k: int, pool):  # local [NB, L, ...] -> [NB·k, L/k, ...]
    return pool.reshape(pool.shape[0] * k, pool.shape[1] // k, *pool.shape[2:])


def _to_full(k: int, pool):  # local [NB·k, L/k, ...] -> [NB, L, ...]
    return pool.reshape(pool.shape[0] // k, pool.shape[1] * k, *pool.shape[2:])


class GroupReshard:
    """The compiled transitions of one group: weights and pools between instance and pipeline layouts."""

    def __init__(self, mesh: Mesh, leaf_shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                 stage_specs: dict[str, P], pool_shape: Sequence[int], pool_dtype, num_ext: int):
        self.mesh = mesh
        self.k = mesh.devices.size
        self.leaf_shapes = leaf_shapes  # flattened leaf path -> (shape, dtype)
        self.stage_specs = stage_specs  # flattened leaf path -> PartitionSpec on the group mesh
        self.pool_shape = tuple(pool_shape)  # one instance's full-layer pool [NB, L, 2, BS, K, D]
        self.pool_dtype = jnp.dtype(pool_dtype)
        self.num_ext = num_ext
        self.rep = NamedSharding(mesh, P())
        self.stage = NamedSharding(mesh, P(STAGE))
        self._drop: dict[str, jax.stages.Compiled] = {}
        self._gather: dict[str, jax.stages.Compiled] = {}

    # ---- compilation --------------------------------------------------------------------------------
    def compile(self) -> None:
        by_kind: dict[tuple, tuple[jax.stages.Compiled, jax.stages.Compiled]] = {}
        for path, (shape, dtype) in self.leaf_shapes.items():
            spec = self.stage_specs[path]
            key = (shape, str(dtype), spec)
            if key not in by_kind:
                sharded = NamedSharding(self.mesh, spec)
                drop = jax.jit(_identity, out_shardings=sharded).lower(_abstract(shape, dtype, self.rep)).compile()
                gather = jax.jit(_identity, out_shardings=self.rep).lower(_abstract(shape, dtype, sharded)).compile()
                by_kind[key] = (drop, gather)
            self._drop[path], self._gather[path] = by_kind[key]
        nb, n_layers = self.pool_shape[:2]
        k = self.k
        full = _abstract((k * nb, n_layers, *self.pool_shape[2:]), self.pool_dtype, self.stage)
        pipe = _abstract((k * nb * k, n_layers // k, *self.pool_shape[2:]), self.pool_dtype, self.stage)

        def local(fn):
            return jax.jit(jax.shard_map(functools.partial(fn, k), mesh=self.mesh, in_specs=P(STAGE),
                                         out_specs=P(STAGE)), donate_argnums=0)

        self._pool_to_pipe = local(_to_pipeline).lower(full).compile()
        self._pool_to_full = local(_to_full).lower(pipe).compile()
        ext_shape = (k * self.num_ext, n_layers // k, *self.pool_shape[2:])
        self._ext_zeros = jax.jit(lambda: jnp.zeros(ext_shape, self.pool_dtype),
                                  out_shardings=self.stage).lower().compile()

    # ---- weights ------------------------------------------------------------------------------------
    def drop_weights(self, replicas: Sequence[dict[str, jax.Array]]) -> dict[str, jax.Array]:
        """Replicas (one flat {path: array} per member, members in stage order) -> stage-sharded leaves.

        Each replica dict is emptied leaf by leaf as it is resharded, so the full copies are released at once.
        """
        out: dict[str, jax.Array] = {}
        for path in self.leaf_shapes:
            shape, _ = self.leaf_shapes[path]
            shards = [r.pop(path) for r in replicas]
            full = jax.make_array_from_single_device_arrays(shape, self.rep, [s.addressable_shards[0].data
                                                                              for s in shards])
            del shards
            out[path] = self._drop[path](full)
            del full
        return out

    def gather_weights(self, sharded: dict[str, jax.Array]) -> list[dict[str, jax.Array]]:
        """Stage-sharded leaves -> one flat {path: single-device array} per member (stage order).

        `sharded` is emptied leaf by leaf, so only one leaf is ever held in both layouts.
        """
        per_member: list[dict[str, jax.Array]] = [{} for _ in range(self.k)]
        order = {d: i for i, d in enumerate(self.mesh.devices.flat)}
        for path in list(self.leaf_shapes):
            full = self._gather[path](sharded.pop(path))
            for shard in full.addressable_shards:
                per_member[order[shard.device]][path] = shard.data
            del full
        return per_member

    # ---- pools --------------------------------------------------------------------------------------
    def pools_to_pipeline(self, pools: list[jax.Array]) -> jax.Array:
        """Member pools `[NB, L, ...]` (stage order; the list is emptied) -> one `[k·NB·k, L/k, ...]` array."""
        nb = self.pool_shape[0]
        shards = [p.addressable_shards[0].data for p in pools]
        pools.clear()
        full = jax.make_array_from_single_device_arrays((self.k * nb, *self.pool_shape[1:]), self.stage, shards)
        del shards
        return self._pool_to_pipe(full)

    def pool_to_members(self, pipe: jax.Array) -> list[jax.Array]:
        """The group's pipeline pool (donated) -> each member's full-layer pool, as single-device arrays."""
        full = self._pool_to_full(pipe)
        order = {d: i for i, d in enumerate(self.mesh.devices.flat)}
        out: list[jax.Array | None] = [None] * self.k
        for shard in full.addressable_shards:
            out[order[shard.device]] = shard.data
        return out  # type: ignore[return-value]

    def new_extension(self) -> jax.Array:
        return self._ext_zeros()
