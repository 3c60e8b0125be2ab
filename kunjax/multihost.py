"""Serving beyond one host: the same engine on `jax.distributed`, one controller process per host.

Every process runs `jax.distributed.initialize` (the coordination service lives in process 0; collectives are
the platform's: gloo on CPU, NCCL on GPU, ICI on TPU) and builds a `JaxExecutor` over the *global* devices.
Process 0, the **leader**, also runs the engine — router, schedulers, policies, books — and is the only one that
talks to clients. The other processes, **followers**, run no engine: they replay the leader's executor calls.

The seam is the executor protocol (`kunjax.executor`): the leader's executor is a `LeaderExecutor` that, before
running each call itself, queues it for the followers; queued calls go out as one pickled batch through the
coordination service's key-value store (`kunjax/m/<n>`) whenever the leader is about to wait on, or dispatch
something that involves, another process, and at the end of every engine step. A follower executes each batch in
order on its own executor, so every process issues the compiled functions of a unit spanning processes (a
pipeline group fused across hosts) in the same order, and their collectives meet. A process skips whatever
involves none of its devices (`JaxExecutor._involves_me`). The sampled tokens of a unit the leader holds no
device of come back from the lowest process holding one (`kunjax/r/<launch>`); of any other unit, the leader
reads them itself (they are replicated over the unit's mesh). No RPC of our own: JAX's coordination service
carries the plans and results, JAX's collectives carry the KV and activations.

Liveness: every process bumps a heartbeat key every `HEARTBEAT_S`; the leader watches every follower's, a
follower the leader's. A peer whose heartbeat has not moved for `--peer-timeout-s`, that posted a fatal error
(`kunjax/fatal/<pid>`), or whose collective failed (a closed connection) is lost: the leader's `on_lost`
callbacks run (the server fails in-flight requests with UNAVAILABLE and turns health NOT_SERVING) and the process
exits with `EXIT_PEER_LOST`; a follower exits with it at once (or is aborted by JAX's client first, when the
coordination service in process 0 is gone). JAX's own heartbeat timeout is set well above ours, so its abort of
the leader never comes first. The group is restarted as a whole by the orchestrator (`docs/multihost.md`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kunjax.executor import ExecutorLost, TickResult
from kunjax.plan import Fuse, MemoryOp, Split, StepInputs, TickWork, UnitShape

log = logging.getLogger("kunjax.multihost")
EXIT_PEER_LOST = 75  # EX_TEMPFAIL: the group lost a process; restart it as a whole
HEARTBEAT_S = 0.5
WAIT_SLICE_MS = 500  # a blocking read of the store wakes at least this often to check liveness
KEY = "kunjax/"

_current: Cluster | None = None


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How to join the group: `coordinator` "HOST:PORT" (process 0 listens there) or "auto" (JAX detects the
    cluster from the launcher's environment: SLURM, Open MPI, Kubernetes JobSet, Cloud TPU)."""

    coordinator: str
    num_processes: int | None = None
    process_id: int | None = None
    peer_timeout_s: float = 10.0


def add_cluster_flags(p: argparse.ArgumentParser, show_all: bool = True) -> None:
    """The launch flags of a multi-host group; without `show_all` they are accepted but listed only by
    `--help-all`."""
    g = p.add_argument_group("multi-host (jax.distributed; docs/multihost.md)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="join a group of processes, one per host, through the coordinator at HOST:PORT (process 0 "
                        "listens there), or 'auto' to let JAX read the cluster launcher's environment; process 0 "
                        "serves, the others follow it (default: one process)")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the group (with --coordinator)")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 to N-1 (0 serves)")
    g.add_argument("--peer-timeout-s", type=float, default=10.0,
                   help="a process silent this long is lost: in-flight requests fail with UNAVAILABLE, health "
                        "turns NOT_SERVING and every process exits with status 75 (default: 10)")
    if not show_all:
        for action in g._group_actions:
            action.help = argparse.SUPPRESS


def spec_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ClusterSpec | None:
    """The `ClusterSpec` of the flags (None: one process); bad combinations exit 2 naming the flag."""
    coord = getattr(args, "coordinator", None)
    n, pid = getattr(args, "num_processes", None), getattr(args, "process_id", None)
    if coord is None:
        if n is not None or pid is not None:
            parser.error("--num-processes/--process-id need --coordinator HOST:PORT (or --coordinator auto)")
        return None
    if args.peer_timeout_s <= 0:
        parser.error(f"--peer-timeout-s must be positive, got {args.peer_timeout_s}")
    if getattr(args, "executor", "jax") == "sim":
        parser.error("--coordinator runs the JAX executor over several processes; --executor sim needs no devices "
                     "(it models any number of hosts in one process)")
    if coord != "auto":
        host, _, port = coord.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            parser.error(f"--coordinator must be HOST:PORT or 'auto', got {coord!r}")
        if n is None or pid is None:
            parser.error("--coordinator HOST:PORT needs --num-processes and --process-id")
        if n < 1:
            parser.error(f"--num-processes must be positive, got {n}")
        if not 0 <= pid < n:
            parser.error(f"--process-id must be in [0, {n - 1}], got {pid}")
    return ClusterSpec(coord, n, pid, args.peer_timeout_s)


def current() -> Cluster | None:
    """The group this process joined (`initialize`), or None."""
    return _current


def initialize(spec: ClusterSpec) -> Cluster:
    """Join the group (before JAX's backends start: call it right after setting the CPU device count)."""
    global _current
    if _current is not None:
        return _current
    import jax

    kwargs: dict[str, Any] = {}
    if spec.coordinator != "auto":
        kwargs = {"coordinator_address": spec.coordinator, "num_processes": spec.num_processes,
                  "process_id": spec.process_id}
    # JAX's own watchdog aborts every process when one misses heartbeats; ours (peer_timeout_s) must act first.
    beat = int(max(60.0, 4 * spec.peer_timeout_s))
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=beat)
    # CPU collectives across processes (the backends start later, at the first use of a device)
    with contextlib.suppress(AttributeError, KeyError, ValueError):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jax._src import distributed

    _current = Cluster(distributed.global_state.client, jax.process_index(), jax.process_count(),
                       spec.peer_timeout_s)
    return _current


class Cluster:
    """This process's view of the group: messages through the coordination service and liveness."""

    def __init__(self, client, pid: int, n: int, peer_timeout_s: float):
        self.client, self.pid, self.n = client, pid, n
        self.peer_timeout_s = peer_timeout_s
        self.lost: str | None = None
        self._lost_lock = threading.Lock()
        self._callbacks: list[Callable[[str], None]] = []
        self._sent = 0  # leader: batches sent
        self._received = 0  # follower: batches executed
        self._deleted = 0  # leader: batches deleted from the store (every follower has read them)
        self._agreements = itertools.count()  # every process makes the same agree_min calls in the same order
        self._stop = threading.Event()
        self._beater = threading.Thread(target=self._heartbeat, name="kunjax-heartbeat", daemon=True)
        self._beater.start()

    @property
    def is_leader(self) -> bool:
        return self.pid == 0

    # ---- liveness -------------------------------------------------------------------------------------
    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Run `callback(reason)` (on the thread that noticed) when a peer is lost, before the process exits."""
        self._callbacks.append(callback)

    def lose(self, reason: str) -> None:
        """A peer is lost: run the callbacks once, then exit with `EXIT_PEER_LOST` (the group restarts whole)."""
        with self._lost_lock:
            if self.lost is not None:
                return
            self.lost = reason
        log.error("multi-host group lost: %s", reason)
        print(f"kunjax: process {self.pid}: {reason}; exiting with status {EXIT_PEER_LOST}", file=sys.stderr,
              flush=True)
        for cb in self._callbacks:
            try:
                cb(reason)
            except Exception:
                log.exception("on-lost callback failed")
        os._exit(EXIT_PEER_LOST)

    def fail(self, reason: str) -> None:
        """This process cannot go on: tell the others (they stop at once rather than at the timeout), then exit."""
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"{KEY}fatal/{self.pid}", reason[:2000], allow_overwrite=True)
        self.lose(f"process {self.pid} failed: {reason}")

    def _try_get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception:  # absent (NOT_FOUND), or the service is unreachable (caught by the next set)
            return None

    def _heartbeat(self) -> None:
        peers = [p for p in range(self.n) if p != self.pid] if self.is_leader else [0]
        seen = {p: (None, time.monotonic()) for p in peers}
        for beat in itertools.count(1):
            if self._stop.is_set():
                return
            now = time.monotonic()
            try:
                self.client.key_value_set(f"{KEY}hb/{self.pid}", f"{beat} {self._received}", allow_overwrite=True)
            except Exception as e:
                if not self._stop.is_set():
                    self.lose(f"the coordination service is unreachable ({type(e).__name__}: {e})")
                return
            acks = []
            for p in peers:
                value = self._try_get(f"{KEY}hb/{p}")
                fatal = self._try_get(f"{KEY}fatal/{p}")
                if fatal is not None:
                    self.lose(f"process {p} failed: {fatal}")
                if value is not None and value != seen[p][0]:
                    seen[p] = (value, now)
                elif now - seen[p][1] > self.peer_timeout_s:
                    self.lose(f"process {p} stopped answering (no heartbeat for {self.peer_timeout_s:g}s)")
                acks.append(int(value.split()[1]) if value is not None else 0)
            if self.is_leader and acks:
                self._forget(min(acks))
            self._stop.wait(HEARTBEAT_S)

    def _forget(self, upto: int) -> None:
        """Delete the batches every follower has executed."""
        while self._deleted < min(upto, self._sent):
            self._deleted += 1
            try:
                self.client.key_value_delete(f"{KEY}m/{self._deleted}")
            except Exception:
                return

    def close(self) -> None:
        """Leave the group cleanly (every process calls it: JAX's shutdown waits for all)."""
        self._stop.set()
        import jax

        try:
            jax.distributed.shutdown()
        except Exception:
            log.exception("jax.distributed.shutdown failed")

    # ---- messages -------------------------------------------------------------------------------------
    def _get(self, key: str, what: str, timeout_s: float | None = None) -> bytes:
        """Wait for `key`, checking liveness every `WAIT_SLICE_MS` (a lost peer raises `ExecutorLost`)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self.lost is not None:
                raise ExecutorLost(self.lost)
            try:
                return self.client.blocking_key_value_get_bytes(key, WAIT_SLICE_MS)
            except Exception as e:
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise ExecutorLost(f"the coordination service failed while waiting for {what}: {e}") from e
            if deadline is not None and time.monotonic() > deadline:
                raise ExecutorLost(f"no {what} within {timeout_s:g}s")

    def send(self, calls: list) -> None:
        """Leader: one batch of executor calls for every follower."""
        self._sent += 1
        self.client.key_value_set_bytes(f"{KEY}m/{self._sent}", pickle.dumps(calls, pickle.HIGHEST_PROTOCOL))

    def receive(self) -> list:
        """Follower: the next batch (waits as long as the leader lives)."""
        data = self._get(f"{KEY}m/{self._received + 1}", "the leader's next step")
        self._received += 1
        return pickle.loads(data)

    def post(self, name: str, value: Any) -> None:
        self.client.key_value_set_bytes(f"{KEY}r/{name}", pickle.dumps(value, pickle.HIGHEST_PROTOCOL))

    def take(self, name: str, what: str) -> Any:
        data = self._get(f"{KEY}r/{name}", what)
        with contextlib.suppress(Exception):
            self.client.key_value_delete(f"{KEY}r/{name}")
        return pickle.loads(data)

    def agree_min(self, name: str, value: int) -> int:
        """Every process offers `value`; all get the smallest (e.g. KV blocks per pool). Each call has its own keys
        (an engine built after another, as the bench does per policy, never reads the previous one's values)."""
        key = f"{KEY}agree/{next(self._agreements)}/{name}"
        self.client.key_value_set(f"{key}/{self.pid}", str(int(value)))
        got = [int(self._get(f"{key}/{p}", f"process {p}'s {name}").decode()) for p in range(self.n)]
        return min(got)


# ---- the leader ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Launched:
    lid: int  # launch number (the followers' key for it)
    uid: int
    inner: Any  # the local executor's handle, or None: the unit runs on other processes only


class LeaderExecutor:
    """The leader's executor: `inner` (a `JaxExecutor` over the global devices) plus the followers' replay of
    every call (module docstring). Whatever the engine reads of an executor is `inner`'s."""

    def __init__(self, inner, cluster: Cluster):
        self.inner, self.cluster = inner, cluster
        self.num_instances, self.num_blocks = inner.num_instances, inner.num_blocks
        self.weight_bytes, self.load_seconds, self.needs_arrays = inner.weight_bytes, inner.load_seconds, True
        self._calls: list[tuple] = []
        self._lids = itertools.count()
        self._units = Units(inner.owners)

    def __getattr__(self, name: str) -> Any:  # introspection (describe, devices_of, unit_params, ...)
        return getattr(self.inner, name)

    def _flush(self) -> None:
        if self._calls:
            calls, self._calls = self._calls, []
            self.cluster.send(calls)

    def _local(self, fn: Callable, *args, spans: bool) -> Any:
        """Run a call here; a failure of a computation spanning processes loses the group (the others' state is
        unknown), as does any failure once a peer is known lost."""
        try:
            return fn(*args)
        except ExecutorLost:
            raise
        except Exception as e:
            if self.cluster.lost is not None:
                raise ExecutorLost(self.cluster.lost) from e
            if spans:
                raise ExecutorLost(f"a computation across processes failed: {type(e).__name__}: {e}") from e
            raise

    def warmup(self, units: Sequence[tuple[int, tuple[int, ...], UnitShape]],
               candidates: Sequence[tuple[tuple[int, ...], UnitShape]]) -> None:
        self._calls.append(("warmup", units, candidates))
        self._flush()
        self._local(self.inner.warmup, units, candidates, spans=True)

    def apply(self, ops: Sequence[MemoryOp]) -> None:
        self._calls.append(("apply", ops))
        spans = self._units.track(ops)
        if spans:  # a collective, or a fuse/split that waits: the followers must be on their way first
            self._flush()
        self._local(self.inner.apply, ops, spans=spans)

    def launch(self, uid: int, work: TickWork, inputs: StepInputs | None) -> _Launched:
        lid = next(self._lids)
        self._calls.append(("launch", lid, uid, work, inputs))
        local, spans = self.inner.is_local_unit(uid), self._units.spans(uid)
        if spans:  # its collectives: the followers must dispatch it too (a unit only they hold waits for collect)
            self._flush()
        handle = self._local(self.inner.launch, uid, work, inputs, spans=spans) if local else None
        return _Launched(lid, uid, handle)

    def collect(self, launched: _Launched, leaving: bool) -> TickResult:
        self._calls.append(("collect", launched.lid, launched.uid, leaving))
        if launched.inner is not None:
            return self._local(self.inner.collect, launched.inner, leaving, spans=self._units.spans(launched.uid))
        self._flush()
        seconds, sampled, error = self.cluster.take(str(launched.lid), f"unit {launched.uid}'s tick")
        if error is not None:
            raise RuntimeError(error)
        return TickResult(sampled, seconds)

    def end_step(self) -> None:
        self._flush()  # the followers keep up at least once a step
        self.inner.end_step()

    def recover(self, uid: int) -> None:
        self._calls.append(("recover", uid))
        self.inner.recover(uid)

    def set_transition_hook(self, hook) -> None:
        self.inner.set_transition_hook(hook)

    def states(self) -> list[dict]:
        """Every process's executor state (`JaxExecutor.state`), process order: for checking the books."""
        name = f"state-{next(self._lids)}"
        self._calls.append(("state", name))
        self._flush()
        return [self.inner.state()] + [self.cluster.take(f"{name}-{p}", f"process {p}'s state")
                                       for p in range(1, self.cluster.n)]

    def stop(self) -> None:
        """The followers leave their loop (the leader is done)."""
        self._calls.append(("stop",))
        self._flush()


class Units:
    """Which processes each unit's devices are on: replicas from the instances' owners, groups from the fuses."""

    def __init__(self, owners: Sequence[int]):
        self.owners = list(owners)
        self.members: dict[int, tuple[int, ...]] = {i: (i,) for i in range(len(owners))}

    def track(self, ops: Sequence[MemoryOp]) -> bool:
        """Note the fuses and splits in `ops`; whether any op involves a group spanning processes or waits."""
        spans = False
        for op in ops:
            if isinstance(op, Fuse):
                self.members[op.unit] = tuple(op.members)
                spans = True
            elif isinstance(op, Split):
                self.members.pop(op.unit, None)
                spans = True
            elif getattr(op, "unit", None) is not None and self.spans(op.unit):
                spans = True
        return spans

    def processes(self, uid: int) -> set[int]:
        return {self.owners[i] for i in self.members.get(uid, ())}

    def spans(self, uid: int) -> bool:
        return len(self.processes(uid)) > 1

    def reporter(self, uid: int) -> int | None:
        """The process that sends unit `uid`'s results to the leader: None when the leader computes it."""
        procs = self.processes(uid)
        return None if 0 in procs or not procs else min(procs)


def check_config(ecfg) -> None:
    """Refuse what would copy KV between instances of different processes outside a pipeline group (not built)."""
    from kunjax.config import ConfigError

    if ecfg.policy == "migrate":
        raise ConfigError("--policy migrate moves KV between instances, which is not built across processes yet; "
                          "use kunserve, swap, recompute or layerkv with --coordinator")
    if ecfg.roles:
        raise ConfigError("--roles (prefill/decode disaggregation) is not built across processes yet")
    if ecfg.scheduler.prefix_transfer_blocks:
        raise ConfigError("--prefix-transfer-blocks is not built across processes yet")


def leader_executor(cluster: Cluster, model_path: str | Path, cfg, ecfg, devices=None) -> LeaderExecutor:
    """Tell the followers to build their executors for this model and configuration, and build the leader's."""
    from kunjax.executor.jax_executor import JaxExecutor

    if devices is not None:
        raise ValueError("with several processes the executor spans every process's devices (no devices=)")
    calls_init = [("init", str(model_path), ecfg)]
    cluster.send(calls_init)
    inner = JaxExecutor(model_path, cfg, ecfg, agree_min=cluster.agree_min)
    return LeaderExecutor(inner, cluster)


def check_books(engine) -> list[dict]:
    """The leader's books balance (`LLMEngine.check_books`) and every process's arrays agree with them: each
    instance is held by the process that owns it, as a replica or a group stage as the engine has it, with the
    host-tier entries the host books list; each process holds exactly the groups it has a member of. Returns every
    process's state (`JaxExecutor.state`, which has the live bytes per device too)."""
    engine.check_books()
    ex = engine.executor
    states = ex.states()
    owners = ex.owners
    for st in states:
        p = st["process"]
        mine = {i for i, o in enumerate(owners) if o == p}
        assert set(st["instances"]) == mine, f"process {p} holds instances {sorted(st['instances'])}, not {mine}"
        for i, inst in st["instances"].items():
            unit = engine.unit_of_instance(i)
            mode = "replica" if unit.k == 1 else "group"
            assert inst["mode"] == mode, f"instance {i} is a {inst['mode']} on process {p}, a {mode} in the books"
            books = sorted(repr(k) for k in engine.mempool.host[i].entries) if engine.mempool.host else []
            assert inst["host"] == books, (f"instance {i}'s host tier on process {p} holds {inst['host'][:3]}..., "
                                           f"the books {books[:3]}...")
        groups = {g.uid: list(g.members) for g in engine.groups if mine & set(g.members)}
        assert st["groups"] == groups, f"process {p} holds groups {st['groups']}, the books {groups}"
    return states


# ---- a follower ------------------------------------------------------------------------------------------
def follow(cluster: Cluster) -> int:
    """A follower's whole life: build the executor the leader names, replay its calls until it stops."""
    from kunjax import checkpoint
    from kunjax.executor.jax_executor import JaxExecutor

    print(f"kunjax: process {cluster.pid} of {cluster.n} following process 0", file=sys.stderr, flush=True)
    executor = units = None
    launched: dict[int, Any] = {}
    while True:
        try:
            batch = cluster.receive()
        except ExecutorLost as e:
            cluster.lose(str(e))
        for call in batch:
            kind = call[0]
            try:
                if kind == "init":
                    executor = units = None
                    launched.clear()
                    path = call[1]
                    executor = JaxExecutor(path, checkpoint.load_config(path), call[2],
                                           agree_min=cluster.agree_min)
                    units = Units(executor.owners)
                elif kind == "stop":
                    print(f"kunjax: process {cluster.pid}: the leader is done", file=sys.stderr, flush=True)
                    cluster.close()
                    return 0
                elif kind == "warmup":
                    executor.warmup(call[1], call[2])
                elif kind == "apply":
                    units.track(call[1])
                    executor.apply(call[1])
                elif kind == "launch":
                    _, lid, uid, work, inputs = call
                    if executor.is_local_unit(uid):
                        try:
                            launched[lid] = executor.launch(uid, work, inputs)
                        except Exception as e:
                            if units.spans(uid):
                                raise
                            launched[lid] = e  # the leader hears of it at the collect
                elif kind == "collect":
                    _collect(cluster, executor, units, launched, *call[1:])
                elif kind == "recover":
                    executor.recover(call[1])
                elif kind == "state":
                    cluster.post(f"{call[1]}-{cluster.pid}", executor.state())
                else:
                    raise ValueError(f"unknown call {kind!r}")
            except ExecutorLost as e:
                cluster.lose(str(e))
            except Exception as e:  # our state no longer matches the leader's books: the group must restart
                log.exception("follower call %s failed", kind)
                cluster.fail(f"{kind}: {type(e).__name__}: {e}")


def _collect(cluster: Cluster, executor, units: Units, launched: dict[int, Any], lid: int, uid: int,
             leaving: bool) -> None:
    handle = launched.pop(lid, None)
    if handle is None or units.reporter(uid) != cluster.pid:
        return
    if isinstance(handle, Exception):
        result = (0.0, None, f"{type(handle).__name__}: {handle}")
    else:
        try:
            r = executor.collect(handle, leaving)
            result = (r.seconds, r.sampled, None)
        except Exception as e:
            if units.spans(uid):
                raise
            result = (0.0, None, f"{type(e).__name__}: {e}")
    cluster.post(str(lid), result)
