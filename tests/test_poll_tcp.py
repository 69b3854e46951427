"""The poller against real simulated devices over Modbus TCP (pymodbus servers in subprocesses)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
from pathlib import Path
from typing import Any

import pytest

from edge.config import parse
from edge.poll import Poller
from edge.reading import BAD_FRAME, BREAKER_OPEN, DISCONNECTED, GOOD, TIMEOUT
from edge.sparkplug import Node
from edge.store import Block, encode_block
from edge.uplink import Payloads
from tests.support import Collector, config, set_faults, start_sim, tag_id, write_map

# (type, order, value, extra tag keys): every type in every byte order it has.
ORDERS = ("ABCD", "BADC", "CDAB", "DCBA")
CASES: list[tuple[str, str, Any, dict[str, Any]]] = [
    *[(ty, o, v, {}) for ty, v in [("int16", -1234), ("uint16", 54321), ("int32", -123456789),
                                    ("uint32", 3_000_000_000), ("int64", -(2**60) - 7),
                                    ("uint64", 2**63 + 11), ("float32", 3.25), ("float64", math.pi),
                                    ("float16", 0.5), ("int8", -5), ("uint8", 200)] for o in ORDERS],
    ("string", "ABCD", "PUMP-7", {"length": 8}),
    ("string", "BADC", "SN12345", {"length": 7}),
    ("bool", "ABCD", True, {"bit": 7}),
]


def _layout() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    points, tags, addr = [], [], 0
    for i, (ty, order, value, extra) in enumerate(CASES):
        points.append({"table": "holding", "address": addr, "type": ty, "order": order, "value": value,
                       **extra})
        tags.append({"name": f"t{i}_{ty}_{order}", "table": "holding", "address": addr, "type": ty,
                     **({} if ty == "bool" else {"order": order}), **extra})
        addr += {"int64": 4, "uint64": 4, "float64": 4, "int32": 2, "uint32": 2, "float32": 2}.get(ty, 1)
        if ty == "string":
            addr += extra["length"] // 2
    points.append({"table": "coil", "address": 9, "type": "bool", "value": True})
    tags.append({"name": "coil9", "table": "coil", "address": 9, "type": "bool"})
    return points, tags


def test_every_type_and_order_end_to_end(tmp_path: Path) -> None:
    points, tags = _layout()
    write_map(tmp_path / "map.toml", [{"id": 1, "points": points}])
    with start_sim(tmp_path / "map.toml") as sim:
        cfg = config([{"name": "d", "host": sim.host, "port": sim.port, "tag": tags}])
        sink = Collector()
        asyncio.run(Poller(cfg, sink).run_once())
    got = {r[0]: r for r in sink.readings}
    assert len(got) == len(tags)
    for i, (ty, order, value, _) in enumerate(CASES):
        _, _, v, q = got[tag_id(cfg, "d", f"t{i}_{ty}_{order}")]
        assert q == GOOD, (ty, order)
        if ty.startswith("float"):
            assert v == pytest.approx(value, rel=1e-3 if ty == "float16" else 1e-6), (ty, order)
        else:
            assert v == value, (ty, order)
    assert got[tag_id(cfg, "d", "coil9")][2:] == (True, GOOD)


def _two_tag_device(name: str, sim: Any, interval: str = "100ms", **kw: Any) -> dict[str, Any]:
    return {"name": name, "host": sim.host, "port": sim.port, "interval": interval, "timeout": "300ms",
            "retries": 0, **kw,
            "tag": [{"name": "a", "address": 0, "type": "uint16"},
                    {"name": "b", "address": 1, "type": "float32"}]}


async def _background(poller: Poller) -> asyncio.Task[None]:
    return asyncio.create_task(poller.run(), name="poller-under-test")


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_device_stops_answering_then_recovers(tmp_path: Path) -> None:
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": 0, "type": "uint16", "wave": "counter"}]}])
    control = tmp_path / "faults.json"
    with start_sim(tmp_path / "map.toml", control=control) as sim:
        cfg = config([_two_tag_device("d", sim)])
        a = tag_id(cfg, "d", "a")

        async def body() -> None:
            sink = Collector()
            task = await _background(Poller(cfg, sink))
            try:
                await sink.until(lambda rs: any(r[0] == a and r[3] == GOOD for r in rs))
                set_faults(control, {"1": {"mode": "silent"}})
                mark = len(sink.readings)
                await sink.until(lambda rs: any(r[0] == a and r[3] == BREAKER_OPEN for r in rs[mark:]))
                bad = [r[3] for r in sink.readings[mark:] if r[0] == a]
                assert TIMEOUT in bad or DISCONNECTED in bad
                assert all(r[2] is None for r in sink.readings[mark:] if r[3] != GOOD)
                set_faults(control, {})
                mark = len(sink.readings)
                await sink.until(lambda rs: any(r[0] == a and r[3] == GOOD for r in rs[mark:]), timeout=30)
            finally:
                await _stop(task)
        asyncio.run(body())


def test_one_dead_device_does_not_slow_the_other(tmp_path: Path) -> None:
    write_map(tmp_path / "map.toml", [{"id": 1, "points": []}])
    control = tmp_path / "faults.json"
    set_faults(control, {"1": {"mode": "silent"}})
    with start_sim(tmp_path / "map.toml") as live, start_sim(tmp_path / "map.toml", control=control) as dead:
        cfg = config([_two_tag_device("live", live), _two_tag_device("dead", dead, timeout="1s")])
        a = tag_id(cfg, "live", "a")

        async def body() -> None:
            sink = Collector()
            poller = Poller(cfg, sink)
            task = await _background(poller)
            try:
                await sink.until(lambda rs: any(r[0] == a for r in rs))
                t0 = asyncio.get_running_loop().time()
                n0 = len(sink.of(a))
                await sink.until(lambda rs: len(sink.of(a)) >= n0 + 30, timeout=10)
                elapsed = asyncio.get_running_loop().time() - t0
            finally:
                await _stop(task)
            # 30 cycles at 100 ms: within 15 % of 3 s even while the other device times out.
            assert elapsed < 3.45, elapsed
            assert all(r[3] == GOOD for r in sink.of(a))
            dead_q = {r[3] for r in sink.readings if r[0] == tag_id(cfg, "dead", "a")}
            assert dead_q and GOOD not in dead_q
            live_line = next(line for line in poller.lines if line.runners[0].device.name == "live")
            sched = live_line.schedules[0].schedule
            assert sched.overruns == 0 and sched.cycles >= 30
            assert sched.jitter_max < 0.05, sched
        asyncio.run(body())


def test_illegal_address_names_the_tag_once_and_neighbours_flow(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_map(tmp_path / "map.toml", [{"id": 1, "invalid": [[5, 5]], "points": [
        {"table": "holding", "address": 0, "type": "uint16", "value": 11},
        {"table": "holding", "address": 9, "type": "uint16", "value": 99}]}])
    with start_sim(tmp_path / "map.toml") as sim:
        cfg = config([{"name": "d", "host": sim.host, "port": sim.port, "tag": [
            {"name": "ok0", "address": 0, "type": "uint16"},
            {"name": "ghost", "address": 5, "type": "uint16"},
            {"name": "ok9", "address": 9, "type": "uint16"}]}])
        sink = Collector()
        poller = Poller(cfg, sink)

        async def body() -> None:
            for _ in range(3):
                await asyncio.gather(*(line.run_once() for line in poller.lines))
            poller.close()
        with caplog.at_level(logging.INFO, logger="edge.poll"):
            asyncio.run(body())
    values = {r[0]: r[2:] for r in sink.readings}
    assert values[tag_id(cfg, "d", "ok0")] == (11, GOOD)
    assert values[tag_id(cfg, "d", "ok9")] == (99, GOOD)
    assert values[tag_id(cfg, "d", "ghost")] == (None, 0x42)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "ghost" in
                r.getMessage()]
    assert len(warnings) == 1 and "illegal address" in warnings[0]
    assert len(poller.runners[0].jobs["default"]) == 3  # the rejected request was split per tag


def test_a_reply_of_the_wrong_length_is_a_bad_frame_not_a_crash(tmp_path: Path) -> None:
    """A well-formed reply with one register fewer than asked (hil.sim's "short" fault) must not reach the
    decoder: the read is a bad frame, retried, and the device's next cycle is good again."""
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": 0, "type": "uint16", "value": 7},
        {"table": "holding", "address": 1, "type": "float32", "value": 2.5}]}])
    control = tmp_path / "faults.json"
    with start_sim(tmp_path / "map.toml", control=control) as sim:
        set_faults(control, {"1": {"mode": "short", "count": 3}})
        cfg = config([{"name": "d", "host": sim.host, "port": sim.port, "retries": 1, "tag": [
            {"name": "a", "address": 0, "type": "uint16"}, {"name": "f", "address": 1, "type": "float32"}]}])
        sink = Collector()
        poller = Poller(cfg, sink)

        async def two_cycles() -> None:
            await poller.run_once()  # the first try and its retry: both short
            await poller.run_once()  # the third short reply, then its retry: good

        asyncio.run(two_cycles())
    assert [r[2:] for r in sink.readings] == [(None, BAD_FRAME)] * 2 + [(7, GOOD), (2.5, GOOD)]
    assert poller.runners[0].stats.errors["bad_frame"] == 3


def test_busy_device_is_asked_again(tmp_path: Path) -> None:
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": 0, "type": "uint16", "value": 7}]}])
    control = tmp_path / "faults.json"
    with start_sim(tmp_path / "map.toml", control=control) as sim:
        set_faults(control, {"1": {"mode": "exception", "code": 6, "count": 2}})
        cfg = config([{"name": "d", "host": sim.host, "port": sim.port, "tag": [
            {"name": "a", "address": 0, "type": "uint16"}]}])
        sink = Collector()
        poller = Poller(cfg, sink)
        asyncio.run(poller.run_once())
    assert sink.readings[0][2:] == (7, GOOD)
    assert poller.runners[0].stats.errors["exception_6_busy"] == 2


def test_connection_refused_gives_disconnected_readings(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config([{"name": "d", "host": "127.0.0.1", "port": port, "timeout": "200ms",
                   "tag": [{"name": "a", "address": 0, "type": "uint16"}]}])
    sink = Collector()
    asyncio.run(Poller(cfg, sink).run_once())
    assert [r[2:] for r in sink.readings] == [(None, DISCONNECTED)]


def _by_exception(raw: list[Any], band: float, heartbeat_ns: int) -> list[int]:
    """The timestamps report-by-exception keeps out of a tag's full reading sequence (the model)."""
    kept, last = [], None
    for _, ts, v, q in raw:
        if q != GOOD:
            kept.append(ts)
            last = None
        elif last is None or abs(v - last[0]) >= band or abs(ts - last[1]) >= heartbeat_ns:
            kept.append(ts)
            last = (v, ts)
    return kept


def test_report_by_exception_keeps_exactly_what_moved_the_heartbeats_and_quality_changes(
        tmp_path: Path) -> None:
    """A ramp and a noisy constant, each read twice in the same request (a twin without a deadband
    gives every sample): the deadband tags keep exactly the readings the model keeps, the quiet one
    only through its heartbeat, and every bad reading plus the first good one after them."""
    ramp = {"wave": "ramp", "amplitude": 40.0, "period": 4.0}  # 1 unit per 100 ms poll
    noise = {"wave": "sine", "offset": 50.0, "amplitude": 0.2, "period": 0.3}
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": a, "type": "float32", **wave}
        for a, wave in ((0, ramp), (2, ramp), (4, noise), (6, noise))]}])
    control = tmp_path / "faults.json"
    with start_sim(tmp_path / "map.toml", control=control) as sim:
        cfg = config([{"name": "d", "host": sim.host, "port": sim.port, "interval": "100ms",
                       "timeout": "300ms", "retries": 0, "tag": [
                           {"name": "ramp", "address": 0, "type": "float32", "deadband": 2.5},
                           {"name": "ramp_all", "address": 2, "type": "float32"},
                           {"name": "quiet", "address": 4, "type": "float32", "deadband": 0.5,
                            "heartbeat": "1s"},
                           {"name": "quiet_all", "address": 6, "type": "float32"}]}])
        ids = {n: tag_id(cfg, "d", n) for n in ("ramp", "ramp_all", "quiet", "quiet_all")}

        async def body() -> Poller:
            sink = Collector()
            poller = Poller(cfg, sink)
            task = await _background(poller)
            try:
                await sink.until(lambda rs: sum(r[0] == ids["quiet_all"] for r in rs) >= 35)
                set_faults(control, {"1": {"mode": "silent"}})
                mark = len(sink.readings)
                await sink.until(lambda rs: any(r[0] == ids["quiet"] and r[3] != GOOD for r in rs[mark:]))
                set_faults(control, {})
                mark = len(sink.readings)
                await sink.until(lambda rs: sum(r[0] == ids["quiet_all"] and r[3] == GOOD
                                                for r in rs[mark:]) >= 3, timeout=30)
            finally:
                await _stop(task)
            for name, band, heartbeat in (("ramp", 2.5, 600.0), ("quiet", 0.5, 1.0)):
                raw = sink.of(ids[f"{name}_all"])
                assert [r[1] for r in sink.of(ids[name])] == _by_exception(raw, band, int(heartbeat * 1e9))
            quiet = sink.of(ids["quiet"])
            good_run = [r for r in quiet if r[3] == GOOD][:3]
            assert len(good_run) >= 3 and good_run[1][1] - good_run[0][1] >= 1_000_000_000  # heartbeat only
            first_bad = next(i for i, r in enumerate(quiet) if r[3] != GOOD)
            assert quiet[-1][3] == GOOD and any(r[3] == GOOD for r in quiet[first_bad:])  # back after bad
            assert len(sink.of(ids["ramp"])) < len(sink.of(ids["ramp_all"])) / 2
            return poller

        stats = asyncio.run(body()).runners[0].stats
        assert stats.stored < stats.readings


def _on_change(raw: list[Any], heartbeat_ns: int) -> list[int]:
    """The timestamps on_change keeps out of a tag's full reading sequence (the model): any type."""
    kept, last = [], None
    for _, ts, v, q in raw:
        if q != GOOD:
            kept.append(ts)
            last = None
        elif last is None or v != last[0] or abs(ts - last[1]) >= heartbeat_ns:
            kept.append(ts)
            last = (v, ts)
    return kept


def test_on_change_keeps_a_bool_when_it_flips_and_a_string_at_its_heartbeat(tmp_path: Path) -> None:
    """A bool flipping every 0.5 s and a constant string, polled every 100 ms beside twins without
    on_change: the on_change tags keep exactly what the model keeps (the flips; the string only at its
    1 s heartbeat)."""
    square = {"type": "bool", "bit": 0, "wave": "square", "amplitude": 1.0, "period": 1.0}
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": 0, **square}, {"table": "holding", "address": 1, **square},
        {"table": "holding", "address": 10, "type": "string", "length": 4, "value": "run"},
        {"table": "holding", "address": 12, "type": "string", "length": 4, "value": "run"}]}])
    with start_sim(tmp_path / "map.toml") as sim:
        cfg = config([{"name": "d", "host": sim.host, "port": sim.port, "interval": "100ms",
                       "timeout": "300ms", "tag": [
                           {"name": "on", "address": 0, "type": "bool", "bit": 0, "on_change": True},
                           {"name": "on_all", "address": 1, "type": "bool", "bit": 0},
                           {"name": "state", "address": 10, "type": "string", "length": 4, "on_change": True,
                            "heartbeat": "1s"},
                           {"name": "state_all", "address": 12, "type": "string", "length": 4}]}])
        ids = {n: tag_id(cfg, "d", n) for n in ("on", "on_all", "state", "state_all")}

        async def body() -> Collector:
            sink = Collector()
            task = await _background(Poller(cfg, sink))
            try:
                await sink.until(lambda rs: sum(r[0] == ids["on_all"] for r in rs) >= 40)
            finally:
                await _stop(task)
            return sink

        sink = asyncio.run(body())
    for name, heartbeat in (("on", 600.0), ("state", 1.0)):
        raw = sink.of(ids[f"{name}_all"])
        assert [r[1] for r in sink.of(ids[name])] == _on_change(raw, int(heartbeat * 1e9)), name
    flips = sink.of(ids["on"])
    assert 4 <= len(flips) < len(sink.of(ids["on_all"])) / 3  # the flips only, about two a second
    assert [r[2] for r in flips[:4]] in ([True, False, True, False], [False, True, False, True])
    assert {r[2] for r in sink.of(ids["state"])} == {"run"} and 2 <= len(sink.of(ids["state"])) <= 6


def test_on_change_keeps_one_nan_of_a_run_of_them() -> None:
    """A float32 that reads NaN cycle after cycle (a sensor's "no value"): on_change keeps the first NaN
    and the next different value, not every NaN (NaN equals nothing, itself included)."""
    cfg = config([{"name": "d", "host": "127.0.0.1", "port": 1,
                   "tag": [{"name": "f", "address": 0, "type": "float32", "on_change": True}]}])
    runner = Poller(cfg, Collector()).runners[0]
    job = runner.jobs["default"][0]
    kept = []
    for i, v in enumerate([1.0, math.nan, math.nan, math.nan, 2.0, 2.0]):
        kept += runner.deadband(job, [v], [(job.ids[0], i, v, GOOD)])
    assert [r[1] for r in kept] == [0, 1, 4]


def test_a_stop_lets_the_cycle_under_way_finish(tmp_path: Path) -> None:
    """200 tags are two requests a cycle (125 + 75) and the device answers each 0.2 s late: a stop that
    comes while the second request is in flight lets it finish, so every tag has as many readings as the
    others (a cancel would have left the last cycle half read)."""
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": a, "type": "uint16", "value": float(a)} for a in range(200)]}])
    set_faults(tmp_path / "faults.json", {"1": {"mode": "slow", "delay": 0.2}})
    with start_sim(tmp_path / "map.toml", control=tmp_path / "faults.json") as sim:
        cfg = config([{"name": "d", "host": sim.host, "port": sim.port, "interval": "50ms", "timeout": "2s",
                       "tag": [{"name": f"r{a}", "address": a} for a in range(200)]}])
        sink = Collector()
        poller = Poller(cfg, sink)

        async def main() -> None:
            task = asyncio.create_task(poller.run())
            await sink.until(lambda readings: len(readings) % 200 == 125)  # a cycle's first request is in
            poller.stop()
            await asyncio.wait_for(task, 10)

        asyncio.run(main())
    counts = {tag: 0 for tag, *_ in sink.readings}
    for tag, *_ in sink.readings:
        counts[tag] += 1
    assert len(counts) == 200 and len(set(counts.values())) == 1
    assert all(q == GOOD for *_, q in sink.readings)


def test_the_devices_of_a_template_share_tags_and_each_reading_names_its_own_device(tmp_path: Path) -> None:
    """Three units of one template behind one simulator, each holding other values, one refusing an
    address (its request split per tag): the devices hold the same tag objects, and every reading polled
    carries its own device's id, which the uplink's encoders (JSON, Sparkplug's births and data) turn
    back into that device's name, the tag and the value that unit holds."""
    units = {1: (11, 1.5), 2: (22, 2.5), 3: (33, 3.5)}
    write_map(tmp_path / "map.toml", [{"id": u, "points": [
        {"table": "holding", "address": 0, "type": "uint16", "value": a},
        {"table": "holding", "address": 1, "type": "float32", "value": b}],
        **({"invalid": [[5, 5]]} if u == 2 else {})} for u, (a, b) in units.items()])
    with start_sim(tmp_path / "map.toml") as sim:
        cfg = parse({"appliance": {"id": "t", "state_dir": str(tmp_path)},
                     "template": {"meter": {"tag": [{"name": "a", "address": 0, "type": "uint16"},
                                                    {"name": "b", "address": 1, "type": "float32"},
                                                    {"name": "c", "address": 5, "type": "uint16"}]}},
                     "device": [{"name": f"m{u}", "host": sim.host, "port": sim.port, "unit": u,
                                 "template": "meter"} for u in units]})
        assert len({id(t) for d in cfg.devices for t in d.tags}) == 3
        assert len({id(d.tags) for d in cfg.devices}) == 1
        sink = Collector()
        poller = Poller(cfg, sink)
        asyncio.run(poller.run_once())  # m2 refuses address 5: its request is split, one per tag
    assert [len(r.jobs["default"]) for r in poller.runners] == [1, 3, 1]
    assert sorted(r[0] for r in sink.readings) == sorted(
        tag_id(cfg, f"m{u}", t) for u in units for t in ("a", "b", "c"))
    block = Block(1, len(sink.readings), encode_block(sink.readings))
    [message] = Payloads(cfg).encode(block)
    rows = {(r["device"], r["tag"]): (r["value"], r["quality"]) for r in json.loads(message)["readings"]}
    assert rows == {**{(f"m{u}", "a"): (a, "good") for u, (a, _) in units.items()},
                    **{(f"m{u}", "b"): (b, "good") for u, (_, b) in units.items()},
                    **{(f"m{u}", "c"): (0, "good") for u in (1, 3)},
                    ("m2", "c"): (None, "exception_2_illegal_address")}
    node = Node(cfg, lambda: 1_800_000_000_000)  # Sparkplug: each device's births and data by its aliases
    node.death()
    node.connected()
    births = {topic.rsplit("/", 1)[1]: {m.name: m.alias for m in p.metrics} for topic, p in node.births()[1:]}
    assert births == {f"m{u}": {t: tag_id(cfg, f"m{u}", t) for t in "abc"} for u in units}
    data = {topic.rsplit("/", 1)[1]: {m.alias for m in p.metrics} for topic, p in node.data(block)}
    assert data == {f"m{u}": {tag_id(cfg, f"m{u}", t) for t in "abc"} for u in units}
