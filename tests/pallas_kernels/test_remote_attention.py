"""Remote attention gives the same `(out, lse)` as attending on the home device directly, on 8 CPU devices.

Every device of a k-device axis has its own pool with distinct contents; random ragged rows on every device have
their history on random homes (the own device included), with random lengths (empty ones too) and positions,
and some rows are not remote at all. The oracle is the reference kernel run directly on the home's pool for the
rows that home serves. The merge case splits one sequence's history between its home and a local segment and
checks the merged result against attention over the union. The fused TPU kernel runs in TPU interpret mode with
buffers of a few KiB (larger multi-device buffers hang jax 0.10.2's interpreter), hence the timeouts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels import merge_attention_states
from pallas_kernels.paged_attention import reference
from pallas_kernels.remote_attention import RemoteRow, plan_remote_rows, remote_paged_attention

AXIS = "x"
REL = 1e-5  # fp32, relative to the largest magnitude of the expected values


def mesh_of(k: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:k]), (AXIS,), axis_types=(AxisType.Auto,))


def assert_close(got, want, rel=REL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    assert np.all(np.isfinite(got[fin]))
    scale = max(1.0, float(np.max(np.abs(want[fin]), initial=0.0)))
    err = float(np.max(np.abs(got[fin] - want[fin]), initial=0.0))
    assert err <= rel * scale, f"max abs error {err} > {rel} * {scale}"


def make_case(seed: int, k: int, *, rows=6, slots=4, heads=4, kv_heads=2, head_dim=8, block_size=4, max_blocks=3,
              layers=2, segments=(10,)):
    """Per-device pools (as segments), query rows, and their remote placements."""
    rng = np.random.default_rng(seed)
    pools = [[rng.normal(size=(n, layers, 2, block_size, kv_heads, head_dim)).astype(np.float32)
              for n in segments] for _ in range(k)]
    q = rng.normal(size=(k, rows, heads, head_dim)).astype(np.float32)
    placed, used = [], np.zeros((k, k), int)
    for dev in range(k):
        for row in range(rows):
            home = int(rng.integers(k))
            if rng.random() < 0.25 or used[dev, home] == slots:
                continue  # not remote: must come back 0 / -inf
            used[dev, home] += 1
            length = int(rng.integers(0, max_blocks * block_size + 1))  # 0: an empty history
            table = rng.choice(sum(segments), size=max_blocks, replace=False)  # ids run base-then-extension
            placed.append(RemoteRow(dev, row, home, table.tolist(), length, length + int(rng.integers(0, 3))))
    plan = plan_remote_rows(placed, k=k, slots=slots, max_blocks=max_blocks)
    return pools, q, placed, plan


def expected(pools, q, placed, layer, *, sliding_window=None):
    """Oracle: the reference kernel on each home's own pool, for the rows it serves."""
    k, rows, h, d = q.shape
    out = np.zeros((k, rows, h, d), np.float32)
    lse = np.full((k, rows, h), -np.inf, np.float32)
    kv_heads = pools[0][0].shape[4]
    for home in range(k):
        mine = [p for p in placed if p.home == home]
        if not mine:
            continue
        n = len(mine)
        o, s = reference.paged_attention(
            jnp.asarray(np.stack([q[p.device, p.row] for p in mine])), jnp.zeros((n, kv_heads, d)),
            jnp.zeros((n, kv_heads, d)), [jnp.asarray(x) for x in pools[home]], jnp.int32(layer),
            jnp.asarray(np.array([p.table for p in mine], np.int32)),
            jnp.asarray(np.array([p.length for p in mine], np.int32)), jnp.arange(n, dtype=jnp.int32),
            jnp.asarray(np.array([p.position for p in mine], np.int32)), jnp.zeros(n, bool),
            scale=1 / np.sqrt(d), sliding_window=sliding_window)
        for i, p in enumerate(mine):
            out[p.device, p.row], lse[p.device, p.row] = o[i], s[i]
    return out, lse


def run_remote(pools, q, plan, layer, *, transport, sliding_window=None):
    k = q.shape[0]
    d = q.shape[-1]
    segments = [jnp.asarray(np.concatenate([pools[dev][i] for dev in range(k)])) for i in range(len(pools[0]))]

    def body(q, send_rows, recv_tables, recv_lens, recv_pos, *segs):  # leading [1] device axis on each
        out, lse = remote_paged_attention(q[0], send_rows[0], recv_tables[0], recv_lens[0], recv_pos[0], segs,
                                          jnp.int32(layer), scale=1 / np.sqrt(d), axis_name=AXIS,
                                          sliding_window=sliding_window, transport=transport)
        return out[None], lse[None]

    args = (q, plan.send_rows, plan.recv_tables, plan.recv_lens, plan.recv_pos)
    mapped = jax.shard_map(body, mesh=mesh_of(k), in_specs=(P(AXIS),) * (len(args) + len(segments)),
                           out_specs=(P(AXIS), P(AXIS)), check_vma=False)
    return jax.jit(mapped)(*[jnp.asarray(a) for a in args], *segments)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["all_to_all", "ppermute"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_remote_matches_attention_on_the_home(k, transport):
    pools, q, placed, plan = make_case(k, k, segments=(7, 3))  # a base and an extension segment on every device
    assert any(p.home == p.device for p in placed) and any(p.length == 0 for p in placed)
    out, lse = run_remote(pools, q, plan, 1, transport=transport)
    want_out, want_lse = expected(pools, q, placed, 1)
    assert_close(out, want_out)
    assert_close(lse, want_lse)


@pytest.mark.timeout(120)
def test_sliding_window_and_the_transports_agree_exactly():
    pools, q, placed, plan = make_case(5, 4, rows=8)
    a2a = run_remote(pools, q, plan, 0, transport="all_to_all", sliding_window=5)
    ring = run_remote(pools, q, plan, 0, transport="ppermute", sliding_window=5)
    want_out, want_lse = expected(pools, q, placed, 0, sliding_window=5)
    assert_close(a2a[0], want_out)
    assert_close(a2a[1], want_lse)
    for x, y in zip(a2a, ring, strict=True):  # same rows, same kernel call, same layout: bit-identical
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.timeout(120)
def test_rows_without_a_home_get_nothing_and_disturb_nothing():
    pools, q, placed, plan = make_case(3, 4)
    alone = [p for p in placed if p.device == 1][:1]  # one remote row; every other row of every device is not
    plan_one = plan_remote_rows(alone, k=4, slots=4, max_blocks=3)
    out, lse = run_remote(pools, q, plan_one, 1, transport="ppermute")
    want_out, want_lse = expected(pools, q, alone, 1)
    assert_close(out, want_out)
    assert_close(lse, want_lse)
    others = np.ones(q.shape[:2], bool)
    others[alone[0].device, alone[0].row] = False
    assert np.all(np.asarray(out)[others] == 0) and np.all(np.isneginf(np.asarray(lse)[others]))
    # The full plan again: the lone row's result does not depend on what else is in flight.
    full_out, _ = run_remote(pools, q, plan, 1, transport="ppermute")
    p = next(x for x in placed if (x.device, x.row) == (alone[0].device, alone[0].row))
    np.testing.assert_array_equal(np.asarray(full_out)[p.device, p.row], np.asarray(out)[p.device, p.row])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["all_to_all", "ppermute"])
def test_merge_of_remote_history_and_local_segment_equals_attention_over_the_union(transport):
    """Device 0 runs a chunk of 3 new tokens of a sequence whose first `split` cached tokens live on device 2 and
    the rest (up to `ctx`) in device 0's own pool; other rows of device 0 are plain local sequences."""
    k, bs, kh, h, d, layer = 4, 4, 2, 4, 8, 1
    split, ctx, mbw = 6, 13, 5  # a split inside a block: logical block 1 is partly remote, partly local
    rng = np.random.default_rng(0)
    pools = [[rng.normal(size=(12, 2, 2, bs, kh, d)).astype(np.float32)] for _ in range(k)]
    home_table = [9, 4]  # logical blocks 0-1 of the history, on device 2
    local_table = [0, 5, 7, 3, 0]  # logical blocks of the sequence on device 0 (block 0 unused: all remote)
    q = rng.normal(size=(k, 6, h, d)).astype(np.float32)
    k_new = rng.normal(size=(6, kh, d)).astype(np.float32)
    v_new = rng.normal(size=(6, kh, d)).astype(np.float32)
    seq_ids = np.array([0, 0, 0, 1, 1, 2], np.int32)
    positions = np.array([ctx, ctx + 1, ctx + 2, 5, 6, 2], np.int32)
    tables = np.array([local_table, [1, 2, 0, 0, 0], [6, 0, 0, 0, 0]], np.int32)
    lens = np.array([ctx, 5, 2], np.int32)
    starts = np.array([split, 0, 0], np.int32)
    placed = [RemoteRow(0, t, 2, home_table, split, int(positions[t])) for t in range(3)]
    plan = plan_remote_rows(placed, k=k, slots=4, max_blocks=mbw)

    remote_out, remote_lse = run_remote(pools, q, plan, layer, transport=transport)
    args = (jnp.asarray(q[0]), jnp.asarray(k_new), jnp.asarray(v_new))
    meta = (jnp.int32(layer), jnp.asarray(tables), jnp.asarray(lens), jnp.asarray(seq_ids), jnp.asarray(positions),
            jnp.ones(6, bool))
    local_out, local_lse = reference.paged_attention(*args, jnp.asarray(pools[0][0]), *meta, scale=1 / np.sqrt(d),
                                                     context_starts=jnp.asarray(starts))
    merged, merged_lse = merge_attention_states(jnp.stack([local_out, remote_out[0]]),
                                                jnp.stack([local_lse, remote_lse[0]]))

    # The union: one pool holding every sequence's whole history (remote positions < split, local from split).
    union = pools[0][0].copy()
    extra = len(union)
    union = np.concatenate([union, np.zeros((2, *union.shape[1:]), np.float32)])
    for logical, blk in enumerate(home_table):
        for off in range(bs):
            pos = logical * bs + off
            src = pools[2][0][blk] if pos < split else pools[0][0][local_table[logical]]
            union[extra + logical, :, :, off] = src[:, :, off]
    union_tables = tables.copy()
    union_tables[0, :2] = [extra, extra + 1]
    want_out, want_lse = reference.paged_attention(*args, jnp.asarray(union), jnp.int32(layer),
                                                   jnp.asarray(union_tables), *meta[2:], scale=1 / np.sqrt(d))
    assert_close(merged, want_out)
    assert_close(merged_lse, want_lse)
    assert not np.allclose(np.asarray(local_out[:3]), np.asarray(want_out[:3]), atol=1e-3)  # the remote part mattered


# ---- the fused TPU kernel, in TPU interpret mode (small buffers) ----


@pytest.mark.timeout(180)
@pytest.mark.parametrize("k", [2, 4, 8])
def test_fused_tpu_kernel_matches_collective_path_and_home_attention(k):
    # Every per-device buffer stays a few KiB: pool segments 4 KiB + 1 KiB, q slots <= 4 KiB.
    pools, q, placed, plan = make_case(10 + k, k, rows=4, slots=2, segments=(4, 1), max_blocks=2)
    fused = run_remote(pools, q, plan, 1, transport="tpu-fused-interpret", sliding_window=6)
    collective = run_remote(pools, q, plan, 1, transport="all_to_all", sliding_window=6)
    want_out, want_lse = expected(pools, q, placed, 1, sliding_window=6)
    for got, coll, want in zip(fused, collective, (want_out, want_lse), strict=True):
        assert_close(got, want)
        assert_close(got, coll)


@pytest.mark.timeout(180)
def test_fused_tpu_kernel_without_window():
    pools, q, placed, plan = make_case(21, 4, rows=4, slots=2, segments=(5,), max_blocks=2)
    fused = run_remote(pools, q, plan, 0, transport="tpu-fused-interpret")
    want = expected(pools, q, placed, 0)
    for got, w in zip(fused, want, strict=True):
        assert_close(got, w)


def test_unknown_transport_is_refused():
    with pytest.raises(ValueError, match="transport"):
        pools, q, _, plan = make_case(1, 2)
        run_remote(pools, q, plan, 0, transport="carrier-pigeon")

