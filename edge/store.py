"""Store-and-forward queue of readings in LMDB, tuned for flash wear.

Readings are buffered in RAM for one commit window ([store] commit_interval, default 1 s, longer in
low-power mode; or until commit_bytes of raw readings are waiting), then packed into blocks, compressed,
and appended in ONE write transaction: never one transaction per reading. The forwarder takes the oldest
blocks and they leave the store only when the uplink acknowledged them (at-least-once).

On disk (the environment directory `[store] path`, default /var/lib/edge/store: data.mdb, lock.mdb):

    main      the queue. key 12 B: (sequence | 2**63) u64 big-endian | readings in the block u32 big-endian
              value: one block (below), at most 16,368 B (four 4 KiB overflow pages). The same tree
              holds LMDB's records of the two named databases, b"meta" and b"rejected": their keys
              are ASCII, so they sort before every block key (top bit set) and appends stay appends.
    rejected  the same keys; value = reason length u16 LE | reason UTF-8 | the original block
    meta      b"next_seq" u64 LE, b"blocks_dropped", b"readings_dropped", b"blocks_rejected",
              b"readings_rejected", b"recoveries", b"rejected_trimmed" u64 LE, b"appliance" UTF-8

Keys sort by sequence, so put(append=True) always appends to the right edge of the B-tree; the reading
count in the key gives the backlog from the keys alone (no value is read at start-up).

Sequence numbers never repeat for one appliance: a new store starts at its creation time in
microseconds (~1.7e15, far below 2**63) and counts up by one per block, so upstream de-duplicates on
(appliance id, sequence) even after the store was replaced. next_seq is persisted only when it cannot be
derived from the last key (the newest block was delivered or the queue drained, or a store is
created).

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

Columns of like data (ids, small deltas, one quality) are what zstd compresses well: 8-12 B stored per
21-byte reading (docs/performance.md, scripts/bench-store).

Flags and their flash cost (measured, docs/performance.md): sync=True and metasync=True (every commit is
durable when commit() returns: the loss window on power cut is the open commit window, at most
commit_interval of readings, which live only in RAM); writemap=False and readahead=False. A commit
writes 3 fixed pages (the queue's leaf, the free list, the meta page) plus the blocks' overflow pages:
5 in all at 1,000 readings/s. That is why the queue lives in the main database (a named one would
rewrite the catalog page at every commit) and why a window is one block up to four pages (a window
split into many small blocks wastes page tails, and values under ~2 KB stored inside the leaf make the
tree split and deepen). Acknowledged blocks are deleted inside the next append transaction (one flush
instead of two).
sync=False or map_async saves nothing measurable and corrupted the database under simulated power cuts:
never.

Mapped pages: LMDB reads through a shared read-only map of the file, and the kernel maps the cached pages
around each page read (fault-around), among them the ones each commit has just written. The process's RSS
would grow with the backlog: +0.9 to 1.2 MiB in 6 minutes of low power offline at 10,000 tags. After each
commit the store drops its page-table entries of the map (madvise MADV_DONTNEED, ~20 µs): the pages stay in
the page cache, unmapped, so not in RSS and cheaper for the kernel to reclaim; pages still in use fault
back in.

Full store: before appending, if pages in use would pass high_watermark (80 %) of map_size, the oldest
blocks are dropped, inside the same transaction, down to low_watermark (70 %): counted exactly (blocks
and readings, persisted in meta), logged once. MapFullError is therefore not expected; if the file
system itself is full, the commit fails, the readings stay in RAM (bounded; beyond the bound the oldest
are dropped and counted) and the oldest 10 % of blocks are dropped to make room.

Damage beyond LMDB's guarantees (a truncated file, flipped bytes: flash wear, not crashes) is detected
at open (file shorter than its last page, a walk of every key) or when a block is taken (CRC); the damaged
store is moved aside to `<path>.damaged-<time>` and a fresh one started, counted in meta `recoveries`
(the totals carry over: they are also copied to `.<name>.totals` beside the store whenever they
change, for a store whose meta cannot be trusted); a damaged block is moved to `rejected` with the
reason "corrupt". LMDB cannot
always survive arbitrary page damage without crashing the process (SIGBUS, SIGSEGV), so a marker file
beside the store counts starts not followed by a clean close: after such a start every page is read
once at open (a bad page crashes there, not at random later), and after 3 in a row the store is moved
aside instead of crashing again. The appliance never refuses to start because of its store.

Refused blocks kept in `rejected` may use 10 % of the map; beyond that the oldest of them are dropped
(counted in rejected_trimmed) before any pending block is.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import operator
import os
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import lmdb
import zstandard

from edge.config import Store as StoreConfig
from edge.reading import Reading, Value

log = logging.getLogger("edge.store")

VERSION = 1
RAW, ZSTD, ZLIB = 0, 1, 2
HEADER = struct.Struct("<BBHIqII")
KEY = struct.Struct(">QI")
KEY_BIAS = 1 << 63  # set in every stored key: block keys sort after the records of the named databases
NAMED = (b"meta", b"rejected")
U64 = struct.Struct("<Q")
MAX_VALUE = 4 * 4096 - 16  # at most four overflow pages (4 KiB pages, 16-byte page header)
READING_BYTES = 21  # u32 + u64 + f64 + u8: the raw size used for commit_bytes and ratios
MARKER = ".opening"
CRASHED_OPENS = 3  # unclean starts in a row (each reading the store through) before it is moved aside
REJECTED_SHARE = 0.1  # refused blocks kept for inspection may use this share of the map

NONE, FALSE, TRUE, INT, UINT, FLOAT, STRING = range(7)
I64_MAX = (1 << 63) - 1
_D, _Q, _UQ, _U16 = struct.Struct("<d"), struct.Struct("<q"), struct.Struct("<Q"), struct.Struct("<H")
_ZERO8 = bytes(8)


class StoreDamaged(Exception):
    """The store cannot be trusted: it is moved aside and a fresh one started."""


# ---------------------------------------------------------------------------------------------------
# Block encoding: pure functions

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


class Window:
    """Readings in columns, each value already in its block encoding (a kind byte, 8 bytes, and for a
    string its length-prefixed UTF-8): the open commit window. About 23 B of RAM a reading, against about
    120 B as tuples and about 50 B with the values as objects; at 10,000 readings/s, or in a 30 s
    low-power window, that is megabytes. Values are encoded once, as they arrive, not at each commit."""

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

    def values(self) -> list[Value | None]:
        return _values(self.kinds, self.nums, self.strings)

    def _cut(self, i: int, start: int = 0, pos: int = 0) -> int:
        """Offset in `strings` where reading i's string would start, walking on from reading `start`,
        whose string starts at `pos`."""
        if self.strings:
            for _ in range(self.kinds.count(STRING, start, i)):
                pos += 2 + _U16.unpack_from(self.strings, pos)[0]
        return pos

    def slice(self, i: int, j: int) -> Window:
        w = Window()
        w.tags, w.stamps, w.qualities, w.kinds = self.tags[i:j], self.stamps[i:j], self.qualities[i:j], \
            self.kinds[i:j]
        w.nums = self.nums[8 * i:8 * j]
        a = self._cut(i)
        w.strings = self.strings[a:self._cut(j, i, a)]
        return w

    def prepend(self, older: Window) -> None:
        for name in self.__slots__:
            getattr(self, name)[:0] = getattr(older, name)

    def drop_oldest(self, n: int) -> None:
        cut = self._cut(n)
        for column in (self.tags, self.stamps, self.qualities, self.kinds):
            del column[:n]
        del self.nums[:8 * n]
        del self.strings[:cut]


def encode_block(readings: Sequence[Reading] | Window, codec: int = ZSTD, compressor: Any = None) -> bytes:
    """One block value from readings (at least one).

    >>> b = encode_block([(7, 1_000, 1.5, 0), (8, 1_250, None, 1)])
    >>> decode_block(b)
    [(7, 1000, 1.5, 0), (8, 1250, None, 1)]
    """
    w = readings if isinstance(readings, Window) else Window.of(readings)
    stamps = w.stamps
    t0 = stamps[0]
    deltas = array("q", map(operator.sub, stamps, (t0, *stamps[:-1])))
    payload = b"".join((w.tags.tobytes(), deltas.tobytes(), w.qualities, w.kinds, w.nums, w.strings))
    if codec == ZSTD:
        stored = (compressor or zstandard.ZstdCompressor(level=1)).compress(payload)
    elif codec == ZLIB:
        stored = zlib.compress(payload, 1)
    else:
        stored = payload
    header = HEADER.pack(VERSION, codec, 0, len(w), t0, 0, len(payload))
    return HEADER.pack(VERSION, codec, 0, len(w), t0, _crc(header, stored), len(payload)) + stored


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
    if len(payload) != size:
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
    return list(zip(tags, stamps, _values(kinds, nums, payload[22 * n:]), qualities, strict=True))


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


def key_of(seq: int, n: int) -> bytes:
    return KEY.pack(seq | KEY_BIAS, n)


def parse_key(key: bytes | memoryview) -> tuple[int, int]:
    seq, n = KEY.unpack(bytes(key))
    return int(seq) & ~KEY_BIAS, int(n)


def pages_of(value: bytes | memoryview) -> int:
    """4 KiB pages a value takes: its overflow pages, or a share of a leaf page (counted as one)."""
    return max(1, -(-(len(value) + 16) // 4096))


def pages_used(txn: lmdb.Transaction, dbs: Sequence[Any]) -> int:
    """Pages the databases `dbs` (all of the environment's) hold, plus the two meta pages and the
    free-list root."""
    used = 3
    for db in dbs:
        s = txn.stat(db)
        used += s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
    return used


FIRST_KEY = key_of(0, 0)  # every block key sorts at or after it; the named databases' records before it


def queue_items(txn: lmdb.Transaction, db: Any = None) -> Iterator[tuple[Any, Any]]:
    """(key, value) of every block of `db` (default: the queue, LMDB's main database), oldest first."""
    cursor = txn.cursor(db=db)
    if cursor.set_range(FIRST_KEY):
        yield from cursor


# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """A block taken for forwarding: its sequence number, reading count and stored bytes."""

    seq: int
    n: int
    value: bytes
    stored_key: bytes | None = None  # the key as found, if it disagrees with (seq, n)

    @property
    def key(self) -> bytes:
        return self.stored_key or key_of(self.seq, self.n)

    def readings(self) -> list[Reading]:
        return decode_block(self.value)


@dataclass
class Counters:
    readings_appended: int = 0
    blocks_committed: int = 0
    commits: int = 0
    commit_seconds: float = 0.0
    blocks_forwarded: int = 0
    readings_forwarded: int = 0
    blocks_rejected: int = 0  # persisted totals from here down
    readings_rejected: int = 0
    blocks_dropped: int = 0
    readings_dropped: int = 0
    recoveries: int = 0
    rejected_trimmed: int = 0
    commit_failures: int = 0
    backlog_blocks: int = 0
    backlog_readings: int = 0
    persisted: tuple[str, ...] = field(default=("blocks_rejected", "readings_rejected", "blocks_dropped",
                                                "readings_dropped", "recoveries", "rejected_trimmed"),
                                       repr=False)


def _read_totals(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: int(v) for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def write_bytes() -> int:
    """Bytes this process caused to be sent to storage (/proc/self/io write_bytes); 0 where unknown."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.madvise  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_libc()


def _map_of(file: Path) -> tuple[int, int]:
    """Address and length of this process's map of file (Linux /proc/self/maps; (0, 0) if none)."""
    try:
        st = os.stat(file)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        with open("/proc/self/maps") as f:
            for line in f:
                span, _, _, at, inode, *_ = line.split()
                if int(inode) == st.st_ino and at == dev:
                    start, end = (int(x, 16) for x in span.split("-"))
                    return start, end - start
    except (OSError, ValueError):
        pass
    return 0, 0


def open_env(path: Path, map_size: int, readonly: bool = False) -> lmdb.Environment:
    return lmdb.open(str(path), map_size=map_size, max_dbs=4, sync=True, metasync=True, writemap=False,
                     readahead=False, meminit=False, readonly=readonly, lock=True, max_readers=64,
                     subdir=True, create=not readonly)


class Store:
    """The queue. Not thread-safe except as the pipeline uses it: add() from the event loop; commit()
    in one worker thread at a time; take/accept/reject/keep from the uplink."""

    def __init__(self, cfg: StoreConfig, appliance_id: str = "") -> None:
        self.cfg = cfg
        self.path = Path(cfg.path)
        self.appliance_id = appliance_id
        self.counters = Counters()
        self.commit_interval = cfg.commit_interval
        self.buffer = Window()
        self.window_start = time.monotonic()
        self.acked: list[Block] = []
        self.rejecting: list[tuple[Block, str]] = []
        self.in_flight: set[int] = set()
        self.per_block = MAX_VALUE // 10  # readings per block estimate, adapted to the compression ratio
        self.max_buffer = max(10_000, 20 * cfg.commit_bytes // READING_BYTES)
        self._compressor = zstandard.ZstdCompressor(level=1)
        self._decompressor = zstandard.ZstdDecompressor()
        self._logged: set[str] = set()
        self._commit_lock = threading.Lock()
        self._settling: set[int] = set()
        self._mapped: tuple[lmdb.Environment, int, int] | None = None  # env, address, length of its map
        self.env = self._open()

    # -- opening and recovery ---------------------------------------------------------------------

    def _open(self) -> lmdb.Environment:
        """The marker counts starts not followed by a clean close() or a full verified read: after an
        unclean stop every page is read once (a damaged page crashes here, not later at random); after
        CRASHED_OPENS such starts in a row the store is moved aside."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.marker = self.path.parent / f".{self.path.name}{MARKER}"
        self.totals_file = self.path.parent / f".{self.path.name}.totals"
        unclean = _read_int(self.marker)
        if unclean >= CRASHED_OPENS:
            self._move_aside(f"the last {unclean} starts with it ended in a crash")
            unclean = 0
        self.marker.write_text(str(unclean + 1))
        try:
            env = self._open_checked(full=unclean > 0)
        except (lmdb.Error, StoreDamaged, OSError, struct.error) as e:
            self._move_aside(str(e))
            env = self._open_checked(full=False)
        if unclean:
            self.marker.write_text("1")  # read through without a crash: only this start is pending
        return env

    def _open_checked(self, full: bool) -> lmdb.Environment:
        fresh = not (self.path / "data.mdb").exists()
        env = open_env(self.path, self.cfg.map_size)
        try:
            self._check_size(env)  # before any page beyond the meta pages is touched (SIGBUS)
            self.db_blocks = env.open_db()  # the main database: no catalog page to rewrite per commit
            self.db_rejected = env.open_db(b"rejected")
            self.db_meta = env.open_db(b"meta")
            self._check_file(env)
            self._load(env, fresh)
            if full:
                self._verify_values(env)
        except BaseException:
            env.close()
            raise
        return env

    def _check_size(self, env: lmdb.Environment) -> None:
        """The file holds every page the meta page claims."""
        size = (self.path / "data.mdb").stat().st_size
        pages = env.info()["last_pgno"] + 1
        if size < pages * env.stat()["psize"]:
            raise StoreDamaged(f"data.mdb is {size} bytes, shorter than its {pages} pages")

    def _check_file(self, env: lmdb.Environment) -> None:
        """The databases fit in the pages of the file."""
        pages = env.info()["last_pgno"] + 1
        with env.begin() as txn:
            used = self._pages_used(txn)
        if used > pages:
            raise StoreDamaged(f"its databases claim {used} pages of the {pages} in the file")

    def _load(self, env: lmdb.Environment, fresh: bool) -> None:
        """Walk every key (leaf pages only), restore counters and the next sequence number."""
        c = self.counters
        with env.begin(write=fresh) as txn:
            if fresh:
                txn.put(b"next_seq", U64.pack(time.time_ns() // 1000), db=self.db_meta)
                txn.put(b"appliance", self.appliance_id.encode(), db=self.db_meta)
            meta = {bytes(k): bytes(v) for k, v in txn.cursor(db=self.db_meta)}
            if b"next_seq" not in meta:  # every store this code made has it: this file is not one
                raise StoreDamaged("its meta database lost the sequence number (an emptied data.mdb?)")
            next_seq = U64.unpack(meta[b"next_seq"])[0]
            c.backlog_blocks = c.backlog_readings = 0
            last = -1
            for key in txn.cursor(db=self.db_blocks).iternext(keys=True, values=False):
                if key < FIRST_KEY:
                    if key not in NAMED:
                        raise StoreDamaged(f"an unknown key {bytes(key)!r} (not a store of this layout)")
                    continue
                if len(key) != KEY.size:
                    raise StoreDamaged("a key of the wrong size")
                seq, n = parse_key(key)
                if seq <= last:
                    raise StoreDamaged("keys out of order")
                last = seq
                c.backlog_blocks += 1
                c.backlog_readings += n
            rejected_last = txn.cursor(db=self.db_rejected)
            if rejected_last.last():
                last = max(last, parse_key(rejected_last.key())[0])
        self.next_seq = max(next_seq, last + 1)
        for name in c.persisted:
            setattr(c, name, U64.unpack(meta.get(name.encode(), bytes(8)))[0])

    def _save_totals(self) -> None:
        """Copy the persisted totals beside the store (written only when they change: drops, refusals,
        recoveries), so that a store found damaged at open does not take them along."""
        c = self.counters
        tmp = self.totals_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({name: getattr(c, name) for name in c.persisted}))
            tmp.replace(self.totals_file)
        except OSError as e:
            self._once("totals", logging.WARNING, "store: cannot write %s: %s", self.totals_file, e)

    def _verify_values(self, env: lmdb.Environment) -> None:
        """Read every stored value once; blocks failing their checksum are moved aside at the next commit."""
        with env.begin(buffers=True) as txn:
            for key, value in queue_items(txn):
                seq, n = parse_key(key)
                if not block_intact(bytes(value)):
                    self.rejecting.append((Block(seq, n, bytes(value)), "corrupt: block checksum mismatch"))
            for _ in txn.cursor(db=self.db_rejected):
                pass

    def _move_aside(self, reason: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}")
        log.error("store %s is damaged (%s): moved to %s, starting a fresh store; readings in it were not "
                  "forwarded and stay there for inspection", self.path, reason, aside)
        if self.path.exists():
            self.path.rename(aside)
        for name, value in _read_totals(self.totals_file).items():  # the damaged meta is not trusted
            if name in self.counters.persisted:
                setattr(self.counters, name, max(value, getattr(self.counters, name)))
        self.counters.recoveries += 1
        self._save_totals()
        self.path.mkdir(parents=True, exist_ok=True)
        env = open_env(self.path, self.cfg.map_size)
        next_seq = max(time.time_ns() // 1000, getattr(self, "next_seq", 0))
        with env.begin(write=True) as txn:
            meta = env.open_db(b"meta", txn=txn)
            txn.put(b"next_seq", U64.pack(next_seq), db=meta)
            txn.put(b"appliance", self.appliance_id.encode(), db=meta)
            for name in self.counters.persisted:  # totals carry over to the fresh store
                txn.put(name.encode(), U64.pack(getattr(self.counters, name)), db=meta)
        env.close()

    # -- producer side ----------------------------------------------------------------------------

    def add(self, readings: list[Reading]) -> None:
        """Buffer readings for the open window. Never blocks and never fails; if commits keep failing
        the RAM buffer is bounded and its oldest readings are dropped (counted)."""
        self.buffer.extend(readings)
        self.counters.readings_appended += len(readings)
        excess = len(self.buffer) - self.max_buffer
        if excess > 0:
            self.buffer.drop_oldest(excess)
            self.counters.readings_dropped += excess
            self._once("ram", logging.ERROR, "store: commits failing, RAM buffer full: dropping the oldest "
                       "readings (counted in readings_dropped)")

    def due(self, now: float | None = None) -> bool:
        """Is a commit due: the window elapsed with something to write, or enough bytes waiting?"""
        now = time.monotonic() if now is None else now
        pending = self.buffer or self.acked or self.rejecting
        return bool(pending) and (now - self.window_start >= self.commit_interval
                                  or len(self.buffer) * READING_BYTES >= self.cfg.commit_bytes)

    def _pack(self, readings: Window) -> list[tuple[int, bytes]]:
        """Split readings into blocks whose values fit MAX_VALUE: [(n, value)]."""
        out = []
        i = 0
        # Equal shares, not full blocks plus a small tail: a tail under ~2 KB would be stored inside the
        # B-tree leaf and make it split and grow (measured: 37 -> 29 B written per reading at 1,000/s).
        share = -(-len(readings) // -(-len(readings) // self.per_block)) if readings else 0
        while i < len(readings):
            k = min(share, len(readings) - i)
            while True:
                value = encode_block(readings.slice(i, i + k), ZSTD, self._compressor)
                if len(value) <= MAX_VALUE or k == 1:
                    break
                k = max(1, k * MAX_VALUE * 9 // (len(value) * 10))
            out.append((k, value))
            i += k
            if k >= self.per_block * 0.9 or len(value) > MAX_VALUE * 0.9:  # full blocks teach the ratio
                self.per_block = max(1, min(10_000, int(k * MAX_VALUE * 0.92 / len(value))))
        return out

    def commit(self) -> int:
        """Write the open window: deletes of acknowledged blocks, rejected blocks moved aside, new blocks
        appended, the oldest dropped if the map would pass its high watermark: one transaction, durable
        on return. Returns the number of blocks appended. Commits from several threads run one by one."""
        with self._commit_lock:
            return self._commit()

    def _commit(self) -> int:
        # Until this commit is durable, settled blocks are still in the database: take() must not send
        # them again. Marked before and after the swap (take() runs in another thread meanwhile).
        self._settling = {b.seq for b in self.acked} | {b.seq for b, _ in self.rejecting}
        batch, self.buffer = self.buffer, Window()
        acked, self.acked = self.acked, []
        rejecting, self.rejecting = self.rejecting, []
        self._settling |= {b.seq for b in acked} | {b.seq for b, _ in rejecting}
        try:
            return self._commit_batch(batch, acked, rejecting)
        finally:
            self._settling = set()

    def _commit_batch(self, batch: Window, acked: list[Block],
                      rejecting: list[tuple[Block, str]]) -> int:
        self.window_start = time.monotonic()
        if not (batch or acked or rejecting):
            return 0
        blocks = self._pack(batch)
        t0 = time.perf_counter()
        try:
            dropped = self._write(blocks, acked, rejecting)
        except (lmdb.CorruptedError, lmdb.PageNotFoundError, StoreDamaged, struct.error) as e:
            self.recover(f"found while committing: {e}")  # the window's readings go to the fresh store
            self.buffer.prepend(batch)
            return 0
        except (lmdb.MapFullError, lmdb.DiskError, OSError) as e:
            self.buffer.prepend(batch)
            self.acked[:0] = acked
            self.rejecting[:0] = rejecting
            self.counters.commit_failures += 1
            self._once("commit", logging.ERROR, "store: commit failed (%s): readings kept in RAM, dropping "
                       "the oldest blocks to make room", e)
            self._drop_fraction(0.1)
            return 0
        c = self.counters
        c.commits += 1
        c.commit_seconds += time.perf_counter() - t0
        c.blocks_committed += len(blocks)
        c.backlog_blocks += len(blocks) - len(acked) - len(rejecting) - dropped[0]
        c.backlog_readings += (sum(n for n, _ in blocks) - sum(b.n for b in acked)
                               - sum(b.n for b, _ in rejecting) - dropped[1])
        self._logged.discard("commit")
        self._unmap()
        return len(blocks)

    def _unmap(self) -> None:
        """Drop this process's page-table entries of the map (module docstring, "Mapped pages")."""
        if self._mapped is None or self._mapped[0] is not self.env:
            self._mapped = (self.env, *_map_of(self.path / "data.mdb"))
        _, address, length = self._mapped
        if length and _libc is not None:
            _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), mmap.MADV_DONTNEED)

    def _write(self, blocks: list[tuple[int, bytes]], acked: list[Block],
               rejecting: list[tuple[Block, str]]) -> tuple[int, int]:
        c = self.counters
        meta: dict[bytes, int] = {}
        with self.env.begin(write=True) as txn:
            for b in acked:
                txn.delete(b.key, db=self.db_blocks)
            moved = [b for b, reason in rejecting if self._move_rejected(txn, b, reason)]
            if moved:
                meta[b"blocks_rejected"] = c.blocks_rejected + len(moved)
                meta[b"readings_rejected"] = c.readings_rejected + sum(b.n for b in moved)
            trimmed = c.rejected_trimmed
            dropped = self._watermark(txn, sum(pages_of(v) for _, v in blocks))
            if c.rejected_trimmed != trimmed:
                meta[b"rejected_trimmed"] = c.rejected_trimmed
            if dropped[0]:
                meta[b"blocks_dropped"] = c.blocks_dropped + dropped[0]
                meta[b"readings_dropped"] = c.readings_dropped + dropped[1]
            seq = self.next_seq
            for n, value in blocks:
                txn.put(key_of(seq, n), value, db=self.db_blocks, append=True)
                seq += 1
            if acked or rejecting or dropped[0]:
                last = txn.cursor(db=self.db_blocks)
                if not last.last() or last.key() < FIRST_KEY or parse_key(last.key())[0] + 1 < seq:
                    meta[b"next_seq"] = seq  # the newest block is gone: its key no longer tells it
            for k, v in meta.items():
                txn.put(k, U64.pack(v), db=self.db_meta)
        self.next_seq = seq
        c.blocks_rejected += len(moved)
        c.readings_rejected += sum(b.n for b in moved)
        if meta:
            self._save_totals()
        if dropped[0]:
            c.blocks_dropped += dropped[0]
            c.readings_dropped += dropped[1]
            self._once("full", logging.WARNING, "store: full (%.0f %% of map_size): dropping the oldest "
                       "blocks (counted in blocks_dropped / readings_dropped)", 100 * self.cfg.high_watermark)
        else:
            self._logged.discard("full")
        return dropped

    def _move_rejected(self, txn: lmdb.Transaction, block: Block, reason: str) -> bool:
        if not txn.delete(block.key, db=self.db_blocks):
            return False
        raw = reason.encode()[:1000]
        txn.put(block.key, struct.pack("<H", len(raw)) + raw + block.value, db=self.db_rejected)
        return True

    def _pages_used(self, txn: lmdb.Transaction) -> int:
        return pages_used(txn, (self.db_blocks, self.db_rejected, self.db_meta))

    def _watermark(self, txn: lmdb.Transaction, new_pages: int) -> tuple[int, int]:
        """Drop the oldest blocks (not in flight) while pages in use exceed the watermark.
        Returns (blocks, readings) dropped."""
        total = self.cfg.map_size // 4096
        used = self._pages_used(txn) + new_pages + new_pages // 50 + 2
        if used <= self.cfg.high_watermark * total:
            return 0, 0
        excess = used - int(self.cfg.low_watermark * total)
        rejected = txn.stat(self.db_rejected)
        rejected_pages = rejected["leaf_pages"] + rejected["overflow_pages"] + rejected["branch_pages"]
        if rejected_pages > total * REJECTED_SHARE:  # refused blocks are kept for inspection, not forever
            trimmed, _ = self._drop_oldest(txn, min(excess, rejected_pages - int(total * REJECTED_SHARE)),
                                           self.db_rejected)
            self.counters.rejected_trimmed += trimmed
            excess -= trimmed
            self._once("trim", logging.WARNING, "store: rejected blocks fill the store: dropping the oldest "
                       "of them (counted in rejected_trimmed)")
        return self._drop_oldest(txn, excess) if excess > 0 else (0, 0)

    def _drop_oldest(self, txn: lmdb.Transaction, pages: int, db: Any = None) -> tuple[int, int]:
        """Delete the oldest blocks (not in flight) of `db` (default: the queue) until about `pages`
        pages are freed or none is left. Returns (blocks, readings) deleted."""
        blocks = readings = 0
        cursor = txn.cursor(db=self.db_blocks if db is None else db)
        ok = cursor.set_range(FIRST_KEY)
        while ok and pages > 0:
            seq, n = parse_key(cursor.key())
            if seq in self.in_flight:
                ok = cursor.next()
                continue
            pages -= pages_of(cursor.value())
            blocks += 1
            readings += n
            ok = cursor.delete() and bool(cursor.key())  # past the last key the cursor is unset
        return blocks, readings

    def _drop_fraction(self, fraction: float) -> None:
        """Last resort after a failed commit: drop the oldest blocks in a transaction of their own."""
        c = self.counters
        try:
            with self.env.begin(write=True) as txn:
                dropped = self._drop_oldest(txn, max(1, int(c.backlog_blocks * fraction)))
                txn.put(b"blocks_dropped", U64.pack(c.blocks_dropped + dropped[0]), db=self.db_meta)
                txn.put(b"readings_dropped", U64.pack(c.readings_dropped + dropped[1]), db=self.db_meta)
        except (lmdb.MapFullError, lmdb.DiskError, OSError) as e:
            self._once("drop", logging.ERROR, "store: cannot even drop blocks (%s)", e)
            return
        c.blocks_dropped += dropped[0]
        c.readings_dropped += dropped[1]
        c.backlog_blocks -= dropped[0]
        c.backlog_readings -= dropped[1]

    # -- forwarder side ---------------------------------------------------------------------------

    def take(self, limit: int) -> list[Block]:
        """The oldest blocks not yet in flight (at most `limit`), marked in flight. A block that fails its
        checksum is moved aside (rejected, reason "corrupt") instead of being returned."""
        out: list[Block] = []
        skip = (self.in_flight | self._settling | {b.seq for b in self.acked}
                | {b.seq for b, _ in self.rejecting})
        try:
            with self.env.begin(db=self.db_blocks, buffers=True) as txn:
                for key, value in queue_items(txn):
                    seq, n = parse_key(key)
                    if seq in skip:
                        continue
                    block = Block(seq, n, bytes(value))
                    if not block_intact(block.value):
                        self.rejecting.append((block, "corrupt: block checksum mismatch"))
                        continue
                    count = block_header(block.value)[1]
                    if count != n:  # the key was damaged, the (checksummed) block was not: trust it
                        self._once("key", logging.WARNING, "store: block %d: its key says %d readings, "
                                   "its checksummed header %d: using the header", seq, n, count)
                        self.counters.backlog_readings += count - n
                        block = Block(seq, count, block.value, bytes(key))
                    out.append(block)
                    if len(out) >= limit:
                        break
        except (lmdb.CorruptedError, lmdb.PageNotFoundError, StoreDamaged) as e:
            self.recover(str(e))
            return []
        self.in_flight.update(b.seq for b in out)
        return out

    def recover(self, reason: str) -> None:
        """Damage found while running: move the store aside and continue with a fresh one. Its backlog is
        counted as dropped (it stays in the moved-aside store for inspection)."""
        c = self.counters
        c.blocks_dropped += c.backlog_blocks
        c.readings_dropped += c.backlog_readings
        c.backlog_blocks = c.backlog_readings = 0
        self.in_flight.clear()  # blocks taken before: accept/reject/keep of them are ignored
        self.acked.clear()
        self.rejecting.clear()
        self.env.close()
        self._move_aside(reason)
        self.env = self._open_checked(full=False)

    def accept(self, blocks: Sequence[Block]) -> None:
        """Delivered: deleted in the next commit (a crash before it re-sends them: at-least-once)."""
        live = [b for b in blocks if b.seq in self.in_flight]  # not from before a recovery
        for b in live:
            self.in_flight.discard(b.seq)
            self.counters.blocks_forwarded += 1
            self.counters.readings_forwarded += b.n
        self.acked.extend(live)

    def reject(self, blocks: Sequence[Block], reason: str) -> None:
        """Refused by the receiver: moved to `rejected` in the next commit, kept for inspection."""
        live = [b for b in blocks if b.seq in self.in_flight]
        for b in live:
            self.in_flight.discard(b.seq)
        self.rejecting.extend((b, reason) for b in live)

    def keep(self, blocks: Sequence[Block]) -> None:
        """Not delivered (connection lost): back in the queue, taken again later, oldest first."""
        for b in blocks:
            self.in_flight.discard(b.seq)

    # -- inspection -------------------------------------------------------------------------------

    def oldest_ts(self) -> int | None:
        """Timestamp (ns) of the oldest stored reading, or None when the queue is empty."""
        with self.env.begin(db=self.db_blocks, buffers=True) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(FIRST_KEY):
                return None
            return block_header(cursor.value())[2]

    def close(self) -> None:
        """Commit the open window and close; a clean close clears the unclean-start marker."""
        try:
            self.commit()
        except lmdb.Error:
            self.env.close()
            return
        self.env.close()
        self.marker.unlink(missing_ok=True)

    def _once(self, kind: str, level: int, message: str, *args: object) -> None:
        log.log(level if kind not in self._logged else logging.DEBUG, message, *args)
        self._logged.add(kind)


# ---------------------------------------------------------------------------------------------------
# Read-only access for `edge store inspect|dump` while the appliance runs (LMDB readers).

@dataclass
class Summary:
    path: str
    appliance: str
    blocks: int
    readings: int
    first_seq: int | None
    last_seq: int | None
    oldest_ts: int | None
    newest_ts: int | None
    rejected_blocks: int
    file_bytes: int
    used_bytes: int
    map_size: int
    next_seq: int
    persisted: dict[str, int]


def inspect(path: Path, map_size: int) -> Summary:
    env = open_env(path, map_size, readonly=True)
    try:
        blocks = env.open_db()
        rejected = env.open_db(b"rejected", create=False)
        meta_db = env.open_db(b"meta", create=False)
        with env.begin(buffers=True) as txn:
            meta = {bytes(k).decode(): bytes(v) for k, v in txn.cursor(db=meta_db)}
            n_blocks = readings = 0
            first = last = None
            for key, _ in queue_items(txn):
                seq, n = parse_key(key)
                first = seq if first is None else first
                last = seq
                n_blocks += 1
                readings += n
            oldest = newest = None
            c = txn.cursor(db=blocks)
            if c.set_range(FIRST_KEY):
                oldest = block_header(c.value())[2]
                c.last()
                newest = max(ts for _, ts, _, _ in decode_block(c.value()))
            used = pages_used(txn, (blocks, rejected, meta_db))
            n_rejected = txn.stat(rejected)["entries"]
        counters = {k: U64.unpack(v)[0] for k, v in meta.items() if k not in ("appliance",)}
        return Summary(str(path), meta.get("appliance", b"").decode(), n_blocks, readings, first, last,
                       oldest, newest, n_rejected, (path / "data.mdb").stat().st_size, used * 4096,
                       map_size, max(counters.pop("next_seq", 0), (last or -1) + 1), counters)
    finally:
        env.close()


def dump(path: Path, map_size: int, start: int, limit: int) -> Iterator[tuple[int, list[Reading]]]:
    """(sequence, readings) of up to `limit` blocks from sequence `start`."""
    env = open_env(path, map_size, readonly=True)
    try:
        with env.begin(buffers=True) as txn:
            cursor = txn.cursor()
            ok = cursor.set_range(key_of(start, 0))
            count = 0
            while ok and count < limit:
                seq, _ = parse_key(cursor.key())
                yield seq, decode_block(cursor.value())
                count += 1
                ok = cursor.next()
    finally:
        env.close()

