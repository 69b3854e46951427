"""The metrics endpoint of a running appliance (`edge run`, a simulated device): served from the event
loop, bounded, and never the reason the appliance stops."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge import __version__
from edge.status import _plural
from tests.support import (
    EdgeProcess,
    free_port,
    set_faults,
    start_sim,
    stop,
    wait_metric,
    write_config,
    write_map,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[tuple[EdgeProcess, int]]:
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": 0, "type": "uint16", "wave": "counter", "step": 1.0}]}])
    with start_sim(tmp_path / "map.toml") as sim:
        conf = tmp_path / "config.toml"
        write_config(conf, {
            "appliance": {"id": "m", "state_dir": str(tmp_path / "state")},
            "device": [{"name": "d", "host": "127.0.0.1", "port": sim.port, "interval": "100ms",
                        "tag": [{"name": "a", "address": 0}]}],
            "store": {"map_size": "16MiB"}, "uplink": {"port": free_port()}, "metrics": {"port": 0}})
        process = EdgeProcess(conf)
        try:
            yield process, process.metrics_port()
        finally:
            assert stop(process) == 0, process.log


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_two_hundred_idle_connections_lock_nobody_out(edge: tuple[EdgeProcess, int]) -> None:
    """Connections that never send a request (a scanner, a stuck client, an attacker) hold no thread and
    cannot fill the server: each new one pushes the oldest idle one out, and scrapes keep answering."""
    process, port = edge
    idle = []
    try:
        idle.extend(socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(200))
        for _ in range(5):
            status, body = get(port, "/metrics")
            assert status == 200 and b"edge_uptime_seconds" in body
            status, body = get(port, "/health")
            assert status == 200 and json.loads(body)["ok"] is True
        assert len(os.listdir(f"/proc/{process.proc.pid}/task")) <= 3  # no thread per connection
        closed = sum(1 for s in idle if _closed(s))
        assert closed >= 200 - 16  # the oldest idle ones were let go
    finally:
        for s in idle:
            s.close()
    wait_metric(port, "edge_store_commits_total", lambda v: v >= 2)  # the appliance went on meanwhile


def _closed(s: socket.socket) -> bool:
    """Closed (or reset) by the server; False while it is still open."""
    s.settimeout(0.2)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_oversized_slow_and_malformed_requests_are_dropped(edge: tuple[EdgeProcess, int]) -> None:
    _, port = edge
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")  # beyond the 8 KiB head
        assert s.recv(100) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert get(port, "/nothing")[0] == 404
    assert get(port, "/metrics")[0] == 200


def test_metrics_follow_prometheus_conventions(edge: tuple[EdgeProcess, int]) -> None:
    """The standard process_* names, a build_info, and every error kind exported at 0 from the start (so
    rate() is 0, not absent, until the first error)."""
    _, port = edge
    text = get(port, "/metrics")[1].decode()
    assert "\nprocess_resident_memory_bytes " in text and "\nprocess_cpu_seconds_total " in text
    assert f'edge_build_info{{version="{__version__}"}} 1.0' in text
    for kind in ("timeout", "bad_frame", "connect_failed", "exception_2_illegal_address"):
        assert f'edge_device_errors_total{{device="d",kind="{kind}"}} 0.0' in text, kind
    # names say what is counted, in what unit: blocks, readings, bytes, connections, seconds
    uplink = sorted(set(re.findall(r"^edge_uplink_\w+_total", text, re.M)))
    nouns = r"edge_uplink_(blocks|readings|bytes|connections?)_"
    assert uplink and all(re.match(nouns, m) for m in uplink), uplink
    assert 'edge_poll_lateness_seconds_bucket{device="d",group="default",le="0.001"}' in text  # a histogram
    assert "edge_process_write_bytes_total" in text and "edge_store_write_bytes" not in text  # the process's
    helps = re.findall(r"^# HELP (edge_\w+) (.*)$", text, re.M)
    assert all(len(doc.split()) >= 3 for _, doc in helps), [h for h in helps if len(h[1].split()) < 3]


def test_status_says_why_a_device_is_down_and_since_when(tmp_path: Path) -> None:
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": 0, "type": "uint16", "wave": "counter", "step": 1.0}]}])
    control = tmp_path / "faults.json"
    set_faults(control, {})
    with start_sim(tmp_path / "map.toml", control=control) as sim:
        conf = tmp_path / "config.toml"
        write_config(conf, {
            "appliance": {"id": "m", "state_dir": str(tmp_path / "state")},
            "device": [{"name": "meter", "host": "127.0.0.1", "port": sim.port, "interval": "100ms",
                        "timeout": "200ms", "retries": 0, "tag": [{"name": "a", "address": 0}]}],
            "store": {"map_size": "16MiB"}, "uplink": {"port": free_port()},
            "metrics": {"port": free_port()}})
        process = EdgeProcess(conf)
        try:
            port = process.metrics_port()
            wait_metric(port, "edge_store_commits_total", lambda v: v >= 2)
            set_faults(control, {"1": {"mode": "silent"}})
            wait_metric(port, "edge_device_up", lambda v: v == 0)
            shown = status(conf, "--window", "2")
            as_json = json.loads(status(conf, "--config", str(conf), "--json", "--window", "1"))
        finally:
            assert stop(process) == 0, process.log
    assert shown.count("DOWN") == 1 and "rates over the last 2 s" in shown, shown
    lines = shown.splitlines()
    down = lines[next(i for i, x in enumerate(lines) if "DOWN" in x) + 1]  # the line under the device's
    assert "timeout" in down and "breaker_open" not in down and " for " in down, shown  # the cause, kept
    assert _plural(1, "block") == "1 block" and _plural(2, "block") == "2 blocks"
    assert as_json["metrics"]["edge_device_up"] == [{"labels": {"device": "meter"}, "value": 0.0}]
    assert {s["labels"]["kind"] for s in as_json["metrics"]["edge_device_errors_total"]} >= {"timeout"}


def status(conf: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "edge", "status", *(() if "--config" in args else (str(conf),)),
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_grafana_dashboard_names_only_metrics_the_appliance_exports(
        edge: tuple[EdgeProcess, int]) -> None:
    """docs/grafana-dashboard.json imports into Grafana as it is; a metric renamed or dropped here
    would leave one of its panels empty: every metric its expressions name must be exported."""
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {re.sub(r"_(bucket|sum|count)$", "", m)
             for e in exprs for m in re.findall(r"\b(?:edge|process)_\w+", e)}
    _, port = edge
    text = get(port, "/metrics")[1].decode()  # a family without samples yet still has its # TYPE line
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    exported |= {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    exported |= {re.sub(r"_(bucket|sum|count)$", "", m) for m in exported}
    assert len(exprs) >= 12 and named, exprs
    assert named <= exported, sorted(named - exported)
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dashboard["panels"])
