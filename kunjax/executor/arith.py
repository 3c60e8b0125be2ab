"""The arithmetic executor: the whole engine without a model (JetStream's mock engine, one level down).

It simulates what the JAX executor's arrays hold, with numbers instead of tensors, so every book the host keeps
is checked by the tokens that come out:

* **KV.** Each instance's pool is an int64 array `[NB, L, BS]`; the "KV" of the token at position p is the value
  `kv(p, token)` (never 0, so an unwritten slot reads as wrong). Pipeline format is the same memory reshaped
  `[NB·k, L/k, BS]` (numpy views, exactly like the real reinterpretation), the extension a second array, the
  host tier copies of block rows; every memory operation (`kunjax.plan`) moves values the way the executor moves
  KV. A tick writes each stage's new values at its slot mapping, as the real step scatters K/V.
* **Attention** of a row at position p, layer l, is `x_l = Σ_q kv(q, t_q) · w_q  (mod M)` over the positions it
  attends (its history read through its block tables — base, extension, slot tables, or the home device's pool
  for remote rows — plus this tick's own earlier tokens; a window with `sliding_window`). Each layer adds
  `a_l · x_l + b_l` to the row's accumulator, which travels stage to stage like the activations; the last stage
  samples `token = accumulator mod V` (greedy) or a hash of it with the row's seed and counter (sampled), and
  never an id the row must not produce yet (min_tokens).
* **Oracle.** With every block right, each layer reads the same sequence, so the next token is a function of the
  tokens alone: `expected_greedy(prompt, n)` computes it directly. A wrong block table, a lost copy, a stale read
  or a misplaced write changes a layer's sum and the tokens stop matching.
* **Time.** On a `VirtualClock`, each tick costs `ArithCost` seconds (a fixed cost, per token, per remote row;
  per block for moves) and `end_step` advances the clock by the slowest unit's ticks of the step; a fuse or
  split stops the engine, so it advances the clock at once (a fixed cost, plus the weights a split gathers back).
  This is a stand-in for the calibrated cost model, not a hardware model.

Tensor parallelism changes nothing here (one array per instance).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np

from kunjax.clock import Clock
from kunjax.config import EngineConfig, ModelConfig
from kunjax.executor import TickResult
from kunjax.memory import num_kv_blocks, weight_bytes_per_device
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

M = (1 << 31) - 1  # a Mersenne prime: products of two residues fit int64


def kv_value(positions: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The simulated KV of `tokens` at `positions` (never 0)."""
    return (positions.astype(np.int64) * 7919 + tokens.astype(np.int64) * 104729 + 1) % M


def position_weights(n: int) -> np.ndarray:  # [n] int64
    rng = np.random.default_rng(20261204)
    return rng.integers(1, M, size=n, dtype=np.int64)


def layer_coefficients(num_layers: int) -> tuple[np.ndarray, np.ndarray]:  # [L], [L] int64
    rng = np.random.default_rng(7)
    return rng.integers(1, M, size=num_layers, dtype=np.int64), rng.integers(0, M, size=num_layers, dtype=np.int64)


class ArithModel:
    """The arithmetic "model": attention sums, layer coefficients, sampling, and the oracle."""

    def __init__(self, cfg: ModelConfig, max_len: int):
        self.cfg = cfg
        self.vocab = cfg.vocab_size
        self.window = cfg.sliding_window
        self.w = position_weights(max_len + 1)
        self.a, self.b = layer_coefficients(cfg.num_layers)

    def layer(self, acc: np.ndarray, x: np.ndarray, layer: int) -> np.ndarray:
        return (acc + x * self.a[layer] + self.b[layer]) % M

    def sample(self, acc: np.ndarray, temperature: np.ndarray, seeds: np.ndarray, counters: np.ndarray,
               suppress: np.ndarray) -> np.ndarray:  # [S] each -> [S] int32
        out = acc % self.vocab
        hot = temperature > 0
        mixed = (acc * 48271 % M + seeds.astype(np.int64) % M * 16807 % M + counters.astype(np.int64) * 69621) % M
        out = np.where(hot, mixed % self.vocab, out)
        for i in range(len(out)):  # rows below their min_tokens never produce a suppressed id
            banned = set(suppress[i][suppress[i] >= 0].tolist())
            while int(out[i]) in banned:
                out[i] = (out[i] + 1) % self.vocab
        return out.astype(np.int32)

    def expected_greedy(self, prompt: Sequence[int], n: int, eos: frozenset[int] = frozenset()) -> list[int]:
        """The engine's greedy output for `prompt` when every block is right (the oracle)."""
        toks = list(prompt)
        out: list[int] = []
        coef_a, coef_b = int(self.a.sum() % M), int(self.b.sum() % M)
        for _ in range(n):
            p = len(toks) - 1
            lo = 0 if self.window is None else max(0, p - self.window + 1)
            q = np.arange(lo, p + 1)
            x = int((kv_value(q, np.asarray(toks[lo:p + 1])) * self.w[q] % M).sum() % M)
            nxt = int((x * coef_a + coef_b) % M) % self.vocab
            toks.append(nxt)
            out.append(nxt)
            if nxt in eos:
                break
        return out


@dataclasses.dataclass(frozen=True)
class ArithCost:
    """Seconds a tick and a move cost on the virtual clock (a stand-in, not a hardware model)."""

    tick_s: float = 0.004
    token_s: float = 0.00005
    remote_row_s: float = 0.00002
    block_move_s: float = 0.00001
    transition_s: float = 0.002  # a fuse or split's fixed cost (stopping the engine, rebuilding the unit)
    weight_byte_s: float = 1e-11  # per weight byte a device gathers back at a split (about 100 GB/s)


@dataclasses.dataclass
class _Unit:
    members: tuple[int, ...]
    pools: list[np.ndarray]  # per stage [NB·k, L/k, BS] (views of the members' pools)
    exts: list[np.ndarray]  # per stage [NE, L/k, BS]
    width: int  # T of the largest bucket
    acts: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)  # per stage (tokens [T],
    # accumulators [T]) of the rows in flight

    def __post_init__(self) -> None:
        self.acts = [(np.zeros(self.width, np.int64), np.zeros(self.width, np.int64)) for _ in self.members]

    @property
    def k(self) -> int:
        return len(self.members)


class ArithmeticExecutor:
    """See the module docstring; `kunjax.executor.Executor` is the protocol."""

    def __init__(self, cfg: ModelConfig, ecfg: EngineConfig, clock: Clock, cost: ArithCost | None = None,
                 num_instances: int | None = None):
        if not clock.virtual:
            raise ValueError("the arithmetic executor needs a virtual clock (it advances it by modelled time)")
        self.cfg, self.ecfg, self.clock = cfg, ecfg, clock
        self.cost = cost or ArithCost()
        self.num_instances = num_instances or ecfg.num_instances or 8
        self.weight_bytes = weight_bytes_per_device(cfg, ecfg.dtype, ecfg.tp)
        self.num_blocks = num_kv_blocks(cfg, ecfg, self.weight_bytes, None)
        self.load_seconds = 0.0
        self.needs_arrays = True
        self.model = ArithModel(cfg, ecfg.resolved_max_model_len(cfg))
        L, bs = cfg.num_layers, ecfg.block_size
        self.pools = [np.zeros((self.num_blocks, L, bs), np.int64) for _ in range(self.num_instances)]
        self.host: list[dict[Hashable, np.ndarray]] = [{} for _ in range(self.num_instances)]
        self.units: dict[int, _Unit] = {i: self._replica(i) for i in range(self.num_instances)}
        self._step_seconds: dict[int, float] = {}
        self.ticks = 0

    def describe(self, instance: int) -> str:
        return f"arith:{instance}"

    def warmup(self, units: Sequence[tuple[int, tuple[int, ...], UnitShape]],
               candidates: Sequence[tuple[tuple[int, ...], UnitShape]]) -> None:
        """Nothing to compile."""

    def _replica(self, i: int) -> _Unit:
        return _Unit((i,), [self.pools[i]], [np.zeros((0, *self.pools[i].shape[1:]), np.int64)],
                      self.ecfg.scheduler.max_num_batched_tokens)

    # ---- memory operations --------------------------------------------------------------------------
    def _view(self, i: int, groups: int) -> np.ndarray:
        pool = self.pools[i]
        return pool.reshape(pool.shape[0] * groups, pool.shape[1] // groups, pool.shape[2])

    def apply(self, ops: Sequence[MemoryOp]) -> None:
        for op in ops:
            match op:
                case CopyBlocks():
                    u = self.units[op.unit]
                    reads = [(c, self._block(u, c[0], c[1])[:, c[4]:c[5]].copy()) for c in op.copies]
                    for (_, _, dst, dst_id, lo, hi), data in reads:
                        self._block(u, dst, dst_id)[:, lo:hi] = data
                    self._charge(op.unit, len(op.copies))
                case Transfer():
                    self.pools[op.dst][list(op.dst_blocks)] = self.pools[op.src][list(op.src_blocks)]
                    self._charge(op.dst, len(op.src_blocks))
                case SwapOut():
                    if op.key in self.host[op.instance]:
                        raise ValueError(f"{op.key!r} already has KV on the host tier of instance {op.instance}")
                    self.host[op.instance][op.key] = self._view(op.instance, op.groups)[list(op.blocks)].copy()
                    self._charge(op.instance, len(op.blocks))
                case SwapIn():
                    host = self.host[op.instance if op.src is None else op.src]
                    data = host[op.key] if op.keep else host.pop(op.key)
                    self._view(op.instance, op.groups)[list(op.blocks)] = data
                    self._charge(op.instance, len(op.blocks))
                case DropHost():
                    self.host[op.instance].pop(op.key, None)
                case SlotCopy():
                    view = self._view(op.instance, op.groups)
                    view[list(op.dst)] = view[list(op.src)]
                case Fuse():
                    k = len(op.members)
                    pools = [self.pools[i].reshape(self.pools[i].shape[0] * k, -1, self.pools[i].shape[2])
                             for i in op.members]
                    exts = [np.zeros((op.shape.num_ext, *p.shape[1:]), np.int64) for p in pools]
                    for i in op.members:
                        del self.units[i]
                    self.units[op.unit] = _Unit(op.members, pools, exts, op.shape.tokens)
                    self.clock.advance(self.cost.transition_s)  # each device frees copies it holds: no traffic
                case Split():
                    k = self.units.pop(op.unit).k
                    for i in op.members:
                        self.units[i] = self._replica(i)
                    # each device gathers the (k-1)/k of the weights it dropped
                    self.clock.advance(self.cost.transition_s
                                       + self.weight_bytes * (k - 1) / k * self.cost.weight_byte_s)
                case _:
                    raise TypeError(f"unknown memory operation {op!r}")

    def _block(self, u: _Unit, stage: int, block: int) -> np.ndarray:  # [L/k, BS] view
        base = u.pools[stage]
        return base[block] if block < base.shape[0] else u.exts[stage][block - base.shape[0]]

    def _charge(self, uid: int, blocks: int) -> None:
        self._step_seconds[uid] = self._step_seconds.get(uid, 0.0) + blocks * self.cost.block_move_s

    # ---- ticks --------------------------------------------------------------------------------------
    def launch(self, uid: int, work: TickWork, inputs: StepInputs | None) -> tuple[int, Sampled]:
        u = self.units[uid]
        k = u.k
        lk = self.cfg.num_layers // k
        rows = inputs.tokens_in.shape[0]
        new_acts = []
        writes = []
        for s in range(k):
            tokens = inputs.tokens_in.astype(np.int64) if s == 0 else u.acts[s - 1][0][:rows]
            acc = np.zeros(rows, np.int64) if s == 0 else u.acts[s - 1][1][:rows]
            acc = self._stage(u, s, lk, inputs, tokens, acc.copy(), writes)
            new_acts.append((tokens, acc))
        for seg, idx, vals in writes:  # K/V scattered after every stage read (the real step writes after its scan)
            seg[idx] = vals
        exit_acc = new_acts[k - 1][1][inputs.logits_indices]
        for s in range(k):  # the ring: stage s's rows enter stage s+1 next tick
            toks, acc = new_acts[s]
            buf_t, buf_a = np.zeros(u.width, np.int64), np.zeros(u.width, np.int64)
            buf_t[:rows], buf_a[:rows] = toks, acc
            u.acts[s] = (buf_t, buf_a)
        tokens = self.model.sample(exit_acc, inputs.temperature, inputs.seeds, inputs.counters, inputs.suppress_ids)
        n = max(self.ecfg.max_logprobs, 1)
        top_ids = (tokens[:, None] + np.arange(n)[None, :]) % self.cfg.vocab_size
        top_lps = -np.broadcast_to(np.arange(n, dtype=np.float32), top_ids.shape) * 0.5
        logprob = np.zeros(len(tokens), np.float32)
        valid_tokens = int(inputs.valid.sum())
        seconds = (self.cost.tick_s + self.cost.token_s * valid_tokens
                   + self.cost.remote_row_s * int((inputs.send_rows >= 0).sum()))
        self._step_seconds[uid] = self._step_seconds.get(uid, 0.0) + seconds
        self.ticks += 1
        return seconds, Sampled(tokens.astype(np.int32), logprob, top_ids.astype(np.int32),
                                top_lps.astype(np.float32))

    def _stage(self, u: _Unit, s: int, lk: int, inp: StepInputs, tokens: np.ndarray, acc: np.ndarray,
               writes: list) -> np.ndarray:
        """One stage's layers over its micro-batch: attention sums into `acc`; the K/V writes are collected."""
        valid = inp.valid[s]
        if not valid.any():
            return acc
        bs = self.ecfg.block_size
        pos = inp.positions[s].astype(np.int64)
        seq = inp.seq_ids[s]
        ctx = inp.context_lens[s][seq].astype(np.int64)  # [T]
        start = inp.context_starts[s][seq].astype(np.int64)  # [T] remote history below this
        vals_new = kv_value(pos, tokens)  # [T]
        w = self.model.w
        window = self.model.window
        lo = np.zeros_like(pos) if window is None else np.maximum(0, pos - window + 1)
        # This tick's own tokens of the same sequence at positions <= p (causal).
        same = (seq[:, None] == seq[None, :]) & valid[None, :] & (pos[None, :] <= pos[:, None]) & (
            pos[None, :] >= lo[:, None])
        own = (same * (vals_new * w[pos] % M)[None, :]).sum(axis=1) % M  # [T]
        groups = inp.block_tables.shape[1] if inp.block_tables.ndim == 4 else 1
        cmax = int(ctx[valid].max(initial=0))
        q = np.arange(cmax)  # history positions
        hist_mask = (q[None, :] < ctx[:, None]) & (q[None, :] >= np.maximum(start, lo)[:, None]) & valid[:, None]
        stage_layers = range(s * lk, (s + 1) * lk)
        for j, layer in enumerate(stage_layers):
            if groups > 1:  # layer groups (a replica): slot tables into the pool's slot view
                lg = lk // groups
                seg = self._view(u.members[0], groups)
                tables = inp.block_tables[s, j // lg][seq]  # [T, MB] slot ids
                hist = seg[tables[:, q // bs], j % lg, (q % bs)[None, :]]
            else:
                hist = self._read(u, s, inp.block_tables[s][seq][:, q // bs], j, q % bs)
            x = ((np.where(hist_mask, hist, 0) * w[q][None, :]) % M).sum(axis=1) % M
            x = (x + own + self._remote(u, s, j, inp, lo)) % M
            acc = np.where(valid, self.model.layer(acc, x, layer), acc)
            # This layer's K/V of the new tokens, written after the tick (padding rows write the null block).
            if groups > 1:
                slots = inp.slot_mapping[s, j // lg]
                writes.append((seg, (slots // bs, j % lg, slots % bs), vals_new))
            else:
                slots = inp.slot_mapping[s]
                self._collect_write(u, s, slots // bs, j, slots % bs, vals_new, writes)
        return acc

    def _read(self, u: _Unit, s: int, blocks: np.ndarray, layer: int, offsets: np.ndarray) -> np.ndarray:
        base, ext = u.pools[s], u.exts[s]
        nb = base.shape[0]
        in_base = blocks < nb
        out = base[np.where(in_base, blocks, 0), layer, offsets[None, :]]
        if ext.shape[0]:
            out = np.where(in_base, out, ext[np.clip(blocks - nb, 0, ext.shape[0] - 1), layer, offsets[None, :]])
        return out

    def _collect_write(self, u: _Unit, s: int, blocks: np.ndarray, layer: int, offsets: np.ndarray,
                       vals: np.ndarray, writes: list) -> None:
        base, ext = u.pools[s], u.exts[s]
        nb = base.shape[0]
        in_base = blocks < nb
        writes.append((base, (blocks[in_base], layer, offsets[in_base]), vals[in_base]))
        if (~in_base).any():
            writes.append((ext, (blocks[~in_base] - nb, layer, offsets[~in_base]), vals[~in_base]))

    def _remote(self, u: _Unit, s: int, j: int, inp: StepInputs, lo: np.ndarray) -> np.ndarray:
        """The remote part of attention for stage s's rows at local layer j (history on other devices)."""
        t = inp.positions.shape[1]
        out = np.zeros(t, np.int64)
        if u.k == 1:
            return out
        bs = self.ecfg.block_size
        w = self.model.w
        for d in range(u.k):
            rows = inp.send_rows[s, d]
            for slot in np.nonzero(rows >= 0)[0]:
                r = int(rows[slot])
                n = int(inp.recv_lens[d, s, slot])
                q = np.arange(max(int(lo[r]), 0), n)
                if not len(q):
                    continue
                blocks = inp.recv_tables[d, s, slot][q // bs]
                vals = u.pools[d][blocks, j, q % bs]
                out[r] = (out[r] + (vals * w[q] % M).sum()) % M
        return out

    def collect(self, launched: tuple[float, Sampled], leaving: bool) -> TickResult:
        seconds, sampled = launched
        return TickResult(sampled if leaving else None, seconds)

    def end_step(self) -> None:
        if self._step_seconds:
            self.clock.advance(max(self._step_seconds.values()))
        self._step_seconds.clear()

    def expected_greedy(self, prompt: Sequence[int], n: int, eos: frozenset[int] = frozenset()) -> list[int]:
        return self.model.expected_greedy(prompt, n, eos)
