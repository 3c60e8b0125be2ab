"""The cost model and its inputs: model shapes against their published sizes, hardware profiles that name a source
for every coefficient, and the regimes a roofline must show (decode memory-bound, prefill compute-bound, tensor
parallelism, pipelines and remote reads, memory operations sized like the books size them)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from kunjax.config import ConfigError
from kunjax.cost_model import CostModel
from kunjax.hardware import HardwareProfile, bundled_profiles, load_profile
from kunjax.memory import kv_block_bytes, weight_bytes_per_device
from kunjax.model_shapes import SHAPES, model_shape
from kunjax.plan import (
    CopyBlocks,
    Fuse,
    Split,
    StageLoad,
    StepInputs,
    SwapOut,
    TickWork,
    Transfer,
    UnitShape,
    head_rows,
)
from tests.helpers import tick_work_of

H100 = load_profile("h100-sxm")
L8B = model_shape("llama-3-8b")


def shape(k: int = 1, tokens: int = 4096, seqs: int = 256) -> UnitShape:
    return UnitShape(k=k, tp=1, tokens=tokens, buckets=(tokens,), seqs=seqs, max_blocks=512, num_base=1000,
                     remote_rows=8)


def decode_inputs(rows: int, ctx: int, k: int = 1, stage: int = 0, tokens: int = 256) -> StepInputs:
    """`rows` decode rows of history `ctx` on `stage` of a k-stage unit, in a bucket of `tokens`."""
    inp = StepInputs.empty(shape(k, tokens), tokens)
    inp.positions[stage, :rows] = ctx
    inp.seq_ids[stage, :rows] = np.arange(rows)
    inp.valid[stage, :rows] = True
    inp.context_lens[stage, :rows] = ctx
    return inp


def decode(rows: int, ctx: int, k: int = 1, stage: int = 0, tokens: int = 256) -> TickWork:
    return tick_work_of(decode_inputs(rows, ctx, k, stage, tokens))


def prefill(n: int) -> TickWork:
    inp = StepInputs.empty(shape(tokens=n), n)
    inp.positions[0] = np.arange(n)
    inp.valid[0] = True
    return tick_work_of(inp)


@pytest.mark.parametrize(("name", "params"), [
    ("llama-3-8b", 8.03e9), ("llama-3-70b", 70.6e9), ("qwen2.5-7b", 7.62e9), ("qwen2.5-14b", 14.77e9),
    ("qwen2.5-72b", 72.7e9), ("mistral-7b", 7.24e9)])
def test_model_shapes_have_their_published_parameter_counts(name, params):
    """The model cards' parameter counts (Hugging Face Hub), within 1%: the shapes are the real models'."""
    got = weight_bytes_per_device(model_shape(name), "bfloat16", 1) / 2
    assert got == pytest.approx(params, rel=0.01)


def test_model_shape_from_a_config_json_and_bad_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SHAPES["qwen2.5-7b"]))
    assert model_shape(tmp_path) == model_shape("Qwen2.5-7B") == model_shape(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="llama-3-70b"):
        model_shape("llama-4-9000b")


def test_every_bundled_profile_names_a_source_for_every_coefficient():
    names = bundled_profiles()
    assert {"h100-sxm", "h200", "a100-80gb", "tpu-v5e", "tpu-v6e"} <= set(names)
    for n in names:
        p = load_profile(n)
        assert p.kind in ("spec", "measured")
        assert all(p.sources[f.name].strip() for f in dataclasses.fields(p)
                   if f.name not in ("name", "device", "kind", "sources"))
    d = H100.to_dict()
    del d["sources"]["hbm_bytes_per_s"]
    with pytest.raises(ConfigError, match="no source for hbm_bytes_per_s"):
        HardwareProfile.from_dict(d)
    with pytest.raises(ConfigError, match="h100-sxm"):
        load_profile("b300")


def test_short_profile_names_are_the_bundled_ones():
    assert load_profile("h100") == load_profile("H100-SXM") == H100
    assert load_profile("a100").name == "a100-80gb" and load_profile("v6e").name == "tpu-v6e"


def test_a_profile_round_trips_through_its_file(tmp_path):
    H100.save(tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == H100


def test_decode_is_memory_bound_on_a_gpu_and_prefill_compute_bound():
    cm = CostModel(L8B, H100, dtype="bfloat16", tp=1, block_size=16)
    one, many = cm.tick_seconds(1, decode(1, 1)), cm.tick_seconds(1, decode(64, 1))
    assert many / one < 1.1  # the weights are read once per step whatever the batch
    # One request's decode step is of the order of published single-stream latencies for an 8B model (~6-8 ms).
    assert 0.004 < one < 0.010
    long_ctx = cm.tick_seconds(1, decode(64, 4096))
    assert long_ctx > 1.3 * many  # 64 x 4096 tokens of KV read per step
    p2k, p4k = cm.tick_seconds(1, prefill(2048)), cm.tick_seconds(1, prefill(4096))
    assert 1.9 < p4k / p2k < 2.3  # compute-bound: about linear in tokens, plus quadratic attention
    assert p2k > 5 * one


def test_tensor_parallelism_divides_the_weights_and_adds_all_reduces():
    cfg = model_shape("llama-3-70b")
    t = {tp: CostModel(cfg, H100, dtype="bfloat16", tp=tp, block_size=16).tick_seconds(1, decode(32, 1024))
         for tp in (4, 8)}
    assert 1.3 < t[4] / t[8] < 2.0
    cpu_like = dataclasses.replace(H100, link_bytes_per_s=1e9, sources=H100.sources)
    slow = CostModel(cfg, cpu_like, dtype="bfloat16", tp=8, block_size=16).tick_seconds(1, prefill(4096))
    assert slow > 2 * CostModel(cfg, H100, dtype="bfloat16", tp=8, block_size=16).tick_seconds(1, prefill(4096))


def test_a_pipeline_tick_lasts_its_slowest_stage_and_remote_reads_load_the_home_device():
    cm = CostModel(L8B, H100, dtype="bfloat16", tp=1, block_size=16)
    busy0 = cm.tick_seconds(2, decode(32, 2048, k=2, stage=0))
    busy1 = cm.tick_seconds(2, decode(32, 2048, k=2, stage=1))
    assert busy0 == pytest.approx(busy1, rel=0.05)
    assert busy0 < cm.tick_seconds(1, decode(32, 2048))  # half the layers per stage
    inp = decode_inputs(32, 2048, k=2, stage=0)
    inp.context_starts[0, :8] = 2048  # 8 stale rows: their whole history lives on device 1
    inp.send_rows[0, 1, :8] = np.arange(8)
    inp.recv_lens[1, 0, :8] = 2048
    stale = tick_work_of(inp)
    works = cm.stage_work(2, stale)
    assert works[0].kv_tokens == 24 * 2049 + 8 and works[0].remote_rows_out == 8
    before, after = cm.device_seconds(2, decode(32, 2048, k=2, stage=0)), cm.device_seconds(2, stale)
    assert after[1] - before[1] == pytest.approx(cm.remote_read_seconds(16, 8 * 2048))
    assert after[0] < before[0]  # stage 0 reads less history itself (the messages cost less than the reads)


def test_memory_operations_move_the_bytes_the_books_count():
    cm = CostModel(L8B, H100, dtype="bfloat16", tp=1, block_size=16)
    block = kv_block_bytes(L8B, 16, "bfloat16", 1)
    fixed = H100.memory_op_overhead_s
    assert fixed > 0
    out = cm.op_seconds(SwapOut(3, "r", tuple(range(100))))
    assert out == {3: pytest.approx(fixed + H100.host_latency_s + 100 * block / H100.host_bytes_per_s)}
    t = cm.op_seconds(Transfer(0, 1, (1, 2), (3, 4)))
    wire = H100.link_latency_s + 2 * block / H100.link_bytes_per_s
    assert t == {0: pytest.approx(fixed + wire), 1: pytest.approx(wire)}  # the fixed part once, where it is issued
    across = CostModel(L8B, H100, dtype="bfloat16", tp=4, block_size=16).op_seconds(Transfer(0, 2, (1,), (3,)))
    assert across[0] > t[0]  # instances 0 and 2 of tp 4 are on different hosts of 8 devices: the network
    local = cm.op_seconds(CopyBlocks(7, ((0, 5, 0, 6, 0, 16),)), members=(4, 5))
    remote = cm.op_seconds(CopyBlocks(7, ((0, 5, 1, 6, 0, 16),)), members=(4, 5))
    assert local[5] == 0 and remote[5] > 0 and local[4] > 0
    w = weight_bytes_per_device(L8B, "bfloat16", 1)
    split = cm.transition_seconds(Split(7, (4, 5)), 2)
    assert split == pytest.approx(H100.transition_overhead_s + H100.link_latency_s + w / 2 / H100.link_bytes_per_s)
    assert cm.transition_seconds(Fuse(7, (4, 5), shape(2)), 2) < split
    slow = CostModel(L8B, H100.scaled(link_bytes_per_s=0.5), dtype="bfloat16", tp=1, block_size=16)
    assert slow.transition_seconds(Split(7, (4, 5)), 2) > split


def test_the_lm_head_is_charged_over_the_rows_the_compiled_step_runs_it_on():
    """`head_rows` is the smallest compiled head size holding the leaving sequences (one size when the vocabulary
    is split): a prefill tick of a few prompts pays a quarter of S rows of head, not S."""
    assert head_rows(64, 256, 6, False) == 16 and head_rows(64, 256, 20, False) == 32
    assert head_rows(64, 256, 64, False) == 64 and head_rows(64, 256, 6, True) == 64
    assert head_rows(8, 256, 3, False) == 8 and head_rows(64, 16, 16, False) == 16
    few = TickWork(256, 64, 512, (StageLoad(256, 256, 256 * 257 // 2, 256),), False, (1,) * 6, (0,) * 6,
                   ((),) * 6, 0)
    many = few._replace(leaving_seeds=(1,) * 64, leaving_counters=(0,) * 64, leaving_suppress=((),) * 64)
    for profile, dtype in ((H100, "bfloat16"), (load_profile("cpu"), "float32")):
        cost = CostModel(L8B, profile, dtype=dtype, tp=1, block_size=16)
        (w_few,), (w_many,) = cost.stage_work(1, few), cost.stage_work(1, many)
        assert (w_few.sample_rows, w_many.sample_rows) == (16, 64)
        head = cost.head_seconds(64, 1.0) - cost.head_seconds(16, 1.0)
        assert cost.tick_seconds(1, many) - cost.tick_seconds(1, few) == pytest.approx(head)
    assert head > 0  # on the CPU the head's FLOPs bound it; on the H100 (above) reading its weights does
