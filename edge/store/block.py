"""The block: readings packed in columns, compressed, checksummed. Pure functions and two containers.

Block value, byte by byte (little-endian):

    0   1  format version (1)
    1   1  codec: 0 raw, 1 zstd (level 1), 2 zlib
    2   2  reserved (0)
    4   4  n readings, u32
    8   8  timestamp of the first reading, i64 unix ns
    16  4  CRC-32 of bytes 0..16 and 20.. (the header without this field, and the stored payload)
    20  4  payload size before compression, u32
    24  .. payload, compressed by the codec:
           n x u32  tag ids
           n x i64  timestamp deltas, each from the previous reading (the first from byte 8: 0)
           n x u8   quality
           n x u8   value kind: 0 none, 1 false, 2 true, 3 int64, 4 uint64, 5 float64, 6 string
           n x 8    value: i64 / u64 / f64 for kinds 3-5, 0 otherwise
           strings  for each kind-6 value in order: u16 length | UTF-8 bytes

Columns of like data (ids, small deltas, one quality) are what zstd compresses well.

Worked example: two readings, tag 7 at t=1,000 ns value 1.5 good, tag 8 at 1,250 ns no value (timeout):
payload = 07 00 00 00 08 00 00 00 | 00.. (delta 0) fa 00.. (delta 250) | 00 01 | 05 00 | 1.5 as f64, 8 x 00.

Two containers hold readings before they become a block, both in the block's column encoding (a kind
byte, 8 bytes, and for a string its length-prefixed UTF-8: about 23 B of RAM a reading):

    Window   the open commit window: mutable, appended to by its owner as readings arrive
    Batch    a sealed window: immutable bytes, the only form in which readings cross to the thread that
             writes them (Window.seal() copies the columns once)
"""

from __future__ import annotations

import operator
import struct
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, cast

import zstandard

from edge.reading import Reading, Value

VERSION = 1
RAW, ZSTD, ZLIB = 0, 1, 2
HEADER = struct.Struct("<BBHIqII")
NONE, FALSE, TRUE, INT, UINT, FLOAT, STRING = range(7)
I64_MAX = (1 << 63) - 1
_D, _Q, _UQ, _U16 = struct.Struct("<d"), struct.Struct("<q"), struct.Struct("<Q"), struct.Struct("<H")
_ZERO8 = bytes(8)


class StoreDamaged(Exception):
    """The store cannot be trusted: it is moved aside and a fresh one started."""


class StoreUnavailable(Exception):
    """The store's directory cannot be used (read-only, not writable, not a directory): not damage, and
    nothing to move aside; the appliance cannot start until it is fixed."""


def _value_column(values: Sequence[Value | None]) -> tuple[bytes, bytes, bytes]:
    """(kinds, 8-byte values, strings) of a block's values."""
    types = set(map(type, values))
    n = len(values)
    if types == {float}:
        return bytes([FLOAT]) * n, array("d", values).tobytes(), b""  # type: ignore[type-var]
    ints = cast("Sequence[int]", values)
    if types == {int} and min(ints) >= -I64_MAX - 1 and max(ints) <= I64_MAX:
        return bytes([INT]) * n, array("q", ints).tobytes(), b""
    kinds = bytearray(n)
    nums: list[bytes] = []
    strings: list[bytes] = []
    for i, v in enumerate(values):
        if v is None:
            nums.append(_ZERO8)
        elif v is True or v is False:
            kinds[i] = TRUE if v else FALSE
            nums.append(_ZERO8)
        elif isinstance(v, float):
            kinds[i] = FLOAT
            nums.append(_D.pack(v))
        elif isinstance(v, int):
            kinds[i] = INT if v <= I64_MAX else UINT
            nums.append(_Q.pack(v) if v <= I64_MAX else _UQ.pack(v))
        else:
            raw = str(v).encode()[:65535]
            kinds[i] = STRING
            nums.append(_ZERO8)
            strings.append(_U16.pack(len(raw)) + raw)
    return bytes(kinds), b"".join(nums), b"".join(strings)


def _string_offset(kinds: bytes | bytearray, strings: bytes | bytearray, i: int, start: int = 0,
                   pos: int = 0) -> int:
    """Offset in `strings` where reading i's string would start, walking on from reading `start`, whose
    string starts at `pos`."""
    if strings:
        for _ in range(kinds.count(STRING, start, i)):
            pos += 2 + _U16.unpack_from(strings, pos)[0]
    return pos


@dataclass(frozen=True, slots=True)
class Batch:
    """Sealed readings in block columns: immutable, safe to hand to another thread."""

    tags: bytes  # n x u32, native order
    stamps: bytes  # n x i64
    qualities: bytes
    kinds: bytes
    nums: bytes  # n x 8
    strings: bytes

    def __len__(self) -> int:
        return len(self.qualities)

    def slice(self, i: int, j: int) -> Batch:
        if i == 0 and j >= len(self):
            return self  # immutable: the whole batch is its own slice (the common one-block window)
        a = _string_offset(self.kinds, self.strings, i)
        b = _string_offset(self.kinds, self.strings, j, i, a)
        return Batch(self.tags[4 * i:4 * j], self.stamps[8 * i:8 * j], self.qualities[i:j], self.kinds[i:j],
                     self.nums[8 * i:8 * j], self.strings[a:b])

    def values(self) -> list[Value | None]:
        return _values(self.kinds, self.nums, self.strings)


EMPTY = Batch(b"", b"", b"", b"", b"", b"")


class Window:
    """The open commit window: readings appended in block columns, each value encoded once, as it arrives
    (no object per reading: a window may hold a long low-power interval). Not thread-safe: one owner."""

    __slots__ = ("kinds", "nums", "qualities", "stamps", "strings", "tags")

    def __init__(self) -> None:
        self.tags = array("I")
        self.stamps = array("q")
        self.qualities = bytearray()
        self.kinds = bytearray()
        self.nums = bytearray()  # 8 bytes a reading: f64, i64 or u64 by kind, zero for the others
        self.strings = bytearray()  # u16 length + UTF-8, one per STRING kind, in order

    @classmethod
    def of(cls, readings: Sequence[Reading]) -> Window:
        w = cls()
        w.extend(readings)
        return w

    def __len__(self) -> int:
        return len(self.tags)

    def extend(self, readings: Sequence[Reading]) -> None:
        if readings:
            tags, stamps, values, qualities = zip(*readings, strict=True)
            kinds, nums, strings = _value_column(values)
            self.tags.extend(tags)
            self.stamps.extend(stamps)
            self.qualities.extend(qualities)
            self.kinds += kinds
            self.nums += nums
            self.strings += strings

    def seal(self) -> Batch:
        return Batch(self.tags.tobytes(), self.stamps.tobytes(), bytes(self.qualities), bytes(self.kinds),
                     bytes(self.nums), bytes(self.strings))

    def prepend(self, older: Batch) -> None:
        """Put sealed readings back in front (a commit that failed)."""
        self.tags[:0] = array("I", older.tags)
        self.stamps[:0] = array("q", older.stamps)
        self.qualities[:0] = older.qualities
        self.kinds[:0] = older.kinds
        self.nums[:0] = older.nums
        self.strings[:0] = older.strings

    def drop_oldest(self, n: int) -> None:
        cut = _string_offset(self.kinds, self.strings, n)
        for column in (self.tags, self.stamps, self.qualities, self.kinds):
            del column[:n]
        del self.nums[:8 * n]
        del self.strings[:cut]


def encode_block(readings: Sequence[Reading] | Batch, codec: int = ZSTD, compressor: Any = None) -> bytes:
    """One block value from readings (at least one).

    >>> b = encode_block([(7, 1_000, 1.5, 0), (8, 1_250, None, 1)])
    >>> decode_block(b)
    [(7, 1000, 1.5, 0), (8, 1250, None, 1)]
    """
    b = readings if isinstance(readings, Batch) else Window.of(readings).seal()
    stamps = array("q")
    stamps.frombytes(b.stamps)
    t0 = stamps[0]
    deltas = array("q", map(operator.sub, stamps, chain((t0,), stamps)))  # map stops with `stamps`
    payload = b"".join((b.tags, deltas.tobytes(), b.qualities, b.kinds, b.nums, b.strings))
    if codec == ZSTD:
        stored = (compressor or zstandard.ZstdCompressor(level=1)).compress(payload)
    elif codec == ZLIB:
        stored = zlib.compress(payload, 1)
    else:
        stored = payload
    header = HEADER.pack(VERSION, codec, 0, len(b), t0, 0, len(payload))
    return HEADER.pack(VERSION, codec, 0, len(b), t0, _crc(header, stored), len(payload)) + stored


def _crc(header: bytes | memoryview, stored: bytes | memoryview) -> int:
    """CRC-32 of the header without its CRC field (bytes 0..16, 20..24), then the stored payload."""
    return zlib.crc32(stored, zlib.crc32(header[20:24], zlib.crc32(header[:16])))


def block_intact(value: bytes) -> bool:
    """Format version known and CRC-32 (header and payload) right."""
    if len(value) < HEADER.size:
        return False
    version, _, _, _, _, crc, _ = HEADER.unpack_from(value)
    view = memoryview(value)
    return bool(version == VERSION and _crc(view[:HEADER.size], view[HEADER.size:]) == crc)


def block_header(value: bytes | memoryview) -> tuple[int, int, int]:
    """(codec, n readings, first timestamp ns) of a block value."""
    version, codec, _, n, t0, _, _ = HEADER.unpack_from(value)
    if version != VERSION:
        raise StoreDamaged(f"unknown block format {version}")
    return codec, n, t0


def decode_block(value: bytes | memoryview, decompressor: Any = None) -> list[Reading]:
    """Readings of a block value; raises StoreDamaged on a bad CRC or layout."""
    _, codec, _, n, t0, _, size = HEADER.unpack_from(value)
    stored = bytes(value[HEADER.size:])
    if not block_intact(bytes(value)):
        raise StoreDamaged("block checksum mismatch")
    try:
        if codec == ZSTD:
            payload = (decompressor or zstandard.ZstdDecompressor()).decompress(stored, max_output_size=size)
        elif codec == ZLIB:
            payload = zlib.decompress(stored)
        else:
            payload = stored
    except (zstandard.ZstdError, zlib.error) as e:
        raise StoreDamaged(f"block does not decompress: {e}") from e
    if len(payload) != size or size < 22 * n:
        raise StoreDamaged("block payload size mismatch")
    tags = array("I")
    tags.frombytes(payload[: 4 * n])
    deltas = array("q")
    deltas.frombytes(payload[4 * n: 12 * n])
    qualities = payload[12 * n: 13 * n]
    kinds = payload[13 * n: 14 * n]
    nums = payload[14 * n: 22 * n]
    stamps, t = [], t0
    for d in deltas:
        t += d
        stamps.append(t)
    try:
        values = _values(kinds, nums, payload[22 * n:])
    except struct.error as e:
        raise StoreDamaged(f"block strings do not parse: {e}") from e
    return list(zip(tags, stamps, values, qualities, strict=True))


def _values(kinds: bytes | bytearray, nums: bytes | bytearray,
            strings: bytes | bytearray) -> list[Value | None]:
    if kinds.count(FLOAT) == len(kinds):
        return list(array("d", nums))
    out: list[Value | None] = []
    pos = 0
    for i, k in enumerate(kinds):
        if k == FLOAT:
            out.append(_D.unpack_from(nums, 8 * i)[0])
        elif k == INT:
            out.append(_Q.unpack_from(nums, 8 * i)[0])
        elif k == UINT:
            out.append(_UQ.unpack_from(nums, 8 * i)[0])
        elif k in (TRUE, FALSE):
            out.append(k == TRUE)
        elif k == STRING:
            (length,) = _U16.unpack_from(strings, pos)
            out.append(strings[pos + 2: pos + 2 + length].decode("utf-8", "replace"))
            pos += 2 + length
        else:
            out.append(None)
    return out
