"""Modbus links: one pymodbus async client per TCP device or per serial bus. The only module that
imports pymodbus (pinned exactly: its API moves between minor versions).

A link performs one read at a time and classifies every failure into a quality code (edge.reading):

    device exception reply       -> RequestError(EXCEPTION | code), BAD_EXCEPTION for a code above 63
    no reply in time             -> RequestError(TIMEOUT), or BAD_FRAME when bytes did arrive but never
                                    formed a valid frame (pymodbus drops frames failing the CRC)
    a frame pymodbus cannot parse -> RequestError(BAD_FRAME) at once (a hostile or broken device: a short
                                    MBAP length, an exception without its code, an unknown function, a
                                    byte count beyond the data); the bytes are discarded
    not connected / link lost    -> RequestError(DISCONNECTED)

pymodbus's own retries and auto-reconnect are switched off: retries, backoff and the circuit breaker
belong to the poller, which knows the bus and the schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import sys
import termios
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse, ReadInputRegistersResponse
from serial.rs485 import RS485Settings

from edge.config import BusConfig, DeviceConfig
from edge.reading import BAD_EXCEPTION, BAD_FRAME, DISCONNECTED, EXCEPTION, TIMEOUT

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


class _HoldingResponse(ReadHoldingRegistersResponse):
    """Register replies parsed with one struct call instead of one per register (~100 us saved per
    125-register reply, the largest client cost measured in scripts/bench-poll).

    PDU: function code, byte count N, then N/2 big-endian registers; `data` starts at the byte count.
    """

    def decode(self, data: bytes) -> None:
        n = data[0]
        if n >= len(data) or n % 2:
            raise ModbusIOException(f"byte_count {n} vs packet of {len(data)}",
                                    function_code=self.function_code)
        self.registers = list(struct.unpack_from(f">{n // 2}H", data, 1))

    def __str__(self) -> str:  # pymodbus formats every reply eagerly for a debug log line: keep it cheap
        return f"{type(self).__name__}(dev_id={self.dev_id}, registers={len(self.registers)})"


class _InputResponse(_HoldingResponse):
    function_code = ReadInputRegistersResponse.function_code


class RequestError(Exception):
    def __init__(self, quality: int, detail: str = "", *, pending: bool = False) -> None:
        super().__init__(detail or f"quality {quality:#x}")
        self.quality = quality
        self.pending = pending  # the request's own reply may still come (see settle)


class Link:
    """A connection to a TCP device, or to a serial port shared by every unit on an RS-485 bus.

    The pymodbus client is made on first connect: it binds to the running event loop.
    """

    def __init__(self, make_client: Callable[[], Any], name: str, device: str | None = None, *,
                 echoes_tid: bool = True, shared: bool = False, rs485_rts: bool = False) -> None:
        self.make_client = make_client
        self.rs485_rts = rs485_rts  # a serial port whose driver switches the line's direction by RTS
        self.shared = shared  # a gateway's connection: one unit's silence is no reason to drop it
        self.device = device  # a serial port: opened once before connecting, for the OS's reason if it fails
        self.client: Any = None
        self.name = name
        self.rx_bytes = 0
        self.last_error = ""
        self._readers: dict[int, Any] = {}
        self.sent_at: deque[float] = deque()  # send times of requests whose frame has not come (yet)
        self.last_rx = 0.0  # monotonic time of the last byte received
        self.late: list[tuple[int, float]] = []  # (unit, s after its request) of frames no request waited for
        # replies say which request they answer (MBAP transaction id): False for RTU frames, and once a
        # TCP reply carried transaction id 0 (a gateway that drops it)
        self.echoes_tid = echoes_tid
        self.garbled = 0  # frames the parser could not read
        self._taken = 0.0  # send time of the request the last frame answered
        self._answer = asyncio.Event()

    def _create(self) -> Any:
        client = self.make_client()
        client.register(_HoldingResponse)
        client.register(_InputResponse)
        client.ctx.trace_packet = self._trace
        client.ctx.trace_pdu = self._trace_pdu
        client.ctx.callback_data = self._guard(client.ctx)
        if self.shared:  # pymodbus closes a TCP connection after a few timeouts in a row, whoever's
            client.ctx.max_until_disconnect = client.ctx.count_until_disconnect = sys.maxsize
        self._answer = asyncio.Event()  # of this event loop, like the client
        self._readers = {
            1: client.read_coils, 2: client.read_discrete_inputs,
            3: client.read_holding_registers, 4: client.read_input_registers,
        }
        return client

    def _guard(self, ctx: Any) -> Callable[..., int]:
        """pymodbus's frame parser, with every failure of it caught where the device's bytes enter: a
        frame it cannot parse raised out of data_received, and asyncio closed the connection with a
        20-line traceback each time. Here the bytes are dropped and the waiting request fails at once
        as a bad frame."""
        parse = ctx.callback_data

        def guarded(data: bytes, addr: tuple[Any, ...] | None = None) -> int:
            try:
                return int(parse(data, addr=addr))
            except Exception as e:  # noqa: BLE001 (any parse failure of hostile bytes; one place)
                self.garbled += 1
                future = getattr(ctx, "response_future", None)
                if future is not None and not future.done():
                    future.set_exception(ModbusIOException(f"unparsable frame: {type(e).__name__}: {e}"))
                return len(data)

        return guarded

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self.rx_bytes += len(data)
            self.last_rx = time.monotonic()
        return data

    def _trace_pdu(self, sending: bool, pdu: Any) -> Any:
        # every request sent, and every valid frame from the unit last asked, taken or not (pymodbus
        # drops one that comes when no request is waiting: a late reply, recorded in `late`)
        if sending:
            self.sent_at.append(time.monotonic())
            return pdu
        if self.sent_at:
            # frames answer requests in order: this one answers the oldest outstanding request, which is
            # late if no request waits any more or a later attempt was sent after it timed out
            retried = len(self.sent_at) > 1
            self._taken = self.sent_at.popleft()
            future = getattr(self.client.ctx, "response_future", None) if self.client is not None else None
            if retried or (future is not None and future.done()):
                self.late.append((int(pdu.dev_id), time.monotonic() - self._taken))
        if pdu.transaction_id == 0 and getattr(self.client.ctx, "request_transaction_id", 0):
            self.echoes_tid = False
        self._answer.set()
        return pdu

    def forget(self) -> None:
        """Every earlier request was answered, garbled, or settled: count afresh."""
        self.sent_at.clear()

    async def settle(self, quiet: float, cap: float) -> None:
        """After a timeout: hold the line until every request sent has had its frame, or until it has been
        silent for `quiet` seconds (counted from the later of now and the last byte received), `cap`
        seconds at most.

        An RTU frame (and the frame of a TCP gateway that does not echo transaction ids) cannot say
        which request it answers: a late reply taken as the reply to the next request of the same unit
        and size would put one block's values on another block's tags, as good readings. Frames that come
        while the line is held are dropped (no request waits for them) and recorded in `late`."""
        start = time.monotonic()
        while self.sent_at:
            now = time.monotonic()
            until = min(start + cap, max(start, self.last_rx) + quiet)
            if now >= until:
                break
            self._answer.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(until - now):
                    await self._answer.wait()
        self.sent_at.clear()

    @property
    def connected(self) -> bool:
        return self.client is not None and bool(self.client.connected)

    async def connect(self, timeout: float) -> bool:
        if self.device is not None:
            try:  # pymodbus reports a port it cannot open only as "not connected"
                os.close(os.open(self.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))
            except OSError as e:
                self.last_error = f"{self.device}: {e.strerror}"
                return False
        if self.client is None:
            self.client = self._create()
        self.client.ctx.comm_params.timeout_connect = timeout
        self.sent_at.clear()
        try:
            async with asyncio.timeout(timeout + 1.0):  # not wait_for: in 3.11 it can swallow a cancel
                connected = bool(await self.client.connect())
        except (TimeoutError, OSError, termios.error) as e:  # termios: a port refusing its settings
            self.last_error = str(e)
            return False
        return connected and self._rs485()

    def _rs485(self) -> bool:
        """The kernel's RS-485 mode (pyserial rs485_mode: RTS high while sending, low to receive) on a
        port that asks for it; a driver that cannot (a pty, most USB adapters, which switch by
        themselves) refuses, and the port is not used with a direction nobody switches."""
        if not self.rs485_rts:
            return True
        try:
            self.client.ctx.transport.sync_serial.rs485_mode = RS485Settings(
                rts_level_for_tx=True, rts_level_for_rx=False)
        except (ValueError, OSError, AttributeError) as e:
            self.last_error = f"{self.device}: rs485_rts: the driver refuses RS-485 mode ({e})"
            self.client.close()
            return False
        return True

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    async def read(self, unit: int, function: int, start: int, count: int,
                   timeout: float) -> Sequence[int] | Sequence[bool]:
        """One read; returns registers (or bits, padded to a multiple of 8) or raises RequestError."""
        rr = await self._request(timeout, function,
                                 lambda: self._readers[function](start, count=count, device_id=unit))
        values: Sequence[int] | Sequence[bool] = rr.bits if function <= 2 else rr.registers
        if len(values) != count if function > 2 else not count <= len(values) < count + 8:
            # a valid frame with the wrong amount of data: a confused device, or on a shared line a reply
            # that was not the one asked for; decoded, its values would land on the wrong tags
            raise self._foreign(f"{len(values)} values in the reply to a read of {count}")
        return values

    async def write(self, unit: int, table: str, address: int, value: list[int] | bool,
                    timeout: float, *, multiple: bool = False) -> None:
        """One write: a coil (FC 5), one register (FC 6) or several (FC 16); with `multiple`, FC 15 and
        FC 16 always (devices that implement only those). Raises RequestError as read()."""
        c = self.client
        if table == "coil" and multiple:
            await self._request(timeout, 15, lambda: c.write_coils(address, [bool(value)], device_id=unit))
        elif table == "coil":
            await self._request(timeout, 5, lambda: c.write_coil(address, bool(value), device_id=unit))
        elif isinstance(value, list) and len(value) == 1 and not multiple:
            await self._request(timeout, 6, lambda: c.write_register(address, value[0], device_id=unit))
        else:
            await self._request(timeout, 16, lambda: c.write_registers(address, value, device_id=unit))

    def _foreign(self, what: str) -> RequestError:
        """A valid frame that does not answer the request: this request's own reply may still come."""
        self.sent_at.appendleft(self._taken)  # the frame counted as its reply was not
        return RequestError(BAD_FRAME, f"{self.name}: {what}", pending=True)

    async def _request(self, timeout: float, function: int, send: Callable[[], Awaitable[Any]]) -> Any:
        """The reply to one request of `function`, or RequestError with the quality that describes the
        failure."""
        if not self.connected:
            raise RequestError(DISCONNECTED, f"{self.name}: not connected")
        self.client.ctx.comm_params.timeout_connect = timeout
        self.rx_bytes = 0
        try:  # pymodbus times the reply itself (timeout_connect, set above)
            rr = await send()
        except ConnectionException as e:
            raise RequestError(DISCONNECTED, f"{self.name}: {e}") from e
        except RuntimeError as e:  # uvloop: a write to a transport the peer closed a moment before
            if "closed" not in str(e):
                raise
            self.close()
            raise RequestError(DISCONNECTED, f"{self.name}: connection lost ({e})") from e
        except (ModbusException, TimeoutError) as e:
            if not self.client.connected:
                raise RequestError(DISCONNECTED, f"{self.name}: connection lost") from e
            if self.rx_bytes:  # bytes came, never a valid frame: the garbled reply
                raise RequestError(BAD_FRAME, f"{self.name}: {e}") from e
            raise RequestError(TIMEOUT, f"{self.name}: {e}", pending=True) from e
        if rr.function_code & 0x7F != function:  # exception replies: function | 0x80
            raise self._foreign(f"function {rr.function_code:#04x} in the reply to function {function}")
        if rr.isError():
            code = int(getattr(rr, "exception_code", 4))
            if not 1 <= code <= 0x3F:  # no room in a quality byte: not to be mistaken for another code
                raise RequestError(BAD_EXCEPTION, f"{self.name}: exception code {code}")
            raise RequestError(EXCEPTION | code, f"{self.name}: exception {code}")
        return rr


def tcp_link(device: DeviceConfig, shared_by: int = 1) -> Link:
    """A TCP connection: one device's, or a gateway's that `shared_by` devices share (edge.config
    .connections); RTU frames on it for transport = "rtu-over-tcp"."""
    assert device.host is not None
    host = device.host
    framer = FramerType.RTU if device.rtu_over_tcp else FramerType.SOCKET
    name = f"{device.name}@{host}:{device.port}" if shared_by == 1 else f"gateway {host}:{device.port}"

    def make() -> Any:
        return AsyncModbusTcpClient(host, port=device.port, framer=framer, timeout=device.timeout, retries=0,
                                    reconnect_delay=0, name=name)
    return Link(make, name, echoes_tid=not device.rtu_over_tcp, shared=shared_by > 1)


def serial_link(bus: BusConfig) -> Link:
    def make() -> Any:
        return AsyncModbusSerialClient(bus.port, framer=FramerType.RTU, baudrate=bus.baud,
                                       bytesize=bus.byte_size, parity=bus.parity, stopbits=bus.stop_bits,
                                       timeout=bus.timeout, retries=0, reconnect_delay=0, name=bus.name)
    return Link(make, f"{bus.name}@{bus.port}", bus.port, rs485_rts=bus.rs485_rts)


def url_link(url: str, timeout: float) -> tuple[Link, int]:
    """A link from `tcp://host:port/unit` or `rtu:///dev/ttyX?baud=9600&parity=E&unit=1` (for probe)."""
    from urllib.parse import parse_qs, urlsplit  # noqa: PLC0415 (CLI only)

    u = urlsplit(url)
    q = {k: v[-1] for k, v in parse_qs(u.query).items()}
    if u.scheme == "tcp":
        if not u.hostname:
            raise ValueError(f"{url}: no host (tcp://host:port/unit)")
        unit = int(u.path.strip("/") or q.get("unit", "1"))
        dev = DeviceConfig(name="probe", unit=unit, tags=(), groups=(), host=u.hostname, port=u.port or 502,
                     timeout=timeout)
        return tcp_link(dev), unit
    if u.scheme == "rtu":
        if not u.path:
            raise ValueError(f"{url}: no serial port (rtu:///dev/ttyUSB0?baud=9600&unit=1)")
        baud = int(q.get("baud", "19200"))
        parity = q.get("parity", "E").upper()
        if parity not in ("N", "E", "O"):
            raise ValueError(f"{url}: parity must be N, E or O")
        bus = BusConfig("probe", u.path, baud, parity, int(q.get("stopbits", "1")),
                        int(q.get("bytesize", "8")), timeout)
        return serial_link(bus), int(q.get("unit", "1"))
    raise ValueError(f"{url}: unknown scheme {u.scheme!r} (tcp://host:port/unit or rtu:///dev/ttyX?...)")

