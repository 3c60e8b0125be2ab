"""`kunjax calibrate`: measure the real engine's compiled steps on the device at hand and fit a hardware profile.

1. **Record.** The real engine (one replica, the JAX executor, the attention backend `auto` picks here) runs a
   grid of workloads — decode batches of 1 to `max_num_seqs` rows at short and long contexts, prefills of one to
   several chunks — under two scheduler shapes (token budget, rows, block-table width), so the held-out steps
   differ from the fitted ones in the compiled shapes too, not only in their contents. Each tick is recorded as
   what the cost model reads off its plan (`kunjax.cost_model.StageWork`) and the wall time of the engine step
   that ran it (the host's scheduling, packing and token handling included: what serving sees, and what
   `step_overhead_s` then carries). The first pass over the grid is thrown away (first runs).
2. **Microbenchmarks** give the reference rates the efficiencies are relative to: a large GEMM per dtype (peak
   FLOP/s), a device copy (memory bandwidth), a device-to-device `device_put` (link) and a device-to-host read
   (host link), each the best of a few runs.
3. **Fit.** Six coefficients — large-GEMM FLOP/s, `matmul_half_tokens`, weight-streaming and attention-read
   bandwidth, `step_overhead_s`, and which attention read model applies (`kv` or `table`, from the backend) — by
   robust least squares on log(predicted / measured) over a deterministic ~70% of the records; the rest are
   held out and reported (median and P90 relative error). The fit calls the cost model itself, so what is
   fitted is exactly what the simulator computes. On one model the step overhead and the weight-streaming rate
   are told apart only by compute-bound steps (both are paid once per decode step); their sum is what the data
   pins down, and it is what a simulated run of the same model depends on. A different model shape on a
   calibrated profile extrapolates through the rates.

`fit_profile` and `held_out_errors` need no device: the tests fit a committed set of recorded steps.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kunjax.config import ModelConfig
from kunjax.cost_model import CostModel, StageWork
from kunjax.executor import Executor, TickResult
from kunjax.hardware import HardwareProfile
from kunjax.plan import StepInputs, TickWork

FIT_SHARE = 0.7  # records used for fitting; the rest are held out
_BIG_RATE = 1e18  # a reference rate far above any fitted one, so efficiencies stay in (0, 1] while fitting


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One measured tick of a replica: what the plan made it compute, and how long it took."""

    work: StageWork
    seconds: float
    shape: str  # the scheduler shape it ran under ("S16-T128-MB32")

    def to_dict(self) -> dict[str, Any]:
        return {"work": self.work._asdict(), "seconds": self.seconds, "shape": self.shape}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepRecord:
        return cls(StageWork(**d["work"]), float(d["seconds"]), d["shape"])


class RecordingExecutor:
    """Wraps an executor; keeps what each replica tick computes (`StageWork`) for the step loop to time
    (`kunjax.executor` is the protocol)."""

    def __init__(self, inner: Executor, cost: CostModel):
        self.inner, self.cost = inner, cost
        self.num_instances, self.num_blocks = inner.num_instances, inner.num_blocks
        self.weight_bytes, self.load_seconds = inner.weight_bytes, inner.load_seconds
        self.works: list[StageWork] = []  # this step's replica ticks

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def launch(self, uid: int, work: TickWork, inputs: StepInputs | None) -> tuple[Any, TickWork]:
        return self.inner.launch(uid, work, inputs), work

    def collect(self, launched: tuple[Any, TickWork], leaving: bool) -> TickResult:
        handle, work = launched
        if len(work.stages) == 1:
            self.works.extend(self.cost.stage_work(1, work, leaving))
        return self.inner.collect(handle, leaving)


# ---- recording ------------------------------------------------------------------------------------------------
def grid(max_num_seqs: int, budget: int, max_model_len: int) -> list[tuple[int, int, int]]:
    """(requests, prompt tokens, output tokens) per workload: decodes at several batch sizes and contexts,
    prefills of one to three chunks."""
    out = []
    for rows in sorted({1, 2, max(max_num_seqs // 4, 1), max(max_num_seqs // 2, 1), max_num_seqs}):
        for ctx in sorted({8, max_model_len // 4, max_model_len // 2}):
            out.append((rows, ctx, 8))
    for chunks in (0.5, 1, 3):
        out.append((1, min(int(budget * chunks), max_model_len - 8), 2))
    return out


def record_steps(model: str, shapes: Sequence[dict[str, int]], *, dtype: str, repeats: int = 2, seed: int = 0,
                 devices=None, log=print) -> tuple[list[StepRecord], ModelConfig, str]:
    """Run `grid()` under each scheduler shape (`{"max_num_seqs", "max_num_batched_tokens", "max_model_len"}`)
    on one replica; returns the records, the model's config and the attention backend that ran."""
    import jax

    from kunjax.engine import LLMEngine, config_from_kwargs
    from kunjax.sampling_params import SamplingParams

    devices = devices or jax.devices()[:1]
    records: list[StepRecord] = []
    backend, cfg = "", None
    rng = np.random.default_rng(seed)
    for shape in shapes:
        ecfg = config_from_kwargs(num_instances=1, dtype=dtype, policy="recompute", **shape)
        engine = LLMEngine(model, ecfg, devices=devices[:1])
        cfg = engine.model_config
        backend = engine.executor.backend
        cost = CostModel(cfg, _placeholder(backend), dtype=dtype, tp=1, block_size=ecfg.block_size)
        rec = RecordingExecutor(engine.executor, cost)
        engine.executor = rec
        t0 = time.perf_counter()
        engine.warmup()
        tag = f"S{shape['max_num_seqs']}-T{shape['max_num_batched_tokens']}-MB{ecfg.max_blocks_per_seq(cfg)}"
        log(f"calibrate: {tag}: compiled in {time.perf_counter() - t0:.1f}s")
        work = grid(shape["max_num_seqs"], shape["max_num_batched_tokens"], ecfg.resolved_max_model_len(cfg))
        n = len(records)
        for r in range(repeats + 1):  # the first pass runs everything once, unrecorded
            for rows, ctx, out in work:
                params = SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True)
                for _ in range(rows):
                    engine.add_request(rng.integers(0, cfg.vocab_size, ctx).tolist(), params)
                while engine.has_unfinished():  # a step's time, host work included: what serving sees
                    rec.works.clear()
                    t0 = time.perf_counter()
                    engine.step()
                    if r > 0 and len(rec.works) == 1:  # one replica, one tick
                        records.append(StepRecord(rec.works[0], time.perf_counter() - t0, tag))
        log(f"calibrate: {tag}: {len(records) - n} steps recorded")
    return records, cfg, backend


def _placeholder(backend: str) -> HardwareProfile:
    """A profile whose rates are only placeholders: `stage_work` reads nothing from it but the read model."""
    return _profile_with(np.zeros(5), "table" if backend == "reference" else "kv", "float32")


def _describe(device) -> str:
    """The device in words; a CPU by its model name (/proc/cpuinfo) and core count."""
    import os

    if device.platform != "cpu":
        return f"{device.device_kind} ({device.platform})"
    model = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores (JAX CPU devices)"


# ---- microbenchmarks ------------------------------------------------------------------------------------------
def _best(fn, runs: int = 5) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def microbench(devices, dtypes: Sequence[str], mib: int = 64) -> dict[str, Any]:
    """Reference rates on `devices` (the first one, and the second for the link when there is one)."""
    import jax
    import jax.numpy as jnp

    d0 = devices[0]
    out: dict[str, Any] = {"peak_flops": {}}
    n = 2048 if d0.platform == "cpu" else 8192
    mm = jax.jit(lambda x: x @ x)
    for dt in dtypes:
        a = jax.device_put(jnp.ones((n, n), dt), d0)
        out["peak_flops"][dt] = 2 * n**3 / _best(lambda a=a: mm(a).block_until_ready())
    x = jax.device_put(jnp.ones((mib * 2**18,), jnp.float32), d0)  # mib MiB
    nbytes = x.size * 4
    cp = jax.jit(lambda v: v * 1.0)
    out["hbm_bytes_per_s"] = 2 * nbytes / _best(lambda: cp(x).block_until_ready())  # read + write
    out["host_bytes_per_s"] = nbytes / _best(lambda: np.asarray(cp(x)), 3)
    small = jax.device_put(jnp.ones((16,), jnp.float32), d0)
    out["host_latency_s"] = _best(lambda: np.asarray(small + 1), 20)
    if len(devices) > 1:
        out["link_bytes_per_s"] = nbytes / _best(lambda: jax.device_put(x, devices[1]).block_until_ready(), 3)
        out["link_latency_s"] = _best(lambda: jax.device_put(small, devices[1]).block_until_ready(), 20)
    return out


def measure_memory_ops(model: str, *, dtype: str, devices, repeats: int = 20, log=print) -> dict[str, Any]:
    """The real executor's memory operations of 1, 4 and 16 blocks (one compiled gather and scatter each) on
    `devices`: a transfer between two instances (when there are two devices), a swap out to and in from the host
    tier, a slot copy inside a pool. Per kind, a line `seconds = fixed + bytes / rate` through the best of
    `repeats` runs per size (the fixed part clipped at 0); `memory_op_overhead_s` is the median fixed part: the
    cost of issuing one operation, which bytes over bandwidth do not show on small copies."""
    import jax

    from kunjax.engine import LLMEngine, config_from_kwargs
    from kunjax.memory import kv_block_bytes
    from kunjax.plan import DropHost, SlotCopy, SwapIn, SwapOut, Transfer

    n_inst = 2 if len(devices) > 1 else 1
    ecfg = config_from_kwargs(num_instances=n_inst, dtype=dtype, policy="recompute", max_num_seqs=8,
                              max_num_batched_tokens=64)
    engine = LLMEngine(model, ecfg, devices=devices[:n_inst])
    ex = engine.executor
    sizes = [n for n in (1, 4, 16) if 2 * n + 1 < ex.num_blocks]
    block = kv_block_bytes(engine.model_config, ecfg.block_size, dtype, 1)
    reps = ex.replicas
    keys = itertools.count()

    def best(ops_of, sync) -> float:
        ex.apply(ops_of())  # compiles the copy size once
        jax.block_until_ready(sync())
        times = []
        for _ in range(repeats):
            ops = ops_of()
            t0 = time.perf_counter()
            ex.apply(ops)
            jax.block_until_ready(sync())
            times.append(time.perf_counter() - t0)
        return min(times)

    def swap_out(ids):
        key = f"calibrate-{next(keys)}"
        ex.apply([DropHost(0, k) for k in list(reps[0].host)])
        return [SwapOut(0, key, ids)]

    samples: dict[str, list[tuple[int, float]]] = {"swap_out": [], "swap_in": [], "slot_copy": []}
    if n_inst > 1:
        samples["transfer"] = []
    for n in sizes:
        src, dst = tuple(range(1, n + 1)), tuple(range(n + 1, 2 * n + 1))
        samples["swap_out"].append((n, best(lambda src=src: swap_out(src), lambda: list(reps[0].host.values()))))
        ex.apply([SwapOut(0, "calibrate-in", src)])
        samples["swap_in"].append((n, best(lambda dst=dst: [SwapIn(0, "calibrate-in", dst, keep=True)],
                                           lambda: reps[0].pool)))
        ex.apply([DropHost(0, "calibrate-in")])
        samples["slot_copy"].append((n, best(lambda src=src, dst=dst: [SlotCopy(0, src, dst, 1)],
                                             lambda: reps[0].pool)))
        if n_inst > 1:
            samples["transfer"].append((n, best(lambda src=src, dst=dst: [Transfer(0, 1, src, dst)],
                                                lambda: reps[1].pool)))
    ex.apply([DropHost(0, k) for k in list(reps[0].host)])
    kinds = {}
    for kind, pts in samples.items():
        x = np.array([n * block for n, _ in pts], float)
        y = np.array([t for _, t in pts])
        slope, fixed = np.polyfit(x, y, 1) if len(pts) > 1 else (0.0, y[0])
        kinds[kind] = {"fixed_s": max(float(fixed), 0.0), "bytes_per_s": float(1 / slope) if slope > 0 else None,
                       "seconds": {str(n): t for n, t in pts}}
        log(f"calibrate: {kind}: {1e6 * kinds[kind]['fixed_s']:.0f} us fixed per operation")
    return {"memory_op_overhead_s": float(np.median([k["fixed_s"] for k in kinds.values()])), "memory_ops": kinds}


def measure_parallelism(model: str, *, dtype: str, devices, profile: HardwareProfile, rows: int = 16,
                        max_prompt: int = 384, max_tokens: int = 64, log=print) -> dict[str, Any]:
    """How many devices' ticks run at once when `devices` share one host (JAX CPU devices), fitted on the engine's
    own steps: one replica per device, each given `rows` requests of mixed prompt (16 to `max_prompt` tokens) and
    output (8 to `max_tokens`) lengths at once, run to the end; each step's wall time is compared with what the
    simulator charges for it, `max(longest tick, sum of ticks / c)` with every tick from `profile`'s cost model,
    and `c` in [1, n] is the value with the smallest median |log(modelled / measured)|. A decode tick of a few
    rows leaves a core to another device's tick, a prefill tick's matmuls take both, and the engine's one host
    thread serves every unit in turn: one job of equal decode steps alone measured 1.5-1.7 on 2 cores, where the
    steps of a whole bench ran at about 1. Devices that do not share a host compute at once (0: not measured)."""
    if devices[0].platform != "cpu" or len(devices) < 2:
        return {}
    from kunjax.engine import LLMEngine, config_from_kwargs
    from kunjax.sampling_params import SamplingParams

    n = len(devices)
    engine = LLMEngine(model, config_from_kwargs(num_instances=n, dtype=dtype, policy="recompute"),
                       devices=devices)
    cost = CostModel(engine.model_config, profile, dtype=dtype, tp=1, block_size=engine.config.block_size)
    rec = engine.executor = RecordingExecutor(engine.executor, cost)
    engine.warmup()
    rng, vocab = np.random.default_rng(0), min(100, engine.model_config.vocab_size)
    steps: list[tuple[float, float, float]] = []  # per step: (measured, longest tick, sum of ticks)
    for job in range(2):  # the first warms the caches; the second is measured
        for _ in range(n * rows):
            prompt = rng.integers(1, vocab, size=int(rng.integers(16, max_prompt + 1))).tolist()
            engine.add_request(prompt, SamplingParams(max_tokens=int(rng.integers(8, max_tokens + 1)),
                                                      temperature=0.0, ignore_eos=True))
        while engine.has_requests():
            rec.works.clear()
            t0 = time.perf_counter()
            engine.step()
            if job and rec.works:
                ticks = [profile.step_overhead_s + cost.stage_seconds(*w) for w in rec.works]
                steps.append((time.perf_counter() - t0, max(ticks), sum(ticks)))
    measured, longest, total = (np.array(col) for col in zip(*steps, strict=True))

    def error(c: float) -> float:
        return float(np.median(np.abs(np.log(np.maximum(longest, total / c) / measured))))

    grid = np.round(np.arange(1.0, n + 1e-9, 0.01), 2)
    parallel = float(grid[int(np.argmin([error(c) for c in grid]))])
    log(f"calibrate: {n} devices on one host run {parallel:.2f} ticks at once ({len(steps)} steps of {n} replicas, "
        f"median error {100 * error(parallel):.1f}%; at 1: {100 * error(1.0):.1f}%)")
    return {"concurrent_devices": parallel, "parallel_fit": {"steps": len(steps), "devices": n,
                                                             "median_error": error(parallel),
                                                             "median_error_at_1": error(1.0)}}


# ---- fitting --------------------------------------------------------------------------------------------------
_PARAMS = ("large-GEMM FLOP/s", "matmul_half_tokens", "weight-streaming bytes/s", "attention-read bytes/s",
           "step_overhead_s")


def _profile_with(theta: np.ndarray, reads: str, dtype: str) -> HardwareProfile:
    """A fitting-time profile: rates against `_BIG_RATE`, so every efficiency is the fitted rate's share of it."""
    flops, half, weights, attn, step = (float(v) for v in np.exp(theta))
    return HardwareProfile(
        name="fitting", device="", kind="measured", memory_bytes=1, peak_flops={dtype: _BIG_RATE},
        hbm_bytes_per_s=_BIG_RATE, matmul_efficiency=min(flops / _BIG_RATE, 1.0), matmul_half_tokens=half,
        memory_efficiency=min(weights / _BIG_RATE, 1.0), attention_efficiency=min(attn / _BIG_RATE, 1.0),
        link_bytes_per_s=1.0, link_latency_s=0.0, network_bytes_per_s=1.0, host_bytes_per_s=1.0,
        host_latency_s=0.0, step_overhead_s=step, layer_overhead_s=0.0, transition_overhead_s=0.0,
        attention_reads=reads, sources=dict.fromkeys(HardwareProfile.coefficients(), "fitting"))


def predict(cost: CostModel, records: Sequence[StepRecord]) -> np.ndarray:  # [N] seconds
    return np.array([cost.profile.step_overhead_s + cost.stage_seconds(*r.work) for r in records])


def split(records: Sequence[StepRecord], seed: int = 0) -> tuple[list[StepRecord], list[StepRecord]]:
    """A deterministic (fit, held-out) split: each scheduler shape's records shuffled with `seed`."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for shape in sorted({r.shape for r in records}):
        rs = [r for r in records if r.shape == shape]
        order = rng.permutation(len(rs))
        cut = int(round(FIT_SHARE * len(rs)))
        fit += [rs[i] for i in order[:cut]]
        held += [rs[i] for i in order[cut:]]
    return fit, held


def fit_coefficients(cfg: ModelConfig, records: Sequence[StepRecord], *, dtype: str, block_size: int,
                     reads: str) -> tuple[dict[str, float], float]:
    """The five rates and overheads that best explain `records` (robust least squares on log error); returns
    them by name and the fit's median relative error on `records`."""
    from scipy.optimize import least_squares

    measured = np.array([r.seconds for r in records])
    if len(records) < len(_PARAMS) or not (measured > 0).all():
        raise ValueError(f"need at least {len(_PARAMS)} records with positive times, got {len(records)}")

    def residuals(theta: np.ndarray) -> np.ndarray:
        cost = CostModel(cfg, _profile_with(theta, reads, dtype), dtype=dtype, tp=1, block_size=block_size)
        return np.log(predict(cost, records) / measured)

    small = float(np.percentile(measured, 5))
    theta0 = np.log([1e11, 32.0, 1e10, 1e10, small / 2])
    sol = least_squares(residuals, theta0, loss="soft_l1", f_scale=0.1, x_scale=1.0,
                        bounds=(np.log([1e6, 1.0, 1e6, 1e6, 1e-7]), np.log([1e17, 1e5, 1e17, 1e17, 10.0])))
    values = dict(zip(_PARAMS, (float(v) for v in np.exp(sol.x)), strict=True))
    return values, float(np.median(np.abs(np.expm1(residuals(sol.x)))))


def relative_errors(profile: HardwareProfile, cfg: ModelConfig, records: Sequence[StepRecord], *, dtype: str,
                    block_size: int) -> np.ndarray:  # [N] (predicted - measured) / measured
    cost = CostModel(cfg, profile, dtype=dtype, tp=1, block_size=block_size)
    measured = np.array([r.seconds for r in records])
    return predict(cost, records) / measured - 1


def fit_profile(cfg: ModelConfig, records: Sequence[StepRecord], *, dtype: str, block_size: int, reads: str,
                rates: dict[str, Any], base: HardwareProfile, name: str, device: str,
                seed: int = 0) -> tuple[HardwareProfile, dict[str, Any]]:
    """Fit on the fitting share of `records`, check on the rest; the profile's reference rates are `rates`
    (`microbench`), its memory, links and transition cost `base`'s where not measured. Returns the profile and a
    report (errors, counts, the fitted values)."""
    fit, held = split(records, seed)
    values, fit_err = fit_coefficients(cfg, fit, dtype=dtype, block_size=block_size, reads=reads)
    peak = dict(rates["peak_flops"])
    gemm = values["large-GEMM FLOP/s"]
    peak[dtype] = max(peak.get(dtype, gemm), gemm)
    hbm = max(rates["hbm_bytes_per_s"], values["weight-streaming bytes/s"], values["attention-read bytes/s"])
    when = datetime.date.today().isoformat()
    fitted = (f"fitted by kunjax calibrate on {device}, {when}: {len(fit)} measured steps of the engine, "
              f"held-out median error {{err}}")
    measured = f"measured by kunjax calibrate on {device}, {when}"
    sources = dict(base.sources)
    changes: dict[str, Any] = dict(
        name=name, device=device, kind="measured", peak_flops=peak, hbm_bytes_per_s=hbm,
        matmul_efficiency=gemm / peak[dtype], matmul_half_tokens=values["matmul_half_tokens"],
        memory_efficiency=values["weight-streaming bytes/s"] / hbm,
        attention_efficiency=values["attention-read bytes/s"] / hbm,
        step_overhead_s=values["step_overhead_s"], layer_overhead_s=0.0, attention_reads=reads)
    for key in ("host_bytes_per_s", "host_latency_s", "link_bytes_per_s", "link_latency_s"):
        if key in rates:
            changes[key] = rates[key]
            sources[key] = f"{measured}: best of a few transfers"
    if "memory_op_overhead_s" in rates:
        changes["memory_op_overhead_s"] = rates["memory_op_overhead_s"]
        per_kind = ", ".join(f"{k} {1e6 * v['fixed_s']:.0f} us" for k, v in rates["memory_ops"].items())
        sources["memory_op_overhead_s"] = (f"{measured}: the executor's own memory operations of 1 to 16 blocks, the "
                                           f"median fixed part of seconds = fixed + bytes / rate ({per_kind})")
    sources["peak_flops"] = (f"{measured}: the best of 5 square GEMMs per dtype ({dtype}: at least the fitted "
                             f"large-GEMM rate)")
    sources["hbm_bytes_per_s"] = f"{measured}: a device copy (read + write), or the fitted rates if higher"
    sources["layer_overhead_s"] = ("not separable from step_overhead_s when one model is measured: folded into "
                                   "it (0)")
    sources["attention_reads"] = f"the attention backend that ran here: {reads!r}"
    if "concurrent_devices" in rates:
        changes["concurrent_devices"] = rates["concurrent_devices"]
        pf = rates.get("parallel_fit")
        sources["concurrent_devices"] = (
            f"{measured}: JAX CPU devices share this host's cores; fitted on {pf['steps']} engine steps of "
            f"{pf['devices']} replicas at once (mixed prefills and decodes), each step's time against max(longest "
            f"tick, sum of ticks / c) with this profile's ticks: median error {100 * pf['median_error']:.1f}% "
            f"({100 * pf['median_error_at_1']:.1f}% at c = 1)" if pf else
            f"{measured}: the same decode steps on 1 replica and on n at once, n * t1 / tn (a recording made before "
            f"this fit existed)" if "parallel_steps" in rates else
            "JAX CPU devices share this host's cores and a tick already uses them all (intra-op threads): their "
            "ticks take turns")
    prof = dataclasses.replace(base, **changes, sources=sources)
    held_err = np.abs(relative_errors(prof, cfg, held, dtype=dtype, block_size=block_size))
    summary = f"{100 * np.median(held_err):.1f}% (P90 {100 * np.percentile(held_err, 90):.1f}%)"
    for key in ("peak_flops", "matmul_efficiency", "matmul_half_tokens", "memory_efficiency",
                "attention_efficiency", "step_overhead_s"):
        sources[key] = fitted.format(err=summary) if key != "peak_flops" else sources[key]
    prof = dataclasses.replace(prof, sources=sources)
    report = {"fitted": values, "fit_steps": len(fit), "held_out_steps": len(held),
              "fit_median_error": fit_err, "held_out_median_error": float(np.median(held_err)),
              "held_out_p90_error": float(np.percentile(held_err, 90)), "rates": rates}
    return prof, report


def save_records(path: str | Path, cfg: ModelConfig, records: Sequence[StepRecord], meta: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps({"model": dataclasses.asdict(cfg), "meta": meta,
                                      "records": [r.to_dict() for r in records]}, indent=None) + "\n")


def load_records(path: str | Path) -> tuple[ModelConfig, list[StepRecord], dict[str, Any]]:
    d = json.loads(Path(path).read_text())
    model = d["model"]
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})
    return cfg, [StepRecord.from_dict(r) for r in d["records"]], d["meta"]


# ---- the command ----------------------------------------------------------------------------------------------
def scheduler_shapes(platform: str) -> list[dict[str, int]]:
    """Two scheduler shapes per platform (fitted and held-out steps come from both)."""
    if platform == "cpu":
        return [dict(max_num_seqs=16, max_num_batched_tokens=128, max_model_len=256),
                dict(max_num_seqs=32, max_num_batched_tokens=256, max_model_len=512)]
    return [dict(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=2048),
            dict(max_num_seqs=128, max_num_batched_tokens=2048, max_model_len=4096)]


def base_profile(device, name: str) -> HardwareProfile:
    """What calibration does not measure (memory size, network, the fuse/split overhead) comes from here: the
    bundled spec profile of this GPU or TPU kind, or stated assumptions for a CPU."""
    import os

    from kunjax.hardware import bundled_profiles, load_profile

    kind = str(getattr(device, "device_kind", "")).lower().replace(" ", "")
    for known in bundled_profiles():
        if known.split("-")[0].replace("tpu", "") in kind and device.platform != "cpu":
            return load_profile(known)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assumed = "assumed for CPU devices (one host's memory, simulated devices): "
    sources = {
        "memory_bytes": "os.sysconf: this host's physical memory, shared by its simulated devices",
        "network_bytes_per_s": assumed + "no network between simulated devices; as the link",
        "transition_overhead_s": assumed + "5 ms to rebuild a unit at a fuse or split (not measured)",
        "concurrent_devices": assumed + "their ticks take turns (1; measured when calibrating on several devices)",
    }
    sources.update({k: "replaced by calibration" for k in HardwareProfile.coefficients() if k not in sources})
    return HardwareProfile(
        name=name, device=str(device), kind="measured", memory_bytes=mem, peak_flops={"float32": 1.0},
        hbm_bytes_per_s=1.0, matmul_efficiency=1.0, matmul_half_tokens=1.0, memory_efficiency=1.0,
        attention_efficiency=1.0, link_bytes_per_s=1e10, link_latency_s=1e-5, network_bytes_per_s=1e10,
        host_bytes_per_s=1e10, host_latency_s=1e-5, step_overhead_s=0.0, layer_overhead_s=0.0,
        transition_overhead_s=5e-3, concurrent_devices=1, sources=sources)


def add_calibrate_arguments(p) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="profile JSON to write (default: kunjax-profile-<name>.json here)")
    p.add_argument("--name", default=None, help="the profile's name (default: the platform, e.g. cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the engine dtype the steps run in (default: float32)")
    p.add_argument("--repeats", type=int, default=2, help="recorded passes over the grid (default: 2)")
    p.add_argument("--records", type=Path, default=None,
                   help="also write the recorded steps (features and seconds) as JSON, to refit without a device")
    p.add_argument("--from-records", type=Path, default=None,
                   help="fit recorded steps (a --records file) instead of running the engine (no device needed; "
                        "the reference rates then come from that file)")
    p.add_argument("--plot", type=Path, default=None, help="scatter plot of predicted vs measured step times")


def cmd_calibrate(parser, args) -> int:
    from kunjax.options import configure_jax

    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.from_records is not None:
        if not args.from_records.is_file():
            parser.error(f"--from-records: no such file {args.from_records}")
        cfg, records, meta = load_records(args.from_records)
        rates, reads, device, dtype = meta["rates"], meta["attention_reads"], meta["device"], meta["dtype"]
        block_size = int(meta.get("block_size", 16))
        name = args.name or meta["name"]
        base = HardwareProfile.from_dict(meta["base_profile"])
    else:
        jax = configure_jax(parser, args)
        devices = jax.devices()
        name, dtype = args.name or devices[0].platform, args.dtype
        device = _describe(devices[0])
        from kunjax.config import ConfigError
        from kunjax.options import flag_message

        try:
            records, cfg, backend = record_steps(args.model, scheduler_shapes(devices[0].platform), dtype=dtype,
                                                 repeats=args.repeats, devices=devices)
        except (ConfigError, ValueError, FileNotFoundError) as e:
            parser.error(f"--model {args.model}: {flag_message(str(e))}")
        reads = "table" if backend == "reference" else "kv"
        block_size = 16  # the engine's default, which record_steps runs with
        print(f"calibrate: microbenchmarks on {device}")
        rates = microbench(devices, sorted({"float32", dtype}))
        rates |= measure_memory_ops(args.model, dtype=dtype, devices=devices)
        base = base_profile(devices[0], name)
    profile, report = fit_profile(cfg, records, dtype=dtype, block_size=block_size, reads=reads, rates=rates,
                                  base=base, name=name, device=device)
    if args.from_records is None:  # how the devices share the host, with the fitted ticks (then the same fit)
        parallel = measure_parallelism(args.model, dtype=dtype, devices=devices, profile=profile)
        if parallel:
            rates |= parallel
            profile, report = fit_profile(cfg, records, dtype=dtype, block_size=block_size, reads=reads,
                                          rates=rates, base=base, name=name, device=device)
    out = args.out or Path(f"kunjax-profile-{name}.json")
    profile.save(out)
    if args.records is not None:
        save_records(args.records, cfg, records, {"rates": rates, "attention_reads": reads, "device": device,
                                                  "dtype": dtype, "name": name, "block_size": block_size,
                                                  "base_profile": base.to_dict()})
    print(f"{'coefficient':24} value")
    for key in ("peak_flops", "matmul_efficiency", "matmul_half_tokens", "hbm_bytes_per_s", "memory_efficiency",
                "attention_efficiency", "attention_reads", "step_overhead_s", "link_bytes_per_s",
                "host_bytes_per_s", "memory_op_overhead_s", "concurrent_devices"):
        v = getattr(profile, key)
        print(f"{key:24} {json.dumps(v) if isinstance(v, dict | str) else f'{v:.4g}'}")
    print(f"fit on {report['fit_steps']} steps (median error {100 * report['fit_median_error']:.1f}%); held out "
          f"{report['held_out_steps']}: median {100 * report['held_out_median_error']:.1f}%, P90 "
          f"{100 * report['held_out_p90_error']:.1f}%")
    if args.plot is not None:
        plot_fit(profile, cfg, records, args.plot, dtype=dtype, block_size=block_size)
    print(f"wrote {out}" + (f", {args.records}" if args.records else ""))
    return 0


def plot_fit(profile: HardwareProfile, cfg: ModelConfig, records: Sequence[StepRecord], path: Path, *,
             dtype: str, block_size: int = 16) -> bool:
    """Predicted vs measured step time, fitted and held-out steps apart; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("calibrate: matplotlib cannot be imported (a dependency of kunjax: reinstall it); no plot")
        return False
    fit, held = split(records)
    cost = CostModel(cfg, profile, dtype=dtype, tp=1, block_size=block_size)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for part, label, marker in ((fit, "fitted", "."), (held, "held out", "x")):
        ms = 1e3 * np.array([r.seconds for r in part])
        ax.scatter(ms, 1e3 * predict(cost, part), s=12, marker=marker, label=f"{label} ({len(part)})")
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="predicted = measured")
    ax.set(xlabel="measured step time (ms)", ylabel="predicted (ms)", xscale="log", yscale="log",
           title=f"cost model vs the engine's steps: {profile.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
