"""Writes to tags: checks, refusals, duplicates, over MQTT through the whole appliance, from the CLI, and on
a shared RS-485 bus while it is polled. Real peers: simulated devices (pymodbus servers), mosquitto."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import ModbusTcpClient

from edge.config import CommandsConfig
from edge.poll import Poller
from edge.reading import GOOD
from edge.write import Commands, sign
from tests.support import (
    LINE,
    Collector,
    Subscriber,
    config,
    pty_pair,
    run_app,
    set_faults,
    start_broker,
    start_sim,
    tag_id,
    until,
    write_config,
    write_map,
)

ROOT = Path(__file__).resolve().parent.parent
MAP = [{"id": 1, "invalid": [[500, 510]], "points": [
    {"table": "holding", "address": 0, "type": "float32", "value": 0.0},
    {"table": "holding", "address": 2, "type": "uint16", "value": 0},
    {"table": "holding", "address": 10, "type": "uint16", "value": 5},
    {"table": "coil", "address": 0, "type": "bool", "value": False}]}]
TAGS = [
    {"name": "setpoint", "address": 0, "type": "float32", "writable": True, "min": 0, "max": 100},
    {"name": "level", "address": 2, "type": "uint16", "scale": 0.1, "writable": True},
    {"name": "fixed", "address": 10, "type": "uint16"},
    {"name": "pump", "table": "coil", "address": 0, "writable": True},
    {"name": "ghost", "address": 500, "type": "uint16", "writable": True},  # the device refuses 500..510
]


def device(sim: Any, **kw: Any) -> dict[str, Any]:
    return {"name": "d", "host": sim.host, "port": sim.port, "interval": "100ms", "timeout": "300ms",
            "retries": 0, "tag": TAGS, **kw}


def holding(sim: Any, address: int, count: int) -> list[int]:
    """Registers read back from the simulated device by a client of its own."""
    with ModbusTcpClient(sim.host, port=sim.port, timeout=2) as c:
        rr = c.read_holding_registers(address, count=count, device_id=1)
        assert not rr.isError(), rr
        return list(rr.registers)


def coil(sim: Any, address: int) -> bool:
    with ModbusTcpClient(sim.host, port=sim.port, timeout=2) as c:
        rr = c.read_coils(address, count=1, device_id=1)
        assert not rr.isError(), rr
        return bool(rr.bits[0])


KEY = b"0123456789abcdef0123456789abcdef-test-key"
SIGNED = CommandsConfig(remote=True, keys=(("ops", KEY),))


def cmd(cid: str, tag: str, value: Any, **extra: Any) -> bytes:
    """A command signed with the test key, valid for a minute unless `expires` says otherwise."""
    return sign(KEY, "ops", {"id": cid, "tag": tag, "value": value, "expires": time.time() + 60, **extra})


def test_writes_land_every_refusal_is_reported_and_a_duplicate_runs_once(tmp_path: Path) -> None:
    write_map(tmp_path / "map.toml", MAP)
    control = tmp_path / "faults.json"
    with start_sim(tmp_path / "map.toml", control=control) as sim:
        cfg = config([device(sim)])

        async def body() -> dict[str, dict[str, Any]]:
            sink = Collector()
            poller = Poller(cfg, sink)
            task = asyncio.create_task(poller.run())  # polling goes on while writes take their turn
            commands = Commands(lambda: poller, SIGNED)
            out = {}
            try:
                await sink.until(lambda rs: len(rs) >= 4)
                for cid, tag, value, extra in [
                        ("w1", "d/setpoint", 42.5, {}), ("w2", "d/level", 12.3, {}),
                        ("w3", "d/pump", True, {}),
                        ("r-unknown", "d/nothing", 1, {}), ("r-ro", "d/fixed", 1, {}),
                        ("r-range", "d/setpoint", 100.5, {}), ("r-type", "d/setpoint", "high", {}),
                        ("r-steps", "d/level", 1.25, {}), ("r-fit", "d/level", 7000.0, {}),
                        ("r-bool", "d/pump", 1, {}),
                        ("r-expired", "d/setpoint", 1.0, {"expires": time.time() - 1}),
                        ("r-exception", "d/ghost", 1, {})]:
                    out[cid] = await commands.handle(cmd(cid, tag, value, **extra))
                out["bad"] = await commands.handle(b"{not json")
                set_faults(control, {"1": {"mode": "silent"}})
                out["r-timeout"] = await commands.handle(cmd("r-timeout", "d/setpoint", 3.0))
                set_faults(control, {})
                d1 = cmd("d1", "d/setpoint", 1.0)
                out["d1"] = await commands.handle(d1)
                out["d2"] = await commands.handle(cmd("d2", "d/setpoint", 2.0))
                out["d1-again"] = await commands.handle(d1)  # MQTT redelivers the same message
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                poller.close()
            assert commands.executed == 5 and commands.refused == 11
            return out

        out = asyncio.run(body())
        assert all(out[c]["ok"] for c in ("w1", "w2", "w3", "d1", "d2"))
        assert out["d1-again"] == out["d1"]  # the redelivered command is answered, not written again
        assert holding(sim, 0, 2) == [0x4000, 0]  # 2.0 as float32 ABCD: d1 did not run twice
        assert holding(sim, 2, 1) == [123]  # 12.3 / scale 0.1
        assert coil(sim, 0) is True
        reasons = {c: (out[c]["ok"], out[c]["error"]) for c in out if c.startswith("r-") or c == "bad"}
        assert reasons == {
            "r-unknown": (False, "unknown tag"), "r-ro": (False, "not writable"),
            "r-range": (False, "out of range"), "r-type": (False, "bad value"),
            "r-steps": (False, "bad value"),
            "r-fit": (False, "out of range"), "r-bool": (False, "bad value"), "r-expired": (False, "expired"),
            "r-exception": (False, "device exception"), "bad": (False, "bad command"),
            "r-timeout": (False, "timeout")}
        assert holding(sim, 10, 1) == [5]  # the read-only tag's register is untouched


def send_commands(cfg: dict[str, Any], sim: Any, broker_port: int, topic: str,
                  messages: list[bytes]) -> tuple[Any, list[dict[str, Any]], list[int]]:
    """Run the appliance, publish `messages` on `topic` once it is connected, wait for as many results
    on cmd/result: (the appliance, the results, holding registers 0..1 read back afterwards)."""
    results = Subscriber(broker_port, "edge/w1/cmd/result")  # upstream: commands out, results in
    try:
        async def body(app: Any) -> None:
            await until(lambda: app.uplink.stats.connected)  # connected and subscribed
            for m in messages:
                sent = results.client.publish(topic, m, qos=1)
                await asyncio.to_thread(sent.wait_for_publish, 10)
            await asyncio.to_thread(results.wait, lambda s: len(s.messages) >= len(messages))

        app = run_app(cfg, body)
        return app, [json.loads(p) for _, p in results.messages], holding(sim, 0, 2)
    finally:
        results.close()


def test_remote_write_over_mqtt_through_the_appliance(tmp_path: Path) -> None:
    """cmd/write in, cmd/result out, through mosquitto and `edge run`'s uplink; a redelivered id is
    answered with its first result and not written again."""
    write_map(tmp_path / "map.toml", MAP)
    with start_broker(tmp_path / "mqtt") as broker, start_sim(tmp_path / "map.toml") as sim:
        m1 = cmd("m1", "d/setpoint", 55.0, by="scada")
        app, got, after = send_commands(remote_config(tmp_path, sim, broker.port), sim, broker.port,
                                        "edge/w1/cmd/write",
                                        [m1, cmd("m2", "d/fixed", 1), cmd("m3", "d/setpoint", 60.0), m1])
    assert [(r["id"], r["ok"], r.get("error")) for r in got] == [
        ("m1", True, None), ("m2", False, "not writable"), ("m3", True, None), ("m1", True, None)]
    assert after == [0x4270, 0]  # 60.0: m3 landed and the redelivered m1 (55.0) did not run again
    assert (app.commands.executed, app.commands.refused) == (2, 1)  # edge_writes_total{result=...}


def _pb(number: int, wire: int, value: bytes | int) -> bytes:
    """One protobuf field, encoded here by hand (the Sparkplug B specification's field numbers)."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    key = varint(number << 3 | wire)
    if isinstance(value, int):
        return key + varint(value)
    return key + varint(len(value)) + value


def dcmd(*metrics: tuple[str, bytes]) -> bytes:
    """A DCMD Payload whose metrics are String metrics (name, value)."""
    return b"".join(_pb(2, 2, _pb(1, 2, name.encode()) + _pb(4, 0, 12) + _pb(15, 2, value))
                    for name, value in metrics)


def test_a_sparkplug_dcmd_write_takes_the_same_checked_path(tmp_path: Path) -> None:
    """[uplink] format = "sparkplug_b": a DCMD's "Edge Command/Write" metric carries a signed command; it
    is checked and answered like cmd/write, and lands; an unsigned Sparkplug write (a metric by its tag
    name) and a payload that is not protobuf are refused, and write nothing."""
    write_map(tmp_path / "map.toml", MAP)
    with start_broker(tmp_path / "mqtt") as broker, start_sim(tmp_path / "map.toml") as sim:
        cfg = remote_config(tmp_path, sim, broker.port)
        cfg["uplink"] |= {"format": "sparkplug_b", "sparkplug_group": "plant"}
        app, got, after = send_commands(cfg, sim, broker.port, "spBv1.0/plant/DCMD/w1/d", [
            dcmd(("setpoint", b"99")), b"\xff\xff not protobuf",
            dcmd(("Edge Command/Write", cmd("s1", "d/setpoint", 42.5)))])
    assert [(r["id"], r["ok"], r.get("error")) for r in got] == [
        (None, False, "bad command"), (None, False, "bad command"), ("s1", True, None)]
    assert after == [0x422A, 0]  # 42.5
    assert (app.commands.executed, app.commands.refused) == (1, 2)


def remote_config(tmp: Path, sim: Any, broker_port: int) -> dict[str, Any]:
    key = tmp / "ops.key"
    key.write_bytes(KEY)
    return {"appliance": {"id": "w1", "state_dir": str(tmp / "state")}, "device": [device(sim)],
            "uplink": {"host": "127.0.0.1", "port": broker_port, "backoff_min": "100ms"},
            "metrics": {"enabled": False}, "commands": {"remote": True, "keys": {"ops": str(key)}}}


def test_hostile_commands_are_each_refused_and_the_writes_go_on(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Through mosquitto and the appliance's uplink: deep JSON, 10 MB, no signature, a wrong signature, an
    unknown key, an expired command, an id squatted by someone without the key, a newline in `by`. Each
    gets its refusal (the 10 MB one never reaches the appliance: it asks the broker for 16 KiB at most);
    the legitimate commands around them all land; the log holds no forged line and no echo of 10 MB."""
    caplog.set_level(logging.INFO)
    write_map(tmp_path / "map.toml", MAP)
    forged = "scada\nedge: WARNING edge.write: write x by admin: d/setpoint = 0"
    with start_broker(tmp_path / "mqtt") as broker, start_sim(tmp_path / "map.toml") as sim:
        results = Subscriber(broker.port, "edge/w1/cmd/result")
        envelope = json.loads(cmd("c-9", "d/setpoint", 9.0))
        messages = [
            b"[" * 2000,  # 2 KB of nesting: beyond the parser's recursion
            b"x" * (10 << 20),
            json.dumps({"id": "c-9", "tag": "d/setpoint", "value": 66.0}).encode(),  # squatting c-9, unsigned
            json.dumps({**envelope, "sig": "0" * 64}).encode(),
            json.dumps({**envelope, "key": "nobody"}).encode(),
            cmd("old", "d/setpoint", 1.0, expires=time.time() - 5),
            cmd("c-9", "d/setpoint", 9.0),  # the real c-9: not pre-answered by the squatter
            cmd("c-10", "d/level", 1.0, by=forged),
        ]
        try:
            async def body(app: Any) -> None:
                await until(lambda: app.uplink.stats.connected)
                for m in messages:
                    sent = results.client.publish("edge/w1/cmd/write", m, qos=1)
                    await asyncio.to_thread(sent.wait_for_publish, 10)
                await asyncio.to_thread(results.wait, lambda s: len(s.messages) >= len(messages) - 1)

            app = run_app(remote_config(tmp_path, sim, broker.port), body)
            got = [json.loads(p) for _, p in results.messages]
            after = holding(sim, 0, 2), holding(sim, 2, 1)
        finally:
            results.close()
    assert [(r["id"], r["ok"], r.get("error")) for r in got] == [
        (None, False, "bad command"), (None, False, "bad command"), (None, False, "bad signature"),
        (None, False, "unknown key"), (None, False, "expired"), ("c-9", True, None), ("c-10", True, None)]
    assert after == ([0x4110, 0], [10])  # 9.0 and 1.0 / 0.1: only the signed writes landed
    assert (app.commands.executed, app.commands.refused) == (2, 5)
    text = [r.getMessage() for r in caplog.records]
    assert not [m for m in text if "\n" in m or "\x1b" in m], "a raw newline or escape in a log line"
    assert max(len(m) for m in text) < 2000  # nothing echoed whole
    assert any("by scada\\nedge: WARNING" in m for m in text)  # the forged `by`, escaped


def test_edge_write_cli(tmp_path: Path) -> None:
    write_map(tmp_path / "map.toml", MAP)
    with start_sim(tmp_path / "map.toml") as sim:
        conf = tmp_path / "config.toml"
        write_config(conf, {"appliance": {"id": "cli", "state_dir": str(tmp_path / "state")},
                            "device": [{"name": "d", "host": sim.host, "port": sim.port, "tag": [
                                {"name": "setpoint", "address": 0, "type": "float32", "writable": True,
                                 "max": 100},
                                {"name": "fixed", "address": 10}]}],
                            "store": {}, "uplink": {}, "metrics": {}})

        def edge(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "edge", "write", str(conf), *args], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60, check=False)

        ok = edge("d/setpoint", "12.5")
        assert ok.returncode == 0, ok.stderr
        assert holding(sim, 0, 2) == [0x4148, 0]  # 12.5
        assert "write local-" in ok.stderr and "d/setpoint = 12.5" in ok.stderr  # logged, with who
        for args, reason in ((("d/setpoint", "101"), "out of range"), (("d/fixed", "1"), "not writable"),
                             (("d/none", "1"), "unknown tag")):
            r = edge(*args)
            assert r.returncode == 1 and f"{args[0]} = {args[1]} refused: {reason}" in r.stderr, r.stderr
            assert r.stderr.count("refused") == 1  # printed once, not also logged
        flag = edge("d/setpoint", "false")
        assert flag.returncode == 1 and "d/setpoint = false refused: bad value" in flag.stderr  # as JSON
        assert holding(sim, 0, 2) == [0x4148, 0]


def test_writes_on_a_shared_rtu_bus_do_not_disturb_its_polls(tmp_path: Path) -> None:
    """Two units on one RS-485 line (socat ptys, wire time emulated at 19200 baud) polled as fast as the
    line allows while one of them gets a stream of writes: every poll reading stays good and exact, and
    every write lands."""
    units = [{"id": u, "points": [{"table": "holding", "address": 0, "type": "uint16", "value": 100 + u},
                                  {"table": "holding", "address": 1, "type": "uint16", "value": 0}]}
             for u in (1, 2)]
    write_map(tmp_path / "map.toml", units)
    with pty_pair(tmp_path) as (client, server), \
            start_sim(tmp_path / "map.toml", tcp=False, rtu_path=server, baud=19200,
                      extra_args=["--parity", "N", "--stopbits", "2"]):
        cfg = config([{"name": f"u{u}", "bus": "rs485", "unit": u, "interval": "20ms", "timeout": "300ms",
                       "retries": 0, "tag": [{"name": "n", "address": 0, "type": "uint16"},
                                             {"name": "w", "address": 1, "type": "uint16", "writable": True}]}
                      for u in (1, 2)], [{"name": "rs485", "port": client, "baud": 19200, **LINE}])

        async def body() -> tuple[list[dict[str, Any]], list[Any]]:
            sink = Collector()
            poller = Poller(cfg, sink)
            task = asyncio.create_task(poller.run())
            commands = Commands(lambda: poller, SIGNED)
            try:
                await sink.until(lambda rs: len(rs) >= 8)
                results = [await commands.handle(cmd(f"b{i}", "u2/w", i)) for i in range(1, 21)]
                mark = len(sink.readings)
                await sink.until(lambda rs: len(rs) >= mark + 8)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                poller.close()
            return results, sink.readings

        results, readings = asyncio.run(body())
    assert all(r["ok"] for r in results), results
    n = {tag_id(cfg, f"u{u}", "n"): 100 + u for u in (1, 2)}
    polled = [r for r in readings if r[0] in n]
    assert len(polled) > 20 and all(r[3] == GOOD and r[2] == n[r[0]] for r in polled)
    w2 = tag_id(cfg, "u2", "w")
    assert [r[2] for r in readings if r[0] == w2][-1] == 20  # the last write, read back by the poll
