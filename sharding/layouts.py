"""Meshes and `PartitionSpec`s of the serving layouts.

* Replica layout: an instance is one model replica on a sub-mesh with axis `('tp',)`; weights follow
  `param_specs` (Megatron-style tensor parallelism: column-parallel q/k/v/gate/up, row-parallel o/down,
  KV heads split over `tp`). With tp = 1 every spec degenerates to a full replica on one device.
* The KV pool `[NB, L, 2, BS, K, D]` is split over its K axis, so each tp shard holds its heads' KV.

Pipeline-group layouts (`('stage', 'tp')`, the layer axis over `stage`) build on these specs by putting
`'stage'` on the leading L axis of every `layers` leaf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

TP = "tp"


class LayoutError(ValueError):
    """A device layout that cannot be built as asked; the message names the option to change."""

_LAYER_SPECS = {
    "attn_norm": P(None, None),
    "mlp_norm": P(None, None),
    "wq": P(None, None, TP),
    "wk": P(None, None, TP),
    "wv": P(None, None, TP),
    "bq": P(None, TP),
    "bk": P(None, TP),
    "bv": P(None, TP),
    "wo": P(None, TP, None),
    "bo": P(None, None),
    "w_gate": P(None, None, TP),
    "w_up": P(None, None, TP),
    "w_down": P(None, TP, None),
}


def make_mesh(devices: Sequence[jax.Device], axis_names: tuple[str, ...], shape: tuple[int, ...]) -> Mesh:
    """A mesh with Auto axis types (jax >= 0.10 defaults `make_mesh` to Explicit, which shard_map rejects)."""
    arr = np.asarray(devices, dtype=object).reshape(shape)
    try:
        from jax.sharding import AxisType

        return Mesh(arr, axis_names, axis_types=(AxisType.Auto,) * len(axis_names))
    except (ImportError, TypeError):  # older jax: Auto is the only behaviour
        return Mesh(arr, axis_names)


def instance_meshes(devices: Sequence[jax.Device], num_instances: int | None, tp: int) -> list[Mesh]:
    """Split `devices` into `num_instances` sub-meshes of `tp` devices each (axis `('tp',)`)."""
    devices = list(devices)
    if num_instances is None:
        num_instances = len(devices) // tp
    if num_instances < 1 or num_instances * tp > len(devices):
        raise LayoutError(f"--num-instances {num_instances} x --tp {tp} needs {num_instances * tp} devices, "
                          f"but {len(devices)} are available")
    return [make_mesh(devices[i * tp:(i + 1) * tp], (TP,), (tp,)) for i in range(num_instances)]


def check_tp(tp: int, *, num_kv_heads: int, num_heads: int, intermediate_size: int) -> None:
    """Tensor parallelism splits KV heads, query heads and the MLP width evenly over `tp` devices."""
    for name, n in (("num_key_value_heads", num_kv_heads), ("num_attention_heads", num_heads),
                    ("intermediate_size", intermediate_size)):
        if n % tp:
            raise LayoutError(f"--tp {tp} must divide the model's {name} ({n})")


def param_specs(params_or_shapes: dict[str, Any]) -> dict[str, Any]:
    """PartitionSpec tree matching a param tree (or `model.param_shapes`) for the replica/tp layout."""
    out: dict[str, Any] = {}
    for name, leaf in params_or_shapes.items():
        if name == "layers":
            out[name] = {k: _LAYER_SPECS[k] for k in leaf}
        else:
            out[name] = P()  # embed, final_norm, lm_head: replicated within the instance
    return out


def param_shardings(mesh: Mesh, params_or_shapes: dict[str, Any]) -> dict[str, Any]:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params_or_shapes),
                        is_leaf=lambda x: isinstance(x, P))


def kv_pool_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(None, None, None, None, TP, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
