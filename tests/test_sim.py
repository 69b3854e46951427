"""The simulated device (python -m hil.sim) against plain pymodbus clients, over TCP and a socat pty bus."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from hil.sim import FaultControl, Line, Point, coerce, encode, load_map
from tests.support import SimHandle, pty_pair, set_faults, start_sim, write_map

# ------------------------------------------------------------------------------------------------ encode

U64 = 0x0102030405060708
ENCODE_CASES: list[tuple[str, str, Any, int | None, list[int]]] = [
    ("float32", "ABCD", 1.0, None, [0x3F80, 0x0000]),
    ("float32", "CDAB", 1.0, None, [0x0000, 0x3F80]),
    ("float32", "BADC", 1.0, None, [0x803F, 0x0000]),
    ("float32", "DCBA", 1.0, None, [0x0000, 0x803F]),
    ("int8", "ABCD", -1, None, [0x00FF]),
    ("int8", "BADC", -1, None, [0xFF00]),
    ("uint8", "CDAB", 200, None, [0x00C8]),
    ("uint8", "DCBA", 200, None, [0xC800]),
    ("int16", "ABCD", -2, None, [0xFFFE]),
    ("uint16", "BA", 0x1234, None, [0x3412]),
    ("uint16", "CDAB", 0x1234, None, [0x1234]),
    ("float16", "AB", 1.0, None, [0x3C00]),
    ("int32", "CDAB", -2, None, [0xFFFE, 0xFFFF]),
    ("uint32", "DCBA", 0x11223344, None, [0x4433, 0x2211]),
    ("uint64", "ABCDEFGH", U64, None, [0x0102, 0x0304, 0x0506, 0x0708]),
    ("uint64", "GHEFCDAB", U64, None, [0x0708, 0x0506, 0x0304, 0x0102]),
    ("uint64", "BADCFEHG", U64, None, [0x0201, 0x0403, 0x0605, 0x0807]),
    ("uint64", "HGFEDCBA", U64, None, [0x0807, 0x0605, 0x0403, 0x0201]),
    ("float64", "ABCD", 1.0, None, [0x3FF0, 0, 0, 0]),
    ("float64", "CDAB", 1.0, None, [0, 0, 0, 0x3FF0]),
    ("string", "ABCD", "abc", 4, [0x6162, 0x6300]),
    ("string", "BADC", "abc", 4, [0x6261, 0x0063]),
    ("string", "CDAB", "abc", 4, [0x6162, 0x6300]),
    ("string", "ABCD", "abcdef", 3, [0x6162, 0x6300]),
    ("string", "ABCD", "ab", 6, [0x6162, 0x0000, 0x0000]),
    ("bool", "ABCD", True, None, [0x0001]),
    ("bool", "ABCD", False, None, [0x0000]),
]


@pytest.mark.parametrize(("type_", "order", "value", "length", "expected"), ENCODE_CASES)
def test_encode_worked_examples(type_: str, order: str, value: Any, length: int | None,
                                expected: list[int]) -> None:
    assert encode(type_, order, value, length) == expected


def test_encode_bool_sets_only_its_bit() -> None:
    assert encode("bool", "ABCD", True, bit=3) == [0x0008]
    assert encode("bool", "ABCD", True, bit=15) == [0x8000]


@given(st.integers(-(2**31), 2**31 - 1))
def test_orders_are_word_and_byte_permutations(value: int) -> None:
    abcd = encode("int32", "ABCD", value)
    assert struct.unpack(">i", struct.pack(">2H", *abcd))[0] == value
    swap = [((w & 0xFF) << 8) | (w >> 8) for w in abcd]
    assert encode("int32", "CDAB", value) == abcd[::-1]
    assert encode("int32", "BADC", value) == swap
    assert encode("int32", "DCBA", value) == swap[::-1]


@pytest.mark.parametrize(("type_", "sample", "expected"), [
    ("int8", 200, -56), ("uint8", -1, 255), ("uint16", 65536.4, 0), ("int16", 40000, -25536),
    ("int32", 2.6, 3), ("float16", 1e6, 65504.0), ("float32", -1e40, -3.4028234663852886e38),
    ("bool", 0.0, False),
])
def test_wave_samples_fit_their_type(type_: str, sample: float, expected: Any) -> None:
    assert coerce(type_, sample) == expected


def test_wire_time_of_a_ten_register_read() -> None:
    # 8E1 at 9600: (8 + 25) bytes * 11 bits / 9600 + t3.5 (3.5 * 11 / 9600) = 41.82 ms
    assert Line(9600).exchange(3, 10, False) == pytest.approx(0.0418229, abs=1e-6)
    # exception reply is 5 bytes; t3.5 is fixed at 1.75 ms above 19200 baud
    assert Line(115200, parity="N").exchange(3, 10, True) == pytest.approx(13 * 10 / 115200 + 0.00175)


def test_bad_map_names_unit_and_point(tmp_path: Path) -> None:
    bad = {"table": "holding", "address": 0, "type": "nope"}
    write_map(tmp_path / "map.toml", [{"id": 4, "points": [bad]}])
    with pytest.raises(ValueError, match="unit 4 point 0"):
        load_map(tmp_path / "map.toml")
    with pytest.raises(RuntimeError, match="unit 4 point 0"), start_sim(tmp_path / "map.toml"):
        pass


# --------------------------------------------------------------------------------------------------- tcp

STATIC_POINTS: list[dict[str, Any]] = [
    {"table": "holding", "address": 0, "type": "float32", "order": "CDAB", "value": 12.5},
    {"table": "holding", "address": 2, "type": "int8", "order": "BADC", "value": -1},
    {"table": "holding", "address": 3, "type": "uint64", "order": "DCBA", "value": U64},
    {"table": "holding", "address": 7, "type": "string", "length": 5, "value": "PUMP7"},
    {"table": "holding", "address": 10, "type": "bool", "bit": 3, "value": True},
    {"table": "holding", "address": 10, "type": "bool", "bit": 15, "value": True},
    {"table": "holding", "address": 11, "type": "float64", "order": "BADC", "value": -2.25},
    {"table": "input", "address": 0, "type": "int16", "value": -1234},
    {"table": "input", "address": 65534, "type": "uint32", "value": 70000},
    {"table": "coil", "address": 3, "type": "bool", "value": True},
    {"table": "discrete", "address": 17, "type": "bool", "value": True},
]
WAVE_POINTS: list[dict[str, Any]] = [
    {"table": "holding", "address": 200, "type": "float32", "wave": "counter", "step": 10000},
    {"table": "coil", "address": 40, "type": "bool", "wave": "square", "period": 0.02},
]
MANY = 10_000  # unit 2: one sine point per holding register 0..9999


@dataclass
class TcpSim:
    handle: SimHandle
    control: Path
    points: tuple[Point, ...]


@pytest.fixture(scope="module")
def tcp_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcpSim]:
    tmp = tmp_path_factory.mktemp("tcp")
    many = [{"table": "holding", "address": a, "type": "uint16", "wave": "sine", "period": 1.0,
             "amplitude": 1000, "offset": 30000} for a in range(MANY)]
    write_map(tmp / "map.toml", [{"id": 1, "invalid": [[100, 109]], "points": STATIC_POINTS + WAVE_POINTS},
                                 {"id": 2, "points": many}])
    control = tmp / "faults.json"
    with start_sim(tmp / "map.toml", control=control) as handle:
        yield TcpSim(handle, control, load_map(tmp / "map.toml")[0].points)


@pytest.fixture
def tcp(tcp_sim: TcpSim) -> Iterator[TcpSim]:
    yield tcp_sim
    set_faults(tcp_sim.control, {})


@contextlib.asynccontextmanager
async def tcp_client(sim: TcpSim, timeout: float = 2.0) -> AsyncIterator[AsyncModbusTcpClient]:
    host, port = sim.handle.host or "", sim.handle.port or 0
    client = AsyncModbusTcpClient(host, port=port, timeout=timeout, retries=0)
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


async def read(client: Any, table: str, address: int, count: int, unit: int) -> Any:
    method = {"holding": client.read_holding_registers, "input": client.read_input_registers,
              "coil": client.read_coils, "discrete": client.read_discrete_inputs}[table]
    return await method(address, count=count, device_id=unit)


def test_static_points_read_back(tcp: TcpSim) -> None:
    async def body() -> None:
        async with tcp_client(tcp) as client:
            for p in tcp.points:
                if p.wave is not None:
                    continue
                rr = await read(client, p.table, p.address, p.size, 1)
                assert not rr.isError(), p
                if p.table in ("coil", "discrete"):
                    assert rr.bits[0] is True, p
                elif p.type == "bool":
                    assert rr.registers[0] == 0x8008, p
                else:
                    assert rr.registers == p.registers(p.value), p
            rr = await client.read_holding_registers(0, count=2, device_id=1)
            assert rr.registers == [0x0000, 0x4148]  # 12.5 = 0x41480000, words swapped
            rr = await client.read_coils(0, count=8, device_id=1)
            assert rr.bits == [False, False, False, True, False, False, False, False]
            rr = await client.read_holding_registers(60000, count=3, device_id=1)
            assert rr.registers == [0, 0, 0]
    asyncio.run(body())


def test_writes_land_and_read_back(tcp: TcpSim) -> None:
    async def body() -> None:
        async with tcp_client(tcp) as client:
            assert not (await client.write_registers(500, [7, 8, 9], device_id=1)).isError()
            assert (await client.read_holding_registers(500, count=3, device_id=1)).registers == [7, 8, 9]
            assert not (await client.write_coil(600, True, device_id=1)).isError()
            assert (await client.read_coils(600, count=1, device_id=1)).bits[0] is True
    asyncio.run(body())


def test_waves_change_between_reads(tcp: TcpSim) -> None:
    async def body() -> None:
        async with tcp_client(tcp) as client:
            seen: list[float] = []
            for _ in range(500):
                rr = await client.read_holding_registers(200, count=2, device_id=1)
                seen.append(struct.unpack(">f", struct.pack(">2H", *rr.registers))[0])
                if len(set(seen)) >= 3:
                    break
            assert len(set(seen)) >= 3 and seen == sorted(seen)  # a counter only climbs
            bits: set[bool] = set()
            deadline = time.monotonic() + 5
            while len(bits) < 2 and time.monotonic() < deadline:
                bits.add((await client.read_coils(40, count=1, device_id=1)).bits[0])
            assert bits == {True, False}
    asyncio.run(body())


def test_many_wave_points_stay_fast(tcp: TcpSim) -> None:
    async def body() -> float:
        async with tcp_client(tcp) as client:
            t0 = time.perf_counter()
            for i in range(20):
                rr = await client.read_holding_registers(i * 125, count=125, device_id=2)
                assert all(29000 <= r <= 31000 for r in rr.registers)
            return (time.perf_counter() - t0) / 20
    # only the 125 overlapping points are sampled; sampling all 10,000 costs tens of ms per request
    assert asyncio.run(body()) < 0.010


@pytest.mark.parametrize(("table", "address", "count", "code"), [
    ("holding", 100, 1, 2), ("holding", 95, 5, 0), ("holding", 95, 6, 2), ("holding", 109, 1, 2),
    ("holding", 110, 1, 0), ("input", 105, 1, 2), ("coil", 90, 10, 0), ("coil", 90, 11, 2),
    ("discrete", 109, 2, 2), ("discrete", 110, 16, 0),
])
def test_invalid_ranges_answer_illegal_address(tcp: TcpSim, table: str, address: int, count: int,
                                               code: int) -> None:
    async def body() -> Any:
        async with tcp_client(tcp) as client:
            return await read(client, table, address, count, 1)
    rr = asyncio.run(body())
    assert (rr.exception_code if rr.isError() else 0) == code


def test_unknown_unit_on_tcp_is_gateway_exception(tcp: TcpSim) -> None:
    async def body() -> Any:
        async with tcp_client(tcp) as client:
            return await client.read_holding_registers(0, count=1, device_id=9)
    rr = asyncio.run(body())
    assert rr.isError() and rr.exception_code == 11


def test_silent_unit_times_out_without_blocking_others(tcp: TcpSim) -> None:
    set_faults(tcp.control, {"1": {"mode": "silent"}})

    async def timed(client: AsyncModbusTcpClient, unit: int) -> tuple[float, Any]:
        t0 = time.perf_counter()
        try:
            rr: Any = await client.read_holding_registers(0, count=1, device_id=unit)
        except ModbusException as exc:
            rr = exc
        return time.perf_counter() - t0, rr

    async def body() -> tuple[tuple[float, Any], tuple[float, Any]]:
        async with tcp_client(tcp, timeout=0.5) as dead, tcp_client(tcp) as live:
            return await asyncio.gather(timed(dead, 1), timed(live, 2))
    (dead_s, dead_rr), (live_s, live_rr) = asyncio.run(body())
    assert isinstance(dead_rr, ModbusException) and dead_s >= 0.5
    assert not live_rr.isError() and live_s < 0.25


def test_slow_unit_answers_late(tcp: TcpSim) -> None:
    set_faults(tcp.control, {"1": {"mode": "slow", "delay": 0.3}})

    async def body() -> tuple[float, Any]:
        async with tcp_client(tcp) as client:
            t0 = time.perf_counter()
            rr = await client.read_holding_registers(2, count=1, device_id=1)
            return time.perf_counter() - t0, rr
    elapsed, rr = asyncio.run(body())
    assert rr.registers == [0xFF00] and 0.3 <= elapsed < 1.0


def test_exception_count_then_normal_replies(tcp: TcpSim) -> None:
    set_faults(tcp.control, {"1": {"mode": "exception", "code": 6, "count": 2}})

    async def body() -> list[Any]:
        async with tcp_client(tcp) as client:
            return [await client.read_holding_registers(2, count=1, device_id=1) for _ in range(3)]
    first, second, third = asyncio.run(body())
    assert first.isError() and first.exception_code == 6
    assert second.isError() and second.exception_code == 6
    assert not third.isError() and third.registers == [0xFF00]


def test_star_applies_to_units_without_their_own_entry(tcp: TcpSim) -> None:
    set_faults(tcp.control, {"*": {"mode": "exception", "code": 4}, "2": {"mode": "ok"}})

    async def body() -> tuple[Any, Any]:
        async with tcp_client(tcp) as client:
            return (await client.read_holding_registers(2, count=1, device_id=1),
                    await client.read_holding_registers(0, count=1, device_id=2))
    one, two = asyncio.run(body())
    assert one.isError() and one.exception_code == 4
    assert not two.isError()


def test_drop_closes_the_connection(tcp: TcpSim) -> None:
    set_faults(tcp.control, {"1": {"mode": "drop"}})

    async def raw_request() -> bytes:
        reader, writer = await asyncio.open_connection(tcp.handle.host, tcp.handle.port)
        try:
            # MBAP: transaction 1, protocol 0, length 6, unit 1; PDU: read holding 0, count 1
            writer.write(struct.pack(">HHHBBHH", 1, 0, 6, 1, 3, 0, 1))
            return await asyncio.wait_for(reader.read(100), 5)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert asyncio.run(raw_request()) == b""  # EOF, no reply

    set_faults(tcp.control, {})

    async def body() -> Any:
        async with tcp_client(tcp) as client:
            return await client.read_holding_registers(2, count=1, device_id=1)
    assert asyncio.run(body()).registers == [0xFF00]


def test_sigterm_exits_cleanly(tmp_path: Path) -> None:
    write_map(tmp_path / "map.toml", [{"id": 1, "points": []}])
    with start_sim(tmp_path / "map.toml") as sim:
        assert sim.proc.poll() is None
    assert sim.proc.returncode == 0


# --------------------------------------------------------------------------------------------------- rtu

RTU_UNITS = (1, 2, 3)
BAUD = 9600


@dataclass
class RtuBus:
    client_path: str
    control: Path


@pytest.fixture(scope="module")
def rtu_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RtuBus]:
    tmp = tmp_path_factory.mktemp("rtu")
    write_map(tmp / "map.toml", [{"id": u, "points": [
        {"table": "holding", "address": a, "type": "uint16", "value": 100 * u + a} for a in range(10)]}
        for u in RTU_UNITS])
    control = tmp / "faults.json"
    with pty_pair(tmp) as (client_path, server_path), \
            start_sim(tmp / "map.toml", tcp=False, rtu_path=server_path, baud=BAUD, control=control):
        yield RtuBus(client_path, control)


@pytest.fixture
def rtu(rtu_bus: RtuBus) -> Iterator[RtuBus]:
    yield rtu_bus
    set_faults(rtu_bus.control, {})


@contextlib.asynccontextmanager
async def rtu_client(bus: RtuBus, timeout: float = 0.5) -> AsyncIterator[AsyncModbusSerialClient]:
    # parity N on the client side: Linux ptys refuse PARENB; the simulator still times the line as 8E1
    client = AsyncModbusSerialClient(bus.client_path, framer=FramerType.RTU, baudrate=BAUD, parity="N",
                                     timeout=timeout, retries=0)
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


async def try_read(client: Any, unit: int, count: int = 1) -> Any:
    try:
        return await client.read_holding_registers(0, count=count, device_id=unit)
    except ModbusException as exc:
        return exc


def test_rtu_units_share_the_bus(rtu: RtuBus) -> None:
    async def body() -> list[Any]:
        async with rtu_client(rtu) as client:
            return [await try_read(client, u, 10) for u in RTU_UNITS]
    for unit, rr in zip(RTU_UNITS, asyncio.run(body()), strict=True):
        assert rr.registers == [100 * unit + a for a in range(10)]


def test_rtu_round_trip_is_the_wire_time(rtu: RtuBus) -> None:
    # 8E1 at 9600: (8 + 25) bytes * 11 bits / 9600 + t3.5 (3.5 * 11 / 9600) = 41.8 ms
    wire = (8 + 5 + 2 * 10) * 11 / BAUD + 3.5 * 11 / BAUD

    async def body() -> list[float]:
        async with rtu_client(rtu) as client:
            times = []
            for i in range(5):
                t0 = time.perf_counter()
                rr = await client.read_holding_registers(0, count=10, device_id=RTU_UNITS[i % 3])
                times.append(time.perf_counter() - t0)
                assert not rr.isError()
            return times
    times = sorted(asyncio.run(body()))
    assert times[0] >= wire, times
    assert times[len(times) // 2] < 2 * wire, times


def test_rtu_crc_corruption_fails_one_unit_only(rtu: RtuBus) -> None:
    set_faults(rtu.control, {"2": {"mode": "crc"}})

    async def body() -> list[Any]:
        async with rtu_client(rtu, timeout=0.3) as client:
            out = [await try_read(client, u) for u in RTU_UNITS]
            set_faults(rtu.control, {})
            return [*out, await try_read(client, 2)]
    one, two, three, two_again = asyncio.run(body())
    assert isinstance(two, ModbusException) or two.isError()
    assert one.registers == [100] and three.registers == [300]
    assert two_again.registers == [200]


def test_rtu_silent_and_unknown_units_never_answer(rtu: RtuBus) -> None:
    set_faults(rtu.control, {"3": {"mode": "silent"}})

    async def body() -> list[Any]:
        async with rtu_client(rtu, timeout=0.3) as client:
            return [await try_read(client, u) for u in (3, 7, 1)]
    silent, unknown, live = asyncio.run(body())
    assert isinstance(silent, ModbusException) and isinstance(unknown, ModbusException)
    assert live.registers == [100]


def test_fault_rate_and_count_apply_to_any_mode(tmp_path: Path) -> None:
    control = tmp_path / "faults.json"
    set_faults(control, {"1": {"mode": "silent", "rate": 0.3}, "2": {"mode": "slow", "count": 3}})
    faults = FaultControl(control)
    hits = sum(faults.take(1).mode == "silent" for _ in range(2000))
    assert 480 <= hits <= 720  # 600 expected, sd 20.5: outside is a < 1e-8 chance
    assert [faults.take(2).mode for _ in range(5)] == ["slow"] * 3 + ["ok"] * 2
    assert faults.take(3).mode == "ok"
