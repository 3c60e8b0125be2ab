"""Remote attention: query rows travel to the device that holds their KV history, attention runs there over its
local pool, and `(out, lse)` travel back (DESIGN.md §6 step 5, §8).

What it owns: the device-side exchange around the local paged-attention kernel, called inside `shard_map` over
one named mesh axis (the group's `stage`), and the host-side packing of a step's remote rows into the fixed-size
slots that exchange needs (`plan_remote_rows`). It never writes any pool and never decides which rows are remote:
the caller merges the returned partial result with its local part by `merge_attention_states`.

Slots. Every device holds `R` slots per destination: `send_rows [k(dest), R]` names the local query row in each
slot (-1: empty). The home's side of the same slot, `recv_* [k(src), R, ...]`, says where that row's history lies
in the home's pool (block table, length, absolute position). The host plans both ends ahead of the step, so only
the query rows and the results move during it; in lockstep every device is at the same local layer, so the home
attends with the `layer` it is at, which is the sender's.

Invariants: a row that is in no slot gets out 0 and lse -inf (it merges as an empty part); an empty slot, or a
slot whose history is empty (length 0), yields 0 / -inf and disturbs no other row; every transport returns the
same `(out, lse)` as running the local kernel on the home over the same rows.

Transports (all exchange the same slots; chosen at trace time):
* `all_to_all` (default): one `lax.all_to_all` of the `[k, R, H, D]` query slots and one of the packed
  `[k, R, H, D + 1]` results: 2 collectives a layer, each moving `k·R` rows a device (`(k-1)·R` of them leave it).
* `ppermute`: for each shift d in 1..k-1 one `lax.ppermute` carries the slot bound for device `(i+d) % k`, and
  the inverse shift carries its results back: the same bytes as `all_to_all`, but `2(k-1)` collectives a layer
  instead of 2 (one swap each way for k = 2), so it pays k-1 times the per-collective latency (on CPU each is a
  rendezvous of all devices). The received rows are attended in one kernel call, as for `all_to_all`.
* `tpu-fused` / `tpu-fused-interpret`: one Pallas TPU kernel that moves the rows by remote DMA, attends in the
  kernel and DMAs the results back (`remote_attention_tpu.py`). Opt-in until measured on TPU hardware.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels

TRANSPORTS = ("all_to_all", "ppermute", "tpu-fused", "tpu-fused-interpret")


def remote_paged_attention(
    q: jax.Array,  # [T, H, D] this device's query rows
    send_rows: jax.Array,  # [k(dest), R] int32 local row of each slot bound for device dest (-1: empty slot)
    recv_tables: jax.Array,  # [k(src), R, MB] int32 here (the home): history blocks of the rows src sends
    recv_lens: jax.Array,  # [k(src), R] int32 history length of each incoming slot (0: empty)
    recv_pos: jax.Array,  # [k(src), R] int32 absolute position of each incoming row
    kv_pool: jax.Array | Sequence[jax.Array],  # [NB, L, 2, BS, K, D] this device's pool, or its segments
    layer: jax.Array,  # [] int32 layer index into the pool's L axis (the same on every device in lockstep)
    *,
    scale: float,
    axis_name: str,
    sliding_window: int | None = None,
    transport: str = "all_to_all",
    backend: str = "auto",  # pallas_kernels.BACKENDS, the local kernel of the collective transports
) -> tuple[jax.Array, jax.Array]:
    """Remote part of attention for this device's rows, inside `shard_map` over `axis_name` (size k).

    Returns `(out [T, H, D] float32, lse [T, H] float32)`: attention of each row that is in a slot over its
    history on that slot's device; rows in no slot get 0 / -inf.
    """
    t, h, d = q.shape
    q_slots = q[jnp.clip(send_rows, 0, t - 1)]  # [k, R, H, D]
    out_slots, lse_slots = exchange_and_attend(
        q_slots, recv_tables, recv_lens, recv_pos, kv_pool, layer, scale=scale, axis_name=axis_name,
        sliding_window=sliding_window, transport=transport, backend=backend)
    target = jnp.where(send_rows >= 0, send_rows, t).reshape(-1)  # empty slots fall outside and are dropped
    out = jnp.zeros((t, h, d), jnp.float32).at[target].set(out_slots.reshape(-1, h, d), mode="drop")
    lse = jnp.full((t, h), -jnp.inf, jnp.float32).at[target].set(lse_slots.reshape(-1, h), mode="drop")
    return out, lse


def exchange_and_attend(
    q_slots: jax.Array,  # [k(dest), R, H, D] query rows bound for each device
    recv_tables: jax.Array,  # [k(src), R, MB] int32
    recv_lens: jax.Array,  # [k(src), R] int32
    recv_pos: jax.Array,  # [k(src), R] int32
    kv_pool: jax.Array | Sequence[jax.Array],  # [NB, L, 2, BS, K, D] or segments
    layer: jax.Array,  # [] int32
    *,
    scale: float,
    axis_name: str,
    sliding_window: int | None = None,
    transport: str = "all_to_all",
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """The slot-level exchange: returns `(out [k(dest), R, H, D] float32, lse [k(dest), R, H] float32)`, the
    results of this device's slots as computed on each destination."""
    k = q_slots.shape[0]
    if recv_tables.shape[0] != k:
        raise ValueError(f"send slots name {k} devices, receive slots {recv_tables.shape[0]}")
    if transport in ("tpu-fused", "tpu-fused-interpret"):
        from jax.experimental.pallas import tpu as pltpu

        from pallas_kernels import remote_attention_tpu

        interpret = pltpu.InterpretParams() if transport == "tpu-fused-interpret" else None
        return remote_attention_tpu.fused_remote_attention(
            q_slots, recv_tables, recv_lens, recv_pos, kv_pool, layer, scale=scale, axis_name=axis_name,
            sliding_window=sliding_window, interpret=interpret)

    def attend(q_in):  # [k(src), R, H, D] rows received here -> packed [k(src), R, H, D + 1] float32
        out, lse = attend_slots(q_in, recv_tables, recv_lens, recv_pos, kv_pool, layer, scale=scale,
                                sliding_window=sliding_window, backend=backend)
        return jnp.concatenate([out, lse[..., None]], axis=-1)  # one buffer back: one collective fewer

    if transport == "all_to_all":
        q_in = jax.lax.all_to_all(q_slots, axis_name, 0, 0, tiled=True)  # [k(src), R, H, D]
        back = jax.lax.all_to_all(attend(q_in), axis_name, 0, 0, tiled=True)  # [k(dest), R, H, D + 1]
    elif transport == "ppermute":
        back = _ppermute_exchange(q_slots, attend, axis_name)
    else:
        raise ValueError(f"remote attention transport must be one of {TRANSPORTS}, got {transport!r}")
    return back[..., :-1], back[..., -1]


def _ppermute_exchange(q_slots, attend, axis_name):
    """`all_to_all` by k-1 shifts: shift d sends slot `(i+d) % k` of device i there; the inverse shift returns
    its results. Received rows are laid out by source, exactly as `all_to_all` delivers them."""
    k = q_slots.shape[0]
    me = jax.lax.axis_index(axis_name)
    by_shift = [q_slots[me]]  # shift 0: this device's own slot, no collective
    for d in range(1, k):
        perm = [(i, (i + d) % k) for i in range(k)]
        by_shift.append(jax.lax.ppermute(q_slots[(me + d) % k], axis_name, perm))  # from device (me - d) % k
    srcs = jnp.arange(k)
    q_in = jnp.stack(by_shift)[(me - srcs) % k]  # [k(src), R, H, D]: source s arrived by shift (me - s) % k
    res = attend(q_in)  # [k(src), R, H, D + 1]
    back = [res[me]]
    for d in range(1, k):
        perm = [(i, (i - d) % k) for i in range(k)]
        back.append(jax.lax.ppermute(res[(me - d) % k], axis_name, perm))  # results from device (me + d) % k
    return jnp.stack(back)[(srcs - me) % k]  # [k(dest), R, H, D + 1]: destination e answered by shift e - me


def attend_slots(
    q_in: jax.Array,  # [k(src), R, H, D] rows received here
    recv_tables: jax.Array,  # [k(src), R, MB] int32
    recv_lens: jax.Array,  # [k(src), R] int32
    recv_pos: jax.Array,  # [k(src), R] int32
    kv_pool: jax.Array | Sequence[jax.Array],  # [NB, L, 2, BS, K, D] or segments
    layer: jax.Array,  # [] int32
    *,
    scale: float,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """The home's work: attend each incoming row over its history only (one sequence per slot, no new keys).
    Returns `(out [k, R, H, D] float32, lse [k, R, H] float32)`."""
    k, r, h, d = q_in.shape
    n = k * r
    segments = (kv_pool,) if isinstance(kv_pool, jax.Array) else tuple(kv_pool)
    no_kv = jnp.zeros((n, segments[0].shape[4], d), q_in.dtype)  # [n, K, D], masked out (valid all False)
    out, lse = pallas_kernels.paged_attention(
        q_in.reshape(n, h, d), no_kv, no_kv, kv_pool, layer, recv_tables.reshape(n, -1), recv_lens.reshape(n),
        jnp.arange(n, dtype=jnp.int32), recv_pos.reshape(n), jnp.zeros(n, bool), scale=scale,
        sliding_window=sliding_window, backend=backend)
    return out.astype(jnp.float32).reshape(k, r, h, d), lse.reshape(k, r, h)


@dataclasses.dataclass(frozen=True)
class RemoteRow:
    """One query row whose history lives on another device (host side)."""

    device: int  # the device the row runs on
    row: int  # its local row index there
    home: int  # the device holding its history
    table: Sequence[int]  # the history's block ids in the home's pool
    length: int  # tokens of history
    position: int  # the row's absolute position


@dataclasses.dataclass
class RemoteSlots:
    """Host arrays of one step's remote rows; leading axis: the device each row of the array lives on."""

    send_rows: np.ndarray  # [k, k(dest), R] int32, -1 pad
    recv_tables: np.ndarray  # [k, k(src), R, MB] int32
    recv_lens: np.ndarray  # [k, k(src), R] int32
    recv_pos: np.ndarray  # [k, k(src), R] int32


def plan_remote_rows(rows: Sequence[RemoteRow], *, k: int, slots: int, max_blocks: int) -> RemoteSlots:
    """Pack remote rows into per-(device, destination) slots, in the given order; both ends of a slot agree.
    Raises if a (device, home) pair has more than `slots` rows or a table is wider than `max_blocks`."""
    out = RemoteSlots(np.full((k, k, slots), -1, np.int32), np.zeros((k, k, slots, max_blocks), np.int32),
                      np.zeros((k, k, slots), np.int32), np.zeros((k, k, slots), np.int32))
    used = np.zeros((k, k), np.int64)
    for r in rows:
        j = int(used[r.device, r.home])
        if j >= slots:
            raise ValueError(f"more than {slots} remote rows from device {r.device} to {r.home}")
        if len(r.table) > max_blocks:
            raise ValueError(f"history of {len(r.table)} blocks exceeds max_blocks={max_blocks}")
        used[r.device, r.home] += 1
        out.send_rows[r.device, r.home, j] = r.row
        out.recv_tables[r.home, r.device, j, :len(r.table)] = r.table
        out.recv_lens[r.home, r.device, j] = r.length
        out.recv_pos[r.home, r.device, j] = r.position
    return out


__all__ = ["TRANSPORTS", "RemoteRow", "RemoteSlots", "attend_slots", "exchange_and_attend", "plan_remote_rows",
           "remote_paged_attention"]
