"""Outside probe of `kunjax serve`: the defects of issue 17 re-checked from outside the test suite, at the scale of
the probe that found them (1,000 concurrent streams).

    python benchmarks/probe.py --out probe.json          # about 5 minutes on 2 cores

Starts `kunjax serve` as its own process (the demo model; `--serve-args` adds flags) with a bearer token, talks to
it only over loopback gRPC and signals, and prints one line per check: what was measured, the bar, and whether it
held. The checks:

1. a rejected 4 MB text prompt stalls the other streams' tokens by less than one step (their largest gap while it
   is refused, less their median gap, is below that median);
2. `GetLoad` and `Abort` answer within 100 ms while 1,000 streams are being admitted;
3. 600 of them cancelled at once leave the engine within a second (its running + waiting requests drop by 600);
4. the server's threads while 1,000 streams are open exceed its idle threads by a constant, not by streams;
5. once every stream is gone, no KV block is held;
6. a 1 MB request id and an empty text prompt get INVALID_ARGUMENT with a short message; an id reused right after
   its stream was cancelled is accepted (50 times);
7. a wrong authorization scheme gets UNAUTHENTICATED and its message does not echo the credential;
8. a request message over the 4 MiB limit gets RESOURCE_EXHAUSTED without the `retry-after-s` entry (so it is
   not mistaken for overload);
9. health reads NOT_SERVING (for "", the service and JetStream's name) within 100 ms of SIGTERM while streams are
   in flight, and a second SIGTERM ends the drain at once;
10. SIGTERM during warm-up exits cleanly (no "Task was destroyed but it is pending").

Timing bars are wall-clock figures on a shared machine: the report keeps the measurements so a miss can be told
from noise by rerunning.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from serving._generated.kunjax.serving.v2 import generate_pb2 as pb  # noqa: E402
from serving._generated.kunjax.serving.v2 import generate_pb2_grpc as pb_grpc  # noqa: E402

TOKEN = "kjtok-probe-secret-0123456789"
SERVICES = ("", "kunjax.serving.v2.KunjaxService", "jetstream_proto.Orchestrator")
results: list[dict] = []


def record(name: str, held: bool, measured: str, bar: str, **data) -> None:
    results.append({"check": name, "held": held, "measured": measured, "bar": bar, **data})
    print(f"[{'ok' if held else 'MISS'}] {name}: {measured} (bar: {bar})", flush=True)


class Server:
    def __init__(self, port: int, token_file: Path, extra: list[str]):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 (lives with the process)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kunjax", "serve", "--port", str(port), "--auth-token-file", str(token_file),
             "--max-queued", "2000", "--grace-s", "30", *extra],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.target = f"127.0.0.1:{port}"

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()


def metadata() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKEN}"),)


async def wait_serving(target: str, timeout_s: float = 900) -> float:
    t0 = time.monotonic()
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() - t0 < timeout_s:
            try:
                if (await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)).status == 1:
                    return time.monotonic() - t0
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("the server never became SERVING")


def generate(stub, prompt, max_tokens: int, request_id: str = ""):
    req = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return stub.Generate(req, metadata=metadata())


async def stream_times(stub, prompt, max_tokens: int, times: list[float]) -> None:
    async for resp in generate(stub, prompt, max_tokens):
        if resp.token_ids:
            times.append(time.monotonic())


def send_huge_prompt(target: str, go, done, out) -> None:
    """In its own process, ready before `go` and exiting after `done` (its start-up and exit would compete for
    this machine's cores inside the measured window): one 4 MB text prompt; puts (sent, answered, status) on
    `out`."""
    with grpc.insecure_channel(target) as ch:
        data = pb.GenerateRequest(text="x" * 4_000_000, sampling=pb.SamplingParams(max_tokens=4)).SerializeToString()
        call = ch.unary_stream("/kunjax.serving.v2.KunjaxService/Generate", request_serializer=lambda _: data,
                               response_deserializer=pb.GenerateResponse.FromString)
        grpc.channel_ready_future(ch).result(timeout=30)
        go.wait()
        t0 = time.monotonic()
        code = ""
        try:
            for _ in call(None, metadata=metadata(), timeout=60):
                pass
        except grpc.RpcError as e:
            code = e.code().name
        out.put((t0, time.monotonic(), code))
        done.wait(timeout=60)


async def probe_stall(stub, target: str) -> None:
    """Check 1: the other streams' token gaps while a 4 MB prompt is refused."""
    # sent from its own process: building and sending 4 MB here would stall this loop, which times the streams
    ctx = multiprocessing.get_context("spawn")
    go, done, queue = ctx.Event(), ctx.Event(), ctx.Queue()
    sender = ctx.Process(target=send_huge_prompt, args=(target, go, done, queue))
    sender.start()
    await asyncio.sleep(5)  # its interpreter is up and connected
    streams = [[] for _ in range(8)]
    tasks = [asyncio.create_task(stream_times(stub, [5 + i, 17, 29, 41], 400, t)) for i, t in enumerate(streams)]
    await asyncio.sleep(4)
    go.set()
    t_send, t_reply, code_name = await asyncio.get_running_loop().run_in_executor(None, queue.get, True, 120)
    code = grpc.StatusCode[code_name] if code_name else None
    await asyncio.sleep(2)
    done.set()
    sender.join(timeout=30)
    for t in tasks:
        t.cancel()
    gaps_before, gaps_during = [], []
    for ts in streams:
        for a, b in zip(ts, ts[1:], strict=False):
            if b < t_send - 0.5:
                gaps_before.append(b - a)
            elif a <= t_reply + 0.5 and b >= t_send:
                gaps_during.append(b - a)
    step = statistics.median(gaps_before)
    worst = max(gaps_during, default=0.0)
    record("rejected 4 MB prompt: other streams' stall", code == grpc.StatusCode.INVALID_ARGUMENT
           and worst - step < step,
           f"{code.name if code else 'accepted'} in {(t_reply - t_send) * 1e3:.0f} ms; largest gap meanwhile "
           f"{worst * 1e3:.0f} ms vs median {step * 1e3:.0f} ms", "stall < one step (largest gap - median < median)",
           worst_gap_s=worst, median_gap_s=step, reject_s=t_reply - t_send)


def control_latency(target: str, stop, out) -> None:
    """In its own process (the probe's event loop is busy with 1,000 streams): GetLoad and Abort every 20 ms,
    timed, until `stop` is set; the latencies go to `out` as {name: [seconds]}."""
    lat: dict[str, list[float]] = {"GetLoad": [], "Abort": []}
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.KunjaxServiceStub(ch)
        calls = {"GetLoad": lambda: stub.GetLoad(pb.GetLoadRequest(), metadata=metadata(), timeout=10),
                 "Abort": lambda: stub.Abort(pb.AbortRequest(request_id="nobody"), metadata=metadata(), timeout=10)}
        while not stop.is_set():
            for name, call in calls.items():
                t0 = time.monotonic()
                call()
                lat[name].append(time.monotonic() - t0)
            time.sleep(0.02)
    out.put(lat)


async def in_engine(stub) -> int:
    load = await stub.GetLoad(pb.GetLoadRequest(), metadata=metadata(), timeout=10)
    return sum(x.running + x.waiting for x in load.instances)


async def probe_thousand(server: Server, stubs, control) -> None:
    """Checks 2-5: 1,000 streams admitted (control calls meanwhile), 600 cancelled, threads, nothing left."""
    idle_threads = server.threads()
    n = 1000
    first = [asyncio.Event() for _ in range(n)]

    async def one(i: int) -> None:
        async for resp in generate(stubs[i % len(stubs)], [3 + i % 50, 11, 23, 37, 41], 1000):  # none ends first
            if resp.token_ids:
                first[i].set()

    ctx = multiprocessing.get_context("spawn")
    stop, queue = ctx.Event(), ctx.Queue()
    watcher = ctx.Process(target=control_latency, args=(server.target, stop, queue))
    watcher.start()
    await asyncio.sleep(3)  # the watcher's interpreter is up
    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    t0 = time.monotonic()
    while await in_engine(control) < n and time.monotonic() - t0 < 120:
        await asyncio.sleep(0.05)
    admitted_s = time.monotonic() - t0
    stop.set()
    lat = queue.get(timeout=60)
    watcher.join(timeout=30)
    peak_threads = server.threads()
    for name, xs in lat.items():
        record(f"{name} while 1,000 streams are admitted", max(xs) < 0.1,
               f"{len(xs)} calls, max {max(xs) * 1e3:.0f} ms, median {statistics.median(xs) * 1e3:.1f} ms "
               f"(admission took {admitted_s:.1f} s)", "< 100 ms", latencies_s=xs)
    record("threads with 1,000 open streams", peak_threads - idle_threads <= 64,
           f"{peak_threads} threads (idle {idle_threads})", "idle + a constant (64), not one per stream",
           peak=peak_threads, idle=idle_threads)
    before = await in_engine(control)
    t_cancel = time.monotonic()
    for t in tasks[:600]:
        t.cancel()
    while await in_engine(control) > before - 600 and time.monotonic() - t_cancel < 30:
        await asyncio.sleep(0.01)
    freed_s = time.monotonic() - t_cancel
    record("600 cancelled streams leave the engine", freed_s < 1.0, f"{freed_s * 1e3:.0f} ms", "< 1 s",
           seconds=freed_s)
    for t in tasks[600:]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        load = await control.GetLoad(pb.GetLoadRequest(), metadata=metadata(), timeout=10)
        if all(x.kv_used == 0 and x.running == 0 and x.waiting == 0 for x in load.instances):
            break
        await asyncio.sleep(0.1)
    used = sum(x.kv_used for x in load.instances)
    record("KV blocks held once every stream is gone", used == 0, f"{used} blocks", "0")


async def expect_code(call, code: grpc.StatusCode) -> tuple[bool, str, tuple]:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code() == code, e.details() or "", tuple(await call.trailing_metadata() or ())
    return False, "accepted", ()


async def probe_inputs(stub, target: str) -> None:
    """Checks 6-8."""
    ok, msg, _ = await expect_code(generate(stub, [1, 2, 3], 4, request_id="i" * 1_000_000),
                                   grpc.StatusCode.INVALID_ARGUMENT)
    record("1 MB request id", ok and len(msg) < 300, f"{len(msg)}-character message: {msg[:80]!r}",
           "INVALID_ARGUMENT, short message")
    ok, msg, _ = await expect_code(generate(stub, "", 4), grpc.StatusCode.INVALID_ARGUMENT)
    record("empty text prompt", ok, repr(msg), "INVALID_ARGUMENT")
    failures = 0
    for i in range(50):
        call = generate(stub, [7, 8, 9], 50, request_id=f"reuse-{i % 3}")
        async for resp in call:
            if resp.token_ids:
                break
        call.cancel()
        again = generate(stub, [7, 8, 9], 2, request_id=f"reuse-{i % 3}")
        try:
            async for _ in again:
                pass
        except grpc.aio.AioRpcError:
            failures += 1
    record("an id reused right after its stream was cancelled", failures == 0, f"{failures} of 50 refused", "0")
    async with grpc.aio.insecure_channel(target) as ch:
        bad = pb_grpc.KunjaxServiceStub(ch)
        try:
            await bad.GetLoad(pb.GetLoadRequest(), metadata=(("authorization", f"Basic {TOKEN}"),), timeout=10)
            code, msg = grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as e:
            code, msg = e.code(), e.details() or ""
    record("wrong authorization scheme", code == grpc.StatusCode.UNAUTHENTICATED and TOKEN not in msg
           and "Basic" not in msg, f"{code.name}: {msg!r}", "UNAUTHENTICATED, the credential not echoed")
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        big = pb_grpc.KunjaxServiceStub(ch)
        ok, msg, trailer = await expect_code(generate(big, "y" * (5 << 20), 4), grpc.StatusCode.RESOURCE_EXHAUSTED)
    retry = [v for k, v in trailer if k == "retry-after-s"]
    record("a 5 MiB request message", ok and not retry, f"{msg!r}, retry-after-s {retry or 'absent'}",
           "RESOURCE_EXHAUSTED without retry-after-s")


async def probe_sigterm(server: Server, stub) -> None:
    """Check 9."""
    tasks = [asyncio.create_task(stream_times(stub, [9, 10 + i, 11], 300, [])) for i in range(16)]
    await asyncio.sleep(2)
    async with grpc.aio.insecure_channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        seen: dict[str, float] = {}
        while len(seen) < len(SERVICES) and time.monotonic() - t0 < 5:
            for s in SERVICES:
                if s not in seen:
                    r = await health.Check(health_pb2.HealthCheckRequest(service=s), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        seen[s] = time.monotonic() - t0
            await asyncio.sleep(0.005)
    worst = max(seen.values(), default=float("inf"))
    record("health NOT_SERVING after SIGTERM", len(seen) == len(SERVICES) and worst < 0.1,
           ", ".join(f"{s or '(server)'} {v * 1e3:.0f} ms" for s, v in seen.items()), "< 100 ms for every name")
    t1 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=30)
        ended = time.monotonic() - t1
    except subprocess.TimeoutExpired:
        ended = float("inf")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    record("a second SIGTERM ends the drain", ended < 15, f"exited {ended:.1f} s after it (grace was 30 s)",
           "well before the grace period")


def probe_warmup_sigterm(token_file: Path, extra: list[str]) -> None:
    """Check 10."""
    server = Server(50000 + os.getpid() % 1000 + 1, token_file, extra)
    time.sleep(8)
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.proc.kill()
    destroyed = "Task was destroyed" in server.output()
    record("SIGTERM during warm-up", not destroyed and server.proc.returncode is not None,
           f"exit code {server.proc.returncode}; 'Task was destroyed' {'found' if destroyed else 'absent'}",
           "clean exit")


async def main_async(args) -> None:
    token_file = Path(tempfile.mkdtemp()) / "token"
    token_file.write_text(TOKEN)
    extra = args.serve_args.split()
    server = Server(args.port, token_file, extra)
    try:
        ready = await wait_serving(server.target)
        print(f"kunjax serve ready in {ready:.0f} s (pid {server.proc.pid})", flush=True)
        channels = [grpc.aio.insecure_channel(server.target) for _ in range(8)]
        stubs = [pb_grpc.KunjaxServiceStub(c) for c in channels]
        async with grpc.aio.insecure_channel(server.target) as control_ch:
            control = pb_grpc.KunjaxServiceStub(control_ch)
            await probe_stall(stubs[0], server.target)
            await probe_thousand(server, stubs, control)
            await probe_inputs(stubs[0], server.target)
            await probe_sigterm(server, stubs[1])
        for c in channels:
            await c.close()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    probe_warmup_sigterm(token_file, extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=50091)
    ap.add_argument("--serve-args", default="", help="more `kunjax serve` flags, e.g. '--policy kunserve'")
    ap.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = ap.parse_args()
    asyncio.run(main_async(args))
    held = sum(r["held"] for r in results)
    print(f"{held} of {len(results)} checks held")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    sys.exit(0 if held == len(results) else 1)


if __name__ == "__main__":
    main()
