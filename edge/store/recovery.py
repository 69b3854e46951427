"""Opening a store and recovering from damage.

Damage beyond LMDB's guarantees (a truncated file, flipped bytes: flash wear, not crashes) is detected at
open (a file shorter than its last page, databases claiming more pages than the file has, a walk of
every key) or later when a block is taken (its CRC). A damaged store is moved aside to
`<path>.damaged-<time>` and a fresh one started: counted in meta `recoveries`, its totals carried over.
Then its blocks are salvaged: a child process (`edge store salvage-read`, so that a page that crashes
LMDB crashes only the child) walks the moved-aside store and streams every block whose CRC holds; they
go back into the queue under their own keys (same sequence numbers: upstream de-duplicates as before),
oldest first, and the directory is renamed `<path>.salvaged-<time>`. What the child could not read stays
there for inspection.
The totals are also copied to `.<name>.totals` beside the store whenever they change, for a store whose
meta cannot be trusted.

LMDB cannot always survive arbitrary page damage without crashing the process (SIGBUS, SIGSEGV), so a
marker file `.<name>.opening` beside the store counts starts not followed by a clean close: after such a
start every page is read once at open (a bad page crashes there, not at random later), and after
CRASHED_OPENS in a row the store is moved aside instead of crashing again. The appliance never refuses
to start because of its store.

Every function here runs with the store's locks held (edge.store.queue): nothing else uses the
environment meanwhile.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import struct
import subprocess
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import lmdb

from edge.store.block import StoreDamaged, block_header, block_intact
from edge.store.layout import (
    FIRST_KEY,
    KEY,
    MAX_VALUE,
    NAMED,
    U64,
    Block,
    open_env,
    pages_used,
    parse_key,
    queue_items,
)

log = logging.getLogger("edge.store")

MARKER = ".opening"
CRASHED_OPENS = 3  # unclean starts in a row (each reading the store through) before it is moved aside
PERSISTED = ("blocks_rejected", "readings_rejected", "blocks_dropped", "readings_dropped", "recoveries",
             "rejected_trimmed", "blocks_salvaged", "readings_salvaged")  # kept in meta and the totals file
FRAME = struct.Struct(">II")  # salvage stream: key length, value length, then key and value
SALVAGE_TIMEOUT = 600.0  # seconds a salvage child may take


@dataclass
class Opened:
    """An open environment and what a walk of it found."""

    env: lmdb.Environment
    blocks: Any  # the queue: LMDB's main database
    rejected: Any
    meta: Any
    next_seq: int
    backlog_blocks: int
    backlog_readings: int
    totals: dict[str, int]
    oldest_ts: int | None
    corrupt: list[Block] = field(default_factory=list)  # blocks failing their CRC (a full read only)
    lease: int = 0  # next_seq as persisted in meta


class Files:
    """The files beside a store: its unclean-start marker and the copy of its totals."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.marker = path.parent / f".{path.name}{MARKER}"
        self.totals = path.parent / f".{path.name}.totals"

    def unclean_starts(self) -> int:
        try:
            return int(self.marker.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def read_totals(self) -> dict[str, int]:
        try:
            data = json.loads(self.totals.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: int(v) for k, v in data.items() if k in PERSISTED and isinstance(v, int)}

    def save_totals(self, totals: dict[str, int]) -> str | None:
        """Write the totals (atomically); the error text if that failed."""
        tmp = self.totals.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(totals))
            tmp.replace(self.totals)
        except OSError as e:
            return f"cannot write {self.totals}: {e}"
        return None


def open_checked(path: Path, map_size: int, appliance_id: str, full: bool) -> Opened:
    """Open the environment and check it (raises StoreDamaged, lmdb.Error, OSError, struct.error)."""
    fresh = not (path / "data.mdb").exists()
    env = open_env(path, map_size)
    try:
        _check_size(path, env)  # before any page beyond the meta pages is touched (SIGBUS)
        blocks = env.open_db()  # the main database: no catalog page to rewrite per commit
        rejected = env.open_db(b"rejected")
        meta = env.open_db(b"meta")
        opened = Opened(env, blocks, rejected, meta, 0, 0, 0, {}, None)
        _check_file(opened)
        _load(opened, appliance_id, fresh)
        if full:
            _verify_values(opened)
    except BaseException:
        env.close()
        raise
    return opened


def _check_size(path: Path, env: lmdb.Environment) -> None:
    """The file holds every page the meta page claims."""
    size = (path / "data.mdb").stat().st_size
    pages = env.info()["last_pgno"] + 1
    if size < pages * env.stat()["psize"]:
        raise StoreDamaged(f"data.mdb is {size} bytes, shorter than its {pages} pages")


def _check_file(o: Opened) -> None:
    """The databases fit in the pages of the file."""
    pages = o.env.info()["last_pgno"] + 1
    with o.env.begin() as txn:
        used = pages_used(txn, (o.blocks, o.rejected, o.meta))
    if used > pages:
        raise StoreDamaged(f"its databases claim {used} pages of the {pages} in the file")


def _load(o: Opened, appliance_id: str, fresh: bool) -> None:
    """Walk every key (leaf pages only): the backlog, the next sequence number, the persisted totals."""
    with o.env.begin(write=fresh) as txn:
        if fresh:
            txn.put(b"next_seq", U64.pack(time.time_ns() // 1000), db=o.meta)
            txn.put(b"appliance", appliance_id.encode(), db=o.meta)
        meta = {bytes(k): bytes(v) for k, v in txn.cursor(db=o.meta)}
        if b"next_seq" not in meta:  # every store this code made has it: this file is not one
            raise StoreDamaged("its meta database lost the sequence number (an emptied data.mdb?)")
        last = -1
        for key in txn.cursor(db=o.blocks).iternext(keys=True, values=False):
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
            o.backlog_blocks += 1
            o.backlog_readings += n
        rejected_last = txn.cursor(db=o.rejected)
        if rejected_last.last():
            last = max(last, parse_key(rejected_last.key())[0])
        o.oldest_ts = oldest_ts(txn, o.blocks)
    o.lease = U64.unpack(meta[b"next_seq"])[0]
    o.next_seq = max(o.lease, last + 1)
    o.totals = {name: U64.unpack(meta.get(name.encode(), bytes(8)))[0] for name in PERSISTED}


def reserve(file: Path, size: int) -> str | None:
    """Allocate `file`'s blocks up to `size` bytes without writing them (fallocate(2), mode 0): LMDB then
    writes inside blocks that are already the store's, so a file system filled by something else cannot
    fail a commit, and no page of the map is ever a hole (on tmpfs, a read fault on a hole of a full file
    system is SIGBUS). Returns None, or why it could not (the store then runs without)."""
    if _fallocate is None:
        return "fallocate is not available"
    try:
        fd = os.open(file, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return e.strerror
    try:
        missing = size - os.fstat(fd).st_blocks * 512
        if missing <= 0:
            return None
        fs = os.fstatvfs(fd)
        spare = fs.f_bavail * fs.f_frsize - fs.f_blocks * fs.f_frsize // 20
        if missing > spare:  # 5 % stay free: a failed fallocate may keep what it got, filling the disk
            return f"{missing >> 20} MiB more needed, {max(0, spare) >> 20} MiB to spare on its file system"
        if _fallocate(fd, 0, 0, size) != 0:
            return os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    return None


def _load_fallocate() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def asides(path: Path) -> list[Path]:
    """Moved-aside stores of `path` not salvaged yet, oldest first."""
    return sorted(p for p in path.parent.glob(f"{path.name}.damaged-*") if p.is_dir())


def salvage_read(aside: Path, out: BinaryIO) -> int:
    """Stream the intact blocks of a moved-aside store to `out` (FRAME, key, value each): the child's
    side. Returns the number of blocks written; LMDB may kill this process on a bad page first."""
    size = max(1 << 20, (aside / "data.mdb").stat().st_size)
    env = open_env(aside, map_size=-(-size // 4096) * 4096, readonly=True)
    written = 0
    try:
        with env.begin(buffers=True) as txn:
            for key, value in queue_items(txn):
                if len(key) == KEY.size and block_intact(bytes(value)):
                    out.write(FRAME.pack(len(key), len(value)) + bytes(key) + bytes(value))
                    out.flush()
                    written += 1
    finally:
        env.close()
    return written


def salvage_stream(aside: Path) -> Generator[tuple[bytes, bytes], None, None]:
    """The (key, value) of the intact blocks of a moved-aside store, read by a child process. A child
    that dies on a damaged page ends the stream where it died."""
    frozen = getattr(sys, "frozen", False)
    argv = [sys.executable, *(() if frozen else ("-m", "edge")), "store", "salvage-read", str(aside)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    deadline = time.monotonic() + SALVAGE_TIMEOUT
    try:
        while time.monotonic() < deadline:
            head = proc.stdout.read(FRAME.size)
            if len(head) < FRAME.size:
                break
            k, v = FRAME.unpack(head)
            if k != KEY.size or v > MAX_VALUE:
                break  # not our stream: stop reading it
            data = proc.stdout.read(k + v)
            if len(data) < k + v:
                break
            yield data[:k], data[k:]
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def mark_salvaged(aside: Path) -> Path:
    done = aside.with_name(aside.name.replace(".damaged-", ".salvaged-", 1))
    aside.rename(done)
    return done


def oldest_ts(txn: lmdb.Transaction, blocks: Any) -> int | None:
    """Timestamp (ns) of the oldest reading in the queue, or None when it is empty."""
    cursor = txn.cursor(db=blocks)
    if not cursor.set_range(FIRST_KEY):
        return None
    return block_header(cursor.value())[2]


def _verify_values(o: Opened) -> None:
    """Read every stored value once; blocks failing their checksum are moved aside at the next commit."""
    with o.env.begin(buffers=True) as txn:
        for key, value in queue_items(txn):
            seq, n = parse_key(key)
            if not block_intact(bytes(value)):
                o.corrupt.append(Block(seq, n, bytes(value)))
        for _ in txn.cursor(db=o.rejected):
            pass


def move_aside(path: Path, files: Files, reason: str, *, appliance_id: str, map_size: int,
               totals: dict[str, int], next_seq: int) -> dict[str, int]:
    """Move a damaged store aside and create an empty one carrying the totals (the larger of `totals` and
    the totals file: the damaged meta is not trusted) plus one recovery, and a sequence number above
    every one used. Returns the totals carried over."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    log.error("store %s is damaged (%s): moved to %s, starting a fresh store; readings in it were not "
              "forwarded and stay there for inspection", path, reason, aside)
    if path.exists():
        path.rename(aside)
    saved = files.read_totals()
    carried = {name: max(totals.get(name, 0), saved.get(name, 0)) for name in PERSISTED}
    carried["recoveries"] += 1
    create(path, files, appliance_id=appliance_id, map_size=map_size, totals=carried, next_seq=next_seq)
    return carried


def create(path: Path, files: Files, *, appliance_id: str, map_size: int, totals: dict[str, int],
           next_seq: int) -> None:
    """An empty store at `path` carrying `totals`, its sequence numbers above `next_seq` and every one a
    store of this appliance used before (they start at the time in microseconds)."""
    if problem := files.save_totals(totals):
        log.warning("store: %s", problem)
    path.mkdir(parents=True, exist_ok=True)
    env = open_env(path, map_size)
    try:
        with env.begin(write=True) as txn:
            meta = env.open_db(b"meta", txn=txn)
            txn.put(b"next_seq", U64.pack(max(time.time_ns() // 1000, next_seq)), db=meta)
            txn.put(b"appliance", appliance_id.encode(), db=meta)
            for name, value in totals.items():
                txn.put(name.encode(), U64.pack(value), db=meta)
    finally:
        env.close()
