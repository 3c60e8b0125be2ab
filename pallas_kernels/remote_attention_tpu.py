"""Fused remote attention as one Pallas TPU kernel: rows to their home by remote DMA, attention there, results back.

What it owns: `fused_remote_attention`, the `tpu-fused` transport of `remote_attention.exchange_and_attend`
(same slots, same results as the collective transports), called inside `shard_map` over one mesh axis. It never
writes the pool. It is opt-in: nothing selects it by default until it has been measured faster than the
collective transports on TPU hardware; it is tested on CPU devices in TPU interpret mode.

One kernel invocation per device, all devices of the axis in it at once:
1. Barrier: each device signals the barrier semaphore (`collective_id`) of every peer and waits for k-1
   signals, so no DMA lands in a peer that has not entered the kernel (its buffers would not exist yet).
2. Rows out: slot `dest` of `q_slots` is DMA'd (`make_async_remote_copy`, device id along the axis) into slot
   `me` of the destination's receive buffer; the own slot is a local copy. Each shift d = 1..k-1 has its own
   send/receive DMA semaphores; waiting on the descriptor of the copy this device sent at shift d also waits
   for the copy it received at shift d (same size, from device `me - d`), as in JAX's ring all-gather.
3. Attention, in the kernel: each received row walks its history blocks (`pool[id, layer]`, `[2, BS·K, D]`,
   DMA'd from the pool left in HBM into one VMEM buffer) with an online softmax per KV head, masked to the
   history length and the sliding window exactly as `reference.paged_attention` masks history (a row with no
   history gets out 0, lse -inf). Rows go one at a time: this is the small-R decode-sized case; it does not
   reuse the tiled local kernel (`paged_attention/tpu.py`), whose work plan is per query tile of one device.
4. Results back: `out [R, H, D]` and `lse [R, H]` of source s's slot are DMA'd into slot `me` of s's outputs,
   and the kernel returns when every result for this device has arrived and every send has completed.

Limits: on jax 0.10.2 the interpreter hangs silently once any per-device buffer of a multi-device kernel is
over ~64 KiB (DESIGN.md §11), so tests keep the pool, q and outputs a few KiB. Not run on TPU hardware: the
strided per-head loads and the `[R, H]`-shaped lse tile are written for clarity, not for Mosaic's tiling rules,
and may need layout work there (as the bf16 notes in `paged_attention/tpu.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention.tpu import segment_sources


def fused_remote_attention(
    q_slots: jax.Array,  # [k(dest), R, H, D] query rows bound for each device
    recv_tables: jax.Array,  # [k(src), R, MB] int32 history blocks of the rows each source sends here
    recv_lens: jax.Array,  # [k(src), R] int32 history lengths (0: empty slot)
    recv_pos: jax.Array,  # [k(src), R] int32 absolute positions of the incoming rows
    kv_pool: jax.Array | Sequence[jax.Array],  # [NB, L, 2, BS, K, D] this device's pool, or its segments
    layer: jax.Array,  # [] int32
    *,
    scale: float,
    axis_name: str,
    sliding_window: int | None = None,
    collective_id: int = 0,  # barrier semaphore id; distinct from any other collective kernel running alongside
    interpret: pltpu.InterpretParams | None = None,  # TPU interpret mode (CPU tests); None on TPU
) -> tuple[jax.Array, jax.Array]:
    """Inside `shard_map` over `axis_name`. Returns `(out [k(dest), R, H, D] float32, lse [k(dest), R, H]
    float32)`: the results of this device's slots as attended on each destination."""
    segments = (kv_pool,) if isinstance(kv_pool, jax.Array) else tuple(kv_pool)
    k, r, h, d = q_slots.shape
    mb = recv_tables.shape[2]
    bs, kh = segments[0].shape[3], segments[0].shape[4]
    segs = tuple(s.reshape(s.shape[0], s.shape[1], 2, bs * kh, d) for s in segments)  # [NB_i, L, 2, BS·K, D]
    scalars = (
        jnp.reshape(layer, (1,)).astype(jnp.int32),  # [1]
        recv_tables.astype(jnp.int32).reshape(-1),  # [k·R·MB], 1-D: SMEM pads 2-D arrays
        recv_lens.astype(jnp.int32).reshape(-1),  # [k·R]
        recv_pos.astype(jnp.int32).reshape(-1),  # [k·R]
    )
    kernel = functools.partial(_kernel, axis_name=axis_name, k=k, r=r, kh=kh, g=h // kh, bs=bs, mb=mb,
                               seg_sizes=tuple(s.shape[0] for s in segs), scale=scale,
                               sliding_window=sliding_window)
    vmem = pl.BlockSpec(memory_space=pltpu.VMEM)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(1,),
            in_specs=[vmem, *([pl.BlockSpec(memory_space=pl.ANY)] * len(segs))],  # q slots; pool left in HBM
            out_specs=[vmem, vmem],
            scratch_shapes=[
                pltpu.VMEM((k, r, h, d), q_slots.dtype),  # rows received, by source
                pltpu.VMEM((k, r, h, d), jnp.float32),  # their outputs, by source
                pltpu.VMEM((k, r, h), jnp.float32),  # their lse, by source
                pltpu.VMEM((2, bs * kh, d), segs[0].dtype),  # one pool block at one layer
                pltpu.SemaphoreType.DMA((k,)),  # rows out: send, per shift
                pltpu.SemaphoreType.DMA((k,)),  # rows in: receive, per shift
                pltpu.SemaphoreType.DMA((2, k)),  # results out (out, lse): send, per shift
                pltpu.SemaphoreType.DMA((2, k)),  # results in: receive, per shift
                pltpu.SemaphoreType.DMA,  # pool block reads
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct((k, r, h, d), jnp.float32), jax.ShapeDtypeStruct((k, r, h), jnp.float32)],
        compiler_params=pltpu.CompilerParams(collective_id=collective_id),
        interpret=interpret if interpret is not None else False,
        name="kunjax_fused_remote_attention",
    )(*scalars, q_slots, *segs)


def _kernel(
    layer_ref,  # SMEM [1]
    tables_ref,  # SMEM [k·R·MB]
    lens_ref,  # SMEM [k·R]
    pos_ref,  # SMEM [k·R]
    q_ref,  # VMEM [k(dest), R, H, D]
    *rest,  # pool segments (HBM), outputs, scratch
    axis_name,
    k,
    r,
    kh,
    g,
    bs,
    mb,
    seg_sizes,
    scale,
    sliding_window,
):
    n_segs = len(seg_sizes)
    segs = rest[:n_segs]  # each [NB_i, L, 2, BS·K, D]
    out_ref, lse_ref = rest[n_segs : n_segs + 2]  # [k(dest), R, H, D], [k(dest), R, H]
    q_in, res_out, res_lse, kv_buf, q_send_sem, q_recv_sem, res_send_sem, res_recv_sem, blk_sem = rest[n_segs + 2 :]
    me = jax.lax.axis_index(axis_name)

    def peer(shift):  # device `shift` places on along the axis
        return jax.lax.rem(me + shift + k, k)

    # 1. Barrier: every peer is inside the kernel before any DMA targets it.
    barrier = pltpu.get_barrier_semaphore()
    for s in range(1, k):
        pl.semaphore_signal(barrier, 1, device_id={axis_name: peer(s)}, device_id_type=pl.DeviceIdType.MESH)
    pl.semaphore_wait(barrier, k - 1)

    # 2. Rows out to their homes; rows in from every source.
    sends = []
    for s in range(1, k):
        dst = peer(s)
        cp = pltpu.make_async_remote_copy(q_ref.at[dst], q_in.at[me], q_send_sem.at[s], q_recv_sem.at[s],
                                          device_id={axis_name: dst}, device_id_type=pl.DeviceIdType.MESH)
        cp.start()
        sends.append(cp)
    q_in[me] = q_ref[me]
    for cp in sends:
        cp.wait()  # this shift's send done, and the same-sized copy from device me - s arrived

    # 3. Attention over the local pool, one received row at a time.
    layer = layer_ref[0]

    def read_block(gid):
        """DMA block `gid` (base-then-extension ids; ids in no segment read the base, clipped, like
        `reference.gather_blocks`) at this layer into `kv_buf`."""
        for si, use, local in segment_sources(gid, seg_sizes):

            @pl.when(use)
            def _(si=si, local=local):
                cp = pltpu.make_async_copy(segs[si].at[local, layer], kv_buf, blk_sem)
                cp.start()
                cp.wait()

    def attend_row(n, carry):
        src, j = n // r, n % r
        length, pos = lens_ref[n], pos_ref[n]
        lo = jnp.int32(0) if sliding_window is None else jnp.maximum(pos - sliding_window + 1, 0)
        hi = jnp.minimum(length, mb * bs)
        q = q_in[src, j].astype(jnp.float32) * scale  # [H, D]

        def block(b, state):
            m, denom, acc = state  # [H, 1], [H, 1], [H, D]
            read_block(tables_ref[n * mb + b])
            key_pos = b * bs + jax.lax.broadcasted_iota(jnp.int32, (1, bs), 1)  # [1, BS]
            seen = (key_pos >= lo) & (key_pos < hi)
            ms, ls, accs = [], [], []
            for hd in range(kh):
                heads = slice(hd * g, (hd + 1) * g)
                keys = kv_buf[0, pl.ds(hd, bs, stride=kh), :].astype(jnp.float32)  # [BS, D]
                vals = kv_buf[1, pl.ds(hd, bs, stride=kh), :].astype(jnp.float32)
                s = jax.lax.dot_general(q[heads], keys, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)  # [G, BS]
                s = jnp.where(seen, s, -jnp.inf)
                m_new = jnp.maximum(m[heads], jnp.max(s, axis=1, keepdims=True))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp(m[heads] - m_safe)
                p = jnp.exp(s - m_safe)  # exp(-inf) = 0 on masked keys
                vals = jnp.where(seen.reshape(bs, 1), vals, 0.0)
                ms.append(m_new)
                ls.append(alpha * denom[heads] + jnp.sum(p, axis=1, keepdims=True))
                accs.append(alpha * acc[heads] + jnp.dot(p, vals, preferred_element_type=jnp.float32))
            return jnp.concatenate(ms), jnp.concatenate(ls), jnp.concatenate(accs)

        n_heads = kh * g
        init = (jnp.full((n_heads, 1), -jnp.inf, jnp.float32), jnp.zeros((n_heads, 1), jnp.float32),
                jnp.zeros((n_heads, q.shape[1]), jnp.float32))
        first, end = lo // bs, jnp.where(hi > lo, (hi + bs - 1) // bs, lo // bs)
        m, denom, acc = jax.lax.fori_loop(first, end, block, init)
        safe = jnp.where(denom > 0, denom, 1.0)
        res_out[src, j] = acc / safe
        res_lse[src, j] = jnp.where(denom > 0, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(safe), -jnp.inf)[:, 0]
        return carry

    jax.lax.fori_loop(0, k * r, attend_row, 0)

    # 4. Results back to the devices the rows came from.
    sends = []
    for s in range(1, k):
        src = peer(-s)
        for i, (res, dst_ref) in enumerate(((res_out, out_ref), (res_lse, lse_ref))):
            cp = pltpu.make_async_remote_copy(res.at[src], dst_ref.at[me], res_send_sem.at[i, s],
                                              res_recv_sem.at[i, s], device_id={axis_name: src},
                                              device_id_type=pl.DeviceIdType.MESH)
            cp.start()
            sends.append(cp)
    out_ref[me] = res_out[me]
    lse_ref[me] = res_lse[me]
    for cp in sends:
        cp.wait()  # sent, and the same-sized result from device me + s arrived
