"""Hostile Modbus TCP devices: a raw socket server on 127.0.0.1 that answers requests with frames no
parser should trust. Each must give bad-quality readings, one log line for the episode, no traceback and
no dropped connection; a healthy request beside a hostile one keeps its good readings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from edge.config import DeviceConfig
from edge.poll import Poller
from edge.poll.transport import RequestError, tcp_link
from edge.reading import BAD_EXCEPTION, BAD_FRAME, DISCONNECTED, GOOD, TIMEOUT, quality_name
from tests.support import Collector, config, tag_id

# Each maker gets (transaction id, unit, function, start, count) of a read and returns the reply bytes.
Reply = Callable[[int, int, int, int, int], bytes]


def mbap(tid: int, unit: int, pdu: bytes, length: int | None = None) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1 if length is None else length, unit) + pdu


def good(tid: int, unit: int, fc: int, start: int, count: int) -> bytes:
    return mbap(tid, unit, struct.pack(">BB", fc, 2 * count) + b"".join(
        struct.pack(">H", (start + i) & 0xFFFF) for i in range(count)))


HOSTILE: dict[str, Reply] = {
    # the MBAP length says 2 bytes (unit, function): the PDU ends before its byte count
    "short length": lambda tid, unit, fc, start, count: mbap(tid, unit, bytes([fc, 4, 0, 1, 0, 2]),
                                                             length=2),
    # an exception reply cut after its function byte: no exception code
    "exception without code": lambda tid, unit, fc, start, count: mbap(tid, unit, bytes([fc | 0x80])),
    # a function code no Modbus reply has
    "unknown function": lambda tid, unit, fc, start, count: mbap(tid, unit, bytes([0x55, 2, 0, 1])),
    # a byte count far beyond the data that follows
    "byte count beyond data": lambda tid, unit, fc, start, count: mbap(tid, unit, bytes([fc, 200, 0, 1])),
}


class RawServer:
    """Modbus TCP on 127.0.0.1: answers each read with `reply(...)`, chosen per request start address."""

    def __init__(self, replies: dict[int, Reply]) -> None:
        self.replies = replies
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while not self.stopping.is_set():
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while len(buf) >= 12:
                    tid, _, length, unit = struct.unpack(">HHHB", buf[:7])
                    fc, start, count = struct.unpack(">BHH", buf[7:12])
                    buf = buf[6 + length:]
                    reply = self.replies.get(start, good)
                    with contextlib.suppress(OSError):
                        conn.sendall(reply(tid, unit, fc, start, count))

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()


@contextlib.contextmanager
def raw_server(replies: dict[int, Reply]) -> Iterator[RawServer]:
    server = RawServer(replies)
    try:
        yield server
    finally:
        server.close()


def poll(port: int, cycles: int, tags: list[dict[str, Any]]) -> tuple[Collector, Any]:
    cfg = config([{"name": "dev", "host": "127.0.0.1", "port": port, "timeout": "500ms", "retries": 1,
                   "tag": tags}])
    sink = Collector()

    async def main() -> None:
        poller = Poller(cfg, sink)
        try:
            for _ in range(cycles):  # on one connection: a hostile frame must not cost it
                for line in poller.lines:
                    await line.run_once()
        finally:
            poller.close()

    asyncio.run(main())
    return sink, cfg


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_frame_is_a_bad_frame_logged_once(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tags = [{"name": "a", "address": 0}, {"name": "b", "address": 1}]
    with raw_server({0: HOSTILE[kind]}) as server:
        sink, _ = poll(server.port, 2, tags)  # a third failure in a row would open the breaker
    assert {quality_name(q) for _, _, _, q in sink.readings} == {quality_name(BAD_FRAME)}
    assert len(sink.readings) == 4
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "bad_frame" in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info or "Fatal error" in r.getMessage()]
    assert server.connections == 1  # the connection was kept: nothing to reconnect


def test_an_exception_code_above_63_is_not_mistaken_for_another(caplog: pytest.LogCaptureFixture) -> None:
    """Code 66 would read as 2 (illegal address) in the quality's six bits, and split the request."""
    def code_66(tid: int, unit: int, fc: int, start: int, count: int) -> bytes:
        return mbap(tid, unit, bytes([fc | 0x80, 66]))

    caplog.set_level(logging.WARNING)
    tags = [{"name": "a", "address": 0}, {"name": "b", "address": 1}]
    with raw_server({0: code_66}) as server:
        sink, _ = poll(server.port, 3, tags)
    assert {q for _, _, _, q in sink.readings} == {BAD_EXCEPTION}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "exception code 66" in messages[0], messages
    assert not any("illegal" in m or "one by one" in m for m in messages)


def test_a_good_request_beside_a_hostile_one_keeps_flowing_and_the_log_stays_quiet(
        caplog: pytest.LogCaptureFixture) -> None:
    """One request good, one hostile, every cycle: the good tags read good, and the hostile request is
    logged once for the whole run, not twice a cycle ("failing", "answering again", ...)."""
    caplog.set_level(logging.INFO)
    tags = [{"name": "ok", "address": 0}, {"name": "bad", "address": 500}]
    with raw_server({500: HOSTILE["byte count beyond data"]}) as server:
        sink, cfg = poll(server.port, 10, tags)
    ok, bad = tag_id(cfg, "dev", "ok"), tag_id(cfg, "dev", "bad")
    assert [q for t, _, _, q in sink.readings if t == ok] == [GOOD] * 10
    assert [q for t, _, _, q in sink.readings if t == bad] == [BAD_FRAME] * 10
    lines = [r.getMessage() for r in caplog.records if "dev" in r.getMessage()]
    assert len(lines) == 1, lines


HANG_UPS = 50  # requests on connections the device drops at once, each a chance to write to a closed one
CONNECTS = 1000  # at most, with the time bound below: a connection dropped before connect() returned is none


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_device_that_hangs_up_at_once_is_disconnected_never_a_crash(loop: str) -> None:
    """A peer that accepts and drops each connection (a serial server restarting, a port forwarder whose
    far side is gone): every request is DISCONNECTED or TIMEOUT, the link closes and connects again. With
    uvloop a write can reach a transport closed a moment before (RuntimeError from uvloop): that must be
    a lost connection too, not an exception out of the poll loop."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def hang_up() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST

    threading.Thread(target=hang_up, daemon=True).start()
    device = DeviceConfig(name="dev", unit=1, tags=(), groups=(), host="127.0.0.1",
                          port=server.getsockname()[1], timeout=0.2)

    async def main() -> list[int]:
        link = tcp_link(device)
        outcomes: list[int] = []
        deadline = time.monotonic() + 20
        try:
            for _ in range(CONNECTS):
                if len(outcomes) >= HANG_UPS or time.monotonic() > deadline:
                    break
                if not link.connected and not await link.connect(1.0):
                    continue
                try:
                    await link.read(1, 3, 0, 2, 0.2)
                except RequestError as e:
                    outcomes.append(e.quality)
                    if not link.connected:
                        link.close()
        finally:
            link.close()
        return outcomes

    try:
        outcomes = uvloop.run(main()) if loop == "uvloop" else asyncio.run(main())
    finally:
        stop.set()
        server.close()
    assert len(outcomes) >= 10 and set(outcomes) <= {DISCONNECTED, TIMEOUT}, outcomes
