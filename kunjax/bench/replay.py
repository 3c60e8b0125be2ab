"""Open-loop replay of one workload against one target: an event loop on the target's clock.

Owns the time of a replay. One loop, no threads: each request is started at its arrival time (replay start + its
offset), never waiting for earlier requests to finish; between events the target works (`Target.advance`: an
engine step in process, a short wait over gRPC) or lets its clock pass to the next event. The target's load and
new policy events are sampled every `SAMPLE_PERIOD_S` of clock time into timeline rows. A progress line goes to
stderr. Once every request has been sent, unfinished ones may run for at most `drain_timeout_s`; then they are
aborted and count as failed with reason "timeout". On a virtual clock (the arithmetic executor) the whole replay
runs as fast as the host can step, and its times are the modelled ones.

Timeline row (one per period): `t_s`, requests in flight (sent, not finished), `queue_len` (waiting requests;
a pipeline unit's queue counted once), `kv_demand_tokens` (the runtime's KV demand in blocks — held by running
requests plus what queued and swapped-out requests need to start — times the block size, summed over instances,
a unit counted once), `kv_capacity_tokens`, `kv_free_tokens`, `groups` (pipeline units), the events seen
since the previous row, and per instance `i{n}_mode` / `_kv_free` / `_kv_used` / `_kv_total` (blocks; a stage's
blocks hold 1/k of the layers) / `_running` / `_waiting`.
"""

from __future__ import annotations

import dataclasses
import heapq
import sys
from collections.abc import Sequence

from kunjax.bench.metrics import RequestRecord
from kunjax.bench.targets import LoadRow, Target
from kunjax.progress import Progress
from kunjax.workloads import TraceRequest, Workload

SAMPLE_PERIOD_S = 1.0


@dataclasses.dataclass
class ReplayResult:
    records: list[RequestRecord]
    timeline: list[dict[str, object]]
    events: list[dict[str, object]]  # policy events with the replay time they happened
    replay_s: float  # from the first arrival to the last request's end (or the abort)
    timed_out: int  # requests aborted at the drain deadline


def _event_dict(ev, t_s: float, wall0: float) -> dict[str, object]:
    """A policy event on the replay clock: when it happened if the runtime stamps it, else when first seen."""
    stamp = float(getattr(ev, "time_unix_s", 0.0))
    if stamp > 0:
        t_s = stamp - wall0
    return {"t_s": round(t_s, 3), "seq": int(ev.seq), "kind": ev.kind, "group": int(ev.group),
            "members": [int(m) for m in ev.members], "step": int(ev.step), "seconds": round(float(ev.seconds), 4),
            "detail": dict(ev.detail)}


def timeline_row(t_s: float, loads: Sequence[LoadRow], block_size: int, inflight: int,
                 events: Sequence[dict[str, object]]) -> dict[str, object]:
    """One timeline sample (module docstring); a group's stages report its queue and tokens once between them."""
    row: dict[str, object] = {"t_s": round(t_s, 2), "inflight": inflight}
    groups: dict[int, list[LoadRow]] = {}
    queue = demand = capacity = free = 0
    for x in loads:
        if x.group >= 0:
            groups.setdefault(x.group, []).append(x)
            continue
        queue += x.waiting
        demand += x.demand_blocks * block_size
        capacity += x.kv_total * block_size
        free += x.kv_free * block_size
    for members in groups.values():  # each stage holds every token's slice: tokens = a stage's blocks
        k = len(members)
        queue += members[0].waiting
        demand += members[0].demand_blocks * block_size  # the group's demand, repeated on every member
        capacity += round(sum(m.kv_total for m in members) / k) * block_size
        free += round(sum(m.kv_free for m in members) / k) * block_size
    row.update(queue_len=queue, kv_demand_tokens=demand, kv_capacity_tokens=capacity, kv_free_tokens=free,
               groups=len(groups),
               events="; ".join(f"{e['kind']} group {e['group']} {e['members']}" for e in events))
    for x in loads:
        p = f"i{x.instance}_"
        mode = x.mode if x.group < 0 else f"{x.mode}:g{x.group}s{x.stage}"
        row.update({p + "mode": mode, p + "kv_free": x.kv_free, p + "kv_used": x.kv_used, p + "kv_total": x.kv_total,
                    p + "running": x.running, p + "waiting": x.waiting})
    return row


class _Progress:
    """The replay's progress (`kunjax.progress`): requests done / total, in flight, and where the replay's clock is:
    within the window of arrivals, or past it while the last requests drain."""

    def __init__(self, label: str, total: int, duration_s: float, enabled: bool):
        self.label, self.duration_s = label, duration_s
        self.bar = Progress(f"[{label}] replay", total, "requests", enabled=enabled)

    def show(self, t_s: float, sent: int, done: int, final: bool = False) -> None:
        clock = (f"replay clock {t_s:.1f}s of {self.duration_s:.0f}s of arrivals" if t_s <= self.duration_s
                 else f"all arrived, replay clock {t_s:.1f}s")
        self.bar.set(done, f"{sent - done} in flight, {clock}")
        if final:
            self.bar.close(f"[{self.label}] replay: {done}/{self.bar.total} requests done, the last at {t_s:.1f}s "
                           f"({self.duration_s:.0f}s of arrivals)")


def session_of(r: TraceRequest) -> str:
    """A request's session for `--routing session`: its conversation when the workload knows it (the
    conversation generator); else, as traces carry no conversation ids, the requests that share their first
    prompt block (Mooncake's first hash id) are taken as one conversation; none without prefixes."""
    if r.session:
        return r.session
    return f"prefix-{r.prefix_ids[0]}" if r.prefix_ids else ""


def replay(target: Target, workload: Workload, prompts: Sequence[list[int]], *, label: str, block_size: int,
           drain_timeout_s: float, progress: bool = True, id_prefix: str = "bench") -> ReplayResult:
    """Replay `workload` (prompt i = `prompts[i]`) against `target` on its clock; see the module docstring.

    A request that `follows` another (a closed-loop conversation turn) is sent its `think_s` after that one ends,
    with that one's prompt and output as they were, then the last `new_tokens` of `prompts[i]`; one whose turn
    before it never completed is not sent (it fails with that reason)."""
    reqs = workload.requests
    records = [RequestRecord(index=i, request_id=f"{id_prefix}-{i}", arrival_s=r.arrival_s,
                             prompt_tokens=len(prompts[i]), max_tokens=r.output_tokens, session_id=session_of(r))
               for i, r in enumerate(reqs)]
    followers: dict[int, list[int]] = {}
    for i, r in enumerate(reqs):
        if r.follows >= 0:
            followers.setdefault(r.follows, []).append(i)
            records[r.follows].output_ids = []
    opening = [i for i, r in enumerate(reqs) if r.follows < 0]  # sent at their arrival times, in order
    due: list[tuple[float, int]] = []  # (replay time, index) of followers whose turn before ended
    sent_prompts: dict[int, list[int]] = {}
    clock = target.clock
    t0 = clock.now()
    wall0 = clock.wall()  # the replay's origin on the (engine clock's) wall time: events carry wall times
    timeline: list[dict[str, object]] = []
    events: list[dict[str, object]] = []
    last_seq = 0
    sent = nxt = 0  # requests sent; next opening request
    open_: list[RequestRecord] = []  # started and not seen done yet
    next_sample = 0.0
    deadline = workload.duration_s + drain_timeout_s
    bar = _Progress(label, len(records), workload.duration_s, progress)
    timed_out = 0

    def send(i: int, prompt: list[int], at_s: float | None = None) -> None:
        nonlocal sent, deadline
        if followers.get(i):
            sent_prompts[i] = prompt
        records[i].prompt_tokens = len(prompt)
        if at_s is not None:  # a follower arrives when it is due (its open-loop arrival was an estimate)
            records[i].arrival_s = at_s
        target.start(records[i], prompt, t0)
        open_.append(records[i])
        sent += 1
        deadline = max(deadline, clock.now() - t0 + drain_timeout_s)

    while True:
        # Compare on the clock's own values (t0 + offset), exactly what `advance` was asked to reach: a virtual
        # clock stops at that value, and `clock.now() - t0` may round below the offset.
        at = clock.now()
        now = at - t0
        while nxt < len(opening) and t0 + records[opening[nxt]].arrival_s <= at:
            send(opening[nxt], list(prompts[opening[nxt]]))
            nxt += 1
        while due and t0 + due[0][0] <= at:
            at_s, i = heapq.heappop(due)
            prev = records[reqs[i].follows]
            new = list(prompts[i][len(prompts[i]) - reqs[i].new_tokens:])
            send(i, sent_prompts.pop(reqs[i].follows) + (prev.output_ids or []) + new, at_s)
        sample = t0 + next_sample <= at
        if followers or sample or sent == len(records):  # counting every loop would cost O(requests) per arrival
            still = []
            for r in open_:
                if not r.done:
                    still.append(r)
                    continue
                for j in followers.get(r.index, ()):
                    if r.completed:
                        heapq.heappush(due, (r.end_s + reqs[j].think_s, j))
                    else:
                        _skip(records, followers, j, r)
            open_ = still
        done = sum(r.done for r in records) if followers else sent - len(open_)
        if sample:
            try:
                loads = target.load()
                new_events = [_event_dict(ev, now, wall0) for ev in target.policy_events() if ev.seq > last_seq]
            except Exception as e:  # a failed read leaves a gap in the timeline, not a failed replay
                print(f"\n[{label}] timeline sample failed: {type(e).__name__}: {e}", file=sys.stderr)
                loads, new_events = [], []
            if new_events:
                last_seq = max(int(ev["seq"]) for ev in new_events)
                events.extend(new_events)
            if loads:
                timeline.append(timeline_row(now, loads, block_size, len(open_), new_events))
            next_sample += SAMPLE_PERIOD_S
        bar.show(now, sent, done)
        if done == len(records):
            break
        if at > t0 + deadline:
            late = [r for r in records if not r.done]
            for r in late:
                if r.submit_s is not None:
                    target.abort(r.request_id)
            for r in late:
                if r.finish_reason in (None, "abort"):
                    r.end_s = r.end_s if r.end_s is not None else clock.now() - t0
                    r.error = f"unfinished {drain_timeout_s:g}s after the last arrival (--drain-timeout-s): aborted"
                    r.finish_reason = "timeout"
            timed_out = len(late)
            break
        wake = min(records[opening[nxt]].arrival_s if nxt < len(opening) else deadline,
                   due[0][0] if due else deadline, next_sample, deadline)
        target.advance(t0 + wake)
    ends = [r.end_s for r in records if r.end_s is not None]
    replay_s = max(ends) if ends else clock.now() - t0
    bar.show(clock.now() - t0, sent, sum(r.done for r in records), final=True)
    return ReplayResult(records=records, timeline=timeline, events=events, replay_s=replay_s, timed_out=timed_out)


def _skip(records: list[RequestRecord], followers: dict[int, list[int]], j: int, prev: RequestRecord) -> None:
    """Turn `j` (and the turns after it) is not sent: the turn before it ended with `prev.finish_reason`."""
    r = records[j]
    r.end_s, r.error = prev.end_s, f"not sent: the turn before it ended with {prev.finish_reason}"
    r.finish_reason = "error"
    for k in followers.get(j, ()):
        _skip(records, followers, k, r)
