"""The poller on a shared RS-485 bus: socat pty pair, simulated units with wire-time emulation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.poll import Poller
from edge.reading import BAD_FRAME, GOOD, quality_name
from tests.support import LINE, Collector, config, pty_pair, set_faults, start_sim, tag_id, write_map

UNITS = (1, 2, 3)



@contextlib.contextmanager
def bus(tmp_path: Path, baud: int, control: Path | None = None,
        units: list[dict[str, Any]] | None = None) -> Iterator[str]:
    """`units` (default: three with a counter at 0 and a float at 10) on one line; yields the client's
    pty."""
    if units is None:
        units = [{"id": u, "points": [
            {"table": "holding", "address": 0, "type": "uint16", "value": 100 + u},
            {"table": "holding", "address": 10, "type": "float32", "value": u + 0.5}]} for u in UNITS]
    write_map(tmp_path / "map.toml", units)
    with pty_pair(tmp_path) as (client, server), \
            start_sim(tmp_path / "map.toml", tcp=False, rtu_path=server, baud=baud, control=control,
                      extra_args=["--parity", "N", "--stopbits", "2"]):
        yield client


def _config(port: str, baud: int, interval: str = "1s", timeout: str = "300ms") -> Any:
    devices = [{"name": f"u{u}", "bus": "rs485", "unit": u, "interval": interval, "timeout": timeout,
                "retries": 0, "tag": [{"name": "n", "address": 0, "type": "uint16"},
                                      {"name": "f", "address": 10, "type": "float32"}]} for u in UNITS]
    return config(devices, [{"name": "rs485", "port": port, "baud": baud, **LINE}])


@pytest.mark.parametrize("baud", [9600, 115200])
def test_three_units_polled_in_turn(tmp_path: Path, baud: int) -> None:
    with bus(tmp_path, baud) as port:
        cfg = _config(port, baud)
        sink = Collector()
        poller = Poller(cfg, sink)
        asyncio.run(poller.run_once())
    assert len(poller.lines) == 1  # one task, one link for the whole bus
    values = {r[0]: r[2:] for r in sink.readings}
    for u in UNITS:
        assert values[tag_id(cfg, f"u{u}", "n")] == (100 + u, GOOD)
        assert values[tag_id(cfg, f"u{u}", "f")] == (u + 0.5, GOOD)
    # Wire time is real: 3 units x 1 request (0..11, 12 registers) at 9600 8E1 is >= 3 x 41 B x 11/9600.
    line = poller.lines[0]
    assert all(r.stats.latency_sum >= r.bus.wire_time(8 + 5 + 24) for r in line.runners if r.bus)


def test_dead_unit_costs_only_its_bounded_timeouts(tmp_path: Path) -> None:
    control = tmp_path / "faults.json"
    set_faults(control, {"3": {"mode": "silent"}})
    with bus(tmp_path, 115200, control) as port:
        cfg = _config(port, 115200, interval="200ms", timeout="150ms")
        live = [tag_id(cfg, f"u{u}", "n") for u in (1, 2)]

        async def body() -> tuple[float, int]:
            sink = Collector()
            poller = Poller(cfg, sink)
            task = asyncio.create_task(poller.run(), name="rtu-poller")
            try:
                await sink.until(lambda rs: all(any(r[0] == t for r in rs) for t in live))
                loop = asyncio.get_running_loop()
                t0, n0 = loop.time(), len(sink.of(live[0]))
                await sink.until(lambda rs: len(sink.of(live[0])) >= n0 + 20, timeout=15)
                elapsed = loop.time() - t0
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert all(r[3] == GOOD for t in live for r in sink.of(t))
            dead = sink.of(tag_id(cfg, "u3", "n"))
            assert dead and all(r[3] != GOOD for r in dead)
            return elapsed, poller.runners[2].stats.requests

        elapsed, dead_requests = asyncio.run(body())
    # 20 cycles at 200 ms = 4 s; the dead unit may cost a few 150 ms timeouts before its breaker opens,
    # each followed by 150 ms of silence on the line (a late reply must not meet the next request).
    assert elapsed < 4.0 * 1.15 + 3 * 0.15, elapsed
    assert dead_requests < 12  # breaker: probes only, not one timeout per cycle


@pytest.mark.parametrize("mode", ["crc", "short", "function"])
def test_a_garbled_or_foreign_reply_is_bad_frame_and_the_bus_recovers(tmp_path: Path, mode: str) -> None:
    """crc: the reply's CRC flipped; short: a valid frame with one register fewer than asked; function: a
    valid frame of the other table's read (FC 4 for FC 3). The last two must never reach the decoder."""
    control = tmp_path / "faults.json"
    with bus(tmp_path, 115200, control) as port:
        cfg = _config(port, 115200, timeout="200ms")
        sink = Collector()

        async def body() -> None:
            poller = Poller(cfg, sink)
            line = poller.lines[0]
            set_faults(control, {"2": {"mode": mode}})
            for r in line.runners:
                await line.cycle(r, "default")
            set_faults(control, {})
            for r in line.runners:
                await line.cycle(r, "default")
            poller.close()

        asyncio.run(body())
    u2 = sink.of(tag_id(cfg, "u2", "n"))
    assert [r[3] for r in u2] == [BAD_FRAME, GOOD]
    for u in (1, 3):
        assert [r[3] for r in sink.of(tag_id(cfg, f"u{u}", "n"))] == [GOOD, GOOD]



def test_a_late_reply_never_puts_its_values_on_another_request(tmp_path: Path) -> None:
    """Replies that come after the adaptive timeout: an RTU frame carries no transaction id, so one taken
    as the reply to the next request of the same unit and size would give that request's tags the other
    block's values, as good readings."""
    units = [{"id": 1, "points": [
        *({"table": "holding", "address": a, "type": "uint16", "value": 1000 + a} for a in range(10)),
        *({"table": "holding", "address": 100 + a, "type": "uint16", "value": 2000 + a} for a in range(10))]}]
    control = tmp_path / "faults.json"
    set_faults(control, {"1": {"mode": "slow", "delay": 0.12, "rate": 0.25}})
    tags = [{"name": f"{block}{a}", "address": base + a, "type": "uint16"}
            for block, base in (("a", 0), ("b", 100)) for a in range(10)]
    sink = Collector()
    with bus(tmp_path, 115200, control, units) as port:
        meter = {"name": "meter", "bus": "rs485", "unit": 1, "interval": "100ms", "timeout": "500ms",
                 "retries": 1, "tag": tags}
        cfg = config([meter], [{"name": "rs485", "port": port, "baud": 115200, **LINE}])
        poller = Poller(cfg, sink)

        async def body() -> None:
            task = asyncio.create_task(poller.run(), name="rtu-poller")
            try:
                # both: the late replies (random, a quarter of the requests) and the line working on
                await sink.until(lambda rs: poller.runners[0].stats.errors["timeout"] >= 12
                                 and sum(r[3] == GOOD for r in rs) >= 200, timeout=60)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        asyncio.run(body())
    expected = {tag_id(cfg, "meter", t["name"]): 1000 + t["address"] if t["address"] < 100
                else 1900 + t["address"] for t in tags}
    good = [r for r in sink.readings if r[3] == GOOD]
    wrong = [(r[0], r[2], expected[r[0]]) for r in good if r[2] != expected[r[0]]]
    assert not wrong, f"{len(wrong)} of {len(good)} good readings carry another block's value: {wrong[:3]}"
    assert len(good) >= 200  # the line kept working through the late replies


def test_replies_later_than_the_timeout_never_land_on_another_request(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Unit 2 answers 350 ms after each request while its timeout says 200 ms, to two requests of the
    same size (holding 0 and holding 100): no good reading ever carries the other block's value, the
    unit's wait is raised to what it takes (one log line) so its readings come through, and unit 1 on
    the same line keeps being polled."""
    caplog.set_level(logging.INFO)
    units = [{"id": 1, "points": [{"table": "holding", "address": 0, "type": "uint16", "value": 7}]},
             {"id": 2, "points": [
                 *({"table": "holding", "address": a, "type": "uint16", "value": 1000 + a}
                   for a in range(10)),
                 *({"table": "holding", "address": 100 + a, "type": "uint16", "value": 2000 + a}
                   for a in range(10))]}]
    control = tmp_path / "faults.json"
    set_faults(control, {"2": {"mode": "slow", "delay": 0.35}})
    u2_tags = [{"name": f"{block}{a}", "address": base + a, "type": "uint16"}
               for block, base in (("a", 0), ("b", 100)) for a in range(10)]
    sink = Collector()
    with bus(tmp_path, 19200, control, units) as port:
        cfg = config([{"name": "u1", "bus": "rs485", "unit": 1, "interval": "100ms", "timeout": "200ms",
                       "retries": 0, "tag": [{"name": "n", "address": 0, "type": "uint16"}]},
                      {"name": "u2", "bus": "rs485", "unit": 2, "interval": "500ms", "timeout": "200ms",
                       "retries": 1, "tag": u2_tags}],
                     [{"name": "rs485", "port": port, "baud": 19200, **LINE}])
        poller = Poller(cfg, sink)
        u2 = {tag_id(cfg, "u2", t["name"]): (1000 if t["address"] < 100 else 1900) + t["address"]
              for t in u2_tags}

        async def body() -> None:
            task = asyncio.create_task(poller.run(), name="rtu-poller")
            try:
                await sink.until(lambda rs: sum(1 for r in rs if r[0] in u2 and r[3] == GOOD) >= 200,
                                 timeout=60)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        asyncio.run(body())
    good = [r for r in sink.readings if r[0] in u2 and r[3] == GOOD]
    wrong = [(r[0], r[2], u2[r[0]]) for r in good if r[2] != u2[r[0]]]
    assert not wrong, f"{len(wrong)} of {len(good)} good readings carry the other block's value: {wrong[:3]}"
    late = [r.getMessage() for r in caplog.records if "beyond its timeout" in r.getMessage()]
    assert len(late) == 1 and "device u2 answers" in late[0], late
    u1 = [r for r in sink.readings if r[0] == tag_id(cfg, "u1", "n")]
    assert len(u1) >= 20 and all(r[2] == 7 for r in u1 if r[3] == GOOD)


def test_rs485_rts_on_a_port_whose_driver_refuses_it_is_one_clear_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """rs485_rts = true asks the driver for the kernel's RS-485 mode (RTS high while sending). A pty
    cannot switch RTS, like many USB adapters' drivers: the port is not used with a direction nobody
    switches; the tags read disconnected and one warning says why. (A driver that takes it toggles RTS
    in the kernel, which no pty shows.)"""
    caplog.set_level(logging.WARNING)
    with bus(tmp_path, 115200) as port:
        cfg = config([{"name": "u1", "bus": "rs485", "unit": 1, "retries": 0,
                       "tag": [{"name": "n", "address": 0, "type": "uint16"}]}],
                     [{"name": "rs485", "port": port, "baud": 115200, "rs485_rts": True, **LINE}])
        sink = Collector()
        poller = Poller(cfg, sink)

        async def twice() -> None:
            for _ in range(2):
                await poller.run_once()

        asyncio.run(twice())
    assert [quality_name(r[3]) for r in sink.readings] == ["disconnected", "disconnected"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "rs485_rts: the driver refuses RS-485 mode" in warnings[0], warnings
