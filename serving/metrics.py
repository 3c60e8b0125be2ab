"""Prometheus metrics of the gRPC front end: request latencies, outcomes, the runtime's load and its memory policy.

Owns one `CollectorRegistry` per server (never the process-global one, so several servers, e.g. in tests, keep
separate books) and the HTTP endpoint that serves its text exposition. What it measures:

* per request, from the server's view of its stream (`StreamTimer`): time to first token (RPC arrival -> first
  token), queue time (admission -> first token; the runtime does not report when it scheduled a request),
  time per output token after the first (mean over the request), end-to-end latency (arrival -> final event);
* requests by finish reason ("stop", "length", "abort", "error", or "cancelled" when the stream ended before its
  final event: client cancel, deadline, server stop) and rejected requests by status code;
* gauges read from `runtime.load()` at scrape time, labelled `instance` and `mode` ("replica" or "pipeline"):
  running and waiting requests, KV blocks used / free / total. A member of a pipeline unit reports its stage's KV
  blocks and the whole unit's requests, so summing the request gauges over a unit's members over-counts;
* the memory policy, read from `runtime.policy_status()` at scrape time: its own figures by name
  (`kunjax_policy_stat{name}`: preemptions under every policy; swaps, host blocks, migrations, partial
  admissions, drops, restores, blocks exchanged ... under the policy that has them), pipeline units serving and
  requests still reading history remotely (gauges), and the duration of each event by kind
  (`kunjax_policy_event_seconds`). Each runtime event is observed once: the collector remembers the highest
  `PolicyEvent.seq` it has observed. Events are only seen while among the runtime's most recent ones
  (`kunjax.api.MAX_POLICY_EVENTS`), so more events than that between two scrapes leave the oldest unobserved
  (the counters stay exact).

Never touches the runtime except `load()` and `policy_status()` during a scrape; a failing one drops its metrics
from that scrape instead of failing it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kunjax.api import Runtime, TokenEvent

log = logging.getLogger("kunjax.serving.metrics")

# Seconds; first-token latencies span milliseconds (cache hit) to minutes (long prompt behind a queue).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
CANCELLED = "cancelled"  # finish-reason label of a stream that ended before its final event
# Seconds; a drop or restore reshards weights and moves KV (milliseconds on a toy model, seconds on a large one);
# an exchange or a migration runs over many steps.
TRANSITION_BUCKETS = LATENCY_BUCKETS


class _LoadCollector(Collector):
    """Per-instance gauges, read from `runtime.load()` when Prometheus scrapes."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            loads = self.runtime.load()
        except Exception:
            log.exception("runtime.load() failed during a metrics scrape; gauges left out")
            return
        labels = ["instance", "mode"]
        families = {
            "running": GaugeMetricFamily("kunjax_requests_running", "Requests being generated, per instance.",
                                         labels=labels),
            "waiting": GaugeMetricFamily("kunjax_requests_waiting", "Requests admitted but not yet scheduled.",
                                         labels=labels),
            "kv_used": GaugeMetricFamily("kunjax_kv_blocks_used", "KV cache blocks held by requests.",
                                         labels=labels),
            "kv_free": GaugeMetricFamily("kunjax_kv_blocks_free", "KV cache blocks free to allocate.",
                                         labels=labels),
            "kv_total": GaugeMetricFamily("kunjax_kv_blocks_total", "KV cache blocks in the pool.",
                                          labels=labels),
        }
        for load in loads:
            for field, family in families.items():
                family.add_metric([str(load.instance), load.mode], float(getattr(load, field)))
        yield from families.values()


class _PolicyCollector(Collector):
    """The memory policy's figures, its serving units and the event-time histogram, from `runtime.policy_status()`.

    The histogram is not in the registry: this collector observes the new events and then yields it, so a
    scrape shows the events it has just read."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.event_s = Histogram("kunjax_policy_event_seconds",
                                 "Duration of the memory policy's events, by kind (e.g. drop, restore, migration; "
                                 "exchange_done: drop to the end of the live KV exchange).",
                                 ["kind"], buckets=TRANSITION_BUCKETS, registry=None)
        self._lock = threading.Lock()  # scrapes may run concurrently; each event is observed once
        self._observed_seq = 0

    def collect(self) -> Iterator[Metric]:
        try:
            status = self.runtime.policy_status()
        except Exception:
            log.exception("runtime.policy_status() failed during a metrics scrape; policy metrics left out")
            return
        with self._lock:
            for ev in status.events:
                if ev.seq > self._observed_seq:
                    self.event_s.labels(kind=ev.kind).observe(ev.seconds)
                    self._observed_seq = ev.seq
            events = list(self.event_s.collect())
        yield from events
        yield GaugeMetricFamily("kunjax_pipeline_units", "Pipeline units (instances fused by the policy) serving now.",
                                value=sum(u.mode == "pipeline" for u in status.units))
        yield GaugeMetricFamily("kunjax_remote_attention_requests",
                                "Running requests still reading history on another device by remote attention.",
                                value=sum(u.remote_dependent for u in status.units))
        stats = GaugeMetricFamily("kunjax_policy_stat", "The memory policy's own figures by name (preemptions; "
                                  "swap_outs, host_used ...; migrations ...; partial_admissions ...; drops, "
                                  "restores, blocks_exchanged ...); counts of events only grow.", labels=["name"])
        for name, value in sorted(status.counters.items()):
            stats.add_metric([name], value)
        yield stats


class ServingMetrics:
    """The server's metrics in their own registry; `serve_http` exposes them (see the module docstring)."""

    def __init__(self, runtime: Runtime | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft_s = Histogram("kunjax_time_to_first_token_seconds", "RPC arrival to first generated token.",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.queue_s = Histogram("kunjax_queue_time_seconds", "Admission by the runtime to first generated token.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tpot_s = Histogram("kunjax_time_per_output_token_seconds",
                                "Mean time per output token after the first, per request with >= 2 tokens.",
                                buckets=TOKEN_BUCKETS, registry=r)
        self.e2e_s = Histogram("kunjax_e2e_request_latency_seconds", "RPC arrival to the final event.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("kunjax_requests", "Admitted requests by how they ended.", ["finish_reason"],
                                registry=r)
        self.rejected = Counter("kunjax_requests_rejected", "Requests refused before admission, by status code.",
                                ["code"], registry=r)
        if runtime is not None:
            r.register(_LoadCollector(runtime))
            r.register(_PolicyCollector(runtime))
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def count_rejected(self, code: object) -> None:
        """Counts a refused request; `code` is a `grpc.StatusCode` (its name is the label) or a string."""
        self.rejected.labels(code=getattr(code, "name", str(code))).inc()

    def stream(self, arrived: float) -> StreamTimer:
        """A timer for one admitted request whose RPC arrived at `arrived` (`time.monotonic()`)."""
        return StreamTimer(self, arrived)

    def exposition(self) -> bytes:
        """The text exposition of this registry, as the HTTP endpoint serves it."""
        return prometheus_client.generate_latest(self.registry)

    def serve_http(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Serves `/metrics` (any path, in fact) on `host:port` from a daemon thread; returns the bound port."""
        if self._http is not None:
            raise RuntimeError("metrics endpoint already started")
        self._http, self._http_thread = prometheus_client.start_http_server(port, host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        """Stops the HTTP endpoint, if started."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)
            self._http = self._http_thread = None


class StreamTimer:
    """Observes one request's events as the server forwards them; `close` records how the stream ended."""

    def __init__(self, metrics: ServingMetrics, arrived: float):
        self.metrics = metrics
        self.arrived = arrived
        self.admitted = time.monotonic()
        self.first_token_at: float | None = None
        self.tokens = 0
        self._closed = False

    def on_event(self, ev: TokenEvent) -> None:
        now = time.monotonic()
        if ev.token_ids and self.first_token_at is None:
            self.first_token_at = now
            self.metrics.ttft_s.observe(now - self.arrived)
            self.metrics.queue_s.observe(now - self.admitted)
        self.tokens += len(ev.token_ids)
        if ev.finished:
            self._end(ev.finish_reason or "error", now)

    def close(self) -> None:
        """Call when the stream ends for any reason; counts it as cancelled unless a final event was seen."""
        self._end(CANCELLED, time.monotonic())

    def _end(self, reason: str, now: float) -> None:
        if self._closed:
            return
        self._closed = True
        self.metrics.requests.labels(finish_reason=reason).inc()
        if reason == CANCELLED:
            return  # its latency says when the client gave up, not how fast we served
        self.metrics.e2e_s.observe(now - self.arrived)
        if self.first_token_at is not None and self.tokens >= 2:
            self.metrics.tpot_s.observe((now - self.first_token_at) / (self.tokens - 1))
