"""`edge status`: a human summary of the running appliance, read from its metrics endpoint.

Rates (requests/s, readings/s, bytes written per day) come from two scrapes `interval` seconds apart;
`--watch` keeps refreshing. Exit 1 when the appliance does not answer.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from edge.config import Config

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


class NotOurs(Exception):
    """Something answers at the metrics address, but not this appliance."""


def scrape(base: str, timeout: float = 3.0) -> Samples:
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=timeout) as r:
            text = r.read(4 << 20).decode("utf-8", "replace")
        out: Samples = defaultdict(dict)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[s.name][tuple(sorted(s.labels.items()))] = s.value
    except (urllib.error.HTTPError, ValueError) as e:
        raise NotOurs(str(e)) from e
    if "edge_uptime_seconds" not in out:
        raise NotOurs("no edge_ metrics in its answer")
    return out


def health(base: str, timeout: float = 3.0) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        return dict(json.loads(e.read()))


def _one(s: Samples, name: str) -> float:
    return sum(s.get(name, {}).values())


def _by(s: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for labels, v in s.get(name, {}).items():
        out[dict(labels).get(label, "")] += v
    return out


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def summary(a: Samples, b: Samples, dt_s: float, hl: dict[str, Any], appliance: str) -> str:
    def rate(name: str, key: str | None = None, label: str = "device") -> float:
        if key is None:
            return (_one(b, name) - _one(a, name)) / dt_s
        return (_by(b, name, label).get(key, 0.0) - _by(a, name, label).get(key, 0.0)) / dt_s

    up = _one(b, "edge_uptime_seconds")
    stalled = ", ".join(hl.get("stalled", [])) or "-"
    lines = [
        f"appliance {appliance}: up {dt.timedelta(seconds=int(up))}, health "
        f"{'ok' if hl.get('ok') else 'STALLED: ' + stalled}, low power "
        f"{'on' if _one(b, 'edge_low_power') else 'off'}",
        "devices",
    ]
    errors = _by(b, "edge_device_errors_total", "device")
    lat_sum, lat_n = (
        _by(b, "edge_device_latency_seconds_sum", "device"),
        _by(b, "edge_device_latency_seconds_count", "device"),
    )
    for device, is_up in sorted(_by(b, "edge_device_up", "device").items()):
        mean = lat_sum.get(device, 0) / lat_n[device] * 1e3 if lat_n.get(device) else 0.0
        requests = rate("edge_device_requests_total", device)
        readings = rate("edge_device_readings_total", device)
        lines.append(
            f"  {device:<16} {'up  ' if is_up else 'DOWN'}  {requests:7.1f} req/s  {readings:8.1f} readings/s"
            f"  errors {errors.get(device, 0):.0f}  latency {mean:.1f} ms"
        )
    per_day = rate("edge_store_write_bytes_total") * 86400 / 1e6
    oldest = _ago(_one(b, "edge_store_oldest_age_seconds"))
    lines += [
        "store",
        f"  backlog {_one(b, 'edge_store_backlog_readings'):,.0f} readings in "
        f"{_one(b, 'edge_store_backlog_blocks'):,.0f} blocks, oldest {oldest}",
        f"  written {_one(b, 'edge_store_write_bytes_total') / 1e6:,.1f} MB so far, {per_day:,.1f} MB/day "
        f"now; dropped {_one(b, 'edge_store_readings_dropped_total'):,.0f} readings, rejected "
        f"{_one(b, 'edge_store_readings_rejected_total'):,.0f}",
        "uplink",
    ]
    last = _one(b, "edge_uplink_last_delivery_timestamp_seconds")
    lines.append(
        f"  {'connected' if _one(b, 'edge_uplink_connected') else 'OFFLINE'}, delivered "
        f"{_one(b, 'edge_uplink_readings_delivered_total'):,.0f} readings "
        f"({rate('edge_uplink_readings_delivered_total'):,.1f}/s), last delivery "
        f"{_ago(time.time() - last) + ' ago' if last else 'never'}"
    )
    return "\n".join(lines)


def status(config: Config, watch: float | None, as_json: bool, interval: float = 1.0) -> int:
    base = f"http://{config.metrics.listen}:{config.metrics.port}"
    try:
        a, t0 = scrape(base), time.monotonic()
        while True:
            time.sleep(watch or interval)
            b, t1 = scrape(base), time.monotonic()
            hl = health(base)
            if as_json:
                print(json.dumps({"health": hl, "metrics": {k: sum(v.values()) for k, v in b.items()}}))
            else:
                if watch:
                    print("\033[2J\033[H", end="")
                print(summary(a, b, t1 - t0, hl, config.appliance.id), flush=True)
            if not watch:
                return 0
            a, t0 = b, t1
    except NotOurs as e:
        print(f"edge: status: something else answers at {base} ({e}): is the [metrics] port taken by another "
              "program? The appliance says so in its log and in `systemctl status edge`", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"edge: status: no appliance answers at {base} ({e})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
