"""Meshes and `PartitionSpec`s of the serving layouts (DESIGN.md §4).

Every serving unit runs on a mesh with axes `('stage', 'tp')`:

* a **replica** (an instance serving alone) is the unit with one stage: mesh `(1, tp)` over its `tp` devices;
* a **pipeline group** fused from k replicas is the unit with k stages: mesh `(k, tp)`, row s being member s's
  devices.

One set of specs serves both (`param_specs`): the stacked layer axis `[L, ...]` of every `layers` leaf is split
over `stage` (a no-op with one stage; L/k layers per stage in a group), the Megatron-style tensor-parallel axes
over `tp` (column-parallel q/k/v/gate/up, row-parallel o/down, KV heads over `tp`); with `split_vocab` the
embedding's and the LM head's vocabulary axis is split over `stage` too, so every stage of a group drops
(k-1)/k of every large weight. The KV pool `[NB, L, 2, BS, K, D]` is split over its block axis by `stage` (each
device holds its own pool) and over K by `tp`.

Dropping parameters is resharding between these specs: `sharding.reshard` moves a tree between the replicas'
layout and a group's. Takes shapes and ints only, never a kunjax config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

STAGE = "stage"
TP = "tp"
AXES = (STAGE, TP)


class LayoutError(ValueError):
    """A device layout that cannot be built as asked; the message names the option to change."""


# Per-layer weights: the leading L axis goes over `stage`, the rest as Megatron tensor parallelism.
_LAYER_SPECS = {
    "attn_norm": P(STAGE, None),
    "mlp_norm": P(STAGE, None),
    "wq": P(STAGE, None, TP),
    "wk": P(STAGE, None, TP),
    "wv": P(STAGE, None, TP),
    "bq": P(STAGE, TP),
    "bk": P(STAGE, TP),
    "bv": P(STAGE, TP),
    "wo": P(STAGE, TP, None),
    "bo": P(STAGE, None),
    "w_gate": P(STAGE, None, TP),
    "w_up": P(STAGE, None, TP),
    "w_down": P(STAGE, TP, None),
}
# Leaves whose per-device product is a partial sum over `tp` (a row-parallel matmul): the step adds them up.
ROW_PARALLEL = ("wo", "w_down")


def make_mesh(devices: Sequence[jax.Device], axis_names: tuple[str, ...], shape: tuple[int, ...]) -> Mesh:
    """A mesh with Auto axis types (jax >= 0.10 defaults `make_mesh` to Explicit, which shard_map rejects)."""
    arr = np.asarray(devices, dtype=object).reshape(shape)
    try:
        from jax.sharding import AxisType

        return Mesh(arr, axis_names, axis_types=(AxisType.Auto,) * len(axis_names))
    except (ImportError, TypeError):  # older jax: Auto is the only behaviour
        return Mesh(arr, axis_names)


def unit_mesh(devices: Sequence[jax.Device], stages: int, tp: int) -> Mesh:
    """The `('stage', 'tp')` mesh of a unit: `stages * tp` devices, stage-major (row s = stage s's devices)."""
    if len(devices) != stages * tp:
        raise LayoutError(f"a unit of {stages} stage(s) x tp {tp} needs {stages * tp} devices, got {len(devices)}")
    return make_mesh(list(devices), AXES, (stages, tp))


def instance_meshes(devices: Sequence[jax.Device], num_instances: int | None, tp: int) -> list[Mesh]:
    """Split `devices` into `num_instances` one-stage meshes of `tp` devices each, the first devices first.

    With devices of several processes (`jax.distributed`, one per host), the instances are spread evenly over
    the processes, each taking its own first devices, in process order: an instance never spans two hosts, every
    host serves, and aligned groups of up to the instances per host fuse within one host."""
    devices = list(devices)
    if num_instances is None:
        num_instances = len(devices) // tp
    if num_instances < 1 or num_instances * tp > len(devices):
        raise LayoutError(f"--num-instances {num_instances} x --tp {tp} needs {num_instances * tp} devices, "
                          f"but {len(devices)} are available")
    by_process: dict[int, list[jax.Device]] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    if len(by_process) > 1:
        n = len(by_process)
        per = num_instances // n
        if per * n != num_instances or any(per * tp > len(ds) for ds in by_process.values()):
            raise LayoutError(f"--num-instances {num_instances} x --tp {tp} cannot be spread evenly over {n} "
                              f"processes of {sorted(len(ds) for ds in by_process.values())} devices")
        devices = [d for p in sorted(by_process) for d in by_process[p][:per * tp]]
    return [unit_mesh(devices[i * tp:(i + 1) * tp], 1, tp) for i in range(num_instances)]


def group_mesh(member_meshes: Sequence[Mesh]) -> Mesh:
    """The mesh of a group fused from members' one-stage meshes (in stage order)."""
    tp = member_meshes[0].devices.size
    return unit_mesh([d for m in member_meshes for d in m.devices.flat], len(member_meshes), tp)


def check_tp(tp: int, *, num_kv_heads: int, num_heads: int, intermediate_size: int) -> None:
    """Tensor parallelism splits KV heads, query heads and the MLP width evenly over `tp` devices."""
    for name, n in (("num_key_value_heads", num_kv_heads), ("num_attention_heads", num_heads),
                    ("intermediate_size", intermediate_size)):
        if n % tp:
            raise LayoutError(f"--tp {tp} must divide the model's {name} ({n})")


def param_specs(params_or_shapes: dict[str, Any], split_vocab: bool = False) -> dict[str, Any]:
    """PartitionSpec tree for a param tree (or `model.param_shapes`) on a `('stage', 'tp')` mesh."""
    out: dict[str, Any] = {}
    for name, leaf in params_or_shapes.items():
        if name == "layers":
            out[name] = {k: _LAYER_SPECS[k] for k in leaf}
        elif name == "embed":  # [V, E]
            out[name] = P(STAGE, None) if split_vocab else P()
        elif name == "lm_head":  # [E, V]
            out[name] = P(None, STAGE) if split_vocab else P()
        else:  # final_norm: replicated
            out[name] = P()
    return out


def replica_spec(spec: P) -> P:
    """The same leaf on a group mesh before the drop: every stage holds a full copy (no `stage`), tp as before."""
    return P(*(None if a == STAGE else a for a in spec))


def param_shardings(mesh: Mesh, params_or_shapes: dict[str, Any], split_vocab: bool = False) -> dict[str, Any]:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params_or_shapes, split_vocab),
                        is_leaf=lambda x: isinstance(x, P))


KV_POOL_SPEC = P(STAGE, None, None, None, TP, None)  # [NB, L, 2, BS, K, D]: blocks by device, K over tp


def kv_pool_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, KV_POOL_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def per_stage(mesh: Mesh) -> NamedSharding:
    """Host metadata with a leading `[k]` stage axis: row s goes to stage s's devices (replicated over tp)."""
    return NamedSharding(mesh, P(STAGE))
