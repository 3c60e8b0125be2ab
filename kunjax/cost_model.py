"""The cost model: seconds for a serving unit's tick and for each memory operation, from a hardware profile.

Pure arithmetic over a model's shape (`ModelConfig`, no weights), the engine's dtype, tensor parallelism and block
size, and a `kunjax.hardware.HardwareProfile`. It reads a tick's plan in counts (`kunjax.plan.TickWork`: what the
padded `StepInputs` the JAX executor runs imply, stage by stage), so what it charges follows what the compiled
step computes:

* **Dense layers** (QKV, output, gated MLP) over the padded bucket T of the stage's micro-batch: a roofline,
  `max(FLOPs / (peak · eff(T)), weight bytes / (HBM · memory_efficiency))` per layer, with
  `eff(M) = matmul_efficiency · M / (M + matmul_half_tokens)`. Decode batches are memory-bound (the weights are
  read whatever T is); long prefill chunks become compute-bound.
* **Attention** per layer: the KV bytes each row reads (its local history plus this tick's tokens) against
  `attention_efficiency` of HBM, or the query-key FLOPs of prefill chunks, whichever is longer. With a profile
  whose `attention_reads` is "table" (the pure-JAX reference backend, what runs on CPU) every query token of the
  padded bucket gathers its row's whole block table instead, whatever the row's history.
* **The LM head** over the rows the compiled step runs it on (`kunjax.plan.head_rows`: the smallest compiled
  size that holds the leaving micro-batch's sequences; split over the stages when the group splits the
  vocabulary), on the last stage.
* **Tensor parallelism**: each device holds 1/tp of every layer; two all-reduces of T·E activations per layer
  (ring: `2(tp-1)/tp` of the bytes over the link, plus the link latency).
* **Pipelines**: a tick runs every stage at once on its own micro-batch and lasts as long as the slowest stage;
  the activations hop to the next stage over the link. Bubbles are the scheduler's: a stage with nothing to do
  costs its fixed overhead only. **Remote attention**: a stale row's home device reads that row's history there
  (its time is added to the home device's stage) and the query and partial results cross the link per layer.
* **Memory operations**: block copies inside a device at HBM speed (read and write), between devices over the
  link; transfers between instances over the link (the network across hosts); swaps over the host link; each
  plus the profile's fixed `memory_op_overhead_s` once, on the device that issues it. A fuse copies each
  device's kept layer slice and a split gathers the dropped (k-1)/k of the weights back, each plus the
  profile's transition overhead.
* A fixed `step_overhead_s` per tick and `layer_overhead_s` per layer.

It knows nothing of the engine's books: the executor (`kunjax.executor.sim`) calls it and keeps the time.
"""

from __future__ import annotations

from typing import NamedTuple

from kunjax.config import ModelConfig
from kunjax.hardware import HardwareProfile
from kunjax.memory import dtype_bytes, split_vocab, weight_bytes_per_device
from kunjax.plan import (
    CopyBlocks,
    DropHost,
    Fuse,
    MemoryOp,
    SlotCopy,
    Split,
    SwapIn,
    SwapOut,
    TickWork,
    Transfer,
    head_rows,
)


class StageWork(NamedTuple):
    """What one stage computes in one tick, read off the plan (for the breakdown and the calibration fit); its
    fields are `stage_seconds`'s arguments."""

    layers: int  # layers this stage runs (L/k)
    tokens: int  # T: the padded bucket the dense layers run over
    valid_tokens: int
    sample_rows: int  # rows the LM head runs over (0 unless the micro-batch leaves here)
    vocab_share: float  # the share of the vocabulary this stage's head computes (1/k when a group splits it)
    kv_tokens: int  # KV entries read per layer (local history + this tick's tokens, summed over rows)
    attn_pairs: int  # query-key pairs per layer (the FLOPs of attention)
    prefill_tokens: int  # tokens of rows with more than one new token
    remote_rows_out: int  # rows whose history another device reads for this stage
    table_tokens: int = 0  # KV entries one block-table row spans (MB * BS)


class CostModel:
    def __init__(self, cfg: ModelConfig, profile: HardwareProfile, *, dtype: str, tp: int, block_size: int,
                 devices_per_host: int = 8):
        self.cfg, self.profile, self.dtype, self.tp, self.block_size = cfg, profile, dtype, tp, block_size
        self.devices_per_host = devices_per_host
        b = self.bytes = dtype_bytes(dtype)
        e, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
        kv_heads = max(cfg.num_kv_heads // tp, 1)  # fewer KV heads than devices: each holds one copy
        self.layer_weight_bytes = (e * q + 2 * e * kv + q * e + 3 * e * f) * b / tp
        self.layer_flops_per_token = 2 * self.layer_weight_bytes / b
        self.kv_bytes_per_token_layer = 2 * kv_heads * cfg.head_dim * b
        self.attn_flops_per_pair = 4 * (cfg.num_heads / tp) * cfg.head_dim
        self.head_bytes = cfg.vocab_size * e * b / tp
        self.head_flops_per_row = 2 * cfg.vocab_size * e / tp
        self.activation_bytes_per_token = e * b
        self.replica_weight_bytes = weight_bytes_per_device(cfg, dtype, tp)
        self.peak = profile.flops(dtype)
        self._dense: dict[int, float] = {}
        self._head: dict[tuple[int, float], float] = {}

    # ---- compute --------------------------------------------------------------------------------------------
    def matmul_seconds(self, m: float, flops: float, weight_bytes: float) -> float:
        p = self.profile
        if m <= 0:
            return 0.0
        eff = p.matmul_efficiency * m / (m + p.matmul_half_tokens)
        return max(flops / (self.peak * eff), weight_bytes / (p.hbm_bytes_per_s * p.memory_efficiency))

    def dense_layer_seconds(self, tokens: int) -> float:
        """One layer's dense matmuls over a bucket of `tokens`, with the tensor-parallel all-reduces (memoized:
        a run has a handful of buckets)."""
        t = self._dense.get(tokens)
        if t is None:
            p = self.profile
            t = self.matmul_seconds(tokens, tokens * self.layer_flops_per_token, self.layer_weight_bytes)
            if self.tp > 1:  # two all-reduces of the activations per layer (ring)
                ar = 2 * (self.tp - 1) / self.tp * tokens * self.activation_bytes_per_token / p.link_bytes_per_s
                t += 2 * (p.link_latency_s + ar)
            self._dense[tokens] = t
        return t

    def recompute_seconds(self, tokens: int) -> float:
        """A floor on recomputing `tokens` of KV: the dense FLOPs of those tokens through every layer at the best
        matmul efficiency (they join a batch whose weights are read anyway); attention over the prefix only adds
        to it. What a copy of cached KV (a transfer, a swap-in) is weighed against."""
        return tokens * self.cfg.num_layers * self.layer_flops_per_token / (self.peak * self.profile.matmul_efficiency)

    def head_seconds(self, rows: int, vocab_share: float) -> float:
        """The LM head over `rows` (memoized)."""
        t = self._head.get((rows, vocab_share))
        if t is None:
            t = self.matmul_seconds(rows, rows * self.head_flops_per_row * vocab_share, self.head_bytes * vocab_share)
            self._head[(rows, vocab_share)] = t
        return t

    def stage_seconds(self, layers: int, tokens: int, valid_tokens: int, sample_rows: int, vocab_share: float,
                      kv_tokens: int, attn_pairs: int, prefill_tokens: int, remote_rows_out: int,
                      table_tokens: int = 0) -> float:
        """One stage's share of a tick (the fields of a `StageWork`: `stage_seconds(*work)`), excluding remote
        reads it serves for other stages and the step overhead."""
        p = self.profile
        t = layers * p.layer_overhead_s
        if valid_tokens == 0:
            return t
        per_layer = self.dense_layer_seconds(tokens)
        read = tokens * table_tokens if p.attention_reads == "table" else kv_tokens
        attn_read = read * self.kv_bytes_per_token_layer / (p.hbm_bytes_per_s * p.attention_efficiency)
        if prefill_tokens:
            attn_compute = (attn_pairs * self.attn_flops_per_pair
                            / (self.peak * p.matmul_efficiency * prefill_tokens
                               / (prefill_tokens + p.matmul_half_tokens)))
            per_layer += max(attn_read, attn_compute)
        else:
            per_layer += attn_read
        if remote_rows_out:  # queries out and partial results back, per layer
            msg = remote_rows_out * self.cfg.q_size * self.bytes / self.tp
            per_layer += 2 * (p.link_latency_s + msg / p.link_bytes_per_s)
        t += layers * per_layer
        if sample_rows:
            t += self.head_seconds(sample_rows, vocab_share)
        return t

    def remote_read_seconds(self, layers: int, kv_tokens: int) -> float:
        """A home device reading stale rows' history for another stage's `layers`."""
        p = self.profile
        return layers * kv_tokens * self.kv_bytes_per_token_layer / (p.hbm_bytes_per_s * p.attention_efficiency)

    def stage_work(self, k: int, work: TickWork, leaving: bool = True) -> list[StageWork]:
        """Per stage, what the plan makes it compute (see `StageWork`)."""
        return [StageWork(*a) for a in self._stage_args(k, work, leaving)]

    def _stage_args(self, k: int, work: TickWork, leaving: bool) -> list[tuple]:
        """`StageWork`'s fields per stage (plain tuples: `device_seconds` runs every tick)."""
        layers = self.cfg.num_layers // k
        table = work.max_blocks * self.block_size
        vocab_split = split_vocab(self.cfg, k)
        head = head_rows(work.seqs, work.rows, len(work.leaving_seeds), vocab_split) if leaving else 0
        share = 1 / k if vocab_split else 1.0
        return [(layers, work.rows, w.valid_tokens, head if vocab_split or s == k - 1 else 0, share, w.kv_tokens,
                 w.attn_pairs, w.prefill_tokens, w.remote_rows_out, table) for s, w in enumerate(work.stages)]

    def tick_seconds(self, k: int, work: TickWork, leaving: bool = True) -> float:
        """One tick of a k-stage unit: every stage at once, as long as the slowest (with the remote reads each
        device serves), plus the activations' hop to the next stage and the fixed step overhead."""
        if k == 1:  # the common tick: one stage, nothing to hop
            return self.profile.step_overhead_s + self.stage_seconds(*self._stage_args(1, work, leaving)[0])
        return self.profile.step_overhead_s + max(self.device_seconds(k, work, leaving))

    def device_seconds(self, k: int, work: TickWork, leaving: bool = True) -> list[float]:
        """Each stage's device's busy time in one tick (its stage, the remote reads it serves, the hop out)."""
        p = self.profile
        per_stage = [self.stage_seconds(*a) for a in self._stage_args(k, work, leaving)]
        if k > 1:
            layers = self.cfg.num_layers // k
            for d, w in enumerate(work.stages):  # device d reads the history of the rows other stages send it
                if w.remote_kv_in:
                    per_stage[d] += self.remote_read_seconds(layers, w.remote_kv_in)
            hop = p.link_latency_s + work.rows * self.activation_bytes_per_token / p.link_bytes_per_s
            per_stage = [t + hop for t in per_stage]
        return per_stage

    # ---- memory operations ----------------------------------------------------------------------------------
    def _link(self, a: int, b: int) -> float:
        """Bytes/s between the devices of instances a and b: the interconnect in one host, else the network."""
        same_host = (a * self.tp) // self.devices_per_host == (b * self.tp) // self.devices_per_host
        return self.profile.link_bytes_per_s if same_host else self.profile.network_bytes_per_s

    def op_seconds(self, op: MemoryOp, members: tuple[int, ...] = ()) -> dict[int, float]:
        """Seconds each instance's devices spend on `op` (`members`: the unit's instances, for `CopyBlocks`).
        A fuse or split is not here: it stops the engine (`transition_seconds`)."""
        busy = self._op_busy(op, members)
        fixed = self.profile.memory_op_overhead_s
        if fixed and busy:  # once per operation, on the device that issues it (the source)
            match op:
                case Transfer():
                    first = op.src
                case CopyBlocks():
                    first = members[op.copies[0][0]] if op.copies else None
                case _:
                    first = getattr(op, "instance", None)
            if first is not None:
                busy[first] = busy.get(first, 0.0) + fixed
        return busy

    def _op_busy(self, op: MemoryOp, members: tuple[int, ...]) -> dict[int, float]:
        p, L, bs = self.profile, self.cfg.num_layers, self.block_size
        block_bytes = bs * self.kv_bytes_per_token_layer * L
        hbm = p.hbm_bytes_per_s * p.memory_efficiency
        match op:
            case CopyBlocks():
                k = len(members)
                busy = dict.fromkeys(members, 0.0)
                pairs: dict[tuple[int, int], float] = {}
                for src, _, dst, _, lo, hi in op.copies:
                    nbytes = (hi - lo) * self.kv_bytes_per_token_layer * (L // k)
                    pairs[(src, dst)] = pairs.get((src, dst), 0.0) + nbytes
                for (src, dst), nbytes in pairs.items():
                    a, b = members[src], members[dst]
                    if src == dst:
                        busy[a] += 2 * nbytes / hbm
                    else:
                        t = p.link_latency_s + nbytes / self._link(a, b)
                        busy[a] += t
                        busy[b] += t
                return busy
            case Transfer():
                # streamed: the other groups went while the prefill computed (the link beside the compute)
                t = p.link_latency_s + len(op.src_blocks) * block_bytes / op.streamed / self._link(op.src, op.dst)
                return {op.src: t, op.dst: t}
            case SwapOut() | SwapIn():
                return {op.instance: p.host_latency_s + len(op.blocks) * block_bytes / op.groups
                        / p.host_bytes_per_s}
            case SlotCopy():
                return {op.instance: 2 * len(op.src) * block_bytes / op.groups / hbm}
            case DropHost():
                return {}
            case Fuse() | Split():
                raise ValueError("a fuse or split stops the engine: use transition_seconds")
            case _:
                raise TypeError(f"unknown memory operation {op!r}")

    def transition_seconds(self, op: Fuse | Split, k: int) -> float:
        """A fuse copies each device's kept 1/k of the weights into the group's layout (HBM, read and write);
        a split gathers the (k-1)/k each device dropped from the others over the link. Devices work in
        parallel; plus the profile's fixed transition overhead."""
        p = self.profile
        w = self.replica_weight_bytes
        if isinstance(op, Fuse):
            return p.transition_overhead_s + 2 * (w / k) / (p.hbm_bytes_per_s * p.memory_efficiency)
        return p.transition_overhead_s + p.link_latency_s * (k - 1) + w * (k - 1) / k / p.link_bytes_per_s
