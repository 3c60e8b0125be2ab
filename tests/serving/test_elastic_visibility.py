"""Parameter-centric elasticity as a client and Prometheus see it: a real 2-instance kunserve engine over loopback gRPC.

What an operator can rely on: after a drop, `GetLoad` reports both instances as stages of one pipeline group
with their stage's KV books, the policy status counts the drop and carries the event with its timing, and
`GetServerInfo` names each instance's stage; after a restore both are replicas again and the restore is counted
and timed; the metrics endpoint counts both transitions and times each exactly once; and requests in flight
across both transitions finish with every token they asked for.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator, Sequence

import grpc
import jax
import pytest

from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.engine_thread import EngineThread
from kunjax.policies.base import FuseUnits
from serving._generated.kunjax.serving.v2 import generate_pb2 as pb
from serving.client import KunjaxClient
from serving.server import ServerHandle
from tests.helpers import served_engine, write_tiny_model

pytestmark = pytest.mark.timeout(180)

# The automatic restore watch is pushed out of reach (restore_window_steps): the test decides when the group
# restores, so what it reads between the drop and the restore cannot race the policy.
CONFIG = config_from_kwargs(num_instances=2, policy="kunserve", num_blocks=64, max_num_seqs=8,
                            max_num_batched_tokens=64,
                            block_size=4, max_model_len=128, restore_window_steps=10_000)
MAX_TOKENS = 30
SAMPLING = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}

Served = tuple[EngineThread, ServerHandle, KunjaxClient]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    engine = LLMEngine(write_tiny_model(tmp_path_factory.mktemp("tiny")), CONFIG, devices=jax.devices()[:2])
    with served_engine(engine) as stack:
        yield stack


def scrape_text(handle: ServerHandle) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def start(client: KunjaxClient, rid: str, first: int) -> grpc.Call:
    return client.generate([first, first + 1, first + 2, first + 3, first + 4], request_id=rid, **SAMPLING)


def finish(call: grpc.Call, already: Sequence[pb.GenerateResponse] = ()) -> tuple[int, pb.GenerateResponse]:
    responses = [*already, *call]
    return sum(len(r.token_ids) for r in responses), responses[-1]


def wait_for(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_drop_and_restore_are_visible_in_load_info_and_metrics(served: Served) -> None:
    rt, handle, client = served
    engine = rt.engine

    info = client.info()
    settings = dict(info.policy_settings)
    assert info.policy == "kunserve" and settings["group_sizes"] == "(2,)"
    assert (float(settings["drop_demand_ratio"]), float(settings["restore_demand_ratio"]),
            int(settings["restore_window_steps"])) == pytest.approx(
        (CONFIG.policy_options.drop_demand_ratio, CONFIG.policy_options.restore_demand_ratio,
         CONFIG.policy_options.restore_window_steps))
    assert [s.split(",")[0] for s in info.instances] == ["instance 0: replica", "instance 1: replica"]
    assert info.kv_pool_blocks == sum(x.kv_total for x in client.load()) > 0  # kunserve sets nothing aside
    zeros = {k: 0 for k in ("preemptions", "drops", "restores", "groups", "remote_dependent", "blocks_exchanged",
                            "remote_ticks")}
    zeros.update({k: 0 for k in engine.hostcache.stats()})  # prefix caching's host tier (on by default)
    status = client.policy_status()
    assert (status.policy, dict(status.counters), list(status.events)) == ("kunserve", zeros, [])
    assert [(u.unit, u.mode, list(u.members)) for u in status.units] == [(0, "replica", [0]), (1, "replica", [1])]

    # Requests generating when the instances fuse, and one that arrives at the group.
    calls = {f"before{i}": start(client, f"before{i}", 3 + 7 * i) for i in range(4)}
    firsts = {rid: [next(call)] for rid, call in calls.items()}  # each admitted and generating
    with rt._lock:
        gid = engine.transition(FuseUnits((0, 1))).unit  # a unit id of its own, after the replicas' 0 and 1
        stage_totals = [s.total for s in engine.groups[0].stages]
    calls["during"] = start(client, "during", 50)

    load = client.load()
    assert [(x.instance, x.mode, x.group, x.stage) for x in load] == [(0, "pipeline", gid, 0),
                                                                      (1, "pipeline", gid, 1)]
    assert [x.kv_total for x in load] == stage_totals
    assert stage_totals[0] > CONFIG.num_blocks  # a stage holds half of every block of both pools, plus the extension
    assert all(x.kv_free + x.kv_used + x.kv_cached == x.kv_total for x in load)
    status = client.policy_status()
    assert (status.counters["drops"], status.counters["restores"], status.counters["groups"]) == (1, 0, 1)
    (unit,) = status.units
    assert (unit.unit, unit.mode, list(unit.members), unit.detail["admitting"]) == (gid, "pipeline", [0, 1], "True")
    (drop,) = [ev for ev in status.events if ev.kind == "drop"]
    assert (drop.seq, drop.group, list(drop.members)) == (1, gid, [0, 1])
    assert drop.seconds > 0 and drop.detail["k"] == "2" and int(drop.detail["extension_blocks"]) > 0
    assert [s.split(",")[0] for s in client.info().instances] == [
        f"instance 0: pipeline group {gid} stage 0", f"instance 1: pipeline group {gid} stage 1"]

    with rt._lock:
        engine.policy.begin_restore(engine.groups[0])
    # A request arriving while the group drains; it also keeps the engine stepping until the restore completes.
    calls["draining"] = start(client, "draining", 70)

    def restored() -> bool:
        return client.policy_status().counters["restores"] == 1 and all(x.mode == "replica" for x in client.load())
    assert wait_for(restored, timeout_s=30), (client.load(), client.policy_status())
    load = client.load()
    assert [(x.mode, x.group, x.stage) for x in load] == [("replica", -1, -1)] * 2
    assert all(x.kv_total == CONFIG.num_blocks - 1 for x in load)
    status = client.policy_status()
    c = status.counters
    assert (c["drops"], c["restores"], c["groups"], c["remote_dependent"]) == (1, 1, 0, 0)
    assert [u.mode for u in status.units] == ["replica", "replica"]
    (restore,) = [ev for ev in status.events if ev.kind == "restore"]
    assert restore.group == gid and restore.seconds > 0 and restore.seq > drop.seq
    seqs = [ev.seq for ev in status.events]
    assert seqs == list(range(1, len(seqs) + 1))  # every event once, oldest first
    assert [s.split(",")[0] for s in client.info().instances] == ["instance 0: replica", "instance 1: replica"]

    for rid, call in calls.items():
        n, last = finish(call, firsts.get(rid, []))
        assert (n, last.finish_reason, last.usage.completion_tokens) == (
            MAX_TOKENS, pb.FINISH_REASON_LENGTH, MAX_TOKENS), rid

    for _ in range(2):  # every scrape reports each transition once
        text = scrape_text(handle).splitlines()
        for line in ('kunjax_policy_stat{name="drops"} 1.0', 'kunjax_policy_stat{name="restores"} 1.0',
                     "kunjax_pipeline_units 0.0", "kunjax_remote_attention_requests 0.0",
                     f'kunjax_policy_stat{{name="blocks_exchanged"}} {float(c["blocks_exchanged"])}',
                     'kunjax_policy_event_seconds_count{kind="drop"} 1.0',
                     'kunjax_policy_event_seconds_count{kind="restore"} 1.0'):
            assert line in text, line
        assert any(x.startswith('kunjax_policy_stat{name="preemptions"}') for x in text)
    assert wait_for(lambda: all(x.kv_used == 0 and x.running == 0 for x in client.load()), timeout_s=10)
    with rt._lock:
        engine.check_books()
