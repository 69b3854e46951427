"""Several unit ids behind one Modbus TCP gateway (or a serial server passing RTU frames on TCP): one
connection, one request at a time, a dead unit costing only its own bounded timeouts. The peers are real:
the simulator (MBAP, or RTU frames on TCP) behind a gateway that serves one connection at a time."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from pathlib import Path

import pytest

from edge.config import connections
from edge.poll import Poller
from edge.reading import GOOD, TIMEOUT, quality_name
from hil.mapgen import write_map
from tests.support import Collector, config, one_connection_gateway, start_sim, tag_id

LIVE, DEAD = (1, 2), 3  # unit 3 is not in the simulator's map: no reply (RTU) or exception 11 (MBAP)
CYCLES = 15


def units_behind(port: int, transport: str, **extra: object) -> list[dict[str, object]]:
    return [{"name": f"u{u}", "host": "127.0.0.1", "port": port, "unit": u, "interval": "200ms",
             "timeout": "150ms", "transport": transport, **extra,
             "tag": [{"name": "n", "address": 0, "type": "uint32"}]} for u in (*LIVE, DEAD)]


@pytest.mark.parametrize("transport", ["tcp", "rtu-over-tcp"])
def test_units_behind_a_gateway_share_its_one_connection_and_a_dead_unit_stalls_none(
        tmp_path: Path, transport: str) -> None:
    write_map(tmp_path / "map.toml", [{"id": u, "points": [
        {"table": "holding", "address": 0, "type": "uint32", "wave": "counter", "step": 1.0}]} for u in LIVE])
    framer = "rtu" if transport == "rtu-over-tcp" else "socket"
    with start_sim(tmp_path / "map.toml", extra_args=["--framer", framer]) as sim, \
            one_connection_gateway(("127.0.0.1", sim.port or 0), delay=0.02) as gateway:
        cfg = config(units_behind(gateway.port, transport))
        live = [tag_id(cfg, f"u{u}", "n") for u in LIVE]
        dead = tag_id(cfg, f"u{DEAD}", "n")

        async def body() -> tuple[Collector, float]:
            sink = Collector()
            poller = Poller(cfg, sink)
            assert [line.name for line in poller.lines] == [f"gateway 127.0.0.1:{gateway.port}"]
            task = asyncio.create_task(poller.run())
            try:
                await sink.until(lambda rs: all(sink.of(t) for t in live))
                loop = asyncio.get_running_loop()
                t0, n0 = loop.time(), len(sink.of(live[0]))
                await sink.until(lambda rs: len(sink.of(live[0])) >= n0 + CYCLES, timeout=20)
                return sink, loop.time() - t0
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        sink, elapsed = asyncio.run(body())
    assert (gateway.connections, gateway.refused) == (1, 0)  # one connection for the three units
    assert all(r[3] == GOOD for t in live for r in sink.of(t))
    values = [r[2] for r in sink.of(live[0])]
    assert values == sorted(values)  # a counter: no reply of another unit landed on this tag
    dead_qualities = {quality_name(r[3]) for r in sink.of(dead)}
    assert dead_qualities and "good" not in dead_qualities, dead_qualities
    if transport == "rtu-over-tcp":
        assert quality_name(TIMEOUT) in dead_qualities
    # 15 cycles at 200 ms = 3 s: the dead unit may cost a few timeouts (and the silence after each, on a
    # line whose replies cannot be told apart) before its breaker opens
    assert elapsed < 3.0 * 1.2 + 4 * 0.3, elapsed


def test_each_device_has_its_own_connection_with_shared_connection_false() -> None:
    other = {"name": "other", "host": "127.0.0.1", "port": 1503, "tag": [{"name": "n", "address": 0}]}
    cfg = config([*units_behind(1502, "tcp", shared_connection=False), other])
    groups = [[d.name for d in group] for group in connections(cfg.devices)]
    assert groups == [["u1"], ["u2"], ["u3"], ["other"]]
    poller = Poller(cfg, Collector())
    assert [line.name for line in poller.lines] == [
        "u1@127.0.0.1:1502", "u2@127.0.0.1:1502", "u3@127.0.0.1:1502", "other@127.0.0.1:1503"]
    shared = config(units_behind(1502, "tcp"))
    assert [[d.name for d in group] for group in connections(shared.devices)] == [["u1", "u2", "u3"]]


def test_a_silent_gateway_connection_is_dropped_and_opened_again() -> None:
    """A gateway that takes the connection and never answers, with a device that has no tags (it never
    sends a request, so its breaker never opens) beside one that does: once the polled device's breaker
    opens with no unit answering since it began failing, the connection is dropped and opened again."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    again = threading.Event()

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)  # read nothing, answer nothing
            if len(held) >= 2:
                again.set()

    threading.Thread(target=accept, daemon=True).start()
    port = server.getsockname()[1]
    cfg = config([{"name": "a", "host": "127.0.0.1", "port": port, "interval": "100ms", "timeout": "100ms",
                   "retries": 0, "tag": [{"name": "n", "address": 0}]},
                  {"name": "b", "host": "127.0.0.1", "port": port, "unit": 2}])

    async def body() -> bool:
        poller = Poller(cfg, Collector())
        assert len(poller.lines) == 1
        task = asyncio.create_task(poller.run())
        try:
            return await asyncio.get_running_loop().run_in_executor(None, again.wait, 15)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        assert asyncio.run(body()), f"{len(held)} connection(s): the silent one was never dropped"
    finally:
        server.close()
        for conn in held:
            conn.close()
