"""Device quirks, each against the simulator, which records what it saw on the wire (hil.sim --record:
each connection and each request with its function code and time)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from edge.poll import Poller
from edge.reading import GOOD
from hil.mapgen import write_map
from tests.support import Collector, config, start_sim, tag_id


def recorded(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def device_map(path: Path) -> None:
    write_map(path, [{"id": 1, "points": [
        {"table": "holding", "address": 0, "type": "uint32", "wave": "counter", "step": 1.0}]}])


@pytest.mark.parametrize("close_after_cycle", [True, False])
def test_connect_pause_and_close_after_cycle(tmp_path: Path, close_after_cycle: bool) -> None:
    """connect_pause = 300 ms: no request reaches the device sooner than that after its connection opened.
    close_after_cycle: one connection per cycle (each request right after a connection of its own);
    without it, one connection for the whole run."""
    device_map(tmp_path / "map.toml")
    record = tmp_path / "wire.jsonl"
    with start_sim(tmp_path / "map.toml", extra_args=["--record", str(record)]) as sim:
        cfg = config([{"name": "d", "host": sim.host, "port": sim.port, "interval": "200ms",
                       "connect_pause": "300ms", "close_after_cycle": close_after_cycle,
                       "tag": [{"name": "n", "address": 0, "type": "uint32"}]}])
        tid = tag_id(cfg, "d", "n")

        async def body() -> Collector:
            sink = Collector()
            task = asyncio.create_task(Poller(cfg, sink).run())
            try:
                await sink.until(lambda rs: len(sink.of(tid)) >= 5)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            return sink

        sink = asyncio.run(body())
    assert all(r[3] == GOOD for r in sink.of(tid))
    events = recorded(record)
    connects = [e for e in events if e["event"] == "connect"]
    requests = [e for e in events if e["event"] == "request"]
    assert len(requests) >= 5
    for req in requests:  # the connection each request came on
        opened = max(c["t"] for c in connects if c["t"] <= req["t"])
        if close_after_cycle or req is requests[0]:
            assert req["t"] - opened >= 0.29, (req, opened)
    if close_after_cycle:
        assert len(connects) >= len(requests) - 1  # the last cycle's connection may still be open
        kinds = [e["event"] for e in events]
        assert all(a != b for a, b in itertools.pairwise(kinds) if a == "request"), kinds
    else:
        assert len(connects) == 1


@pytest.mark.parametrize("write_multiple", [False, True])
def test_write_multiple_forces_fc16_and_fc15(tmp_path: Path, write_multiple: bool) -> None:
    """One register and one coil written: FC 6 and FC 5, or with write_multiple FC 16 and FC 15 (devices
    that implement only those); the values land either way."""
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": 5, "type": "uint16", "value": 0},
        {"table": "coil", "address": 3, "type": "bool", "value": False}]}])
    record = tmp_path / "wire.jsonl"
    with start_sim(tmp_path / "map.toml", extra_args=["--record", str(record)]) as sim:
        cfg = config([{"name": "d", "host": sim.host, "port": sim.port, "write_multiple": write_multiple,
                       "tag": [{"name": "r", "address": 5, "writable": True},
                               {"name": "c", "table": "coil", "address": 3, "type": "bool",
                                "writable": True}]}])

        async def body() -> Collector:
            sink = Collector()
            poller = Poller(cfg, sink)
            line, runner = poller.line_of("d")
            try:
                await line.write(runner, "holding", 5, [42])
                await line.write(runner, "coil", 3, True)
                await line.run_once()
            finally:
                poller.close()
            return sink

        sink = asyncio.run(body())
    fcs = [e["fc"] for e in recorded(record) if e["event"] == "request" and e["fc"] in (5, 6, 15, 16)]
    assert fcs == ([16, 15] if write_multiple else [6, 5])
    values = {r[0]: r[2] for r in sink.readings}
    assert values == {tag_id(cfg, "d", "r"): 42, tag_id(cfg, "d", "c"): True}
