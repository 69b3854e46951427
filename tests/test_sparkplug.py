"""[uplink] format = "sparkplug_b" through a real mosquitto, decoded by an implementation of its own: the
protobuf wire format read here from the Sparkplug B specification's field numbers (6.4), sharing no code
with edge.sparkplug and its generated module. Births, data by alias, seq, a rebirth on NCMD, historical
metrics after an outage, and the death (the will) on kill -9."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import pytest

from edge.config import ConfigError, parse
from tests.support import (
    EdgeProcess,
    Subscriber,
    config_dict,
    free_port,
    simulated_pump,
    start_broker,
    wait_metric,
    write_config,
)

# -- the independent decoder ------------------------------------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def fields(buf: bytes) -> list[tuple[int, Any]]:
    """(field number, value) of a protobuf message: ints for varints, bytes for length-delimited, raw
    little-endian bytes for fixed32/fixed64."""
    out: list[tuple[int, Any]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        out.append((number, value))
    return out


def metric(buf: bytes) -> dict[str, Any]:
    m: dict[str, Any] = {"properties": {}}
    for number, v in fields(buf):
        if number == 1:
            m["name"] = v.decode()
        elif number in (2, 3, 4):
            m[{2: "alias", 3: "timestamp", 4: "datatype"}[number]] = v
        elif number in (5, 7):
            m[{5: "is_historical", 7: "is_null"}[number]] = bool(v)
        elif number == 9:
            ps = fields(v)
            keys = [k.decode() for n, k in ps if n == 1]
            values = [dict(fields(pv)) for n, pv in ps if n == 2]
            m["properties"] = {k: pv.get(8, b"").decode() for k, pv in zip(keys, values, strict=True)}
        elif number in (10, 11):
            m["value"] = v
        elif number == 12:
            m["value"] = struct.unpack("<f", v)[0]
        elif number == 13:
            m["value"] = struct.unpack("<d", v)[0]
        elif number == 14:
            m["value"] = bool(v)
        elif number == 15:
            m["value"] = v.decode()
    return m


def payload(buf: bytes) -> dict[str, Any]:
    p: dict[str, Any] = {"metrics": []}
    for number, v in fields(buf):
        if number == 1:
            p["timestamp"] = v
        elif number == 2:
            p["metrics"].append(metric(v))
        elif number == 3:
            p["seq"] = v
    return p


def _key(number: int, wire: int) -> bytes:
    return bytes([number << 3 | wire])


def rebirth_command() -> bytes:
    """An NCMD Payload{metrics: [Metric{name: "Node Control/Rebirth", datatype: Boolean, boolean_value:
    true}]}, encoded here by hand."""
    name = b"Node Control/Rebirth"
    m = _key(1, 2) + bytes([len(name)]) + name + _key(4, 0) + bytes([11]) + _key(14, 0) + b"\x01"
    return _key(1, 0) + b"\x01" + _key(2, 2) + bytes([len(m)]) + m


# -- through mosquitto ------------------------------------------------------------------------------

def messages(sub: Subscriber, kind: str) -> list[tuple[str, dict[str, Any]]]:
    with sub.cond:
        raw = [(t, p) for t, p in sub.messages if t.split("/")[2] == kind]
    return [(t, payload(p)) for t, p in raw]


def count(sub: Subscriber, kind: str) -> int:
    with sub.cond:
        return sum(1 for t, _ in sub.messages if t.split("/")[2] == kind)


@pytest.mark.timeout(180)
def test_sparkplug_births_data_rebirth_history_and_death(tmp_path: Path) -> None:
    port = free_port()
    with simulated_pump(tmp_path) as sim_port:
        # births are QoS 0: queued for the test's subscriber while it reconnects after the outage
        qos0 = "queue_qos0_messages true\n"
        broker = start_broker(tmp_path / "mqtt", port, extra=qos0)
        broker.__enter__()
        sub = Subscriber(port, "spBv1.0/#")
        cfg = config_dict(tmp_path, sim_port, port, format="sparkplug_b", sparkplug_group="plant")
        conf = tmp_path / "config.toml"
        write_config(conf, cfg)
        edge = EdgeProcess(conf)
        try:
            sub.wait(lambda s: count(s, "DDATA") >= 5)
            (nb_topic, nbirth), = messages(sub, "NBIRTH")
            (db_topic, dbirth), = messages(sub, "DBIRTH")
            assert (nb_topic, db_topic) == ("spBv1.0/plant/NBIRTH/t1", "spBv1.0/plant/DBIRTH/t1/pump")
            by_name = {m["name"]: m for m in nbirth["metrics"]}
            assert nbirth["seq"] == 0 and by_name["Node Control/Rebirth"]["value"] is False
            bdseq = by_name["bdSeq"]["value"]
            births = {m["name"]: m for m in dbirth["metrics"]}
            assert dbirth["seq"] == 1 and set(births) == {"count", "temp", "name"}
            # UInt32, Float, String (the specification's datatype numbers)
            assert [births[n]["datatype"] for n in ("count", "temp", "name")] == [7, 9, 12]
            assert births["temp"]["properties"] == {"engUnit": "degC"}
            names = {m["alias"]: m["name"] for m in dbirth["metrics"]}

            data = messages(sub, "DDATA")
            assert {t for t, _ in data} == {"spBv1.0/plant/DDATA/t1/pump"}
            assert [p["seq"] for _, p in data] == [(2 + k) % 256 for k in range(len(data))]
            values: dict[str, list[Any]] = {}
            for _, p in data:
                for m in p["metrics"]:
                    assert "name" not in m and not m.get("is_historical")  # by alias, live
                    values.setdefault(names[m["alias"]], []).append((m["timestamp"], m["value"]))
            assert {v for _, v in values["temp"]} == {21.5} and {v for _, v in values["name"]} == {"PUMP-1"}
            counts = [v for _, v in sorted(values["count"])]
            assert counts == sorted(counts) and len(counts) >= 5

            # a host asks for a rebirth: NBIRTH (seq 0, the same bdSeq) and the DBIRTH again
            sub.client.publish("spBv1.0/plant/NCMD/t1", rebirth_command(), qos=1)
            sub.wait(lambda s: count(s, "NBIRTH") >= 2 and count(s, "DBIRTH") >= 2)
            again = messages(sub, "NBIRTH")[1][1]
            assert again["seq"] == 0 and {m["name"]: m["value"] for m in again["metrics"]}["bdSeq"] == bdseq

            # an outage: readings stored meanwhile arrive afterwards as historical, after a new birth
            broker.__exit__(None, None, None)
            time.sleep(6)  # not a wait for anything: the outage lasts past the live window (3.4 s)
            broker = start_broker(tmp_path / "mqtt", port, extra=qos0)
            broker.__enter__()
            sub.wait(lambda s: count(s, "NBIRTH") >= 3 and any(
                m.get("is_historical") for _, p in messages(s, "DDATA") for m in p["metrics"]), timeout=60)
            third = {m["name"]: m["value"] for m in messages(sub, "NBIRTH")[2][1]["metrics"]}
            assert third["bdSeq"] == (bdseq + 1) % 256

            # kill -9: the broker publishes the will, NDEATH with the bdSeq of the last birth (an earlier
            # connection's death may come too, when the broker went down: a host tells them apart by it)
            edge.proc.kill()
            edge.proc.wait()

            def deaths(s: Subscriber) -> list[int]:
                return [{m["name"]: m["value"] for m in p["metrics"]}["bdSeq"]
                        for _, p in messages(s, "NDEATH")]

            sub.wait(lambda s: third["bdSeq"] in deaths(s))
            assert set(deaths(sub)) <= {bdseq, third["bdSeq"]}
        finally:
            if edge.proc.poll() is None:
                edge.proc.kill()
                edge.proc.wait()
            sub.close()
            broker.__exit__(None, None, None)


@pytest.mark.parametrize(("uplink", "device", "why"), [
    ({"sparkplug_group": "a/b"}, "pump", "uplink.sparkplug_group"),
    ({"format": "protobuf"}, "pump", "uplink.format"),
])
def test_sparkplug_ids_are_checked_with_the_config(uplink: dict[str, str], device: str, why: str) -> None:
    doc = {"appliance": {"id": "t1"}, "device": [{"name": device, "host": "127.0.0.1", "tag": [
        {"name": "x", "address": 0, "type": "uint16"}]}], "uplink": {"format": "sparkplug_b", **uplink}}
    with pytest.raises(ConfigError, match=why.replace("+", "[+]")):
        parse(doc)


@pytest.mark.parametrize(("state", "offline", "online"), [
    ("spBv1.0/STATE/scada", b'{"online": false, "timestamp": 0}', b'{"online": true, "timestamp": 1}'),
    ("STATE/scada", b"OFFLINE", b"ONLINE"),  # a Sparkplug 2 host
])
def test_data_waits_while_the_primary_host_is_offline(tmp_path: Path, state: str, offline: bytes,
                                                      online: bytes) -> None:
    """[uplink] sparkplug_host: connected, but the host's retained STATE says offline: no birth, no data,
    the readings stay in the store; STATE online: births, then the held readings (historical)."""
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker:
        sub = Subscriber(broker.port, "spBv1.0/#")
        sub.client.publish(state, offline, qos=1, retain=True).wait_for_publish(10)
        cfg = config_dict(tmp_path, sim_port, broker.port, format="sparkplug_b", sparkplug_host="scada")
        conf = tmp_path / "config.toml"
        write_config(conf, cfg)
        edge = EdgeProcess(conf)
        try:
            mport = edge.metrics_port()
            wait_metric(mport, "edge_uplink_connected", lambda v: v == 1)
            wait_metric(mport, "edge_store_backlog_readings", lambda v: v >= 300)  # 5 s: past the live window
            assert count(sub, "NBIRTH") == count(sub, "DDATA") == 0
            sub.client.publish(state, online, qos=1, retain=True)
            sub.wait(lambda s: any(m.get("is_historical") for _, p in messages(s, "DDATA")
                                   for m in p["metrics"]))
            with sub.cond:
                kinds = [t.split("/")[2] for t, _ in sub.messages if t != state]
            assert kinds[:2] == ["NBIRTH", "DBIRTH"] and "DDATA" in kinds  # births first
        finally:
            edge.proc.kill()
            edge.proc.wait()
            sub.close()
