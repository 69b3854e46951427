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


def fetch_health(base: str, timeout: float = 3.0) -> dict[str, Any]:
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


def _plural(n: float, word: str) -> str:
    """
    >>> _plural(1, "block"), _plural(2, "block"), _plural(1_234, "reading")
    ('1 block', '2 blocks', '1,234 readings')
    """
    return f"{n:,.0f} {word}" if round(n) == 1 else f"{n:,.0f} {word}s"


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:g} s" if seconds < 120 else _ago(seconds)


def summary(a: Samples, b: Samples, dt_s: float, hl: dict[str, Any], appliance: str) -> str:
    """The status view from two scrapes `dt_s` seconds apart (rates are averages over that window)."""
    def rate(name: str, key: str | None = None, label: str = "device") -> float:
        if key is None:
            return (_one(b, name) - _one(a, name)) / dt_s
        return (_by(b, name, label).get(key, 0.0) - _by(a, name, label).get(key, 0.0)) / dt_s

    up = _one(b, "edge_uptime_seconds")
    stalled = ", ".join(hl.get("stalled", [])) or "-"
    low = bool(_one(b, "edge_low_power"))
    lines = [
        f"appliance {appliance}: up {dt.timedelta(seconds=int(up))}, health "
        f"{'ok' if hl.get('ok') else 'STALLED: ' + stalled}, low power {'on' if low else 'off'}",
        f"devices (rates over the last {dt_s:.0f} s)",
    ]
    errors = _by(b, "edge_device_errors_total", "device")
    lat_sum, lat_n = (
        _by(b, "edge_device_latency_seconds_sum", "device"),
        _by(b, "edge_device_latency_seconds_count", "device"),
    )
    since = _by(b, "edge_device_down_since_timestamp_seconds", "device")
    problems = {dict(k)["device"]: dict(k)["problem"]
                for k, v in b.get("edge_device_problem", {}).items() if v}
    polled_all = stored_all = 0.0
    for device, is_up in sorted(_by(b, "edge_device_up", "device").items()):
        mean = lat_sum.get(device, 0) / lat_n[device] * 1e3 if lat_n.get(device) else 0.0
        requests = rate("edge_device_requests_total", device)
        polled = rate("edge_device_readings_total", device)
        stored = rate("edge_device_readings_stored_total", device)
        polled_all, stored_all = polled_all + polled, stored_all + stored
        state = "up  " if is_up else "DOWN"
        line = (f"  {device:<16} {state}  {requests:7.1f} req/s  {polled:8.1f} readings/s polled, "
                f"{stored:8.1f} stored  errors {errors.get(device, 0):,.0f}  latency {mean:.1f} ms")
        if not is_up:
            why = problems.get(device, "not answering")
            ago = f" for {_ago(time.time() - since[device])}" if since.get(device) else ""
            line += f"\n  {'':<16} {why}{ago}"
        lines.append(line)
    if stored_all < polled_all * 0.99:
        lines.append(f"  stored < polled: deadbands (report by exception) left out "
                     f"{polled_all - stored_all:,.1f} readings/s that did not move")
    stretched = _stretched(b)
    if stretched:
        lines.append("  intervals in force: " + ", ".join(stretched))
    per_day = rate("edge_process_write_bytes_total") * 86400 / 1e6
    oldest = _ago(_one(b, "edge_store_oldest_age_seconds"))
    lines += [
        "store",
        f"  backlog {_plural(_one(b, 'edge_store_backlog_readings'), 'reading')} in "
        f"{_plural(_one(b, 'edge_store_backlog_blocks'), 'block')}, oldest {oldest}; stored "
        f"{rate('edge_store_readings_appended_total'):,.1f} readings/s",
        f"  written {_one(b, 'edge_process_write_bytes_total') / 1e6:,.1f} MB so far, {per_day:,.1f} MB/day "
        f"now; dropped {_plural(_one(b, 'edge_store_readings_dropped_total'), 'reading')}, rejected "
        f"{_plural(_one(b, 'edge_store_readings_rejected_total'), 'reading')}",
        "uplink",
    ]
    last = _one(b, "edge_uplink_last_delivery_timestamp_seconds")
    session = _one(b, "edge_uplink_session_interval_seconds")
    lines.append(
        f"  {'connected' if _one(b, 'edge_uplink_connected') else 'OFFLINE'}, delivered "
        f"{_plural(_one(b, 'edge_uplink_readings_delivered_total'), 'reading')} "
        f"({rate('edge_uplink_readings_delivered_total'):,.1f}/s), last delivery "
        f"{_ago(time.time() - last) + ' ago' if last else 'never'}"
        + (f"; low power: a session every {_duration(session)}" if session else "")
    )
    update = hl.get("update")
    if isinstance(update, dict):  # the last image update (edge.update)
        lines += ["update", f"  {update.get('state')}: {update.get('slot')} from {update.get('from')}"
                            + (f", {update['detail']}" if update.get("detail") else "")]
    return "\n".join(lines)


def _stretched(s: Samples) -> list[str]:
    """Groups whose interval in force is not the configured one: "pump1/fast 2.5 s (250 ms x10)"."""
    intervals = {dict(k).get("device", "") + "/" + dict(k).get("group", ""): v
                 for k, v in s.get("edge_poll_interval_seconds", {}).items()}
    out = []
    for k, stretch in sorted(s.get("edge_poll_stretch", {}).items()):
        name = dict(k).get("device", "") + "/" + dict(k).get("group", "")
        if stretch != 1.0 and name in intervals:
            shown = "stopped" if stretch >= 1e5 else _duration(intervals[name] * stretch)
            out.append(f"{name} {shown} ({_duration(intervals[name])} x{stretch:g})")
    return out


def labelled(s: Samples) -> dict[str, list[dict[str, Any]]]:
    """Every series with its labels, for --json."""
    return {name: [{"labels": dict(labels), "value": v} for labels, v in series.items()]
            for name, series in sorted(s.items())}


def status(config: Config, watch: float | None, as_json: bool, window: float = 5.0) -> int:
    base = f"http://{config.metrics.listen}:{config.metrics.port}"
    try:
        history = [(time.monotonic(), scrape(base))]
        time.sleep(min(window, watch or window))
        while True:
            history.append((time.monotonic(), scrape(base)))
            t1, b = history[-1]
            while len(history) > 2 and t1 - history[1][0] >= window:
                history.pop(0)  # the oldest scrape still at least `window` back is the rates' base
            t0, a = history[0]
            hl = fetch_health(base)
            if as_json:
                print(json.dumps({"health": hl, "window_s": round(t1 - t0, 3), "metrics": labelled(b)}))
            else:
                if watch:
                    print("\033[2J\033[H", end="")
                print(summary(a, b, t1 - t0, hl, config.appliance.id), flush=True)
            if not watch:
                return 0
            time.sleep(watch)
    except BrokenPipeError:
        raise
    except NotOurs as e:
        print(f"edge: status: something else answers at {base} ({e}): is the [metrics] port taken by another "
              "program? The appliance says so in its log and in `systemctl status edge`", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"edge: status: no appliance answers at {base} ({e})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
