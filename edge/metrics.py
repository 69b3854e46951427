"""Prometheus metrics and /health on [metrics] listen:port (127.0.0.1:9108 by default).

Everything is read from one snapshot of the stages (Snapshot, built by the app from each stage's own
snapshot()) when scraped: nothing is updated per reading, so metrics cost nothing between scrapes.

    GET /metrics   Prometheus text exposition (families below, names prefixed edge_)
    GET /health    200 {"ok": true, ...} when poll, store and uplink each beat within HEALTH_STALE
                   seconds (edge.supervise.stalled, the watchdog's definition); 503 otherwise, naming
                   the stalled stage

Served from the event loop (asyncio), never a thread per connection: at most MAX_CONNECTIONS wait for
their request at once (a new one closes the oldest waiting, so idle connections cannot lock scrapers
out), each request read within REQUEST_TIMEOUT and at most MAX_REQUEST bytes, one request per connection.
The rendered /metrics is reused for RENDER_REUSE seconds, so a flood of scrapes costs one render.
Metrics are an observer: if the port cannot be bound (another process holds it) that is logged once,
shown in the systemd status line, and retried with backoff; polling, storing and forwarding go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from edge import __version__
from edge.config import MetricsConfig
from edge.govern import LEVELS as GOVERNOR_LEVELS
from edge.govern import GovernorSnapshot
from edge.policy import Policy
from edge.poll import LATENCY_BUCKETS, LATENESS_BUCKETS, PollSnapshot, backoff
from edge.reading import EXCEPTION, quality_name
from edge.snapshot import Snapshot
from edge.store import StoreSnapshot
from edge.supervise import stalled
from edge.uplink import UplinkStats

log = logging.getLogger("edge.metrics")

HEALTH_STALE = 30.0  # seconds without a beat before /health names a stage stalled
# the kinds of edge_device_errors_total exported from the start, at 0: rate() of them is 0, not absent
ERROR_KINDS = ("timeout", "bad_frame", "disconnected", "connect_failed", "exception_out_of_range",
               *(quality_name(EXCEPTION | c) for c in (1, 2, 3, 4, 5, 6, 8, 10, 11)))
MAX_CONNECTIONS = 16
MAX_REQUEST = 8192  # bytes of request line and headers
REQUEST_TIMEOUT = 5.0
RENDER_REUSE = 0.5  # seconds a rendered /metrics answers further scrapes


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(f"edge_{name}", doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"edge_{name}", doc, labels=list(labels))


def _one(fam: Any, value: float) -> Any:
    fam.add_metric([], value)
    return fam


class ApplianceCollector:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        yield from self._devices(s.poll)
        yield from self._groups(s.poll)
        yield from self._store(s.store)
        yield from self._uplink(s.uplink, s.policy)
        yield _one(_gauge("uptime_seconds", "Seconds since the appliance started"), time.time() - s.started)
        yield _one(_counter("process_write_bytes", "Bytes this process caused to be written to storage, all "
                            "of it: the store's commits and every other file (/proc/self/io write_bytes)"),
                   s.written)
        info = _gauge("build_info", "1, labelled with the running version", ["version"])
        info.add_metric([__version__], 1.0)
        yield info
        yield _one(_counter("config_reloads", "Configs reloaded on SIGHUP"), s.reloads)
        yield _one(_counter("config_reloads_refused", "Reloads refused (the config was bad; the running one "
                            "was kept)"), s.reloads_refused)
        yield _one(_gauge("low_power", "1 while low-power mode is on"), float(s.policy.low_power))
        yield from self._governor(s.governor)
        writes = _counter("writes", "Write commands (cmd/write, edge write) by outcome", ["result"])
        writes.add_metric(["ok"], s.writes[0])
        writes.add_metric(["refused"], s.writes[1])
        yield writes

    def _governor(self, g: GovernorSnapshot) -> Iterator[Metric]:
        yield _one(_gauge("governor_memory_level", "Memory level: 0 normal, 1 soft (stretching), 2 shed"),
                   float(GOVERNOR_LEVELS.index(g.level)))
        yield _one(_gauge("governor_rss_bytes", "Anonymous RSS the governor judges (median of its window)"),
                   float(g.rss))
        yield _one(_gauge("governor_cpu_cores", "CPU used over the governor's window, in cores"), g.cpu)
        yield _one(_counter("governor_decisions", "Governor state changes (each one is logged)"), g.decisions)
        limits = _gauge("governor_limit_bytes", "Memory limits in force (absent: none)", ["limit"])
        for name, value in (("soft", g.soft), ("hard", g.hard)):
            if value is not None:
                limits.add_metric([name], float(value))
        yield limits

    def _devices(self, poll: PollSnapshot) -> Iterator[Metric]:
        fams = {
            "requests": _counter("device_requests", "Modbus requests sent", ["device"]),
            "good": _counter("device_replies_good", "Requests answered with valid data", ["device"]),
            "readings": _counter("device_readings", "Readings polled (any quality)", ["device"]),
            "stored": _counter("device_readings_stored", "Readings passed on to the store: polled minus "
                               "those inside their deadband (report by exception)", ["device"]),
            "skipped": _counter("device_requests_skipped", "Requests not sent: breaker open or link down",
                                ["device"]),
        }
        errors = _counter("device_errors", "Failed requests by kind, and failed connections (connect_failed)",
                          ["device", "kind"])
        up = _gauge("device_up", "1 while the device answers", ["device"])
        since = _gauge("device_down_since_timestamp_seconds",
                       "Unix time the device stopped answering (0: up)", ["device"])
        problem = _gauge("device_problem", "1 for the reason a device is down (its last failure), per reason",
                         ["device", "problem"])
        latency = HistogramMetricFamily("edge_device_latency_seconds", "Request round trip",
                                        labels=["device"])
        for d, st in poll.devices:
            for key, fam in fams.items():
                fam.add_metric([d], getattr(st, key))
            for kind in sorted(set(ERROR_KINDS) | set(st.errors)):  # every kind from the start: rate() is 0
                errors.add_metric([d, kind], st.errors.get(kind, 0))
            up.add_metric([d], 1.0 if st.up else 0.0)
            since.add_metric([d], st.down_since)
            if not st.up and st.problem:
                problem.add_metric([d, st.problem], 1.0)
            latency.add_metric([d], _buckets(LATENCY_BUCKETS, st.latency_buckets, st.good), st.latency_sum)
        yield from (*fams.values(), errors, up, since, problem, latency)

    def _groups(self, poll: PollSnapshot) -> Iterator[Metric]:
        cycles = _counter("poll_cycles", "Poll cycles run", ["device", "group"])
        overruns = _counter("poll_overruns", "Poll cycles skipped because the previous one ran late",
                            ["device", "group"])
        late = HistogramMetricFamily("edge_poll_lateness_seconds", "How late poll cycles started (behind "
                                     "their deadline)", labels=["device", "group"])
        stretch = _gauge("poll_stretch", "Interval multiplier (governor, low power)", ["device", "group"])
        interval = _gauge("poll_interval_seconds", "Configured interval of the group (in force: x stretch)",
                          ["device", "group"])
        for g in poll.groups:
            labels = [g.device, g.group]
            interval.add_metric(labels, g.interval)
            cycles.add_metric(labels, g.cycles)
            overruns.add_metric(labels, g.overruns)
            late.add_metric(labels, _buckets(LATENESS_BUCKETS, g.lateness, g.cycles), g.jitter_sum)
            stretch.add_metric(labels, g.stretch)
        yield from (cycles, overruns, late, stretch, interval)

    def _store(self, s: StoreSnapshot) -> Iterator[Metric]:
        c = s.counters
        for name, doc in (("readings_appended", "Readings handed to the store"),
                          ("blocks_committed", "Blocks written to the store"),
                          ("commits", "Write transactions of the store (one per commit window)"),
                          ("blocks_forwarded", "Blocks acknowledged upstream"),
                          ("readings_forwarded", "Readings acknowledged upstream"),
                          ("blocks_direct", "Blocks acknowledged upstream from RAM, never written"),
                          ("readings_direct", "Readings acknowledged upstream from RAM, never written"),
                          ("blocks_rejected", "Blocks refused upstream, kept aside"),
                          ("readings_rejected", "Readings refused upstream, kept aside"),
                          ("blocks_dropped", "Blocks dropped because the store was full"),
                          ("readings_dropped", "Readings dropped because the store was full"),
                          ("recoveries", "Damaged stores moved aside"),
                          ("rejected_blocks_trimmed", "Refused blocks dropped to keep room for pending ones"),
                          ("commit_failures", "Commits that failed (readings kept in RAM)"),
                          ("blocks_salvaged", "Blocks of moved-aside stores put back in the queue"),
                          ("readings_salvaged", "Readings of moved-aside stores put back in the queue")):
            value = getattr(c, name.replace("rejected_blocks_", "rejected_"))
            yield _one(_counter(f"store_{name}", doc), value)
        age = 0.0 if s.oldest_ts is None else max(0.0, time.time() - s.oldest_ts / 1e9)
        for name, value, doc in (("backlog_readings", c.backlog_readings, "Readings waiting upstream"),
                                 ("backlog_blocks", c.backlog_blocks, "Blocks waiting upstream"),
                                 ("oldest_age_seconds", age, "Age of the oldest stored reading"),
                                 ("window_readings", s.window_readings, "Readings in RAM, in the open "
                                  "commit window"),
                                 ("commit_interval_seconds", s.commit_interval, "Commit window in force "
                                  "([store] commit_interval, or low_power_commit_interval in low power)")):
            yield _one(_gauge(f"store_{name}", doc), value)

    def _uplink(self, st: UplinkStats, policy: Policy) -> Iterator[Metric]:
        yield _one(_gauge("uplink_connected", "1 while connected to the broker"), float(st.connected))
        for name, field, doc in (
                ("connections", "connects", "Connections made to the broker"),
                ("connection_failures", "connect_failures", "Connection attempts that failed"),
                ("blocks_published", "published", "Blocks published, one message each"),
                ("blocks_acked", "acked", "Blocks the broker acknowledged (deleted from the store)"),
                ("blocks_rejected", "rejected", "Blocks the broker refused (moved aside in the store)"),
                ("blocks_kept", "kept", "Blocks sent but not acknowledged (kept, sent again later)"),
                ("readings_delivered", "readings_delivered", "Readings in blocks the broker acknowledged"),
                ("bytes_published", "bytes_published", "Bytes of payload published")):
            yield _one(_counter(f"uplink_{name}", doc), getattr(st, field))
        yield _one(_gauge("uplink_last_delivery_timestamp_seconds",
                          "Unix time of the last acknowledged block"), st.last_delivery)
        yield _one(_gauge("uplink_session_interval_seconds", "Seconds between uplink sessions in low-power "
                          "mode (0: connected continuously)"), policy.session_interval or 0.0)


def _buckets(bounds: Iterable[float], counts: Iterable[int], total: int) -> list[tuple[str, float]]:
    """Cumulative histogram buckets from per-bucket counts; `total` is the +Inf bucket."""
    out: list[tuple[str, float]] = []
    cumulative = 0
    for bound, n in zip(bounds, counts, strict=True):
        cumulative += n
        out.append((str(bound), cumulative))
    out.append(("+Inf", total))
    return out


def liveness(beats: dict[str, float], now: float | None = None) -> tuple[bool, dict[str, Any]]:
    """Has every stage beaten within HEALTH_STALE seconds? (monotonic clock)"""
    now = time.monotonic() if now is None else now
    late = stalled(beats, now - HEALTH_STALE)
    return not late, {"ok": not late, "stalled": late, "stale_after_s": HEALTH_STALE,
                      "age_s": {k: round(now - t, 3) for k, t in beats.items()}}


class MetricsServer:
    """The HTTP endpoint (module docstring). `problem` says why it is not listening, else None."""

    def __init__(self, cfg: MetricsConfig, snapshot: Callable[[], Snapshot],
                 beats: Callable[[], dict[str, float]],
                 update: Callable[[], dict[str, Any] | None] = lambda: None) -> None:
        self.cfg = cfg
        self.beats = beats
        self.update = update  # the last image update, for /health (not a whole snapshot per request)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ApplianceCollector(snapshot))
        ProcessCollector(registry=self.registry)  # the standard process_* names dashboards expect
        self.port: int | None = None
        self.problem: str | None = None
        self.waiting: dict[asyncio.StreamWriter, None] = {}  # connected, request not read yet, oldest first
        self.rendered = (-RENDER_REUSE, b"")

    async def run(self) -> None:
        """Listen and serve until cancelled; while the port cannot be bound, retry with backoff."""
        failures = 0
        while True:
            try:
                # Bound here, not by start_server(host, port): uvloop would resolve the address on libuv's
                # thread pool and keep its four threads for the life of the process.
                sock = socket.create_server((self.cfg.listen, self.cfg.port), backlog=MAX_CONNECTIONS)
                server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_REQUEST)
            except OSError as e:
                self.problem = f"cannot listen on {self.cfg.listen}:{self.cfg.port} ({e.strerror or e})"
                log.log(logging.ERROR if failures == 0 else logging.DEBUG, "metrics: %s; retrying, while "
                        "polling, storing and forwarding go on", self.problem)
                failures += 1
                await asyncio.sleep(backoff(failures - 1, 1.0, 60.0))
                continue
            self.port = server.sockets[0].getsockname()[1]
            self.problem = None
            log.info("edge: metrics on http://%s:%d/metrics%s", self.cfg.listen, self.port,
                     f" (after {failures} failed attempts)" if failures else "")
            async with server:
                await server.serve_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.waiting) >= MAX_CONNECTIONS:
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            oldest.transport.abort()  # its readuntil() ends, and its handler with it
        self.waiting[writer] = None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                self.waiting.pop(writer, None)
                status, ctype, body = self.respond(head)
                writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                             "Connection: close\r\n\r\n".encode() + body)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a slow, silent, oversized or vanished client: dropped
        finally:
            self.waiting.pop(writer, None)
            writer.close()

    def respond(self, head: bytes) -> tuple[str, str, bytes]:
        """(status, content type, body) for a request's head."""
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return "400 Bad Request", "text/plain", b"bad request\n"
        if parts[0] != b"GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        path = parts[1].split(b"?", 1)[0]
        if path == b"/metrics":
            now = time.monotonic()
            if now - self.rendered[0] >= RENDER_REUSE:
                self.rendered = (now, generate_latest(self.registry))
            return "200 OK", CONTENT_TYPE_LATEST, self.rendered[1]
        if path == b"/health":
            ok, body = liveness(self.beats())
            body["update"] = self.update()
            status = "200 OK" if ok else "503 Service Unavailable"
            return status, "application/json", json.dumps(body).encode()
        return "404 Not Found", "text/plain", b"/metrics or /health\n"

