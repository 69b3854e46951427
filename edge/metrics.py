"""Prometheus metrics and /health on [metrics] listen:port (127.0.0.1:9108 by default).

Everything is read from the stages' own counters when scraped: nothing is updated per reading, so
metrics cost nothing between scrapes. Served by prometheus-client's WSGI server in a daemon thread.

    GET /metrics   Prometheus text exposition (families below, names prefixed edge_)
    GET /health    200 {"ok": true, ...} when poll, store and uplink each made progress within
                   `stale` seconds (3 x the longest poll interval, at least 30 s); 503 otherwise,
                   naming the stalled stage
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from edge.govern import LEVELS as GOVERNOR_LEVELS
from edge.poll.engine import LATENCY_BUCKETS
from edge.store import write_bytes

if TYPE_CHECKING:
    from edge.app import Appliance


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(f"edge_{name}", doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"edge_{name}", doc, labels=list(labels))


class ApplianceCollector:
    def __init__(self, app: Appliance) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        yield from self._devices()
        yield from self._groups()
        yield from self._store()
        yield from self._uplink()
        up = _gauge("uptime_seconds", "Seconds since the appliance started")
        up.add_metric([], time.time() - self.app.started)
        yield up
        rl = _counter("config_reloads", "Configs reloaded on SIGHUP")
        rl.add_metric([], self.app.reloads)
        yield rl
        lp = _gauge("low_power", "1 while low-power mode is on")
        lp.add_metric([], float(getattr(self.app, "low_power", False)))
        yield lp
        yield from self._governor()
        writes = _counter("writes", "Write commands (cmd/write, edge write) by outcome", ["result"])
        writes.add_metric(["ok"], self.app.commands.executed)
        writes.add_metric(["refused"], self.app.commands.refused)
        yield writes

    def _governor(self) -> Iterator[Metric]:
        g = self.app.governor
        level = _gauge("governor_memory_level", "Memory level: 0 normal, 1 soft (stretching), 2 shed")
        level.add_metric([], float(GOVERNOR_LEVELS.index(g.level)))
        rss = _gauge("governor_rss_bytes", "Anonymous RSS the governor judges (median of its window)")
        rss.add_metric([], float(g.rss))
        cpu = _gauge("governor_cpu_cores", "CPU used over the governor's window, in cores")
        cpu.add_metric([], g.cpu)
        decisions = _counter("governor_decisions", "Governor state changes (each one is logged)")
        decisions.add_metric([], g.decisions)
        limits = _gauge("governor_limit_bytes", "Memory limits in force (absent: none)", ["limit"])
        for name, value in (("soft", g.soft), ("hard", g.hard)):
            if value is not None:
                limits.add_metric([name], float(value))
        yield from (level, rss, cpu, decisions, limits)

    def _devices(self) -> Iterator[Metric]:
        fams = {
            "requests": _counter("device_requests", "Modbus requests sent", ["device"]),
            "good": _counter("device_replies_good", "Requests answered with valid data", ["device"]),
            "readings": _counter("device_readings", "Readings polled (any quality)", ["device"]),
            "stored": _counter("device_readings_stored", "Readings passed on to the store: polled minus "
                               "those inside their deadband (report by exception)", ["device"]),
            "skipped": _counter("device_requests_skipped", "Requests not sent: breaker open or link down",
                                ["device"]),
        }
        errors = _counter("device_errors", "Failed requests by kind", ["device", "kind"])
        up = _gauge("device_up", "1 while the device answers", ["device"])
        latency = HistogramMetricFamily("edge_device_latency_seconds", "Request round trip",
                                        labels=["device"])
        for r in self.app.poller.runners:
            d, st = r.device.name, r.stats
            for key, fam in fams.items():
                fam.add_metric([d], getattr(st, key))
            for kind, n in st.errors.items():
                errors.add_metric([d, kind], n)
            up.add_metric([d], 1.0 if st.up else 0.0)
            cumulative, buckets = 0, []
            for bound, n in zip(LATENCY_BUCKETS, st.latency_buckets, strict=True):
                cumulative += n
                buckets.append((str(bound), cumulative))
            buckets.append(("+Inf", st.good))
            latency.add_metric([d], buckets, st.latency_sum)
        yield from (*fams.values(), errors, up, latency)

    def _groups(self) -> Iterator[Metric]:
        cycles = _counter("poll_cycles", "Poll cycles run", ["device", "group"])
        overruns = _counter("poll_overruns", "Poll cycles skipped because the previous one ran late",
                            ["device", "group"])
        jitter = _counter("poll_jitter_seconds", "Total lateness of cycle starts", ["device", "group"])
        jmax = _gauge("poll_jitter_max_seconds", "Largest lateness of a cycle start", ["device", "group"])
        stretch = _gauge("poll_stretch", "Interval multiplier (governor, low power)", ["device", "group"])
        for line in self.app.poller.lines:
            for sched, r, group in line.plan:
                labels = [r.device.name, group]
                cycles.add_metric(labels, sched.cycles)
                overruns.add_metric(labels, sched.overruns)
                jitter.add_metric(labels, sched.jitter_sum)
                jmax.add_metric(labels, sched.jitter_max)
                stretch.add_metric(labels, sched.stretch)
        yield from (cycles, overruns, jitter, jmax, stretch)

    def _store(self) -> Iterator[Metric]:
        c = self.app.store.counters
        for name, doc in (("readings_appended", "Readings handed to the store"),
                          ("blocks_committed", "Blocks written"), ("commits", "Write transactions"),
                          ("blocks_forwarded", "Blocks acknowledged upstream"),
                          ("readings_forwarded", "Readings acknowledged upstream"),
                          ("blocks_rejected", "Blocks refused upstream, kept aside"),
                          ("readings_rejected", "Readings refused upstream, kept aside"),
                          ("blocks_dropped", "Blocks dropped because the store was full"),
                          ("readings_dropped", "Readings dropped because the store was full"),
                          ("recoveries", "Damaged stores moved aside"),
                          ("rejected_trimmed", "Refused blocks dropped to keep room for pending ones"),
                          ("commit_failures", "Commits that failed (readings kept in RAM)")):
            fam = _counter(f"store_{name}", doc)
            fam.add_metric([], getattr(c, name))
            yield fam
        written = _counter("store_write_bytes", "Bytes this process wrote to storage (/proc/self/io)")
        written.add_metric([], write_bytes())
        yield written
        for name, value, doc in (("backlog_readings", c.backlog_readings, "Readings waiting upstream"),
                                 ("backlog_blocks", c.backlog_blocks, "Blocks waiting upstream"),
                                 ("oldest_age_seconds", self._oldest_age(),
                                  "Age of the oldest stored reading")):
            g = _gauge(f"store_{name}", doc)
            g.add_metric([], value)
            yield g

    def _oldest_age(self) -> float:
        ts = self.app.store.oldest_ts()
        return 0.0 if ts is None else max(0.0, time.time() - ts / 1e9)

    def _uplink(self) -> Iterator[Metric]:
        st = self.app.uplink.stats
        conn = _gauge("uplink_connected", "1 while connected to the broker")
        conn.add_metric([], float(st.connected))
        yield conn
        for name in ("connects", "connect_failures", "published", "acked", "rejected", "kept",
                     "readings_delivered", "bytes_published"):
            fam = _counter(f"uplink_{name}", f"Uplink {name.replace('_', ' ')}")
            fam.add_metric([], getattr(st, name))
            yield fam
        last = _gauge("uplink_last_delivery_timestamp_seconds", "Unix time of the last acknowledged block")
        last.add_metric([], st.last_delivery)
        yield last


def health(app: Appliance, now: float | None = None) -> tuple[bool, dict[str, Any]]:
    """Has every stage made progress recently? (monotonic clock)"""
    now = time.monotonic() if now is None else now
    longest = max((g.interval * s.stretch for line in app.poller.lines for s, r, _ in line.plan
                   for g in r.device.groups), default=1.0)
    stale = max(30.0, 3 * longest)
    ages = {
        "poll": now - min((line.last_cycle for line in app.poller.lines), default=now),
        "store": now - app.last_commit,
    }
    if app.config.uplink.enabled:
        ages["uplink"] = now - app.uplink.stats.last_progress
    stalled = sorted(k for k, age in ages.items() if age > stale)
    return not stalled, {"ok": not stalled, "stalled": stalled, "stale_after_s": stale,
                         "age_s": {k: round(v, 3) for k, v in ages.items()}}


def _app(registry: CollectorRegistry, app: Appliance) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(registry)

    def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/health":
            ok, body = health(app)
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json")])
            return [json.dumps(body).encode()]
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return route


class MetricsServer:
    def __init__(self, app: Appliance) -> None:
        cfg = app.config.metrics
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ApplianceCollector(app))
        ProcessCollector(namespace="edge", registry=self.registry)
        self.server: WSGIServer = make_server(cfg.listen, cfg.port, _app(self.registry, app),
                                              ThreadingWSGIServer, handler_class=_SilentHandler)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
