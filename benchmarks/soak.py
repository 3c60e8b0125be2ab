"""Soak: the serving stack (`EngineThread` + gRPC over loopback + the real engine on 2 CPU devices, the tiny test
model) under bursty traffic with random cancels, disconnects and deadlines, under `--policy kunserve` with
repeated drops and restores.

    python benchmarks/soak.py --minutes 30 --out soak.json     # the benchmark
    (tests/e2e/test_soak.py runs it for a minute in CI)

Traffic alternates bursts (`burst_streams` concurrent streams for `phase_s`) and lulls (one stream), so the pool
overloads and kunserve fuses the two instances, then recovers and restores them. Each stream picks, at random:
run to the end, cancel after a few tokens, close its channel mid-stream (a disconnect), or a deadline shorter
than its generation. Every second it samples the process's RSS and thread count.

It reports (and `check` asserts): every stream ended with a final message or an expected status (CANCELLED,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED; never INTERNAL or UNKNOWN, never a hang); afterwards the engine is idle
with its books balanced and nothing held; drops happened and each was restored; the live device buffers are
what they were before the traffic; the thread count is bounded by a constant, not by streams; and the RSS slope
over the second half of the run (MiB per minute; reported, and bounded loosely in `check`: this machine is
shared).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def device_bytes() -> int:
    """Bytes of the live device buffers: every shard counted where it lives (a replicated array's `nbytes`
    counts it once), and each buffer once (two arrays may alias one buffer: a `device_put` to the device an array
    is already on returns a view of it)."""
    import jax

    seen: dict[tuple[str, int], int] = {}
    for a in jax.live_arrays():
        for sh in a.addressable_shards:
            seen[(str(sh.device), sh.data.unsafe_buffer_pointer())] = sh.data.nbytes
    return sum(seen.values())


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) pairs, per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 60 * sum((t - mt) * (v - mv) for t, v in samples) / var if var else 0.0


def run(duration_s: float, *, seed: int = 0, burst_streams: int = 24, phase_s: float = 3.0,
        model_dir: Path | None = None, log=print) -> dict:
    import grpc
    import jax

    from kunjax.engine import LLMEngine, config_from_kwargs
    from serving.client import AsyncKunjaxClient, KunjaxClient
    from serving.server import serve
    from tests.helpers import started, write_tiny_model

    model_dir = model_dir or write_tiny_model(Path(tempfile.mkdtemp(prefix="kunjax-soak-")))
    cfg = config_from_kwargs(num_instances=2, policy="kunserve", num_blocks=48, max_num_seqs=8,
                             max_num_batched_tokens=64, block_size=4, max_model_len=128, restore_window_steps=20,
                             min_group_steps=10)
    engine = LLMEngine(model_dir, cfg, devices=jax.devices()[:2])
    rt = started(engine)
    handle = serve(rt, metrics_port=None)
    control = KunjaxClient(handle.target, timeout_s=30)
    gc.collect()  # what warm-up left for the collector is not the engine's
    live0 = device_bytes()
    threads0 = threading.active_count()
    samples: list[tuple[float, float, int]] = []  # (t, rss MiB, threads)
    outcomes: collections.Counter[str] = collections.Counter()
    t0 = time.monotonic()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append((time.monotonic() - t0, rss_mib(), threading.active_count()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def one(client: AsyncKunjaxClient, rng: random.Random) -> None:
        action = rng.choice(("finish", "finish", "cancel", "disconnect", "deadline"))
        prompt = [rng.randrange(1, 90) for _ in range(rng.randint(4, 40))]  # the tiny model has 97 ids
        tokens = rng.randint(8, 60)
        own = AsyncKunjaxClient(handle.target, timeout_s=None) if action == "disconnect" else None
        c = own or client
        call = c.generate(prompt, max_tokens=tokens, temperature=0.0, ignore_eos=True,
                          timeout_s=rng.uniform(0.05, 0.5) if action == "deadline" else 120.0)
        stop_after = rng.randint(1, 5)
        seen = 0
        try:
            async for resp in call:
                seen += 1
                if resp.finish_reason:
                    outcomes["finished"] += 1
                    return
                if action in ("cancel", "disconnect") and seen >= stop_after:
                    if action == "cancel":
                        call.cancel()
                        outcomes["cancelled"] += 1
                    else:
                        await own.channel.close(grace=None)
                        outcomes["disconnected"] += 1
                    return
            outcomes["ended without a final message"] += 1
        except grpc.aio.AioRpcError as e:
            outcomes[e.code().name] += 1
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
        finally:
            if own is not None:
                await own.channel.close(grace=None)

    async def worker(client: AsyncKunjaxClient, r: random.Random, until: float) -> None:
        while time.monotonic() < until:
            await one(client, r)

    async def traffic() -> None:
        rng = random.Random(seed)
        async with AsyncKunjaxClient(handle.target, timeout_s=120) as client:
            end = time.monotonic() + duration_s
            phase = 0
            while time.monotonic() < end:
                streams = burst_streams if phase % 2 == 0 else 1
                phase_end = min(time.monotonic() + phase_s, end)
                await asyncio.gather(*(worker(client, random.Random(rng.random()), phase_end)
                                       for _ in range(streams)))
                phase += 1

    try:
        asyncio.run(traffic())
        # Quiet: everything finishes, the groups restore (their restore window passes on idle steps).
        quiet = time.monotonic() + 120
        while time.monotonic() < quiet:
            status = control.policy_status()
            if status.counters["groups"] == 0 and all(not (x.running or x.waiting or x.kv_used)
                                                      for x in control.load()):
                break
            time.sleep(0.1)
        with rt._lock:
            engine.check_books()
            held = sum(u.stages[0].num_used for u in engine.units.values() if u.k == 1)
            groups = len(engine.groups)
            gc.collect()
            # idle again, every replica whole; less the host tier's copies of spilled prefix blocks (a CPU device
            # has no pinned host memory: they are device arrays there), which the books account for
            host = sum(p.nbytes for rep in engine.executor.replicas for parts in rep.host.values() for p in parts)
            live1 = device_bytes() - host
        counters = dict(control.policy_status().counters)
    finally:
        stop.set()
        sampler.join(timeout=5)
        control.close()
        handle.stop(grace=1.0)
        rt.shutdown(grace_s=5)
    half = [(t, r) for t, r, _ in samples if t >= duration_s / 2]
    report = {
        "duration_s": duration_s, "outcomes": dict(outcomes), "streams": sum(outcomes.values()),
        "drops": counters.get("drops", 0), "restores": counters.get("restores", 0), "groups_left": groups,
        "blocks_held_after": held, "live_device_bytes_before": live0, "live_device_bytes_after": live1,
        "threads_before": threads0, "threads_max": max((n for _, _, n in samples), default=threads0),
        "rss_mib_start": samples[0][1] if samples else float("nan"),
        "rss_mib_end": samples[-1][1] if samples else float("nan"),
        "rss_slope_mib_per_min_second_half": slope_per_minute(half),
    }
    log(json.dumps(report, indent=1))
    return report


EXPECTED = {"finished", "cancelled", "disconnected", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED"}


def check(report: dict, *, max_threads_over: int = 40, max_rss_slope: float = 60.0) -> list[str]:
    """What is wrong with a soak's report (empty: it passed)."""
    bad = []
    unexpected = {k: v for k, v in report["outcomes"].items() if k not in EXPECTED}
    if unexpected:
        bad.append(f"streams ended badly: {unexpected}")
    if report["outcomes"].get("finished", 0) == 0:
        bad.append("no stream finished")
    if report["drops"] < 1 or report["restores"] != report["drops"] or report["groups_left"]:
        bad.append(f"drops {report['drops']}, restores {report['restores']}, groups left {report['groups_left']}")
    if report["blocks_held_after"]:
        bad.append(f"{report['blocks_held_after']} blocks still held when idle")
    if report["live_device_bytes_after"] != report["live_device_bytes_before"]:
        bad.append(f"live device bytes {report['live_device_bytes_before']} -> {report['live_device_bytes_after']}")
    if report["threads_max"] - report["threads_before"] > max_threads_over:
        bad.append(f"threads grew from {report['threads_before']} to {report['threads_max']}")
    if report["rss_slope_mib_per_min_second_half"] > max_rss_slope:
        bad.append(f"RSS grows {report['rss_slope_mib_per_min_second_half']:.1f} MiB/min")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the report here as JSON")
    args = p.parse_args(argv)
    if not args.minutes > 0:
        p.error(f"--minutes must be positive, got {args.minutes}")
    import os

    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    report = run(60 * args.minutes, seed=args.seed)
    bad = check(report)
    report["problems"] = bad
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("soak passed" if not bad else "soak FAILED:\n" + "\n".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
