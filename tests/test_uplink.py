"""The uplink on its own: the payload encoder (Payloads) and the forwarding loop (Uplink) between a real
Store and a real mosquitto on 127.0.0.1, without the poller or the appliance around them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import __version__
from edge.config import StoreConfig, load, parse, tag_id
from edge.policy import Policy
from edge.reading import quality_name, strict_json
from edge.store import Block, Store, encode_block
from edge.uplink import Payloads, Uplink
from tests.support import (
    ROOT,
    T0,
    EdgeProcess,
    Subscriber,
    config_dict,
    free_port,
    metric,
    received,
    set_faults,
    simulated_pump,
    start_broker,
    start_sim,
    stop,
    until,
    wait_metric,
    write_config,
    write_map,
)


@pytest.mark.parametrize("n", [1, Payloads.ROWS - 1, Payloads.ROWS, Payloads.ROWS + 1, 3 * Payloads.ROWS + 7])
def test_payload_is_the_documented_json_whatever_the_block_size(n: int) -> None:
    config = load(ROOT / "config.toml")
    tags = [(d.name, t) for d in config.devices for t in d.tags]
    values: list[Any] = [1.5, None, True, False, -7, 2**64 - 1, 'q"\\ü', math.inf, math.nan]
    rs = [(tag_id(tags[i % len(tags)][0], tags[i % len(tags)][1].name) if i % 11 else 0xDEAD, T0 + i,
           values[i % len(values)], i % 3 * 0x21) for i in range(n)]
    block = Block(77, n, encode_block(rs))
    names = {tag_id(d, t.name): (d, t) for d, t in tags}
    rows = [strict_json({"device": names[t][0] if t in names else "?",
                         "tag": names[t][1].name if t in names else "?",
                         "unit": names[t][1].unit if t in names else "",
                         "ts": ts, "value": v, "quality": quality_name(q) if q else "good"})
            for t, ts, v, q in rs]
    expected = {"appliance": config.appliance.id, "seq": 77, "count": n, "readings": rows}
    [payload] = Payloads(config).encode(block)  # one message: the demo's blocks fit 128 KiB
    assert payload == json.dumps(expected, separators=(",", ":"), allow_nan=False).encode()
    json.loads(payload, parse_constant=no_constant)  # strict JSON: NaN and Infinity are not numbers there
    # a broker's smaller limit: parts, each within it, each a whole document, in order, every row once
    small = dataclasses.replace(config, uplink=dataclasses.replace(config.uplink, max_message_bytes=4096))
    parts = [json.loads(m, parse_constant=no_constant) for m in Payloads(small).encode(block)]
    assert all(len(m) <= 4096 for m in Payloads(small).encode(block))
    assert [(m["seq"], m.get("part", 0), m.get("parts", 1)) for m in parts] == [
        (77, k, len(parts)) for k in range(len(parts))]
    assert [r for m in parts for r in m["readings"]] == rows and sum(m["count"] for m in parts) == n
    assert all(m["count"] == len(m["readings"]) and m["appliance"] == config.appliance.id for m in parts)
    assert len(parts) == 1 or len(parts) >= -(-len(payload) // 4096)


def no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@settings(max_examples=60, deadline=None)
@given(names=st.sets(st.text("abcdefghij0123456789_", min_size=1, max_size=6), min_size=1, max_size=40),
       shifts=st.lists(st.integers(1, 0xFFFF), max_size=8))
def test_payload_finds_every_tag_by_id_and_no_other(names: set[str], shifts: list[int]) -> None:
    """The encoder's table of tags by id: every configured id is found however their slots collide; an id
    in the same slot as a configured one, or next to it, is an unknown tag (written as "?")."""
    tag = [{"name": n, "table": "input", "address": a, "type": "uint16"} for a, n in enumerate(sorted(names))]
    config = parse({"appliance": {"id": "a"}, "device": [{"name": "d", "host": "127.0.0.1", "tag": tag}]})
    tags = {tag_id("d", t.name): t.name for t in config.devices[0].tags}
    stray = {(i ^ (s << 16)) & 0xFFFFFFFF for i in tags for s in shifts}
    stray |= {(i + 1) & 0xFFFFFFFF for i in tags}
    ids = list(tags) + sorted(stray - set(tags))
    block = Block(1, len(ids), encode_block([(i, T0, 0, 0) for i in ids]))
    got = [r["tag"] for m in Payloads(config).encode(block) for r in json.loads(m)["readings"]]
    assert got == [tags.get(i, "?") for i in ids]


def uplink_config(port: int, **uplink: Any) -> Any:
    return parse({"appliance": {"id": "u1", "state_dir": "/tmp/edge-test"},
                  "uplink": {"host": "127.0.0.1", "port": port, "publish_timeout": "3s",
                             "backoff_min": "100ms", "backoff_max": "500ms", **uplink}})


def seqs(first: int, n: int) -> list[int]:
    return list(range(first, first + n))


def filled_store(path: Path, blocks: int, per_block: int) -> tuple[Store, int]:
    """A store with `blocks` committed blocks, and the sequence number of the first (a new store's
    numbers start from the clock, so that a replaced store never repeats one)."""
    store = Store(StoreConfig(path=path, map_size=64 << 20), "u1")
    first = store.next_seq
    for b in range(blocks):
        store.add([(7, T0 + b * per_block + i, float(i), 0) for i in range(per_block)])
        store.commit()
    return store, first


def test_every_block_is_published_once_and_removed_only_when_acknowledged(tmp_path: Path) -> None:
    """40 committed blocks, at most 4 in flight: each arrives once with its own sequence number, each is
    accepted by the store only after its PUBACK (the store is empty at the end, the counters agree)."""
    with start_broker(tmp_path / "mqtt") as broker:
        sub = Subscriber(broker.port, "edge/u1/data")
        store, store_first = filled_store(tmp_path / "store", 40, 25)
        uplink = Uplink(uplink_config(broker.port, max_inflight=4), store)

        async def main() -> None:
            task = asyncio.create_task(uplink.run())
            await until(lambda: uplink.stats.acked >= 40)
            uplink.stop()
            await asyncio.wait_for(task, 20)

        asyncio.run(main())
        store.commit()  # the deletes of the acknowledged blocks
        sub.wait(lambda s: len(received(s)) >= 40)
        sub.close()
    msgs = received(sub)
    assert sorted(msgs) == seqs(store_first, 40) and all(m["count"] == 25 for m in msgs.values())
    st_ = uplink.stats
    assert (st_.published, st_.acked, st_.rejected, st_.kept, st_.readings_delivered) == (40, 40, 0, 0, 1000)
    c = store.snapshot().counters
    assert (c.backlog_readings, c.readings_forwarded) == (0, 1000)
    store.close()


def test_drain_rate_caps_how_fast_a_backlog_goes_out(tmp_path: Path) -> None:
    """60 stored blocks: with drain_rate = 20 (a fleet back after an outage must not stampede its broker)
    they take at least (60 - a second's 20) / 20 = 2 s, each once; without a cap, in the same run, far
    less."""
    def drain(rate: float, name: str) -> float:
        with start_broker(tmp_path / f"mqtt-{name}") as broker:
            sub = Subscriber(broker.port, "edge/u1/data")
            store, first = filled_store(tmp_path / f"store-{name}", 60, 10)
            uplink = Uplink(uplink_config(broker.port, max_inflight=16, drain_rate=rate), store)

            async def main() -> float:
                t0 = time.monotonic()
                task = asyncio.create_task(uplink.run())
                await until(lambda: uplink.stats.acked >= 60)
                elapsed = time.monotonic() - t0
                uplink.stop()
                await asyncio.wait_for(task, 20)
                return elapsed

            elapsed = asyncio.run(main())
            sub.wait(lambda s: len(received(s)) >= 60)
            sub.close()
            store.close()
        assert sorted(received(sub)) == seqs(first, 60) and uplink.stats.published == 60
        return elapsed

    capped, free = drain(20.0, "capped"), drain(0.0, "free")
    assert capped >= 1.9 and free < capped / 2, (capped, free)


def test_require_subscriber_keeps_blocks_nobody_would_read(tmp_path: Path) -> None:
    """A broker with no subscriber for the data topic acknowledges with 0x10 and drops the message. With
    require_subscriber the blocks stay stored until a subscriber comes, then each arrives; without it,
    in the same run, they are acknowledged and gone."""
    def run(require: bool, name: str) -> tuple[Uplink, Subscriber, Store, int]:
        broker_ctx = start_broker(tmp_path / f"mqtt-{name}")
        broker = broker_ctx.__enter__()
        store, first = filled_store(tmp_path / f"store-{name}", 10, 5)
        uplink = Uplink(uplink_config(broker.port, require_subscriber=require), store)
        sub: list[Subscriber] = []

        async def main() -> None:
            task = asyncio.create_task(uplink.run())
            await until(lambda: uplink.stats.kept >= 1 or uplink.stats.acked >= 10)
            if require:
                assert uplink.stats.acked == 0 and store.snapshot().counters.backlog_blocks == 10
            sub.append(Subscriber(broker.port, "edge/u1/data"))  # the consumer arrives
            await until(lambda: uplink.stats.acked >= 10)
            uplink.stop()
            await asyncio.wait_for(task, 20)

        try:
            asyncio.run(main())
            store.commit()
        finally:
            broker_ctx.__exit__(None, None, None)
        return uplink, sub[0], store, first

    uplink, sub, store, first = run(True, "required")
    sub.wait(lambda s: len(received(s)) >= 10)
    sub.close()
    assert sorted(received(sub)) == seqs(first, 10) and uplink.stats.kept >= 1
    assert store.snapshot().counters.backlog_blocks == 0
    store.close()
    uplink, sub, store, _ = run(False, "not-required")
    sub.close()
    assert uplink.stats.kept == 0 and not received(sub)  # acknowledged, and dropped by the broker
    store.close()


def test_a_block_above_the_brokers_limit_goes_out_in_parts(tmp_path: Path) -> None:
    """mosquitto with message_size_limit 16000: 3 blocks of 400 readings (about 30 KB as one message) sent
    whole never get through (the broker drops the connection at each, the block is kept and sent again:
    the uplink is stuck); with max_message_bytes 15000 they go out in parts, every reading once, and the
    store lets each block go only when all its parts were acknowledged."""
    def run(limit: int, name: str) -> tuple[Any, dict[int, dict[str, Any]], Any]:
        with start_broker(tmp_path / f"mqtt-{name}", extra="message_size_limit 16000\n") as broker:
            sub = Subscriber(broker.port, "edge/u1/data")
            store, _ = filled_store(tmp_path / f"store-{name}", 3, 400)
            uplink = Uplink(uplink_config(broker.port, max_message_bytes=limit), store)

            async def main() -> None:
                task = asyncio.create_task(uplink.run())
                await until(lambda: uplink.stats.acked + uplink.stats.rejected >= 3 or uplink.stats.kept >= 3)
                uplink.stop()
                await asyncio.wait_for(task, 20)

            asyncio.run(main())
            store.commit()
            if uplink.stats.acked:
                sub.wait(lambda s: len(received(s)) >= 3)
            sub.close()
            counters = store.snapshot().counters
            store.close()
        return uplink.stats, received(sub), counters

    whole, got, counters = run(1 << 20, "whole")
    assert (whole.acked, got, counters.backlog_readings) == (0, {}, 1200) and whole.kept >= 3
    parts, got, counters = run(15000, "parts")
    assert (parts.acked, parts.rejected) == (3, 0)
    assert [m["count"] for m in got.values()] == [400, 400, 400]
    stamps = [[r["ts"] for r in m["readings"]] for m in got.values()]
    assert all(ts == sorted(ts) for ts in stamps)
    assert (counters.backlog_readings, counters.readings_forwarded) == (0, 1200)


def test_a_broker_that_goes_away_keeps_every_unacknowledged_block(tmp_path: Path) -> None:
    """The broker stops while the uplink forwards: what was not acknowledged stays in the store, is sent
    again when it is back, and the subscriber ends up with every sequence number."""
    port_broker = start_broker(tmp_path / "mqtt")
    broker = port_broker.__enter__()
    port = broker.port
    sub = Subscriber(port, "edge/u1/data")
    store, store_first = filled_store(tmp_path / "store", 30, 400)
    uplink = Uplink(uplink_config(port, max_inflight=2), store)

    async def main() -> None:
        nonlocal port_broker
        task = asyncio.create_task(uplink.run())
        await until(lambda: uplink.stats.acked >= 5)
        port_broker.__exit__(None, None, None)
        await until(lambda: not uplink.stats.connected)
        kept = store.snapshot().counters.backlog_readings
        assert kept > 0
        port_broker = start_broker(tmp_path / "mqtt", port)
        port_broker.__enter__()
        async with asyncio.timeout(60):
            while store.snapshot().counters.backlog_readings > 0 or uplink.stats.acked < 30:
                await asyncio.to_thread(store.commit)  # the deletes of acknowledged blocks, as the app does
                uplink.wake.set()
                await until(lambda: uplink.stats.acked > 0)
        uplink.stop()
        await asyncio.wait_for(task, 20)

    try:
        asyncio.run(main())
        sub.wait(lambda s: len(received(s)) >= 30, timeout=60)
    finally:
        sub.close()
        port_broker.__exit__(None, None, None)
    assert sorted(received(sub)) == seqs(store_first, 30)
    assert uplink.stats.connects >= 2 and uplink.stats.readings_delivered >= 30 * 400
    store.close()


def test_in_a_low_power_session_the_uplink_drains_and_disconnects(tmp_path: Path) -> None:
    """With a session interval (low power) the uplink connects, sends the backlog, publishes "offline" and
    waits for the next session instead of staying connected."""
    with start_broker(tmp_path / "mqtt") as broker:
        sub = Subscriber(broker.port, "edge/u1/#")
        store, store_first = filled_store(tmp_path / "store", 5, 10)
        uplink = Uplink(uplink_config(broker.port), store, policy=lambda: Policy(session_interval=600.0))

        async def main() -> None:
            task = asyncio.create_task(uplink.run())
            await until(lambda: any(t.endswith("/status") and p == b"offline" for t, p in sub.messages))
            assert not task.done()  # waiting for the next session, not ended
            uplink.stop()
            await asyncio.wait_for(task, 20)

        asyncio.run(main())
        sub.close()
    assert sorted(received(sub)) == seqs(store_first, 5) and uplink.stats.connects == 1
    store.close()


def test_a_broker_outage_is_one_warning_in_the_appliances_log(tmp_path: Path) -> None:
    """`edge run` loses its broker and gets it back: the journal has one warning for the outage and one
    line for the reconnection, no traceback (a lost connection's error is read, not left to asyncio to
    report as never retrieved)."""
    with simulated_pump(tmp_path) as sim_port:
        port = free_port()
        broker = start_broker(tmp_path / "mqtt", port)
        broker.__enter__()
        try:
            cfg = config_dict(tmp_path, sim_port, port)
            cfg["metrics"]["port"] = mport = free_port()
            write_config(tmp_path / "config.toml", cfg)
            edge = EdgeProcess(tmp_path / "config.toml")
            edge.metrics_port()
            wait_metric(mport, "edge_uplink_blocks_acked_total", lambda v: v >= 3)
            broker.__exit__(None, None, None)
            wait_metric(mport, "edge_uplink_connection_failures_total", lambda v: v >= 2)
            broker = start_broker(tmp_path / "mqtt", port)
            broker.__enter__()
            wait_metric(mport, "edge_uplink_connections_total", lambda v: v >= 2)
            acked = metric(mport, "edge_uplink_blocks_acked_total")
            wait_metric(mport, "edge_uplink_blocks_acked_total", lambda v: v > acked)
            assert stop(edge) == 0, edge.log
        finally:
            broker.__exit__(None, None, None)
    lines = edge.log.splitlines()
    assert "Traceback" not in edge.log and "never retrieved" not in edge.log, edge.log
    assert [line for line in lines if " ERROR " in line] == []
    assert len([line for line in lines if "unavailable" in line]) == 1
    assert any("connected to" in line and "after" in line for line in lines)


def test_the_health_message_follows_the_boxs_state(tmp_path: Path) -> None:
    """`edge run` with a long health_interval (600 s): a retained health message at connection (devices
    up, version, uptime), another within seconds of the device going silent (down, why, since when),
    another when a reload is refused (the key path of the error), and a late subscriber gets the last one
    (retained)."""
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": 0, "type": "uint32", "wave": "counter", "step": 1.0}]}])
    set_faults(tmp_path / "faults.json", {})
    with start_sim(tmp_path / "map.toml", control=tmp_path / "faults.json") as sim, \
            start_broker(tmp_path / "mqtt") as broker:
        cfg = config_dict(tmp_path, sim.port or 0, broker.port, health_interval="600s")
        cfg["device"][0]["tag"] = [{"name": "count", "address": 0, "type": "uint32"}]
        cfg["device"][0]["timeout"] = "200ms"
        cfg["metrics"]["port"] = free_port()
        conf = tmp_path / "config.toml"
        write_config(conf, cfg)
        sub = Subscriber(broker.port, "edge/t1/health")

        def healths(s: Subscriber) -> list[dict[str, Any]]:
            return [json.loads(p) for t, p in s.messages if t == "edge/t1/health"]

        edge = EdgeProcess(conf)
        try:
            sub.wait(lambda s: any(h["devices"] == [{"name": "pump", "up": True}] for h in healths(s)))
            first = healths(sub)[0]
            assert (first["appliance"], first["version"], first["low_power"], first["config_error"]) == (
                "t1", __version__, False, None)
            set_faults(tmp_path / "faults.json", {"1": {"mode": "silent"}})
            sub.wait(lambda s: not healths(s)[-1]["devices"][0]["up"], timeout=30)
            down = healths(sub)[-1]["devices"][0]
            # why: the failure itself (a silent TCP device times out, then its link is dropped), not the
            # breaker it opened
            assert down["problem"] in ("timeout", "disconnected") and down["down_since"] <= time.time()
            conf.write_text(conf.read_text().replace('interval = "50ms"', 'interval = "fast"'))
            edge.proc.send_signal(signal.SIGHUP)
            sub.wait(lambda s: healths(s)[-1]["config_error"] is not None, timeout=30)
            assert "device[0].interval" in healths(sub)[-1]["config_error"]
            late = Subscriber(broker.port, "edge/t1/health")
            late.wait(lambda s: len(healths(s)) >= 1)
            assert healths(late)[0]["config_error"] == healths(sub)[-1]["config_error"]
            late.close()
        finally:
            assert stop(edge) == 0, edge.log
            sub.close()
    assert len(healths(sub)) <= 6  # changes of state only, not a message a second


def test_edge_run_forwards_over_mqtt_3_1_1(tmp_path: Path) -> None:
    """`edge run` with [uplink] protocol = "3.1.1" against mosquitto: blocks, the retained status and the
    health message arrive, and a clean stop leaves nothing behind."""
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker:
        sub = Subscriber(broker.port, "edge/t1/#")
        write_config(tmp_path / "config.toml", config_dict(tmp_path, sim_port, broker.port, protocol="3.1.1"))
        edge = EdgeProcess(tmp_path / "config.toml")
        try:
            sub.wait(lambda s: len(s.seqs()) >= 3 and any(t == "edge/t1/health" for t, _ in s.messages))
        finally:
            code = stop(edge)
        sub.close()
    assert code == 0, edge.log
    assert ("edge/t1/status", b"online") in sub.messages
    assert "Traceback" not in edge.log and " ERROR " not in edge.log, edge.log
