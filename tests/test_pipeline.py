"""The whole appliance: simulated device -> edge run -> mosquitto (Debian) -> a subscriber in the test."""

from __future__ import annotations

import http.server
import json
import math
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from edge.app import Appliance
from edge.config import load, tag_id
from edge.store import Store, dump, inspect
from tests.support import (
    STOPPED,
    T0,
    EdgeProcess,
    Subscriber,
    check_delivery,
    check_values_and_order,
    config_dict,
    delivered_count,
    free_port,
    make_ca,
    metric,
    received,
    run_app,
    simulated_pump,
    start_broker,
    start_sim,
    stop,
    until,
    wait_metric,
    write_config,
    write_map,
)

ROOT = Path(__file__).resolve().parent.parent







def test_end_to_end_every_sequence_arrives(tmp_path: Path) -> None:
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker:
        sub = Subscriber(broker.port, "edge/t1/#")

        async def body(app: Appliance) -> None:
            await until(lambda: len(sub.data()) >= 15)

        app = run_app(config_dict(tmp_path, sim_port, broker.port), body)
        sub.wait(lambda s: any(t.endswith("/status") and p == b"offline" for t, p in s.messages))
        sub.close()
    msgs = check_delivery(sub)
    c = app.store.counters
    delivered = sum(m["count"] for m in msgs.values())
    assert delivered == c.readings_forwarded
    assert delivered + c.backlog_readings == c.readings_appended  # the rest waits in the store
    assert c.readings_dropped == 0 and c.blocks_rejected == 0


def test_memory_first_while_the_broker_acknowledges_nothing_is_written(tmp_path: Path) -> None:
    """[store] ack_wait: a window the broker acknowledges within it never reaches the flash; with
    ack_wait = 0 every window is written before it is sent (the same run, the same broker)."""
    written: dict[float, tuple[int, int]] = {}
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker:
        for wait in (0.0, 1.0):
            sub = Subscriber(broker.port, "edge/t1/data")

            async def body(app: Appliance, wait: float = wait) -> None:
                await until(lambda: app.uplink.stats.acked >= 3)
                c = app.store.counters
                before = (c.blocks_committed, c.blocks_forwarded)
                await until(lambda: c.blocks_forwarded >= before[1] + 20)
                written[wait] = (c.blocks_committed - before[0], c.blocks_forwarded - before[1])

            cfg = config_dict(tmp_path / f"w{wait}", sim_port, broker.port)
            cfg["store"]["ack_wait"] = wait
            app = run_app(cfg, body)
            sub.wait(lambda s, app=app: len(received(s)) >= app.store.counters.blocks_forwarded)
            sub.close()
            check_delivery(sub)
            if wait:
                assert app.store.counters.blocks_direct >= 20
            else:
                assert app.store.counters.blocks_direct == 0
    committed, forwarded = written[1.0]
    assert committed <= forwarded // 10, written  # a slow PUBACK now and then is written, no more
    assert written[0.0][0] >= written[0.0][1], written  # before: every block forwarded was written first


def test_broker_outage_loses_nothing(tmp_path: Path) -> None:
    with simulated_pump(tmp_path) as sim_port:
        port = free_port()
        broker_ctx = start_broker(tmp_path / "mqtt", port)
        broker_ctx.__enter__()
        sub = Subscriber(port, "edge/t1/data")

        async def body(app: Appliance) -> None:
            nonlocal broker_ctx
            await until(lambda: app.store.counters.blocks_forwarded >= 5)
            # Only what the subscriber already has may be in the broker when it stops: what a broker
            # acknowledged but had not passed on is the broker's to keep, not the appliance's.
            await until(lambda: delivered_count(sub) >= app.store.counters.readings_forwarded)
            broker_ctx.__exit__(None, None, None)  # the network goes away
            backlog_before = app.store.counters.readings_forwarded
            await until(lambda: app.store.counters.backlog_readings >= 200 and not app.uplink.stats.connected)
            assert app.store.counters.readings_forwarded == backlog_before
            broker_ctx = start_broker(tmp_path / "mqtt", port)  # and comes back
            broker_ctx.__enter__()
            await until(lambda: app.store.counters.backlog_readings < 60 and app.uplink.stats.connects >= 2)

        try:
            app = run_app(config_dict(tmp_path, sim_port, port), body)
            delivered = app.store.counters.readings_forwarded
            sub.wait(lambda s: sum(m["count"] for m in received(s).values()) >= delivered)
        finally:
            sub.close()
            broker_ctx.__exit__(None, None, None)
    msgs = received(sub)
    seqs = sorted(msgs)
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    check_values_and_order(msgs)
    c = app.store.counters
    assert sum(m["count"] for m in msgs.values()) + c.backlog_readings == c.readings_appended
    assert c.readings_dropped == 0
    assert app.uplink.stats.connect_failures >= 1


def test_broker_refusing_is_counted_not_retried(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite edge/+/status\ntopic read #\n")  # data topic denied
    extra = f"acl_file {acl}\n"
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt", extra=extra) as broker:

        async def body(app: Appliance) -> None:
            await until(lambda: app.store.counters.blocks_rejected >= 4)

        app = run_app(config_dict(tmp_path, sim_port, broker.port), body)
    st, c = app.uplink.stats, app.store.counters
    assert st.acked == 0 and st.rejected == st.published  # each block sent once, refused once
    assert c.blocks_rejected == st.rejected and c.readings_rejected > 0
    info = inspect(tmp_path / "state" / "store", 64 << 20)  # kept aside for inspection, persisted
    assert info.rejected_blocks == c.blocks_rejected
    assert info.persisted["readings_rejected"] == c.readings_rejected


def test_tls_with_a_test_ca_and_server_name(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    port = free_port()
    extra = (f"listener {port} 127.0.0.1\ncafile {ca['ca']}\ncertfile {ca['server']}\n"
             f"keyfile {ca['server_key']}\n")
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt", extra=extra) as broker:
        plain = Subscriber(broker.port, "edge/t1/data")

        async def body(app: Appliance) -> None:
            await until(lambda: app.store.counters.blocks_forwarded >= 3)

        cfg = config_dict(tmp_path, sim_port, port, tls={"ca": str(ca["ca"]), "server_name": "localhost"})
        app = run_app(cfg, body)
        plain.wait(lambda s: len(s.data()) >= 3)
        plain.close()
    assert app.uplink.stats.acked >= 3
    cfg["uplink"]["tls"] = {}  # system CAs do not know the test CA: refused, nothing lost
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt2", extra=extra):
        cfg["device"][0]["port"] = sim_port
        cfg["appliance"]["state_dir"] = str(tmp_path / "state2")

        async def refused(app: Appliance) -> None:
            await until(lambda: app.uplink.stats.connect_failures >= 2 and app.store.counters.commits >= 3)

        app = run_app(cfg, refused)
    assert app.uplink.stats.acked == 0 and app.store.counters.backlog_readings > 0


# ------------------------------------------------------------------------------ as a real process

def test_kill_9_during_a_backlog_drain_loses_nothing_committed(tmp_path: Path) -> None:
    port = free_port()
    with simulated_pump(tmp_path) as sim_port:
        cfg = config_dict(tmp_path, sim_port, port, max_inflight=2)
        cfg["store"]["commit_interval"] = "100ms"
        cfg["device"][0]["interval"] = "10ms"
        conf = tmp_path / "config.toml"
        write_config(conf, cfg)
        edge = EdgeProcess(conf)
        mport = edge.metrics_port()
        wait_metric(mport, "edge_store_backlog_readings", lambda v: v >= 1500)  # offline: a backlog builds
        with start_broker(tmp_path / "mqtt", port):
            sub = Subscriber(port, "edge/t1/data")
            wait_metric(mport, "edge_uplink_blocks_acked_total", lambda v: v >= 2)  # draining...
            edge.proc.kill()  # ...power cut
            edge.proc.wait()
            committed = {seq for seq, _ in dump(tmp_path / "state" / "store", 64 << 20, 0, 10**6)}
            delivered = set(received(sub))
            assert committed, "the backlog was committed before the kill"
            edge = EdgeProcess(conf)
            edge.metrics_port()
            sub.wait(lambda s: committed <= set(received(s)) | delivered, timeout=60)
            assert stop(edge) == 0, edge.log
            sub.close()
    check_values_and_order(received(sub))


def test_kill_9_again_and_again_with_memory_first_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """A power-cut loop while the broker acknowledges and windows go out from RAM: every block in the
    store at a kill arrives, no sequence number carries two contents (a restart never reuses one sent
    from RAM: the lease), and the loss at each cut is bounded by the readings still in RAM."""
    rng = random.Random(11)
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker:
        sub = Subscriber(broker.port, "edge/t1/data")
        cfg = config_dict(tmp_path, sim_port, broker.port)
        cfg["store"] |= {"commit_interval": "100ms", "ack_wait": "300ms"}
        conf = tmp_path / "config.toml"
        write_config(conf, cfg)
        stored: set[int] = set()
        direct = 0.0
        edge = None
        try:
            for _ in range(5):
                edge = EdgeProcess(conf)
                mport = edge.metrics_port()
                start = metric(mport, "edge_uplink_blocks_acked_total")
                wait_metric(mport, "edge_uplink_blocks_acked_total", lambda v, s=start: v >= s + 5)
                direct += metric(mport, "edge_store_blocks_direct_total")
                sub.wait(lambda s: len(received(s)) >= 5)
                time.sleep(rng.uniform(0.0, 0.5))  # not a wait for anything: a random moment of the cycle
                edge.proc.kill()
                edge.proc.wait()
                stored |= {seq for seq, _ in dump(tmp_path / "state" / "store", 64 << 20, 0, 10**6)}
            edge = EdgeProcess(conf)
            edge.metrics_port()
            sub.wait(lambda s: stored <= set(received(s)), timeout=60)
            assert stop(edge) == 0, edge.log
        finally:
            if edge is not None and edge.proc.poll() is None:
                edge.proc.kill()
                edge.proc.wait()
            sub.close()
    msgs = received(sub)  # asserts that a sequence number received twice carries the same readings
    check_values_and_order(msgs)
    assert direct > 0, "no window went out from RAM"


COUNTERS = ("edge_uplink_blocks_acked_total", "edge_uplink_readings_delivered_total",
            "edge_uplink_connections_total", "edge_device_requests_total", "edge_device_readings_total",
            "edge_poll_cycles_total", "edge_store_readings_appended_total")


def test_status_health_and_reload(tmp_path: Path) -> None:
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker:
        cfg = config_dict(tmp_path, sim_port, broker.port)
        cfg["metrics"]["port"] = free_port()
        conf = tmp_path / "config.toml"
        write_config(conf, cfg)
        edge = EdgeProcess(conf)
        proc = edge.proc
        try:
            mport = edge.metrics_port()
            wait_metric(mport, "edge_uplink_blocks_acked_total", lambda v: v >= 3)
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/health", timeout=5) as r:
                assert r.status == 200 and json.loads(r.read())["ok"] is True
            out = subprocess.run([sys.executable, "-m", "edge", "status", "--config", str(conf)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=30, check=False)
            assert out.returncode == 0, out.stderr
            assert "connected" in out.stdout and "pump" in out.stdout and " up " in out.stdout
            good = conf.read_text()
            for refused, bad in enumerate((good.replace('type = "float32"', 'type = "flaot32"').encode(),
                                           b'[appliance]\nid = "a\xffb"\n', b"x = " + b"[" * 3000), 1):
                conf.write_bytes(bad)
                proc.send_signal(signal.SIGHUP)  # a bad config is refused, the running one kept
                wait_metric(mport, "edge_config_reloads_refused_total", lambda v, n=refused: v >= n)
            acked = metric(mport, "edge_uplink_blocks_acked_total")
            wait_metric(mport, "edge_uplink_blocks_acked_total", lambda v: v >= acked + 3)
            before = {name: metric(mport, name) for name in COUNTERS}
            conf.write_text(good.replace('interval = "50ms"', 'interval = "20ms"'))
            proc.send_signal(signal.SIGHUP)
            wait_metric(mport, "edge_config_reloads_total", lambda v: v >= 1)
            after = {name: metric(mport, name) for name in COUNTERS}
            assert metric(mport, "edge_config_reloads_refused_total") == 3
        finally:
            code = stop(edge)
        log = edge.log
    assert code == 0, log
    assert all(after[k] >= before[k] > 0 for k in COUNTERS), (before, after)  # a reload resets no counter
    assert log.count("reload refused") == 3 and 'unknown type "flaot32"' in log and "config reloaded" in log
    assert "not UTF-8" in log and "nested too deeply" in log
    assert "Traceback" not in log and "never retrieved" not in log


def test_a_reload_in_low_power_keeps_every_low_power_setting(tmp_path: Path) -> None:
    """SIGUSR2 turns low power on (a state held only in RAM); a SIGHUP with a changed [governor] section
    keeps it on and applies the new section: poll stretch, commit window and uplink sessions."""
    lp = {"on_battery": False, "interval_factor": 10, "uplink_session_interval": "600s"}
    with simulated_pump(tmp_path) as sim_port:
        cfg = config_dict(tmp_path, sim_port, free_port())  # no broker: the uplink stays offline
        cfg["store"]["low_power_commit_interval"] = "30s"
        cfg["governor"] = {"low_power": lp}
        conf = tmp_path / "config.toml"
        write_config(conf, cfg)
        edge = EdgeProcess(conf)

        def settings(port: int) -> tuple[float, ...]:
            return tuple(metric(port, name) for name in (
                "edge_low_power", "edge_poll_stretch", "edge_store_commit_interval_seconds",
                "edge_uplink_session_interval_seconds"))

        try:
            mport = edge.metrics_port()
            assert settings(mport) == (0.0, 1.0, 0.2, 0.0)
            edge.proc.send_signal(signal.SIGUSR2)
            wait_metric(mport, "edge_low_power", lambda v: v == 1.0)
            wait_metric(mport, "edge_poll_stretch", lambda v: v == 10.0)
            wait_metric(mport, "edge_store_commit_interval_seconds", lambda v: v == 30.0)  # read each turn
            assert settings(mport) == (1.0, 10.0, 30.0, 600.0)
            cfg["store"]["low_power_commit_interval"] = "20s"
            cfg["governor"]["low_power"] = {**lp, "interval_factor": 4, "uplink_session_interval": "300s"}
            write_config(conf, cfg)
            edge.proc.send_signal(signal.SIGHUP)
            wait_metric(mport, "edge_config_reloads_total", lambda v: v >= 1)
            wait_metric(mport, "edge_poll_stretch", lambda v: v == 4.0)
            wait_metric(mport, "edge_store_commit_interval_seconds", lambda v: v == 20.0)
            assert settings(mport) == (1.0, 4.0, 20.0, 300.0)
            edge.proc.send_signal(signal.SIGUSR2)  # and off again, from the new section's normal values
            wait_metric(mport, "edge_low_power", lambda v: v == 0.0)
            wait_metric(mport, "edge_store_commit_interval_seconds", lambda v: v == 0.2)
            assert settings(mport) == (0.0, 1.0, 0.2, 0.0)
        finally:
            assert stop(edge) == 0, edge.log


class Squatter:
    """Another program on the metrics port: answers every request with a page that is not metrics."""

    def __init__(self, port: int) -> None:
        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"hello from another program\n")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", port), Page)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_taken_metrics_port_stops_nothing_and_is_retried(tmp_path: Path) -> None:
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker:
        cfg = config_dict(tmp_path, sim_port, broker.port)
        cfg["metrics"]["port"] = mport = free_port()
        conf = tmp_path / "config.toml"
        write_config(conf, cfg)
        squatter = Squatter(mport)
        sub = Subscriber(broker.port, "edge/t1/data")
        edge = EdgeProcess(conf)
        try:
            sub.wait(lambda s: len(blocks_received(s)) >= 5)  # polling, storing, forwarding go on
            assert "cannot listen on 127.0.0.1" in edge.log and edge.proc.poll() is None
            out = subprocess.run([sys.executable, "-m", "edge", "status", "--config", str(conf)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=30, check=False)
            assert out.returncode == 1 and "something else answers" in out.stderr, out
            squatter.close()
            assert edge.metrics_port(timeout=90) == mport  # bound on a retry
            wait_metric(mport, "edge_uplink_blocks_acked_total", lambda v: v >= 5)
        finally:
            squatter.close()
            code = stop(edge)
            sub.close()
    assert code == 0, edge.log
    errors = [line for line in edge.log.splitlines() if "cannot listen" in line]
    assert len(errors) == 1 and "ERROR" in errors[0], errors  # one line for the episode
    assert "after" in next(line for line in edge.log.splitlines() if "/metrics" in line)


# ------------------------------------------------------------------------------ issue: every reading arrives

HEAD = re.compile(rb'\{"appliance":"[^"]*","seq":(\d+),"count":(\d+)')


def blocks_received(sub: Subscriber) -> dict[int, int]:
    """seq -> reading count of the data messages received, read from each message's head only."""
    with sub.cond:
        heads = [HEAD.match(p) for t, p in sub.messages if t.endswith("/data")]
    return {int(m[1]): int(m[2]) for m in heads if m}


def test_every_poll_cycle_of_every_tag_arrives_through_edge_run(tmp_path: Path) -> None:
    """Many tags on short poll and commit intervals (commits in their worker thread beside polling, all
    the time): after a clean stop, the readings at the broker plus those still in the store are exactly
    the readings polled, and every tag of a device has one for each of the device's poll cycles."""
    tags = [{"name": f"r{a}", "address": a, "type": "uint16"} for a in range(150)]
    write_map(tmp_path / "map.toml", [{"id": u, "points": [
        {"table": "holding", "address": a, "type": "uint16", "wave": "counter", "step": 1.0}
        for a in range(150)]} for u in (1, 2)])
    with start_sim(tmp_path / "map.toml") as sim, start_broker(tmp_path / "mqtt") as broker:
        assert sim.port is not None
        cfg = config_dict(tmp_path, sim.port, broker.port)
        cfg["device"] = [{"name": f"dev{u}", "host": "127.0.0.1", "port": sim.port, "unit": u,
                          "interval": "20ms", "timeout": "500ms", "tag": tags} for u in (1, 2)]
        cfg["store"]["commit_interval"] = "10ms"
        conf = tmp_path / "config.toml"
        write_config(conf, cfg)
        sub = Subscriber(broker.port, "edge/t1/data")
        edge = EdgeProcess(conf)
        try:
            mport = edge.metrics_port()
            wait_metric(mport, "edge_store_readings_appended_total", lambda v: v >= 40_000, timeout=90)
            wait_metric(mport, "edge_store_commits_total", lambda v: v >= 100)
        finally:
            assert stop(edge) == 0, edge.log[-3000:]
        found = STOPPED.search(edge.log)
        assert found, edge.log[-3000:]
        polled, stored, delivered, backlog, dropped = map(int, found.groups())
        sub.wait(lambda s: sum(blocks_received(s).values()) >= delivered, timeout=60)
        sub.close()
    assert polled == stored == delivered + backlog and dropped == 0
    msgs = received(sub)
    rows = [(r["device"], r["tag"], r["ts"]) for m in msgs.values() for r in m["readings"]]
    rows += [(d, n, ts) for d, n, ts in dumped(tmp_path / "state" / "store", conf)]
    assert len(rows) == polled
    for name in ("dev1", "dev2"):
        per_tag = Counter(tag for d, tag, _ in rows if d == name)
        assert len(per_tag) == 150 and len(set(per_tag.values())) == 1, per_tag.most_common(3)
        stamps = {tag: {ts for d, t, ts in rows if d == name and t == tag} for tag in ("r0", "r124")}
        assert len(stamps["r0"]) == per_tag["r0"]  # one reading per cycle, no cycle twice


def dumped(store: Path, conf: Path) -> list[tuple[str, str, int]]:
    """(device, tag, ts) of the readings left in the store (its backlog after the stop)."""
    names = {tag_id(d.name, t.name): (d.name, t.name) for d in load(conf).devices for t in d.tags}
    return [(*names[tag], ts) for _, rs in dump(store, 64 << 20, 0, 10**6) for tag, ts, _, _ in rs]


def deliver_and_poll(tmp: Path, points: list[dict[str, Any]], tags: list[dict[str, Any]],
                     blocks: int) -> tuple[list[bytes], subprocess.CompletedProcess[str], Path]:
    """A simulated device with `points` polled for `tags` by the appliance until `blocks` blocks reached a
    subscriber, then once by `edge poll --json`: (the data payloads, that poll, the config file)."""
    write_map(tmp / "map.toml", [{"id": 1, "points": points}])
    with start_sim(tmp / "map.toml") as sim, start_broker(tmp / "mqtt") as broker:
        assert sim.port is not None
        cfg = config_dict(tmp, sim.port, broker.port)
        cfg["device"][0]["tag"] = tags
        sub = Subscriber(broker.port, "edge/t1/data")

        async def body(app: Appliance) -> None:
            await until(lambda: app.store.counters.blocks_forwarded >= blocks)

        run_app(cfg, body)
        sub.wait(lambda s: len(blocks_received(s)) >= blocks)
        sub.close()
        conf = tmp / "config.toml"
        write_config(conf, cfg)
        polled = subprocess.run([sys.executable, "-m", "edge", "poll", str(conf), "--json"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60, check=False)
    with sub.cond:
        return [p for t, p in sub.messages if t.endswith("/data")], polled, conf


def no_nan(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def test_nan_and_infinity_travel_as_strict_json(tmp_path: Path) -> None:
    points = [{"table": "holding", "address": 2 * i, "type": "float32", "value": v}
              for i, v in enumerate([math.nan, math.inf, -math.inf, 1.5])]
    names = ["nan", "up", "down", "ok"]
    tags = [{"name": n, "address": 2 * i, "type": "float32"} for i, n in enumerate(names)]
    payloads, polled, _ = deliver_and_poll(tmp_path, points, tags, blocks=2)
    seen = {}
    for payload in payloads:
        for r in json.loads(payload, parse_constant=no_nan)["readings"]:
            seen[r["tag"]] = (r["value"], r.get("nonfinite"), r["quality"])
    assert seen == {"nan": (None, "nan", "good"), "up": (None, "inf", "good"),
                    "down": (None, "-inf", "good"), "ok": (1.5, None, "good")}
    assert polled.returncode == 0, polled.stderr
    lines = [json.loads(line, parse_constant=no_nan) for line in polled.stdout.splitlines()]
    assert {r["tag"]: (r["value"], r.get("nonfinite")) for r in lines} == {
        "nan": (None, "nan"), "up": (None, "inf"), "down": (None, "-inf"), "ok": (1.5, None)}


def test_float32_values_are_written_as_the_decimals_the_device_meant(tmp_path: Path) -> None:
    """51.90218 travels as float32 0x424F9C4E, which is 51.90217971801758 as a double: payloads, `edge
    poll` and `edge store dump` write 51.90218 (the shortest decimal that is the same float32); a float64
    tag keeps every digit it has."""
    meant = 51.90218
    points = [{"table": "holding", "address": 0, "type": "float32", "value": meant},
              {"table": "holding", "address": 2, "type": "float64", "value": 51.90217971801758}]
    tags = [{"name": "f32", "address": 0, "type": "float32"},
            {"name": "f64", "address": 2, "type": "float64"}]
    payloads, polled, conf = deliver_and_poll(tmp_path, points, tags, blocks=1)
    store = Store(load(conf).store, "t1")  # a backlog of its own (the run above delivered everything)
    first = load(conf).devices[0]
    store.add([(tag_id(first.name, first.tags[0].name), T0, 51.90217971801758, 0)])
    store.close()
    dumped = subprocess.run([sys.executable, "-m", "edge", "store", "dump", str(conf)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    payload = payloads[0]
    assert b'"tag":"f32","unit":"","ts":' in payload and b'"value":51.90218,' in payload, payload[:300]
    assert b'"value":51.90217971801758,' in payload  # the float64 tag: every digit
    assert '"value": 51.90218,' in polled.stdout and '"value": 51.90217971801758,' in polled.stdout, polled
    assert " pump/f32 51.90218 good" in dumped.stdout, dumped
