"""Read config.toml, validate it into frozen dataclasses, report every error by key path.

Every problem is collected (not just the first) and reported as one line each, e.g.::

    device[1].tag[4].type: unknown type "flaot32" (one of: bool, bit, int8, ...)

Indices are 0-based, in file order. Nothing is silently dropped: unknown keys, overlapping tags,
duplicate names and addresses beyond 65535 are all errors. Durations are seconds (number) or strings
such as "250ms", "1.5s", "5m", "2h"; sizes are bytes (integer) or strings such as "64MiB", "1GB".

The schema covers every stage; see docs/config.md for the reference with defaults.
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import pickle
import re
import signal
import socket
import stat
import struct
import sys
import tomllib
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")

# table name -> (modbus function code, is_bit_table)
TABLES: dict[str, tuple[int, bool]] = {
    "coil": (1, True),
    "discrete": (2, True),
    "holding": (3, False),
    "input": (4, False),
}

# type -> registers occupied (None: strings, from length; 0: a single bit of a bit table)
TYPE_REGISTERS: dict[str, int | None] = {
    "bool": 1, "bit": 1,
    "int8": 1, "uint8": 1, "int16": 1, "uint16": 1,
    "int32": 2, "uint32": 2, "float32": 2,
    "int64": 4, "uint64": 4, "float64": 4,
    "float16": 1,
    "string": None,
}

# Byte orders: canonical name -> (byte swap inside each word, reverse word order). The 64-bit spellings
# and the 16-bit spellings are aliases of the same two switches.
ORDERS: dict[str, tuple[bool, bool]] = {
    "ABCD": (False, False), "BADC": (True, False), "CDAB": (False, True), "DCBA": (True, True),
}
ORDER_ALIASES: dict[str, str] = {
    "AB": "ABCD", "BA": "BADC",
    "ABCDEFGH": "ABCD", "BADCFEHG": "BADC", "GHEFCDAB": "CDAB", "HGFEDCBA": "DCBA",
}

MAX_ADDRESS = 65535
MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000
DEFAULT_GROUP = "default"


class ConfigError(Exception):
    """One or more configuration problems, each a line naming its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Appliance:
    id: str
    state_dir: Path


@dataclass(frozen=True, slots=True)
class Bus:
    name: str
    port: str
    baud: int = 19200
    parity: str = "E"
    stop_bits: int = 1
    byte_size: int = 8
    timeout: float = 0.5
    frame_gap: float = 0.0  # seconds of silence between frames; derived from 3.5 characters when not set

    @property
    def bits_per_char(self) -> int:
        return 1 + self.byte_size + (self.parity != "N") + self.stop_bits

    def wire_time(self, nbytes: int) -> float:
        """Seconds on the line for nbytes; 8E1 at 9600 baud: 8 bytes -> 8 * 11 / 9600 = 9.17 ms."""
        return nbytes * self.bits_per_char / self.baud


def default_frame_gap(baud: int, bits_per_char: int) -> float:
    """Modbus RTU t3.5: 3.5 character times, fixed at 1.75 ms above 19200 baud (spec 2.5.1.1)."""
    return 0.00175 if baud > 19200 else 3.5 * bits_per_char / baud


@dataclass(frozen=True, slots=True)
class PollGroup:
    name: str
    interval: float
    priority: int = 0  # 0 is most important; the governor stretches/sheds higher numbers first


class Kind(NamedTuple):
    """What a tag has that most tags share: one interned object for all the tags alike."""

    table: str
    type: str
    order: str = "ABCD"
    length: int | None = None
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    deadband: float = 0.0
    deadband_percent: float = 0.0
    heartbeat: float = 600.0  # s; with a deadband, a reading is stored at least this often (0: never)
    group: str = DEFAULT_GROUP
    barrier: bool = False
    device: str = ""  # the device's name


# Every kind this process has made, each once, by index: a tag holds its kind's index. Reloads add only
# the kinds not seen before, so the list grows with the distinct kinds ever configured, not with reloads.
_KIND_LIST: list[Kind] = []
_KIND_INDEX: dict[Kind, int] = {}
_PACKED = struct.Struct("<IHbI")  # id, address, bit (-1: none), kind index; then the name in UTF-8
_U32 = struct.Struct("<I")
_KIND_AT = _PACKED.size - _U32.size  # offset of the kind index
_ID, _ADDRESS, _BIT, _KIND = (struct.Struct(f"<{at}x{code}") for at, code in
                              ((0, "I"), (4, "H"), (6, "b"), (_KIND_AT, "I")))


class Tag(bytes):
    """A configured tag, immutable: one bytes object of its id, address, bit, the index of its kind (what
    it shares with the tags alike: one Kind object for all of them) and its name. 80 B for a tag named
    "t9999", against 192 B as an object with an id, an address and a name object of its own (10,000
    tags: -1.1 MiB). Every field is a property (130-190 ns): hot paths read what they need once."""

    __slots__ = ()
    FIELDS = ("id", "name", "table", "address", "type", "order", "bit", "length", "scale", "offset", "unit",
              "deadband", "deadband_percent", "heartbeat", "group", "barrier", "device")
    # read from kind (properties set below the class)
    table: str
    type: str
    order: str
    length: int | None
    scale: float
    offset: float
    unit: str
    deadband: float
    deadband_percent: float
    heartbeat: float
    group: str
    barrier: bool
    device: str

    def __new__(cls, id: int, name: str, table: str, address: int, type: str,  # noqa: PLR0917
                order: str = "ABCD", bit: int | None = None, length: int | None = None, scale: float = 1.0,
                offset: float = 0.0, unit: str = "", deadband: float = 0.0, deadband_percent: float = 0.0,
                heartbeat: float = 600.0, group: str = DEFAULT_GROUP, barrier: bool = False,
                device: str = "") -> Tag:
        index = cls.register(Kind(table, type, order, length, scale, offset, unit, deadband, deadband_percent,
                                  heartbeat, group, barrier, device))
        packed = _PACKED.pack(id, address, -1 if bit is None else bit, index)
        return super().__new__(cls, packed + name.encode())

    @staticmethod
    def register(kind: Kind) -> int:
        """The index of `kind` in this process's list of kinds, added if new."""
        index = _KIND_INDEX.get(kind)
        if index is None:
            index = _KIND_INDEX[kind] = len(_KIND_LIST)
            _KIND_LIST.append(kind)
        return index

    @property
    def id(self) -> int:
        """u32, crc32 of "device/tag": stable across reordering of the config."""
        return _ID.unpack_from(self)[0]  # type: ignore[no-any-return]

    @property
    def address(self) -> int:
        return _ADDRESS.unpack_from(self)[0]  # type: ignore[no-any-return]

    @property
    def bit(self) -> int | None:
        bit: int = _BIT.unpack_from(self)[0]
        return None if bit < 0 else bit

    @property
    def kind(self) -> Kind:
        return _KIND_LIST[_KIND.unpack_from(self)[0]]  # type: ignore[no-any-return]

    @property
    def name(self) -> str:
        return self[_PACKED.size:].decode()

    def kind_and_name(self) -> tuple[Kind, str]:
        """Both at once, for hot paths (the uplink's encoder): one call instead of two properties."""
        return _KIND_LIST[_KIND.unpack_from(self)[0]], self[_PACKED.size:].decode()

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tag) and bytes.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return bytes.__hash__(self)

    def __repr__(self) -> str:
        return f"Tag({', '.join(f'{f}={getattr(self, f)!r}' for f in self.FIELDS)})"

    __str__ = __repr__  # not the bytes

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return Tag, tuple(getattr(self, f) for f in self.FIELDS)

    @property
    def registers(self) -> int:
        """Addresses this tag occupies in its table (bits for coil/discrete)."""
        n = TYPE_REGISTERS[self.type]
        return n if n is not None else -(-(self.length or 0) // 2)

    @property
    def end(self) -> int:
        return self.address + self.registers


for _field in Kind._fields:
    setattr(Tag, _field, property(operator.attrgetter(f"kind.{_field}")))


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    unit: int
    tags: tuple[Tag, ...]
    groups: tuple[PollGroup, ...]
    host: str | None = None
    port: int = 502
    bus: str | None = None
    timeout: float = 1.0
    retries: int = 1
    max_registers: int = MAX_REGISTERS_PER_READ
    max_bits: int = MAX_BITS_PER_READ
    single_register_reads: bool = False
    pause: float = 0.0
    max_gap: int | None = None  # registers read across to join two tags; None: derived from request overhead
    writable: tuple[tuple[str, float | None, float | None], ...] = ()  # (tag name, min, max) of writable tags

    @property
    def transport(self) -> str:
        return "tcp" if self.host is not None else "rtu"

    # Pickled (the forked load) with its tags as one bytes of all their packed forms, their ends, and the
    # kinds they use by this process's index; the receiving process registers the kinds and rewrites an
    # index where its own differs. Unpickling then makes no per-tag objects besides the tags (an
    # unpickler's memo keeps what it made alive to the end of the load, and freed then, that leaves holes
    # among the tags: 10,000 tags as per-field state once left 2.2 MB of free blocks never reused).
    def __getstate__(self) -> list[Any]:
        state = [getattr(self, name) for name in self.__slots__]
        used = sorted({int(_KIND.unpack_from(t)[0]) for t in self.tags})
        state[2] = ({i: _KIND_LIST[i] for i in used}, b"".join(self.tags),
                    array("I", itertools.accumulate(map(len, self.tags))))
        return state

    def __setstate__(self, state: list[Any]) -> None:
        kinds, blob, ends = state[2]
        remap = {old: Tag.register(kind) for old, kind in kinds.items()}
        moved = {old: _U32.pack(new) for old, new in remap.items() if old != new}
        tags, start = [], 0
        for end in ends:
            raw = blob[start:end]
            if moved:
                old = int(_KIND.unpack_from(raw)[0])
                if old in moved:
                    raw = raw[:_KIND_AT] + moved[old] + raw[_KIND_AT + _U32.size:]
            tags.append(bytes.__new__(Tag, raw))
            start = end
        state[2] = tuple(tags)
        for name, value in zip(self.__slots__, state, strict=True):
            object.__setattr__(self, name, value)


@dataclass(frozen=True, slots=True)
class Store:
    path: Path
    map_size: int = 1 << 30
    reserve: bool = True  # allocate the data file up to map_size (fallocate, nothing written)
    commit_interval: float = 1.0
    commit_bytes: int = 256 * 1024
    low_power_commit_interval: float = 30.0
    high_watermark: float = 0.8
    low_watermark: float = 0.7


@dataclass(frozen=True, slots=True)
class Tls:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class Uplink:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "edge"
    username: str | None = None
    password_file: Path | None = None
    tls: Tls | None = None
    keepalive: float = 30.0
    max_inflight: int = 16
    batch_blocks: int = 64
    backoff_min: float = 1.0
    backoff_max: float = 300.0
    publish_timeout: float = 10.0
    payload: str = "json"


@dataclass(frozen=True, slots=True)
class LowPower:
    on_battery: bool = True
    control_file: Path | None = None
    schedule: tuple[tuple[str, str], ...] = ()  # ("22:00", "06:00") local-time windows
    interval_factor: float = 10.0
    uplink_session_interval: float = 900.0


@dataclass(frozen=True, slots=True)
class Governor:
    enabled: bool = True
    memory_soft: int | None = None  # bytes; None: from cgroup memory.high, else 60% of memory.max
    memory_hard: int | None = None  # bytes; None: 85% of cgroup memory.max
    cpu_budget: float = 0.5  # fraction of one core
    window: float = 30.0  # seconds of the sliding window; no decision on a single sample
    max_stretch: float = 8.0
    low_power: LowPower = field(default_factory=LowPower)


@dataclass(frozen=True, slots=True)
class Commands:
    """Remote writes over MQTT (cmd/write): off unless keys are configured; each command signed."""

    remote: bool = False
    keys: tuple[tuple[str, bytes], ...] = ()  # (name, HMAC-SHA256 key) pairs, read from their files
    max_age: float = 600.0  # a command's `expires` may be at most this far in the future

    def __repr__(self) -> str:  # keys are secrets: never in a log line or a traceback
        return f"Commands(remote={self.remote}, keys={[n for n, _ in self.keys]}, max_age={self.max_age})"


@dataclass(frozen=True, slots=True)
class Metrics:
    enabled: bool = True
    listen: str = "127.0.0.1"
    port: int = 9108


@dataclass(frozen=True, slots=True)
class Config:
    appliance: Appliance
    buses: tuple[Bus, ...]
    devices: tuple[Device, ...]
    store: Store
    uplink: Uplink
    governor: Governor
    metrics: Metrics
    commands: Commands = field(default_factory=Commands)

    def bus(self, name: str) -> Bus:
        return next(b for b in self.buses if b.name == name)

    def tags_by_id(self) -> dict[int, tuple[Device, Tag]]:
        return {t.id: (d, t) for d in self.devices for t in d.tags}


# --------------------------------------------------------------------------------------------------
# Field readers. Each takes the table, key, key path prefix and the problem list; returns a value or
# the default, recording a problem (never raising) so that one pass reports everything.

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*([0-9]+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 1 << 10, "MiB": 1 << 20,
               "GiB": 1 << 30}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_MISSING: Any = object()


class _Reader:
    """Typed access to one TOML table with key-path error reporting and unknown-key detection."""

    def __init__(self, table: Any, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        if not isinstance(table, dict):
            self.fail("", f"expected a table, got {_kind(table)}")
            table = {}
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path and key else self.path or key

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{self.key_path(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.table

    def _get(self, key: str, kinds: tuple[type, ...], what: str, required: bool = False) -> Any:
        """The value if present and of the right kind, else _MISSING (a problem recorded if wrong)."""
        self.used.add(key)
        if key not in self.table:
            if required:
                self.fail(key, "required")
            return _MISSING
        value = self.table[key]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            self.fail(key, f"expected {what}, got {_kind(value)} {value!r}")
            return _MISSING
        if isinstance(value, str) and not value.strip() and str in kinds and kinds != (str,):
            self.fail(key, "must not be empty")
            return _MISSING
        return value

    def _range(self, key: str, value: Any, lo: float | None, hi: float | None, unit: str = "") -> bool:
        if lo is not None and hi is not None and not lo <= value <= hi:
            self.fail(key, f"{value}{unit} out of range {lo}..{hi}{unit}")
            return False
        if lo is not None and value < lo:
            self.fail(key, f"{value}{unit} is below the minimum {lo}{unit}")
            return False
        if hi is not None and value > hi:
            self.fail(key, f"{value}{unit} is above the maximum {hi}{unit}")
            return False
        return True

    def text(self, key: str, default: Any = None, *, required: bool = False, allow_empty: bool = False,
             choices: tuple[str, ...] | None = None) -> Any:
        value = self._get(key, (str,), "a string", required)
        if value is _MISSING:
            return default
        if not value.strip() and not allow_empty:
            self.fail(key, "must not be empty")
            return default
        if choices is not None and value not in choices:
            self.fail(key, f"unknown value {value!r} (one of: {', '.join(choices)})")
            return default
        return value

    def name(self, key: str, *, required: bool = True) -> str:
        value: str = self.text(key, "", required=required)
        if value and not _NAME.match(value):
            self.fail(key, f"invalid name {value!r} (letters, digits, _ . -; not starting with . or -)")
            return ""
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, (bool,), "true or false")
        return default if value is _MISSING else bool(value)

    def integer(self, key: str, default: Any = None, *, lo: int | None = None, hi: int | None = None,
                required: bool = False) -> Any:
        value = self._get(key, (int,), "an integer", required)
        if value is _MISSING or not self._range(key, value, lo, hi):
            return default
        return value

    def number(self, key: str, default: Any = None, *, lo: float | None = None,
               hi: float | None = None) -> Any:
        value = self._get(key, (int, float), "a number")
        if value is _MISSING:
            return default
        if not math.isfinite(value):
            self.fail(key, f"{value} is not finite")
            return default
        return float(value) if self._range(key, value, lo, hi) else default

    def duration(self, key: str, default: Any, *, lo: float = 0.0, hi: float = 7 * 86400.0) -> Any:
        value = self._get(key, (int, float, str), 'a duration (seconds, or "250ms", "5s", "2m", "1h")')
        if value is _MISSING:
            return default
        if isinstance(value, str):
            m = _DURATION.match(value)
            if not m:
                self.fail(key, f'invalid duration {value!r} (e.g. 0.5, "250ms", "5s", "2m", "1h")')
                return default
            value = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        if not math.isfinite(value):
            self.fail(key, f"{value} is not finite")
            return default
        return float(value) if self._range(key, value, lo, hi, " s") else default

    def size(self, key: str, default: Any, *, lo: int = 0) -> Any:
        value = self._get(key, (int, str), 'a size (bytes, or "64MiB", "1GB")')
        if value is _MISSING:
            return default
        if isinstance(value, str):
            m = _SIZE.match(value)
            if not m:
                self.fail(key, f'invalid size {value!r} (e.g. 1048576, "64MiB", "1GB")')
                return default
            value = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
        return int(value) if self._range(key, value, lo, None, " bytes") else default

    def file(self, key: str, default: Path | None = None) -> Any:
        value = self.text(key, None)
        return Path(value) if value else default

    def table_list(self, key: str) -> Iterator[_Reader]:
        self.used.add(key)
        items = self.table.get(key, [])
        if not isinstance(items, list):
            self.fail(key, f"expected an array of tables ([[{self.key_path(key)}]]), got {_kind(items)}")
            return
        for i, item in enumerate(items):
            yield _Reader(item, f"{self.key_path(key)}[{i}]", self.problems)

    def sub(self, key: str) -> _Reader:
        self.used.add(key)
        return _Reader(self.table.get(key, {}), self.key_path(key), self.problems)

    def done(self) -> None:
        """Every key not read by the schema is an error: a typo must not silently disable a setting."""
        for key in self.table:
            if key not in self.used:
                self.fail(key, "unknown key")


def _kind(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------------
# Sections

def _appliance(r: _Reader, base: Path) -> Appliance:
    app_id = r.name("id", required=False) or socket.gethostname()
    state_dir = base / r.file("state_dir", Path("/var/lib/edge"))
    r.done()
    return Appliance(id=app_id, state_dir=state_dir)


def _bus(r: _Reader) -> Bus:
    name = r.name("name")
    port = r.text("port", "", required=True)
    baud = r.integer("baud", 19200, lo=300, hi=4_000_000)
    parity = r.text("parity", "E", choices=("N", "E", "O"))
    stop_bits = r.integer("stop_bits", 1, lo=1, hi=2)
    byte_size = r.integer("byte_size", 8, lo=7, hi=8)
    timeout = r.duration("timeout", 0.5, lo=0.01, hi=60.0)
    bits = 1 + byte_size + (parity != "N") + stop_bits
    frame_gap = r.duration("frame_gap", default_frame_gap(baud, bits), hi=1.0)
    r.done()
    return Bus(name, port, baud, parity, stop_bits, byte_size, timeout, frame_gap)


def _groups(r: _Reader, device_interval: float) -> tuple[PollGroup, ...]:
    groups = {DEFAULT_GROUP: PollGroup(DEFAULT_GROUP, device_interval)}
    g = r.sub("group")
    for gname in g.table:
        g.used.add(gname)
        gr = _Reader(g.table[gname], g.key_path(gname), r.problems)
        if not _NAME.match(gname):
            r.problems.append(f"{gr.path}: invalid group name {gname!r}")
        groups[gname] = PollGroup(gname, gr.duration("interval", device_interval, lo=0.001, hi=86400.0),
                                  gr.integer("priority", 0, lo=0, hi=9))
        gr.done()
    return tuple(groups.values())


_NUMERIC_ONLY = ("scale", "offset", "deadband", "deadband_percent", "min", "max")
Writable = tuple[str, float | None, float | None]


def _tag(r: _Reader, device: str, groups: set[str]) -> tuple[Tag, Writable | None] | None:
    """A validated tag and, if it may be written, (name, min, max); None when it has problems (recorded;
    kept out of the overlap checks)."""
    before = len(r.problems)
    name = r.name("name")
    table = r.text("table", "holding", choices=tuple(TABLES))
    address = r.integer("address", 0, lo=0, hi=MAX_ADDRESS, required=True)
    is_bits = TABLES.get(table, (0, False))[1]
    type_ = r.text("type", "bool" if is_bits else "uint16")
    if type_ not in TYPE_REGISTERS:
        r.fail("type", f'unknown type "{type_}" (one of: {", ".join(TYPE_REGISTERS)})')
    elif is_bits and type_ not in ("bool", "bit"):
        r.fail("type", f"{type_} on the {table} table: coils and discrete inputs hold only bool")
    is_bool = type_ in ("bool", "bit")
    order = r.text("order", "ABCD")
    order = ORDER_ALIASES.get(order, order)
    if order not in ORDERS:
        r.fail("order", f"unknown byte order {order!r} (one of: ABCD, BADC, CDAB, DCBA; 64-bit: "
                        "ABCDEFGH, BADCFEHG, GHEFCDAB, HGFEDCBA; 16-bit: AB, BA)")
    bit = r.integer("bit", None, lo=0, hi=15)
    if bit is not None and (is_bits or not is_bool):
        r.fail("bit", "only for bool/bit tags on the input or holding table")
    if not is_bits and is_bool and "bit" not in r.table:
        r.fail("bit", f"required for a {type_} tag on the {table} table (0..15)")
    length = r.integer("length", None, lo=1, hi=2 * MAX_REGISTERS_PER_READ)
    if type_ == "string" and "length" not in r.table:
        r.fail("length", "required for a string tag (bytes)")
    if type_ != "string" and "length" in r.table:
        r.fail("length", "only for string tags")
    for key in (*_NUMERIC_ONLY, "order"):
        if key in r.table and (is_bool or (type_ == "string" and key != "order")):
            r.fail(key, f"not for {type_} tags")
    scale = r.number("scale", 1.0)
    if scale == 0.0:
        r.fail("scale", "must not be 0")
    offset = r.number("offset", 0.0)
    unit = r.text("unit", "", allow_empty=True)
    deadband = r.number("deadband", 0.0, lo=0.0)
    deadband_percent = r.number("deadband_percent", 0.0, lo=0.0, hi=100.0)
    if deadband and deadband_percent:
        r.fail("deadband_percent", "set deadband or deadband_percent, not both")
    heartbeat = r.duration("heartbeat", 600.0, hi=86400.0)
    if "heartbeat" in r.table and not (deadband or deadband_percent):
        r.fail("heartbeat", "only with deadband or deadband_percent (without, every reading is stored)")
    group = r.text("group", DEFAULT_GROUP)
    if group not in groups:
        r.fail("group", f'unknown poll group "{group}" (defined: {", ".join(sorted(groups))})')
    barrier = r.flag("barrier", False)
    writable = r.flag("writable", False)
    low, high = r.number("min", None), r.number("max", None)
    if writable and table not in ("holding", "coil"):
        r.fail("writable", f"the {table} table is read-only (writable tags: holding or coil)")
    elif writable and is_bool and not is_bits:
        r.fail("writable", "a bit inside a register cannot be written alone (it would take a read-modify-"
                           "write racing the device)")
    for key in ("min", "max"):
        if key in r.table and not writable:
            r.fail(key, "only for writable tags")
    if low is not None and high is not None and low > high:
        r.fail("max", f"{high} is below min ({low})")
    r.done()
    if len(r.problems) > before:
        return None
    tag_id = zlib.crc32(f"{device}/{name}".encode())
    intern = sys.intern  # the same few strings in every tag: one object each, not one per tag
    tag = Tag(tag_id, name, intern(table), address, intern(type_), intern(order), bit, length, scale, offset,
              intern(unit), deadband, deadband_percent, heartbeat, intern(group), barrier, intern(device))
    return tag, ((name, low, high) if writable else None)


def _device(r: _Reader, buses: dict[str, Bus]) -> tuple[Device, list[int]]:
    """The device and, for key paths, the file index of each of its (valid) tags."""
    name = r.name("name")
    host = r.text("host", None)
    port = r.integer("port", 502, lo=1, hi=65535)
    bus = r.text("bus", None)
    if "host" not in r.table and "bus" not in r.table:
        r.fail("", 'needs "host" (Modbus TCP) or "bus" (Modbus RTU)')
    if "host" in r.table and "bus" in r.table:
        r.fail("bus", 'set "host" (Modbus TCP) or "bus" (Modbus RTU), not both')
    if bus is not None and bus not in buses:
        r.fail("bus", f'unknown bus "{bus}" (defined: {", ".join(sorted(buses)) or "none"})')
    if "bus" in r.table and "port" in r.table:
        r.fail("port", "only for Modbus TCP devices (the serial port belongs to the [[bus]])")
    rtu = "bus" in r.table
    unit = r.integer("unit", None if rtu else 1, lo=1 if rtu else 0, hi=247 if rtu else 255, required=rtu)
    timeout = r.duration("timeout", buses[bus].timeout if bus in buses else 1.0, lo=0.01, hi=60.0)
    retries = r.integer("retries", 1, lo=0, hi=10)
    max_registers = r.integer("max_registers", MAX_REGISTERS_PER_READ, lo=1, hi=MAX_REGISTERS_PER_READ)
    max_bits = r.integer("max_bits", MAX_BITS_PER_READ, lo=1, hi=MAX_BITS_PER_READ)
    single = r.flag("single_register_reads", False)
    pause = r.duration("pause", 0.0, hi=10.0)
    max_gap = r.integer("max_gap", None, lo=0, hi=MAX_REGISTERS_PER_READ)
    interval = r.duration("interval", 1.0, lo=0.001, hi=86400.0)
    groups = _groups(r, interval)
    names = {g.name for g in groups}
    readers = list(r.table_list("tag"))
    parsed = [(i, _tag(t, name, names)) for i, t in enumerate(readers)]
    r.done()
    _unique(r.problems, [(t.key_path("name"), t.table.get("name")) for t in readers
                         if isinstance(t.table.get("name"), str)], "tag")
    tags = tuple(t[0] for _, t in parsed if t is not None)
    index = [i for i, t in parsed if t is not None]
    writable = tuple(t[1] for _, t in parsed if t is not None and t[1] is not None)
    dev = Device(name, unit if unit is not None else 0, tags, groups, host, port, bus, timeout, retries,
                 max_registers, max_bits, single, pause, max_gap, writable)
    _check_tags(r, dev, index)
    return dev, index


def _check_tags(r: _Reader, dev: Device, index: list[int]) -> None:
    """Tags past 65535 or wider than one read, overlaps within one table.

    Overlaps are found by a sweep over tags sorted by address against the furthest-reaching tag so far,
    so a wide tag is checked against every tag it covers; bool tags may share a register on distinct bits.
    """
    path = [f"{r.path}.tag[{i}]" for i in index]
    for j, t in enumerate(dev.tags):
        if t.end - 1 > MAX_ADDRESS:
            r.problems.append(f"{path[j]}.address: {t.type} at {t.address} ends at {t.end - 1}, beyond "
                              f"{MAX_ADDRESS}")
        limit = dev.max_bits if TABLES[t.table][1] else dev.max_registers
        if t.registers > limit:
            r.problems.append(f"{path[j]}.{'length' if t.type == 'string' else 'type'}: {t.type} of "
                              f"{t.registers} registers is wider than one read of this device "
                              f"(max_registers = {limit})")
    by_table: dict[str, list[int]] = {}
    for j, t in enumerate(dev.tags):
        by_table.setdefault(t.table, []).append(j)
    for members in by_table.values():
        members.sort(key=lambda j: (dev.tags[j].address, j))
        reach: int | None = None  # the tag reaching furthest so far
        bits: dict[tuple[int, int], int] = {}
        for j in members:
            t = dev.tags[j]
            other = reach
            if t.bit is not None:
                other = bits.setdefault((t.address, t.bit), j)
                other = other if other != j else reach
            if other is not None and t.address < dev.tags[other].end and not _bits_share(dev.tags[other], t):
                o = dev.tags[other]
                r.problems.append(f'{path[j]}.address: "{t.name}" at {t.address} overlaps "{o.name}" '
                                  f"({path[other]}, {o.address}..{o.end - 1})")
            if reach is None or t.end > dev.tags[reach].end:
                reach = j


def _bits_share(a: Tag, b: Tag) -> bool:
    """Two bool tags on distinct bits of the same register do not overlap."""
    return a.bit is not None and b.bit is not None and a.address == b.address and a.bit != b.bit


def _store(r: _Reader, state_dir: Path) -> Store:
    """Relative paths are relative to the state directory."""
    before = len(r.problems)
    path = state_dir / r.file("path", Path("store"))
    s = Store(
        path=path,
        map_size=r.size("map_size", 1 << 30, lo=1 << 20),
        reserve=r.flag("reserve", True),
        commit_interval=r.duration("commit_interval", 1.0, lo=0.01, hi=3600.0),
        commit_bytes=r.size("commit_bytes", 256 * 1024, lo=1024),
        low_power_commit_interval=r.duration("low_power_commit_interval", 30.0, lo=0.01, hi=86400.0),
        high_watermark=r.number("high_watermark", 0.8, lo=0.1, hi=0.95),
        low_watermark=r.number("low_watermark", 0.7, lo=0.05, hi=0.9),
    )
    if len(r.problems) == before and s.low_watermark >= s.high_watermark:
        r.fail("low_watermark", f"{s.low_watermark} must be below high_watermark {s.high_watermark}")
    r.done()
    return s


def _tls(r: _Reader) -> Tls:
    """Present (even empty: system CAs, server name from host) means TLS on."""
    t = Tls(r.file("ca"), r.file("cert"), r.file("key"), r.text("server_name", None))
    if (t.cert is None) != (t.key is None):
        r.fail("key" if t.key is None else "cert", "cert and key go together")
    r.done()
    return t


def _uplink(r: _Reader) -> Uplink:
    u = Uplink(
        enabled=r.flag("enabled", True),
        host=r.text("host", "127.0.0.1"),
        port=r.integer("port", 8883 if "tls" in r.table else 1883, lo=1, hi=65535),
        topic_prefix=r.text("topic_prefix", "edge"),
        username=r.text("username", None),
        password_file=r.file("password_file"),
        tls=_tls(r.sub("tls")) if "tls" in r.table else None,
        keepalive=r.duration("keepalive", 30.0, lo=5.0, hi=3600.0),
        max_inflight=r.integer("max_inflight", 16, lo=1, hi=1000),
        batch_blocks=r.integer("batch_blocks", 64, lo=1, hi=10000),
        backoff_min=r.duration("backoff_min", 1.0, lo=0.01, hi=3600.0),
        backoff_max=r.duration("backoff_max", 300.0, lo=0.01, hi=86400.0),
        publish_timeout=r.duration("publish_timeout", 10.0, lo=0.1, hi=120.0),
        payload=r.text("payload", "json", choices=("json",)),
    )
    if any(c in u.topic_prefix for c in "#+") or u.topic_prefix.startswith("/"):
        r.fail("topic_prefix", f"invalid MQTT topic prefix {u.topic_prefix!r} (no #, +, leading /)")
    if u.backoff_min > u.backoff_max:
        r.fail("backoff_min", f"{u.backoff_min} s exceeds backoff_max {u.backoff_max} s")
    r.done()
    return u


_CLOCK = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


def _low_power(r: _Reader) -> LowPower:
    windows = []
    raw = r._get("schedule", (list,), 'an array of ["HH:MM", "HH:MM"] windows')
    raw = [] if raw is _MISSING else raw
    for i, w in enumerate(raw):
        ok = isinstance(w, list) and len(w) == 2 and all(isinstance(x, str) and _CLOCK.match(x) for x in w)
        if not ok:
            r.problems.append(f"{r.key_path('schedule')}[{i}]: expected [\"HH:MM\", \"HH:MM\"], got {w!r}")
            continue
        windows.append((w[0], w[1]))
    lp = LowPower(
        on_battery=r.flag("on_battery", True),
        control_file=r.file("control_file"),
        schedule=tuple(windows),
        interval_factor=r.number("interval_factor", 10.0, lo=1.0, hi=1000.0),
        uplink_session_interval=r.duration("uplink_session_interval", 900.0, lo=1.0, hi=86400.0),
    )
    r.done()
    return lp


def _governor(r: _Reader) -> Governor:
    g = Governor(
        enabled=r.flag("enabled", True),
        memory_soft=r.size("memory_soft", None, lo=1 << 20),
        memory_hard=r.size("memory_hard", None, lo=1 << 20),
        cpu_budget=r.number("cpu_budget", 0.5, lo=0.01, hi=64.0),
        window=r.duration("window", 30.0, lo=1.0, hi=3600.0),
        max_stretch=r.number("max_stretch", 8.0, lo=1.0, hi=1000.0),
        low_power=_low_power(r.sub("low_power")),
    )
    if g.memory_soft and g.memory_hard and g.memory_soft >= g.memory_hard:
        r.fail("memory_soft", f"{g.memory_soft} must be below memory_hard {g.memory_hard}")
    r.done()
    return g


MIN_KEY_BYTES = 32


def _commands(r: _Reader) -> Commands:
    remote = r.flag("remote", False)
    keys: list[tuple[str, bytes]] = []
    k = r.sub("keys")
    for name in k.table:
        path = k.file(name)
        if path is None:
            continue
        if not _NAME.match(name):
            k.fail(name, f"invalid key name {name!r} (letters, digits, _ . -)")
            continue
        try:
            secret = path.read_bytes().strip()
        except OSError as e:
            k.fail(name, f"cannot read {path}: {e.strerror}")
            continue
        if len(secret) < MIN_KEY_BYTES:
            k.fail(name, f"{path} holds {len(secret)} bytes; a key needs at least {MIN_KEY_BYTES} "
                         "(e.g. `openssl rand -hex 32`)")
            continue
        keys.append((name, secret))
    c = Commands(remote, tuple(keys), r.duration("max_age", 600.0, lo=1.0, hi=86400.0))
    if remote and not keys and not k.table:
        r.fail("keys", "remote = true needs at least one key ([commands.keys] name = \"/path/to/key\")")
    r.done()
    return c


def _metrics(r: _Reader) -> Metrics:
    m = Metrics(r.flag("enabled", True), r.text("listen", "127.0.0.1"),
                r.integer("port", 9108, lo=0, hi=65535))
    r.done()
    return m


def _unique(problems: list[str], items: list[tuple[str, Any]], what: str) -> None:
    seen: dict[str, str] = {}
    for path, name in items:
        if name and name in seen:
            problems.append(f"{path}: duplicate {what} name \"{name}\" (also {seen[name]})")
        seen.setdefault(name, path)


def parse(data: dict[str, Any], base: Path | None = None) -> Config:
    """Validate a TOML document (already parsed) into a Config; raise ConfigError listing every problem.
    Relative paths are resolved against `base` (the config file's directory; default: the working one)."""
    problems: list[str] = []
    root = _Reader(data, "", problems)
    appliance = _appliance(root.sub("appliance"), base or Path.cwd())
    bus_readers = list(root.table_list("bus"))
    buses = [_bus(b) for b in bus_readers]
    _unique(problems, [(f"{b.path}.name", x.name) for b, x in zip(bus_readers, buses, strict=True)], "bus")
    ports = [(f"{b.path}.port", x.port) for b, x in zip(bus_readers, buses, strict=True)]
    _unique(problems, ports, "serial port")
    bus_map = {b.name: b for b in buses}
    dev_readers = list(root.table_list("device"))
    parsed = [_device(d, bus_map) for d in dev_readers]
    devices = [d for d, _ in parsed]
    _unique(problems, [(f"{d.path}.name", x.name) for d, x in zip(dev_readers, devices, strict=True)],
            "device")
    _unique(problems, [(f"{d.path}.unit", f"{x.bus}/{x.unit}") for d, x in
                       zip(dev_readers, devices, strict=True) if x.bus and x.unit], "bus/unit")
    _check_ids(problems, [(d.path, x, index) for d, (x, index) in zip(dev_readers, parsed, strict=True)])
    cfg = Config(appliance, tuple(buses), tuple(devices), _store(root.sub("store"), appliance.state_dir),
                 _uplink(root.sub("uplink")), _governor(root.sub("governor")), _metrics(root.sub("metrics")),
                 _commands(root.sub("commands")))
    root.done()
    if problems:
        raise ConfigError(problems)
    return cfg


def _check_ids(problems: list[str], devices: list[tuple[str, Device, list[int]]]) -> None:
    """Tag ids are crc32("device/tag"); two names hashing alike must be renamed, never merged."""
    ids: dict[int, tuple[str, str]] = {}
    for path, d, index in devices:
        for t, i in zip(d.tags, index, strict=True):
            here = (f"{path}.tag[{i}].name", f"{d.name}/{t.name}")
            first = ids.setdefault(t.id, here)
            if first[1] != here[1]:
                problems.append(f'{here[0]}: "{here[1]}" has the same tag id ({t.id}, crc32) as "{first[1]}" '
                                f"({first[0]}); rename one of them")


def load(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError (unreadable file, not a regular file, larger
    than MAX_CONFIG_BYTES, not UTF-8, TOML syntax, schema).

    A large file is parsed in a forked child that sends back the result pickled: the parse's peak (the
    TOML tree, the strings, the validation) never touches this process's heap, which keeps only the
    compact result."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from e
    _check_file(path, st)
    result = _load_forked(path) if st.st_size > FORK_ABOVE else None
    if result is None:
        result = _load(path)
    if isinstance(result, ConfigError):
        raise result
    return result


FORK_ABOVE = 64 * 1024  # bytes of TOML (about 1,000 tags)
MAX_CONFIG_BYTES = 8 << 20  # about 100,000 tags; parsing takes ~25 x the file's size in RAM, briefly


def _check_file(path: str | Path, st: os.stat_result) -> None:
    """A regular file (not a device, FIFO or directory: /dev/zero never ends, a FIFO blocks) of at most
    MAX_CONFIG_BYTES."""
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a file")
        raise ConfigError([f"{path}: not a regular file ({kind})"])
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: {st.st_size:,} bytes, above the {MAX_CONFIG_BYTES:,} a config may have"])


def _read(path: str | Path) -> bytes:
    """The file's bytes, checked again on the open file (it may have been replaced since load() looked)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO does not block
    with open(fd, "rb") as f:
        _check_file(path, os.fstat(fd))
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:  # it grew
        raise ConfigError([f"{path}: above the {MAX_CONFIG_BYTES:,} bytes a config may have"])
    return data


def _load(path: str | Path) -> Config | ConfigError:
    try:
        data = tomllib.loads(_read(path).decode())
        return parse(data, Path(path).resolve().parent)
    except OSError as e:
        return ConfigError([f"{path}: cannot read: {e.strerror}"])
    except tomllib.TOMLDecodeError as e:
        return ConfigError([f"{path}: invalid TOML: {e}"])
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        return ConfigError([f"{path}: not UTF-8 text: byte 0x{e.object[e.start]:02x} on line {line}"])
    except RecursionError:
        return ConfigError([f"{path}: invalid TOML: arrays or tables nested too deeply"])
    except ConfigError as e:
        return e


def load_for_run(path: str | Path) -> Config:
    """load(), and a config that would poll nothing (no [[device]]: an empty or truncated file) refused."""
    config = load(path)
    if not config.devices:
        raise ConfigError([f"{path}: no device configured (a [[device]] table with its tags): nothing to "
                           "poll"])
    return config


def _load_forked(path: str | Path) -> Config | ConfigError | None:
    """_load() in a child process; None when that fails for any reason (the caller parses here)."""
    try:
        r, w = os.pipe()
        pid = os.fork()
    except OSError:
        return None
    if pid == 0:  # the child: no signal handling of the parent's, no cleanup, only the answer
        os.close(r)
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(sig, signal.SIG_DFL)
            result = _load(path)
            with open(w, "wb") as f:
                f.write(pickle.dumps(result.problems if isinstance(result, ConfigError) else result))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with open(r, "rb") as f:
        packed = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not packed:
        return None
    answer = pickle.loads(packed)
    return ConfigError(answer) if isinstance(answer, list) else answer
