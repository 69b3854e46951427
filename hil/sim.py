"""A simulated Modbus device: a real pymodbus 3.16 server fed from a TOML map, faults switched at run time.

    python -m hil.sim --map MAP.toml --tcp 127.0.0.1:0                 -> prints "READY tcp 127.0.0.1:<port>"
    python -m hil.sim --map MAP.toml --rtu /dev/pts/7 --baud 9600      -> prints "READY rtu /dev/pts/7"
        [--parity E|N|O] [--stopbits 1|2] [--bytesize 7|8] [--control FILE] [--no-wire-time]
    python -m hil.sim --map MAP.toml --tcp 127.0.0.1:0 --framer rtu    RTU frames on TCP (a serial server)
        [--baud 9600 ...]   and its RS-485 side's wire time, as a gateway in front of the units

Every unit of the map is one SimDevice of the same server, so several RTU units share one bus. Each unit has
four tables (coil, discrete, input, holding) spanning addresses 0..65535, zero unless a point sets them;
coils and discrete inputs are bit-addressed. Ranges listed in `invalid` answer exception 2 in every table.
A request for a unit id the map lacks gets no reply on RTU (also RTU on TCP) and exception 11 (gateway
target) on Modbus TCP.

Encoding (see `encode`) is this module's own on purpose, not edge.poll.types and edge.poll.decode: the
simulator is the independent implementation the appliance's decoder is tested against, so a mistake in
the appliance's type table cannot pass on both sides. The value is packed big-endian, bytes "A B C D ..."
with A the most significant, then `order` swaps bytes inside each word (BADC), reverses the words (CDAB)
or both (DCBA):

    float32 1.0 = 3F 80 00 00    ABCD [0x3F80, 0x0000]   CDAB [0x0000, 0x3F80]
                                 BADC [0x803F, 0x0000]   DCBA [0x0000, 0x803F]
    int8 -1 = FF                 ABCD [0x00FF]           BADC [0xFF00]   (8-bit types sit in one word)
    string "abc", length 4       ABCD [0x6162, 0x6300]   BADC [0x6261, 0x0063]

Faults come from the JSON control file, re-read whenever its (st_ino, st_mtime_ns, st_size) changes:

    {"1": {"mode": "silent"}, "2": {"mode": "slow", "delay": 0.3},
     "3": {"mode": "exception", "code": 6, "count": 2}, "*": {"mode": "crc", "rate": 0.5}}

Modes: ok; silent (no reply, ever); slow (reply `delay` s late, default 1); exception (reply `code`);
crc (RTU: CRC bytes of the reply flipped); drop (TCP: close the connection; on RTU it is silent); short (a
register read answered with one register fewer than asked, in a frame that is otherwise valid: a confused
device or gateway); function (a read's reply, or exception, sent with the function code of the other
table's read: 4 for 3, 2 for 1; a gateway mixing up replies). A unit's own entry wins over "*". `count`
limits any mode to that unit's next `count` requests after the file changed; `rate` makes it hit each
request with that probability (default 1); `delay` adds seconds to any mode that replies.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextvars
import functools
import gc
import json
import logging
import math
import os
import random
import signal
import struct
import sys
import termios
import time
import tomllib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerRTU, FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

ADDRESSES = 65536
TABLES = ("coil", "discrete", "input", "holding")
BIT_TABLES = frozenset({"coil", "discrete"})

# type -> (struct code, bytes); 8-bit values travel in the low byte of one word: int8 -1 -> 0x00FF
CODES: dict[str, tuple[str, int]] = {
    "int8": ("b", 1), "uint8": ("B", 1),
    "int16": ("h", 2), "uint16": ("H", 2), "float16": ("e", 2),
    "int32": ("i", 4), "uint32": ("I", 4), "float32": ("f", 4),
    "int64": ("q", 8), "uint64": ("Q", 8), "float64": ("d", 8),
}
TYPES = frozenset({*CODES, "bool", "string"})
FLOAT_MAX = {"e": 65504.0, "f": 3.4028234663852886e38, "d": sys.float_info.max}

# order -> (swap the bytes inside every word, reverse the order of the words)
ORDERS: dict[str, tuple[bool, bool]] = {
    "ABCD": (False, False), "AB": (False, False), "ABCDEFGH": (False, False),
    "BADC": (True, False), "BA": (True, False), "BADCFEHG": (True, False),
    "CDAB": (False, True), "GHEFCDAB": (False, True),
    "DCBA": (True, True), "HGFEDCBA": (True, True),
}

# function code -> table it addresses
FC_TABLE = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 4: "input",
            3: "holding", 6: "holding", 16: "holding", 22: "holding", 23: "holding"}
BIT_FCS = frozenset({1, 2, 5, 15})
WRITE_FCS = frozenset({5, 6, 15, 16, 22, 23})

WAVES = ("sine", "ramp", "counter", "square")
MODES = frozenset({"ok", "silent", "slow", "exception", "crc", "drop", "short", "function"})
NO_REPLY = frozenset({"silent", "drop"})

# (function code, address, count) of the request being served. Set by trace_pdu while the frame is decoded;
# pymodbus then schedules the request with call_soon, which copies the context, so the action hook sees it.
_REQUEST: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar("request",
                                                                                       default=None)
# What to do with the reply of the request served by the current task: None, "silent", "drop", "crc",
# "short" or "function".
_VERDICT: contextvars.ContextVar[str | None] = contextvars.ContextVar("verdict", default=None)


# ----------------------------------------------------------------------------------------------- encoding

def encode(type: str, order: str, value: Any, length: int | None = None, *, bit: int = 0) -> list[int]:
    """Registers holding `value`; bool is the single register with only `bit` set (or clear)."""
    byte_swap, word_swap = ORDERS[order]
    if type == "bool":
        return [1 << bit if value else 0]
    if type == "string":
        raw, word_swap = _string_bytes(str(value), length), False
    else:
        code, size = CODES[type]
        raw = struct.pack(">" + code, value)
        raw = b"\0" + raw if size == 1 else raw
    words = [raw[i:i + 2] for i in range(0, len(raw), 2)]
    if word_swap:
        words.reverse()
    if byte_swap:
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def _string_bytes(text: str, length: int | None) -> bytes:
    """UTF-8 bytes cut to `length`, NUL padded to whole registers: "abc", 4 -> b"abc\\0"."""
    raw = text.encode("utf-8")
    length = len(raw) if length is None else length
    return raw[:length].ljust(2 * ((length + 1) // 2), b"\0")


def coerce(type: str, value: float) -> Any:
    """Fit a wave sample to the type: integers round and wrap (int8 200 -> -56), floats clamp to finite."""
    if type == "bool":
        return bool(value)
    code, size = CODES[type]
    if code in FLOAT_MAX:
        return max(-FLOAT_MAX[code], min(FLOAT_MAX[code], value))
    bits = 8 * size
    wrapped = round(value) % (1 << bits)
    return wrapped - (1 << bits) if code.islower() and wrapped >> (bits - 1) else wrapped


# --------------------------------------------------------------------------------------------------- map

@dataclass(frozen=True)
class Wave:
    kind: str
    amplitude: float = 100.0
    period: float = 60.0
    offset: float = 0.0
    step: float = 1.0

    def sample(self, now: float, elapsed: float) -> float:
        """sine/square swing offset +- amplitude, ramp climbs offset..offset+amplitude each period,
        counter adds `step` per second since the simulator started."""
        phase = (now % self.period) / self.period
        if self.kind == "sine":
            return self.offset + self.amplitude * math.sin(2 * math.pi * phase)
        if self.kind == "square":
            return self.offset + (self.amplitude if phase < 0.5 else -self.amplitude)
        if self.kind == "ramp":
            return self.offset + self.amplitude * phase
        return self.offset + self.step * elapsed


@dataclass(frozen=True)
class Point:
    table: str
    address: int
    type: str = "uint16"
    order: str = "ABCD"
    bit: int | None = None
    length: int | None = None
    value: Any = 0
    wave: Wave | None = None

    @property
    def size(self) -> int:
        """Registers (bits, on coil and discrete tables) the point occupies."""
        if self.type == "string":
            return ((self.length or 0) + 1) // 2
        return 1 if self.type == "bool" else max(1, CODES[self.type][1] // 2)

    def registers(self, value: Any) -> list[int]:
        return encode(self.type, self.order, value, self.length, bit=self.bit or 0)

    def sample(self, now: float, elapsed: float) -> Any:
        """The wave's value at `now`; bool waves are on while the sample exceeds the offset."""
        assert self.wave is not None
        raw = self.wave.sample(now, elapsed)
        return raw > self.wave.offset if self.type == "bool" else coerce(self.type, raw)


@dataclass(frozen=True)
class Unit:
    id: int
    points: tuple[Point, ...] = ()
    invalid: tuple[tuple[int, int], ...] = ()

    def is_invalid(self, first: int, last: int) -> bool:
        return any(lo <= last and first <= hi for lo, hi in self.invalid)


def load_map(path: str | Path) -> list[Unit]:
    """Units of a MAP toml; raises ValueError naming the unit and point of a bad entry."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    units = [_unit(raw) for raw in doc.get("unit", [])]
    ids = [u.id for u in units]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate unit id in {ids}")
    return units


def _unit(raw: dict[str, Any]) -> Unit:
    uid = raw.get("id")
    if not isinstance(uid, int) or not 0 <= uid <= 255:
        raise ValueError(f"unit id {uid!r}: must be an integer 0..255")
    invalid = tuple((int(lo), int(hi)) for lo, hi in raw.get("invalid", []))
    points = []
    for i, spec in enumerate(raw.get("point", [])):
        try:
            points.append(_point(spec))
        except (KeyError, TypeError, ValueError, struct.error) as exc:
            raise ValueError(f"unit {uid} point {i}: {exc}") from exc
    return Unit(uid, tuple(points), invalid)


def _point(spec: dict[str, Any]) -> Point:
    table, type_, order = spec["table"], spec.get("type", "uint16"), spec.get("order", "ABCD")
    _check(table in TABLES, f"table {table!r} not in {TABLES}")
    _check(type_ in TYPES, f"type {type_!r} unknown")
    _check(order in ORDERS, f"order {order!r} unknown")
    _check(table not in BIT_TABLES or type_ == "bool", f"{table} points must be bool")
    bit = spec.get("bit")
    _check(bit is None or (type_ == "bool" and table not in BIT_TABLES and 0 <= bit <= 15), "bad bit")
    length = spec.get("length")
    if type_ == "string":
        length = length if length is not None else len(str(spec.get("value", "")).encode())
        _check(length > 0, "string needs a length")
    point = Point(table, int(spec["address"]), type_, order, bit, length, _static(type_, spec), _wave(spec))
    _check(point.address >= 0 and point.address + point.size <= ADDRESSES, "address out of range")
    _check(point.wave is None or type_ != "string", "strings cannot wave")
    point.registers(point.value)
    return point


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _static(type_: str, spec: dict[str, Any]) -> Any:
    value = spec.get("value", "" if type_ == "string" else 0)
    if type_ == "bool":
        return bool(value)
    if type_ == "string":
        return str(value)
    return float(value) if CODES[type_][0] in FLOAT_MAX else round(value)


def _wave(spec: dict[str, Any]) -> Wave | None:
    kind = spec.get("wave")
    if kind is None:
        return None
    _check(kind in WAVES, f"wave {kind!r} not in {WAVES}")
    wave = Wave(kind, *(float(spec.get(k, d)) for k, d in
                        (("amplitude", 100.0), ("period", 60.0), ("offset", 0.0), ("step", 1.0))))
    _check(wave.period > 0, "period must be > 0")
    return wave


# ------------------------------------------------------------------------------------------ data blocks

@dataclass
class WaveIndex:
    """Wave points of one table sorted by address, so a request touches only the points it overlaps."""

    starts: list[int] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    span: int = 1

    @classmethod
    def build(cls, points: Sequence[Point]) -> WaveIndex:
        ordered = sorted(points, key=lambda p: p.address)
        return cls([p.address for p in ordered], ordered, max((p.size for p in ordered), default=1))

    def overlapping(self, first: int, last: int) -> Iterator[Point]:
        for i in range(bisect.bisect_left(self.starts, first - self.span + 1), len(self.starts)):
            if self.starts[i] > last:
                return
            if self.starts[i] + self.points[i].size > first:
                yield self.points[i]


def register_image(points: Sequence[Point]) -> dict[int, int]:
    """address -> register of the static points of a register table; bool points set only their bit."""
    image: dict[int, int] = {}
    for p in points:
        if p.type == "bool":
            mask = 1 << (p.bit or 0)
            image[p.address] = (image.get(p.address, 0) & ~mask) | (mask if p.value else 0)
        else:
            image.update(enumerate(p.registers(p.value), start=p.address))
    return image


def register_blocks(image: dict[int, int]) -> list[SimData]:
    """SimData covering 0..65535: runs of set registers as lists, the gaps between them as zeros."""
    blocks: list[SimData] = []
    addr = 0
    for start in sorted(image):
        if start < addr:
            continue
        end = start
        while end + 1 in image:
            end += 1
        if start > addr:
            blocks.append(SimData(addr, count=start - addr, values=0, datatype=DataType.REGISTERS))
        blocks.append(SimData(start, values=[image[a] for a in range(start, end + 1)],
                              datatype=DataType.REGISTERS))
        addr = end + 1
    if addr < ADDRESSES:
        blocks.append(SimData(addr, count=ADDRESSES - addr, values=0, datatype=DataType.REGISTERS))
    return blocks


def bit_block(points: Sequence[Point]) -> list[SimData]:
    """One SimData of 65536 bits (an explicit list: SimDevice squares `count` when it checks bit blocks)."""
    bits = [False] * ADDRESSES
    for p in points:
        bits[p.address] = bool(p.value)
    return [SimData(0, values=bits, datatype=DataType.BITS)]


def simdata(points: Sequence[Point]) -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
    """(coils, discrete inputs, holding registers, input registers), the SimDevice tuple order."""
    static = {t: [p for p in points if p.table == t and p.wave is None] for t in TABLES}
    holding, inputs = (register_blocks(register_image(static[t])) for t in ("holding", "input"))
    return bit_block(static["coil"]), bit_block(static["discrete"]), holding, inputs


# ------------------------------------------------------------------------------------------------ faults

@dataclass(frozen=True)
class Fault:
    mode: str = "ok"
    delay: float = 0.0
    code: int = 6
    count: int | None = None
    rate: float = 1.0


OK = Fault()


def parse_fault(spec: dict[str, Any]) -> Fault:
    mode = spec.get("mode", "ok")
    _check(mode in MODES, f"mode {mode!r} not in {sorted(MODES)}")
    count = spec.get("count")
    fault = Fault(mode, float(spec.get("delay", 1.0 if mode == "slow" else 0.0)), int(spec.get("code", 6)),
                  None if count is None else int(count), float(spec.get("rate", 1.0)))
    ExcCodes(fault.code)
    return fault


def parse_faults(text: str) -> dict[str, Fault]:
    raw = json.loads(text)
    _check(isinstance(raw, dict), "control file must hold a JSON object")
    return {str(key): parse_fault(spec) for key, spec in raw.items()}


class FaultControl:
    """Faults per unit id from the control file, re-read when the file's (inode, mtime, size) changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.stamp: tuple[int, int, int] | None = None
        self.faults: dict[str, Fault] = {}
        self.left: dict[int, int] = {}

    def take(self, unit: int) -> Fault:
        """The fault of one request to `unit` (with probability `rate`), spending one of its `count`."""
        self._refresh()
        fault = self.faults.get(str(unit)) or self.faults.get("*") or OK
        if fault.count is not None:
            left = self.left.get(unit, fault.count)
            self.left[unit] = left - 1
            if left <= 0:
                return OK
        return fault if fault.rate >= 1.0 or random.random() < fault.rate else OK

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self.stamp:
            return
        self.stamp, self.left = stamp, {}
        try:
            self.faults = parse_faults(self.path.read_text()) if stamp else {}
        except (OSError, ValueError) as exc:
            print(f"hil.sim: control file {self.path}: {exc}; faults unchanged", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------- wire time

@dataclass(frozen=True)
class Line:
    """Serial line; 8E1 at 9600 baud: 11 bits a character, t3.5 = 3.5 * 11 / 9600 = 4.01 ms."""

    baud: int
    bytesize: int = 8
    parity: str = "E"
    stopbits: int = 1

    @property
    def bits_per_char(self) -> int:
        return 1 + self.bytesize + (self.parity != "N") + self.stopbits

    @property
    def t35(self) -> float:
        return 0.00175 if self.baud > 19200 else 3.5 * self.bits_per_char / self.baud

    def exchange(self, fc: int, count: int, error: bool) -> float:
        """Seconds a request and its reply take on the line, plus one t3.5 gap.

        Read 10 holding registers at 9600 8E1: (8 + 25) * 11 / 9600 + 0.00401 = 41.8 ms.
        """
        request, reply = frame_lengths(fc, count, error)
        return (request + reply) * self.bits_per_char / self.baud + self.t35


def frame_lengths(fc: int, count: int, error: bool) -> tuple[int, int]:
    """RTU (request, reply) bytes: unit + fc + data + 2 CRC; an exception reply is 5 bytes."""
    data = (count + 7) // 8 if fc in BIT_FCS else 2 * count
    if fc in (1, 2, 3, 4):
        request, reply = 8, 5 + data
    elif fc in (15, 16):
        request, reply = 9 + data, 8
    else:
        request, reply = 8, 8
    return request, 5 if error else reply


# ----------------------------------------------------------------------------------------------- server

@dataclass
class Request:
    """One call of the action hook: `registers` is the whole table (16 bits a word on coil and discrete
    tables), `start` the address of registers[0], `values` what a write sets (None on reads)."""

    unit: int
    fc: int
    start: int
    address: int
    count: int
    registers: list[int]
    values: list[int] | list[bool] | None


class Sim:
    """State and pymodbus hooks of one simulated bus or TCP device."""

    def __init__(self, units: Sequence[Unit], *, control: Path | None = None, line: Line | None = None,
                 rtu: bool = False) -> None:
        self.units = {u.id: u for u in units}
        self.waves = {u.id: {t: WaveIndex.build([p for p in u.points if p.table == t and p.wave])
                             for t in TABLES} for u in units}
        self.faults = FaultControl(control)
        self.line = line
        self.rtu = rtu
        self.started = time.time()
        self.recording: IO[str] | None = None  # --record: connections and requests as JSON lines
        self.arrived = 0.0  # monotonic time the last request's bytes arrived (one line: one at a time)
        self.woke = 0.0  # when the last wait for the wire time ended
        self.reply_work = 0.0  # s from the end of the wait to the reply leaving, smoothed

    def devices(self) -> list[SimDevice]:
        """One SimDevice per unit, plus id 0 (pymodbus' catch-all) for ids the map lacks."""
        devices = [SimDevice(u.id, simdata(u.points), action=functools.partial(self.action, u.id))
                   for u in self.units.values()]
        if 0 not in self.units:
            devices.append(SimDevice(0, simdata(()), action=self.unknown))
        return devices

    async def unknown(self, *_: Any) -> ExcCodes:
        if self.rtu:
            _VERDICT.set("silent")
            return ExcCodes.DEVICE_FAILURE
        return ExcCodes.GATEWAY_NO_RESPONSE

    async def action(self, unit: int, *hook: Any) -> ExcCodes | None:
        """pymodbus SimAction, bound to a unit: faults, invalid ranges, waves and wire time of one request."""
        req = Request(unit, *hook)
        if req.values is None and req.fc in WRITE_FCS:
            # pymodbus reads a written range back after writing: one request, already served
            if req.fc == 23:
                self.overlay(req)
            return None
        req.count = exact_count(req)
        fault = self.faults.take(unit)
        if fault.mode in NO_REPLY:
            _VERDICT.set("drop" if fault.mode == "drop" and not self.rtu else "silent")
            return ExcCodes.DEVICE_FAILURE  # never sent; keeps a write from landing
        error = self.error(req, fault)
        if error is None and req.values is None:
            self.overlay(req)
        if fault.delay > 0:
            await asyncio.sleep(fault.delay)
        if self.line:  # the reply leaves when the exchange's wire time, counted from the request's arrival,
            # is over: the simulator's own work on both sides of the wait is inside it, not added to it
            wire = self.line.exchange(req.fc, req.count, error is not None)
            await _until(self.arrived + fault.delay + wire - self.reply_work)
        self.woke = time.monotonic()
        if fault.mode == "crc" and self.rtu:
            _VERDICT.set("crc")
        if fault.mode == "short" and error is None and req.fc in (3, 4):
            _VERDICT.set("short")
        if fault.mode == "function" and req.fc in OTHER_READ:
            _VERDICT.set("function")
        return error

    def error(self, req: Request, fault: Fault) -> ExcCodes | None:
        if fault.mode == "exception":
            return ExcCodes(fault.code)
        if self.units[req.unit].is_invalid(req.address, req.address + req.count - 1):
            return ExcCodes.ILLEGAL_ADDRESS
        return None

    def overlay(self, req: Request) -> None:
        """Write the current sample of every wave point overlapping the request into the block."""
        table, regs, start = FC_TABLE[req.fc], req.registers, req.start
        now = time.time()
        for p in self.waves[req.unit][table].overlapping(req.address, req.address + req.count - 1):
            value = p.sample(now, now - self.started)
            if table in BIT_TABLES:
                _set_bit(regs, p.address // 16 - start, p.address % 16, value)
            elif p.type == "bool":
                _set_bit(regs, p.address - start, p.bit or 0, value)
            else:
                regs[p.address - start:p.address - start + p.size] = p.registers(value)

    def trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            _REQUEST.set((pdu.function_code, getattr(pdu, "address", -1), getattr(pdu, "count", 0)))
            self.record("request", unit=pdu.dev_id, fc=pdu.function_code, address=getattr(pdu, "address", -1))
        return pdu

    def record(self, event: str, **fields: Any) -> None:
        """One JSON line in the --record file (what a test checks the appliance did on the wire)."""
        if self.recording is not None:
            # buffered: written out when the server stops (a flush per event would delay the replies)
            self.recording.write(json.dumps({"t": time.time(), "event": event, **fields}) + "\n")

    def trace_packet(self, conn: Any, sending: bool, packet: bytes) -> bytes:
        """Per-connection packet hook: applies the verdict the action hook left for this reply."""
        if not sending:
            self.arrived = time.monotonic()
        else:  # what building a reply takes after the wait (smoothed), taken off the next wait
            self.reply_work += (min(time.monotonic() - self.woke, 0.01) - self.reply_work) / 8
            if self.recording is not None:
                self.record("reply", bytes=len(packet))
        verdict = _VERDICT.get() if sending else None
        if verdict is None:
            return packet
        if verdict == "crc":
            return packet[:-2] + bytes(b ^ 0xA5 for b in packet[-2:])
        if verdict == "short":
            return short_reply(packet, self.rtu)
        if verdict == "function":
            return other_function_reply(packet, self.rtu)
        if verdict == "drop":
            conn.loop.call_soon(conn.close)
        return b""


async def _until(when: float) -> None:
    """Wait until the monotonic time `when`, to within tens of microseconds: the event loop's timers
    round up to the next millisecond, which on a 5 ms exchange (115200 baud) would be 10 % of the line;
    the last 2 ms are spent yielding to the loop instead."""
    if (left := when - time.monotonic() - 0.002) > 0:
        await asyncio.sleep(left)
    while time.monotonic() < when:  # noqa: ASYNC110 (a time, not an event, is awaited)
        await asyncio.sleep(0)


def short_reply(packet: bytes, rtu: bool) -> bytes:
    """A register-read reply with its last register cut off, byte count, MBAP length or CRC made to fit."""
    if rtu:  # unit, fc, byte count, data, CRC
        body = bytearray(packet[:-4])
        body[2] -= 2
        return _with_crc(body)
    body = bytearray(packet[:-2])  # MBAP (tid, protocol, length, unit), fc, byte count, data
    body[4:6] = (int.from_bytes(body[4:6], "big") - 2).to_bytes(2, "big")
    body[8] -= 2
    return bytes(body)


OTHER_READ = {1: 2, 2: 1, 3: 4, 4: 3}  # the read whose reply has the same layout


def other_function_reply(packet: bytes, rtu: bool) -> bytes:
    """A read's reply (or exception) sent as the one of the other table's read, e.g. FC 4 for FC 3."""
    body = bytearray(packet[:-2] if rtu else packet)
    at = 1 if rtu else 7  # RTU: unit, fc; TCP: MBAP (7 bytes), fc
    body[at] = OTHER_READ[body[at] & 0x7F] | body[at] & 0x80
    return _with_crc(body) if rtu else bytes(body)


def _with_crc(body: bytearray) -> bytes:
    """An RTU frame: the body and its CRC."""
    return bytes(body) + FramerRTU.compute_CRC(bytes(body)).to_bytes(2, "big")


def exact_count(req: Request) -> int:
    """Values the request addresses; for bit reads pymodbus passes the action 16-bit words, not bits."""
    if req.values is not None:
        return len(req.values)
    if req.fc not in BIT_FCS:
        return req.count
    request = _REQUEST.get()
    if request is not None and request[:2] == (req.fc, req.address):
        return request[2]
    return req.count * 16 - req.address % 16


def _set_bit(registers: list[int], index: int, bit: int, on: bool) -> None:
    registers[index] = registers[index] | (1 << bit) if on else registers[index] & ~(1 << bit)


class _PerConnection:
    """Gives each connection its own trace_packet bound to it, so a fault can close that connection."""

    sim: Sim

    def callback_new_connection(self) -> Any:
        self.sim.record("connect")
        handler = super().callback_new_connection()  # type: ignore[misc]
        handler.trace_packet = functools.partial(self.sim.trace_packet, handler)
        return handler


class TcpSimServer(_PerConnection, ModbusTcpServer):
    pass


class RtuSimServer(_PerConnection, ModbusSerialServer):
    pass


# -------------------------------------------------------------------------------------------------- cli

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m hil.sim", description="Simulated Modbus device")
    ap.add_argument("--map", required=True, type=Path)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST:PORT")
    where.add_argument("--rtu", metavar="PTY_PATH")
    ap.add_argument("--baud", type=int, default=None,
                    help="the line's baud rate (default 9600); with --tcp --framer rtu: emulate a gateway's "
                         "RS-485 side at this rate (its wire time), none without")
    ap.add_argument("--parity", choices=("E", "N", "O"), default="E")
    ap.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    ap.add_argument("--bytesize", type=int, choices=(7, 8), default=8)
    ap.add_argument("--control", type=Path)
    ap.add_argument("--no-wire-time", action="store_true")
    ap.add_argument("--record", type=Path, help="append each connection and request as a JSON line")
    ap.add_argument("--framer", choices=("socket", "rtu"), default="socket",
                    help="with --tcp: MBAP (socket), or RTU frames on TCP (a serial server, transparent)")
    return ap.parse_args(argv)


def make_server(args: argparse.Namespace, units: Sequence[Unit], parity: str) -> Any:
    if args.tcp:
        rtu = args.framer == "rtu"
        wire = rtu and args.baud and not args.no_wire_time  # a gateway's serial side, one request at a time
        line = Line(args.baud, args.bytesize, args.parity, args.stopbits) if wire else None
        sim = Sim(units, control=args.control, rtu=rtu, line=line)
        host, port = args.tcp.rsplit(":", 1)
        server: Any = TcpSimServer(sim.devices(), address=(host, int(port)), trace_pdu=sim.trace_pdu,
                                   framer=FramerType.RTU if rtu else FramerType.SOCKET)
    else:
        args.baud = args.baud or 9600
        line = None if args.no_wire_time else Line(args.baud, args.bytesize, args.parity, args.stopbits)
        sim = Sim(units, control=args.control, line=line, rtu=True)
        server = RtuSimServer(sim.devices(), framer=FramerType.RTU, port=args.rtu, baudrate=args.baud,
                              bytesize=args.bytesize, parity=parity, stopbits=args.stopbits,
                              trace_pdu=sim.trace_pdu)
    if args.record:
        sim.recording = open(args.record, "a")  # noqa: SIM115 (open for the server's life)
    server.sim = sim
    return server


async def start_server(args: argparse.Namespace, units: Sequence[Unit]) -> Any:
    """Listening server. Linux ptys may refuse parity (tcsetattr -> EINVAL, sometimes only on the second
    call, leaving the port open and locked); such a port is reopened without parity, while the emulated
    wire time still counts the parity bit."""
    for parity in dict.fromkeys((args.parity, "N")):
        server = make_server(args, units, parity)
        try:
            await server.serve_forever(background=True)
        except termios.error:
            if not args.rtu or parity == "N":
                raise
        else:
            return server
        gc.collect()  # closes (and unlocks) the port the failed open left behind
        print(f"hil.sim: {args.rtu} refuses parity {parity}; opened without parity", file=sys.stderr,
              flush=True)
    raise RuntimeError("unreachable")


def ready_line(args: argparse.Namespace, server: Any) -> str:
    if args.rtu:
        return f"READY rtu {args.rtu}"
    host, port = server.transport.sockets[0].getsockname()[:2]
    return f"READY tcp {host}:{port}"


async def serve(args: argparse.Namespace) -> None:
    units = load_map(args.map)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await start_server(args, units)
    print(ready_line(args, server), flush=True)
    await stop.wait()
    await server.shutdown()
    if server.sim.recording is not None:
        server.sim.recording.close()


def main(argv: Sequence[str] | None = None) -> int:
    warnings.simplefilter("ignore", DeprecationWarning)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    args = parse_args(argv)
    try:
        asyncio.run(serve(args))
    except (OSError, RuntimeError, ValueError, termios.error) as exc:
        print(f"hil.sim: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
