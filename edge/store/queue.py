"""The store-and-forward queue: readings in, blocks out, deleted only after the broker acknowledged them.

Readings are buffered in RAM for one commit window (the policy's commit interval: [store]
commit_interval, default 1 s, low_power_commit_interval in low-power mode; or until commit_bytes of raw
readings are waiting), then packed into blocks (edge.store.block) and appended in ONE write transaction
(edge.store.layout): never one transaction per reading. The forwarder takes the oldest blocks; they
leave the store only when the uplink accepted them (at-least-once). Acknowledged blocks are deleted
inside the next append transaction (one flush instead of two).

Memory-first ([store] ack_wait, while the uplink is connected): the window is first staged (stage()):
packed into blocks with their sequence numbers, kept in RAM and handed out by take() after the stored
ones. The commit that follows ack_wait later (or as soon as every staged block is acknowledged) writes
only the staged blocks still unacknowledged; one the broker acknowledged never reaches the flash. So a
power cut loses at most the open window and the staged blocks not yet acknowledged: commit_interval +
ack_wait of readings (2 s by default), against commit_interval writing first. Sequence numbers are never
handed out twice: before a staged block goes out, meta's next_seq is persisted above it (a lease of
LEASE numbers, one small transaction per LEASE blocks); a restart after a crash starts above the lease
(the unused rest is a gap in seq, nothing lost); a clean close hands the rest back. Offline, or with
ack_wait = 0, every window is written before it is sent, as above.

Threads. The store owns its state; one lock, `_lock`, guards all of it that lives in RAM (the open
window, blocks in flight, acknowledged and refused blocks waiting for the next commit, counters, the
environment handle) and is held only for short steps: add(), take() (a read transaction),
accept/reject/keep, snapshot(), and the two ends of a commit. A commit is three steps:

    seal     (_lock)       the open window is swapped for an empty one and sealed (edge.store.block.Batch,
                           bytes), with the staged blocks not acknowledged and the acknowledged and
                           refused blocks: one immutable Sealed value
    write    (no lock)     the write transaction, from the Sealed value alone, in a worker thread
                           (asyncio.to_thread from run()): returns an immutable Written value
    settle   (_lock)       the Written value is applied: counters, next sequence number, blocks in flight;
                           if the commit failed, the sealed readings go back in front of the window
                           and the staged blocks back to RAM

Commits run one at a time (_commit_lock, also held by recovery and close). The worker thread touches
only the Sealed value, the environment (LMDB allows one writer beside any number of readers) and what
belongs to the commit alone (the compressor, the block-size estimate, the map's address, the lease).
stage() runs under _commit_lock too: it packs outside _lock and hands the blocks over under it. The
environment is replaced (recovery) only with both locks held, so never under a running transaction.
Damage found by take() is noted and recovered from at the next commit.

Full store: before appending, if pages in use would pass high_watermark (80 %) of map_size, the oldest
blocks (not in flight, not being settled) are dropped, inside the same transaction, down to
low_watermark (70 %): counted exactly (blocks and readings, persisted in meta), logged once. Refused
blocks kept in `rejected` may use 10 % of the map; beyond that the oldest of them are dropped first
(counted in rejected_trimmed). If the file system refuses a commit (full, I/O error), the readings stay
in RAM (bounded: beyond max_buffer the oldest are dropped and counted) and the oldest 10 % of blocks are
dropped in a transaction of their own to make room.

Mapped pages: LMDB reads through a shared read-only map of the file, and the kernel maps the cached
pages around each page read (fault-around), among them those each commit has just written, so RSS would
grow with the backlog. After each commit the store drops its page-table entries of the map (madvise
MADV_DONTNEED): the pages stay in the page cache, unmapped; pages still in use fault back in.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lmdb
import zstandard

from edge.config import StoreConfig
from edge.policy import Policy, normal
from edge.reading import Reading
from edge.store.block import (
    EMPTY,
    ZSTD,
    Batch,
    StoreDamaged,
    StoreUnavailable,
    Window,
    block_header,
    block_intact,
    encode_block,
)
from edge.store.layout import (
    FIRST_KEY,
    MAX_VALUE,
    U64,
    Block,
    key_of,
    pages_of,
    pages_used,
    parse_key,
    queue_items,
)
from edge.store.recovery import (
    CRASHED_OPENS,
    PERSISTED,
    Files,
    Opened,
    asides,
    create,
    mark_salvaged,
    move_aside,
    oldest_ts,
    open_checked,
    reserve,
    salvage_stream,
)

log = logging.getLogger("edge.store")

READING_BYTES = 21  # u32 + u64 + f64 + u8: the raw size used for commit_bytes and ratios
REJECTED_SHARE = 0.1  # refused blocks kept for inspection may use this share of the map
SALVAGE_BATCH = 256  # salvaged blocks put back per transaction
LEASE = 1 << 16  # sequence numbers persisted ahead at once for staged blocks (memory-first)
RESERVE_RETRY = 600.0  # seconds between attempts to reserve the data file
DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, StoreDamaged, struct.error)
REFUSED = (lmdb.MapFullError, lmdb.DiskError, lmdb.Error, OSError)  # after DAMAGE: the file system said no


@dataclass
class Counters:
    readings_appended: int = 0
    blocks_committed: int = 0
    commits: int = 0
    commit_seconds: float = 0.0
    blocks_forwarded: int = 0
    readings_forwarded: int = 0
    blocks_rejected: int = 0  # persisted totals (recovery.PERSISTED) from here ...
    readings_rejected: int = 0
    blocks_dropped: int = 0
    readings_dropped: int = 0
    recoveries: int = 0
    rejected_trimmed: int = 0
    blocks_salvaged: int = 0  # from moved-aside stores, back in the queue
    readings_salvaged: int = 0  # ... to here
    blocks_direct: int = 0  # delivered from RAM, never written (memory-first)
    readings_direct: int = 0
    commit_failures: int = 0
    backlog_blocks: int = 0
    backlog_readings: int = 0


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """What observers (metrics, status, the governor's log) see of the store: a copy."""

    counters: Counters
    oldest_ts: int | None  # ns, the oldest stored reading
    commit_interval: float  # in force
    window_readings: int  # in RAM, not written: the open window and the staged blocks


@dataclass(frozen=True, slots=True)
class Sealed:
    """One commit's input, handed to the worker thread: nothing in it changes."""

    batch: Batch
    staged: tuple[Block, ...]  # staged blocks not acknowledged: written now (memory-first)
    acked: tuple[Block, ...]
    rejecting: tuple[tuple[Block, str], ...]
    unstored: frozenset[int]  # of `rejecting`, the staged blocks: never written to the queue
    protected: frozenset[int]  # in flight or being settled: never dropped by the watermark
    next_seq: int
    totals: tuple[tuple[str, int], ...]  # the persisted counters at sealing

    def __bool__(self) -> bool:
        return bool(self.batch or self.staged or self.acked or self.rejecting)


@dataclass(frozen=True, slots=True)
class Written:
    """One commit's outcome, handed back to the owner."""

    appended: tuple[int, ...] = ()  # readings in each appended block
    next_seq: int = 0
    moved_blocks: int = 0  # refused blocks moved to `rejected`
    moved_readings: int = 0
    gone: tuple[int, int] = (0, 0)  # (blocks, readings) acknowledged or refused that left the queue
    trimmed: int = 0  # refused blocks dropped to keep room
    dropped: tuple[int, ...] = ()  # sequence numbers of the blocks dropped (watermark or failure)
    dropped_readings: int = 0
    oldest_ts: int | None = None
    seconds: float = 0.0
    error: str | None = None  # the file system refused the commit: nothing of it was written
    damage: str | None = None  # the store is damaged: recover
    notes: tuple[str, ...] = field(default=())  # warnings for the owner to log once


class Store:
    """The queue (threading model: module docstring)."""

    def __init__(self, cfg: StoreConfig, appliance_id: str = "") -> None:
        self.cfg = cfg
        self.path = Path(cfg.path)
        self.appliance_id = appliance_id
        self.files = Files(self.path)
        self.counters = Counters()
        self.max_buffer = max(10_000, 20 * cfg.commit_bytes // READING_BYTES)
        self.beat = time.monotonic()  # the commit loop's heartbeat
        self.interval = cfg.commit_interval  # the commit interval in force
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        # under _lock
        self._window = Window()
        self._window_start = time.monotonic()
        self._asked = False  # commit_bytes reached: the commit loop was woken
        self._acked: list[Block] = []
        self._rejecting: list[tuple[Block, str]] = []
        self._staged: dict[int, Block] = {}  # sealed, in RAM, not written: memory-first (stage())
        self._unstored: set[int] = set()  # refused staged blocks (in _rejecting): not in the queue
        self._queue_empty = False  # a read found no stored block and none was stored since: take() reads
        # nothing (a read transaction writes this process's reader slot in lock.mdb, a page on the card)
        self._all_acked: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # set: none staged
        self._in_flight: set[int] = set()
        self._settling: frozenset[int] = frozenset()
        self._damage: str | None = None
        self._asides: list[Path] = []  # moved-aside stores whose blocks are to be salvaged
        self._oldest_ts: int | None = None
        self._logged: set[str] = set()
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        # the commit's own (_commit_lock)
        self._per_block = MAX_VALUE // 10  # readings per block estimate, adapted to the compression ratio
        self._compressor = zstandard.ZstdCompressor(level=1)
        self._mapped: tuple[lmdb.Environment, int, int] | None = None  # env, address, length of its map
        self._identity: tuple[int, int] | None = None  # (device, inode) of the data file opened
        self._reserve_at = 0.0  # when to try reserving the data file again (0: reserved, or not wanted)
        self._lease = 0  # the next_seq persisted in meta: sequence numbers below it may go out unwritten
        self.next_seq = 0
        self._open()

    # -- opening and recovery (edge.store.recovery) ------------------------------------------------

    def _open(self) -> None:
        """After an unclean stop every page is read once; after CRASHED_OPENS such starts in a row the
        store is moved aside. A directory that cannot be written is StoreUnavailable, never damage."""
        unclean = self._usable()
        if unclean >= CRASHED_OPENS:
            self._move_aside(f"the last {unclean} starts with it ended in a crash")
            unclean = 0
            self.files.marker.write_text("1")
        try:
            opened = open_checked(self.path, self.cfg.map_size, self.appliance_id, full=unclean > 0)
        except (lmdb.Error, StoreDamaged, OSError, struct.error) as e:
            self._move_aside(str(e))
            opened = open_checked(self.path, self.cfg.map_size, self.appliance_id, full=False)
        if unclean:
            self.files.marker.write_text("1")  # read through without a crash: only this start is pending
        self._use(opened)
        self._asides = asides(self.path)

    def _usable(self) -> int:
        """Create the directory and count this start in the marker (which proves the directory is
        writable); the unclean starts before this one."""
        try:
            for d in (self.path.parent, *self.path.parent.parents):
                if d.exists():
                    if not d.is_dir():
                        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(d))
                    break
            self.path.parent.mkdir(parents=True, exist_ok=True)
            unclean = self.files.unclean_starts()
            try:
                self.files.marker.write_text(str(unclean + 1))
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                log.warning("store: cannot write %s (%s): this start is not counted", self.files.marker,
                            e.strerror)  # a full file system is not a reason to stop
            data = self.path / "data.mdb"
            if data.exists() and not os.access(data, os.R_OK | os.W_OK):
                raise PermissionError(errno.EACCES, "not readable and writable by this user", str(data))
        except OSError as e:
            where = e.filename if e.filename and e.filename != str(self.files.marker) else self.path.parent
            raise StoreUnavailable(f"cannot use {where}: {e.strerror or e}") from e
        return unclean

    def _use(self, o: Opened) -> None:
        self.env, self.db_blocks, self.db_rejected, self.db_meta = o.env, o.blocks, o.rejected, o.meta
        self._identity = _identity(self.path / "data.mdb")
        self.next_seq = o.next_seq
        self._lease = o.lease
        c = self.counters
        c.backlog_blocks, c.backlog_readings = o.backlog_blocks, o.backlog_readings
        for name, value in o.totals.items():
            setattr(c, name, value)
        self._oldest_ts = o.oldest_ts
        self._queue_empty = False
        self._rejecting.extend((b, "corrupt: block checksum mismatch") for b in o.corrupt)
        self._reserve()

    def _reserve(self) -> None:
        """Reserve the data file (recovery.reserve); where that is not possible yet, try again at a
        commit RESERVE_RETRY seconds later (the file system may grow, or room return)."""
        if not self.cfg.reserve:
            return
        problem = reserve(self.path / "data.mdb", self.cfg.map_size)
        if problem is None:
            if self._reserve_at:
                log.info("store: %d MiB reserved for %s", self.cfg.map_size >> 20, self.path)
            self._reserve_at = 0.0
            return
        self._once("reserve", logging.WARNING, "store: cannot reserve %d MiB for %s (%s): running without "
                   "for now; a full file system would make commits fail until room returns",
                   self.cfg.map_size >> 20, self.path, problem)
        self._reserve_at = time.monotonic() + RESERVE_RETRY

    def _totals(self) -> dict[str, int]:
        return {name: getattr(self.counters, name) for name in PERSISTED}

    def _move_aside(self, reason: str) -> None:
        carried = move_aside(self.path, self.files, reason, appliance_id=self.appliance_id,
                             map_size=self.cfg.map_size, totals=self._totals(), next_seq=self.next_seq)
        for name, value in carried.items():
            setattr(self.counters, name, value)

    def _lost(self) -> str | None:
        """Why the file this environment has open is no longer the store at `path` (removed, replaced),
        else None. LMDB would go on writing into the unlinked file: whatever it holds is lost at exit."""
        now = _identity(self.path / "data.mdb")
        if now == self._identity:
            return None
        return "its data.mdb was removed" if now is None else "its data.mdb was replaced"

    def _reopen(self, reason: str) -> None:  # both locks held
        """The store was removed or replaced while open: its backlog is lost (counted as dropped); go on
        with what is at `path` now, or a fresh store carrying the totals."""
        c = self.counters
        found = (self.path / "data.mdb").exists()
        log.error("store %s: %s while edge ran: its %d readings in %d blocks are lost (counted in "
                  "readings_dropped); going on with %s", self.path, reason, c.backlog_readings,
                  c.backlog_blocks, "the store found there" if found else "a fresh store")
        c.blocks_dropped += c.backlog_blocks
        c.readings_dropped += c.backlog_readings
        c.backlog_blocks = c.backlog_readings = 0
        self._in_flight.clear()
        self._acked.clear()
        self._keep_unstored()
        self.env.close()
        self._usable()
        if not (self.path / "data.mdb").exists():
            create(self.path, self.files, appliance_id=self.appliance_id, map_size=self.cfg.map_size,
                   totals=self._totals(), next_seq=self.next_seq)
        totals, seq = self._totals(), self.next_seq
        try:
            opened = open_checked(self.path, self.cfg.map_size, self.appliance_id, full=True)
        except (lmdb.Error, StoreDamaged, OSError, struct.error) as e:
            self._move_aside(str(e))
            opened = open_checked(self.path, self.cfg.map_size, self.appliance_id, full=False)
        self._use(opened)
        for name, value in totals.items():  # the totals are the appliance's, not the file's
            setattr(c, name, max(value, getattr(c, name)))
        self.next_seq = max(seq, opened.next_seq)  # never a sequence number used before
        if self.next_seq > self._lease:  # numbers sent from RAM: persisted in the file found now
            self._extend_lease(self.next_seq + LEASE)
        if problem := self.files.save_totals(self._totals()):
            log.warning("store: %s", problem)

    def _keep_unstored(self) -> None:  # _lock held
        """The refusals still to settle, but those of staged blocks: no store holds those, so they go to
        the next one's `rejected`."""
        self._rejecting = [(b, r) for b, r in self._rejecting if b.seq in self._unstored]

    def recover(self, reason: str) -> None:
        """Damage found: move the store aside and continue with a fresh one. Its backlog is counted as
        dropped (it stays in the moved-aside store for inspection)."""
        with self._commit_lock, self._lock:
            self._recover(reason)

    def _recover(self, reason: str) -> None:  # both locks held
        c = self.counters
        c.blocks_dropped += c.backlog_blocks
        c.readings_dropped += c.backlog_readings
        c.backlog_blocks = c.backlog_readings = 0
        self._in_flight.clear()  # blocks taken before: accept/reject/keep of them are ignored
        self._acked.clear()
        self._keep_unstored()
        self._damage = None
        self.env.close()
        self._move_aside(reason)
        self._use(open_checked(self.path, self.cfg.map_size, self.appliance_id, full=False))
        self._asides = asides(self.path)

    # -- producer side -----------------------------------------------------------------------------

    def add(self, readings: list[Reading]) -> None:
        """Buffer readings for the open window. Never blocks on I/O and never fails; if commits keep
        failing the RAM buffer is bounded and its oldest readings are dropped (counted)."""
        with self._lock:
            window = self._window
            window.extend(readings)
            self.counters.readings_appended += len(readings)
            n = len(window)
            if n > self.max_buffer:
                window.drop_oldest(n - self.max_buffer)
                self.counters.readings_dropped += n - self.max_buffer
                n = self.max_buffer
                self._once("ram", logging.ERROR, "store: commits failing, RAM buffer full: dropping the "
                           "oldest readings (counted in readings_dropped)")
            ask = not self._asked and n * READING_BYTES >= self.cfg.commit_bytes
            self._asked |= ask
            wake = self._wake
        if ask and wake is not None:
            wake[0].call_soon_threadsafe(wake[1].set)

    # -- the commit --------------------------------------------------------------------------------

    async def run(self, policy: Callable[[], Policy] = normal,
                  committed: Callable[[], None] = lambda: None,
                  forwarding: Callable[[], bool] = lambda: False) -> None:
        """The commit loop: commit the open window when the policy's interval has passed since it opened,
        when commit_bytes are waiting, or when the policy asks for a commit now; the write in a worker
        thread, so a slow flash never stalls polling. `committed()` after each commit that appended
        blocks, and after each window staged. Beats at least once a second. Cancel to stop (then close()).

        Memory-first ([store] ack_wait > 0): while `forwarding()` (the uplink is connected), a window is
        first staged (stage()): the uplink sends its blocks from RAM; the commit that follows, once they
        are all acknowledged or ack_wait has passed, writes only those still unacknowledged. A commit the
        policy asks for (memory pressure) is never staged: its readings leave RAM at once."""
        wake = asyncio.Event()
        acked = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._wake = (loop, wake)
        self._all_acked = (loop, acked)
        asked = policy().commit_now
        try:
            while True:
                self.beat = time.monotonic()
                p = policy()
                self.interval = p.commit_interval or self.cfg.commit_interval
                remaining = self._window_start + self.interval - time.monotonic()
                if remaining > 0 and p.commit_now == asked and not wake.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(remaining, 1.0)):
                            await wake.wait()
                    continue
                forced, asked = p.commit_now != asked, p.commit_now
                wake.clear()
                staged = 0
                if self.cfg.ack_wait and not forced and forwarding():
                    acked.clear()
                    staged = await asyncio.to_thread(self.stage)
                    if staged:
                        committed()
                        await self._until_acked(acked, policy, asked)
                if await asyncio.to_thread(self.commit, window=not staged):
                    committed()
        finally:
            self._wake = None
            self._all_acked = None

    async def _until_acked(self, acked: asyncio.Event, policy: Callable[[], Policy], asked: int) -> None:
        """Until every staged block was acknowledged (or refused), ack_wait has passed, or the policy asks
        for a commit now (checked every second); beating."""
        end = time.monotonic() + self.cfg.ack_wait
        while (left := end - time.monotonic()) > 0 and policy().commit_now == asked:
            self.beat = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await acked.wait()
                    return

    def stage(self) -> int:
        """Memory-first: seal the open window into blocks kept in RAM, not written: take() hands them out
        after the stored ones; those acknowledged before the next commit never reach the flash, the
        others are written by it. Their sequence numbers are covered by the lease persisted in meta
        first (edge.store.layout), so a crash can never hand one out again. Returns the blocks staged
        (0: nothing to stage, or the lease could not be written: then the window stays open)."""
        with self._commit_lock:
            with self._lock:
                if self._damage is not None or not self._window:
                    return 0
                window, self._window = self._window, Window()
                self._window_start = time.monotonic()
                self._asked = False
                seq = self.next_seq
            batch = window.seal()
            blocks = self._pack(batch)
            top = seq + len(blocks)
            if top > self._lease and not self._extend_lease(top + LEASE):
                with self._lock:
                    self._window.prepend(batch)
                return 0
            with self._lock:
                for n, value in blocks:
                    self._staged[seq] = Block(seq, n, value)
                    seq += 1
                self.next_seq = seq
            return len(blocks)

    def _extend_lease(self, lease: int) -> bool:  # _commit_lock held
        """Persist next_seq = lease in meta (a transaction of its own, once in LEASE blocks)."""
        try:
            with self.env.begin(write=True) as txn:
                txn.put(b"next_seq", U64.pack(lease), db=self.db_meta)
        except (*DAMAGE, *REFUSED) as e:
            self._once("lease", logging.WARNING, "store: cannot persist the sequence lease (%s): windows are "
                       "written before they are sent", e)
            return False
        self._logged.discard("lease")
        self._lease = lease
        return True

    def commit(self, *, window: bool = True) -> int:
        """Commit the open window (unless `window` is false), the staged blocks not yet acknowledged, the
        deletes of acknowledged blocks and the moves of refused ones: one transaction, durable on return.
        Returns the number of blocks appended (0 also when it failed: then everything stays pending).
        Callable from any thread; commits run one at a time."""
        with self._commit_lock:
            with self._lock:
                if self._damage is not None:
                    self._recover(self._damage)
                elif (lost := self._lost()) is not None:
                    self._reopen(lost)
                aside = self._asides.pop(0) if self._asides else None
            if aside is not None:
                self._salvage(aside)
            if self._reserve_at and time.monotonic() >= self._reserve_at:
                self._reserve()
            with self._lock:
                sealed = self._seal(window)
            if not sealed:
                return 0
            written = self._write(sealed)
            with self._lock:
                return self._settle(sealed, written)

    def _salvage(self, aside: Path) -> None:  # _commit_lock held
        """Put the intact blocks of a moved-aside store back in the queue, under their own keys (module
        docstring of edge.store.recovery), in transactions of SALVAGE_BATCH blocks; stop where the map
        would pass its high watermark."""
        blocks = readings = 0
        full = False
        batch: list[tuple[bytes, bytes]] = []
        stream = salvage_stream(aside)
        try:
            for item in stream:
                batch.append(item)
                if len(batch) >= SALVAGE_BATCH:
                    added, full = self._put_salvaged(batch)
                    blocks, readings, batch = blocks + added[0], readings + added[1], []
                    if full:
                        break
            if batch and not full:
                added, full = self._put_salvaged(batch)
                blocks, readings = blocks + added[0], readings + added[1]
        except REFUSED as e:
            log.error("store: salvaging %s stopped: %s", aside, e)  # noqa: TRY400 (one line, no traceback)
        finally:
            stream.close()
        with self._lock, self.env.begin(buffers=True) as txn:
            self._oldest_ts = oldest_ts(txn, self.db_blocks)
        try:
            done = mark_salvaged(aside)
        except OSError as e:
            log.error("store: cannot rename %s after salvaging it (%s): it will be salvaged again",  # noqa: TRY400
                      aside, e)
            done = aside
        log.warning("store: %d readings in %d blocks salvaged from %s%s; they are sent first (kept: %s)",
                    readings, blocks, aside, ", stopped at the high watermark" if full else "", done)

    def _put_salvaged(self, batch: list[tuple[bytes, bytes]]) -> tuple[tuple[int, int], bool]:
        """Insert salvaged blocks not in the queue already; ((blocks, readings) added, map full)."""
        added = readings = 0
        with self.env.begin(write=True) as txn:
            used = pages_used(txn, (self.db_blocks, self.db_rejected, self.db_meta))
            if used > self.cfg.high_watermark * self.cfg.map_size // 4096:
                return (0, 0), True
            for key, value in batch:
                if txn.put(key, value, db=self.db_blocks, overwrite=False):
                    added += 1
                    readings += parse_key(key)[1]
        with self._lock:
            c = self.counters
            c.backlog_blocks += added
            c.backlog_readings += readings
            c.blocks_salvaged += added
            c.readings_salvaged += readings
            self._queue_empty &= not added
        return (added, readings), False

    def _seal(self, with_window: bool) -> Sealed:  # _lock held
        batch = EMPTY
        if with_window:
            window, self._window = self._window, Window()
            self._window_start = time.monotonic()
            self._asked = False
            batch = window.seal() if window else EMPTY
        staged, self._staged = tuple(self._staged.values()), {}
        acked, self._acked = tuple(self._acked), []
        rejecting, self._rejecting = tuple(self._rejecting), []
        unstored, self._unstored = frozenset(self._unstored), set()
        self._settling = frozenset(b.seq for b in acked) | frozenset(b.seq for b, _ in rejecting)
        return Sealed(batch, staged, acked, rejecting, unstored, frozenset(self._in_flight) | self._settling,
                      self.next_seq, tuple(self._totals().items()))

    def _unseal(self, s: Sealed) -> None:  # both locks held
        """A commit that wrote nothing: its readings and staged blocks back in RAM (a staged block
        acknowledged or refused meanwhile is settled as such), its deletes and moves pending again."""
        self._window.prepend(s.batch)
        acked = {b.seq for b in self._acked}
        refused = {b.seq for b, _ in self._rejecting}
        c = self.counters
        for b in s.staged:
            if b.seq in acked:  # acknowledged while it was being written: it never was
                self._acked = [a for a in self._acked if a.seq != b.seq]
                c.blocks_direct += 1
                c.readings_direct += b.n
            elif b.seq in refused:
                self._unstored.add(b.seq)
            else:
                self._staged[b.seq] = b  # in order: nothing was staged meanwhile (_commit_lock)
        self._acked[:0] = s.acked
        self._rejecting[:0] = s.rejecting
        self._unstored |= s.unstored
        self._trim_staged()

    def _trim_staged(self) -> None:  # _lock held
        """RAM stays bounded while commits fail: beyond max_buffer, the oldest staged blocks not in
        flight are dropped (counted)."""
        c = self.counters
        held = self._staged_readings() + len(self._window)
        for seq in list(self._staged):
            if held <= self.max_buffer:
                break
            if seq in self._in_flight:
                continue
            b = self._staged.pop(seq)
            held -= b.n
            c.blocks_dropped += 1
            c.readings_dropped += b.n
            self._once("ram", logging.ERROR, "store: commits failing, RAM buffer full: dropping the "
                       "oldest readings (counted in readings_dropped)")

    def _settle(self, s: Sealed, w: Written) -> int:  # both locks held
        self._settling = frozenset()
        for note in w.notes:
            self._once(note.split(":", 1)[0], logging.WARNING, "store: %s", note)
        c = self.counters
        self._count_drops(w)
        if w.damage is not None:
            self._unseal(s)  # the window's readings and the staged blocks go to the fresh store
            self._recover(w.damage)
            return 0
        if w.error is not None:
            self._unseal(s)
            c.commit_failures += 1
            self._once("commit", logging.ERROR, "store: commit failed (%s): readings kept in RAM, dropping "
                       "the oldest blocks to make room", w.error)
            return 0
        self._logged.discard("commit")
        c.commits += 1
        c.commit_seconds += w.seconds
        c.blocks_committed += len(w.appended)
        c.blocks_rejected += w.moved_blocks
        c.readings_rejected += w.moved_readings
        c.rejected_trimmed += w.trimmed
        # a block dropped at the watermark before its delete or move is counted in w.dropped, not here
        c.backlog_blocks += len(w.appended) - w.gone[0]
        c.backlog_readings += sum(w.appended) - w.gone[1]
        if w.appended:
            self._queue_empty = False
        self.next_seq = w.next_seq
        self._oldest_ts = w.oldest_ts
        if w.trimmed:
            self._once("trim", logging.WARNING, "store: rejected blocks fill the store: dropping the "
                       "oldest of them (counted in rejected_trimmed)")
        if w.dropped:
            self._once("full", logging.WARNING, "store: full (%.0f %% of map_size): dropping the oldest "
                       "blocks (counted in blocks_dropped / readings_dropped)", 100 * self.cfg.high_watermark)
        else:
            self._logged.discard("full")
        return len(w.appended)

    def _count_drops(self, w: Written) -> None:
        c = self.counters
        c.blocks_dropped += len(w.dropped)
        c.readings_dropped += w.dropped_readings
        c.backlog_blocks -= len(w.dropped)
        c.backlog_readings -= w.dropped_readings
        for seq in w.dropped:  # taken after sealing: its accept/reject/keep is ignored (counted dropped)
            self._in_flight.discard(seq)

    # -- the worker thread's part: Sealed in, Written out --------------------------------------------

    def _write(self, s: Sealed) -> Written:
        blocks = [(b.seq, b.n, b.value) for b in s.staged]
        blocks += [(seq, n, value) for seq, (n, value) in enumerate(self._pack(s.batch), s.next_seq)]
        try:
            w = self._transaction(s, blocks, time.perf_counter())
        except DAMAGE as e:
            return Written(damage=f"found while committing: {e}")
        except REFUSED as e:
            dropped, readings, notes = self._drop_fraction(s, 0.1)
            return Written(error=str(e), dropped=dropped, dropped_readings=readings, notes=notes)
        self._unmap()
        return w

    def _pack(self, batch: Batch) -> list[tuple[int, bytes]]:
        """Split readings into blocks whose values fit MAX_VALUE: [(n, value)]. Equal shares, not full
        blocks plus a small tail: a tail under ~2 KB would be stored inside the B-tree leaf and make it
        split and grow."""
        out = []
        i, n = 0, len(batch)
        share = -(-n // -(-n // self._per_block)) if n else 0
        while i < n:
            k = min(share, n - i)
            while True:
                value = encode_block(batch.slice(i, i + k), ZSTD, self._compressor)
                if len(value) <= MAX_VALUE or k == 1:
                    break
                k = max(1, k * MAX_VALUE * 9 // (len(value) * 10))
            out.append((k, value))
            i += k
            if k >= self._per_block * 0.9 or len(value) > MAX_VALUE * 0.9:  # full blocks teach the ratio
                self._per_block = max(1, min(10_000, int(k * MAX_VALUE * 0.92 / len(value))))
        return out

    def _transaction(self, s: Sealed, blocks: list[tuple[int, int, bytes]], t0: float) -> Written:
        totals = dict(s.totals)
        meta: dict[bytes, int] = {}
        with self.env.begin(write=True) as txn:
            gone = [b for b in s.acked if txn.delete(b.key, db=self.db_blocks)]
            moved = [b for b, reason in s.rejecting
                     if self._move_rejected(txn, b, reason, stored=b.seq not in s.unstored)]
            gone += [b for b in moved if b.seq not in s.unstored]
            if moved:
                meta[b"blocks_rejected"] = totals["blocks_rejected"] + len(moved)
                meta[b"readings_rejected"] = totals["readings_rejected"] + sum(b.n for b in moved)
            new_pages = sum(pages_of(v) for _, _, v in blocks)
            trimmed, dropped, readings = self._watermark(txn, new_pages, s.protected)
            if trimmed:
                meta[b"rejected_trimmed"] = totals["rejected_trimmed"] + trimmed
            if dropped:
                meta[b"blocks_dropped"] = totals["blocks_dropped"] + len(dropped)
                meta[b"readings_dropped"] = totals["readings_dropped"] + readings
            for seq, n, value in blocks:
                if not txn.put(key_of(seq, n), value, db=self.db_blocks, append=True):
                    raise StoreDamaged(f"block {seq} does not sort after the newest stored block")
            seq = s.next_seq + len(blocks) - len(s.staged)
            if (s.acked or s.rejecting or dropped) and seq > self._lease:
                last = txn.cursor(db=self.db_blocks)
                if not last.last() or last.key() < FIRST_KEY or parse_key(last.key())[0] + 1 < seq:
                    meta[b"next_seq"] = seq  # the newest block is gone: its key no longer tells it
            for k, v in meta.items():
                txn.put(k, U64.pack(v), db=self.db_meta)
            oldest = oldest_ts(txn, self.db_blocks)
        if b"next_seq" in meta:
            self._lease = seq
        seconds = time.perf_counter() - t0
        notes: tuple[str, ...] = ()
        if len(meta) > (b"next_seq" in meta):
            totals.update({k.decode(): v for k, v in meta.items() if k != b"next_seq"})
            problem = self.files.save_totals(totals)
            notes = (f"totals: {problem}",) if problem else ()
        return Written(tuple(n for _, n, _ in blocks), seq, len(moved), sum(b.n for b in moved),
                       (len(gone), sum(b.n for b in gone)), trimmed, dropped, readings, oldest, seconds,
                       notes=notes)

    def _move_rejected(self, txn: lmdb.Transaction, block: Block, reason: str, *, stored: bool) -> bool:
        if not txn.delete(block.key, db=self.db_blocks) and stored:
            return False
        raw = reason.encode()[:1000]
        txn.put(block.key, struct.pack("<H", len(raw)) + raw + block.value, db=self.db_rejected)
        return True

    def _watermark(self, txn: lmdb.Transaction, new_pages: int,
                   protected: frozenset[int]) -> tuple[int, tuple[int, ...], int]:
        """Drop the oldest blocks (not protected) while pages in use exceed the watermark.
        Returns (refused blocks trimmed, sequence numbers dropped, readings dropped)."""
        total = self.cfg.map_size // 4096
        used = pages_used(txn, (self.db_blocks, self.db_rejected, self.db_meta))
        used += new_pages + new_pages // 50 + 2
        if used <= self.cfg.high_watermark * total:
            return 0, (), 0
        excess = used - int(self.cfg.low_watermark * total)
        trimmed = 0
        rejected = txn.stat(self.db_rejected)
        rejected_pages = rejected["leaf_pages"] + rejected["overflow_pages"] + rejected["branch_pages"]
        if rejected_pages > total * REJECTED_SHARE:  # refused blocks are kept for inspection, not forever
            seqs, _ = self._drop_oldest(txn, min(excess, rejected_pages - int(total * REJECTED_SHARE)),
                                        frozenset(), self.db_rejected)
            trimmed = len(seqs)
            excess -= trimmed
        if excess <= 0:
            return trimmed, (), 0
        return (trimmed, *self._drop_oldest(txn, excess, protected))

    def _drop_oldest(self, txn: lmdb.Transaction, pages: int, protected: frozenset[int],
                     db: Any = None) -> tuple[tuple[int, ...], int]:
        """Delete the oldest blocks of `db` (default: the queue) not in `protected` until about `pages`
        pages are freed or none is left. Returns (sequence numbers, readings) deleted."""
        seqs: list[int] = []
        readings = 0
        cursor = txn.cursor(db=self.db_blocks if db is None else db)
        ok = cursor.set_range(FIRST_KEY)
        while ok and pages > 0:
            seq, n = parse_key(cursor.key())
            if seq in protected:
                ok = cursor.next()
                continue
            pages -= pages_of(cursor.value())
            seqs.append(seq)
            readings += n
            ok = cursor.delete() and bool(cursor.key())  # past the last key the cursor is unset
        return tuple(seqs), readings

    def _drop_fraction(self, s: Sealed, fraction: float) -> tuple[tuple[int, ...], int, tuple[str, ...]]:
        """After a refused commit: drop the oldest blocks in a transaction of their own."""
        totals = dict(s.totals)
        try:
            with self.env.begin(write=True) as txn:
                entries = txn.stat(self.db_blocks)["entries"]
                seqs, readings = self._drop_oldest(txn, max(1, int(entries * fraction)), s.protected)
                txn.put(b"blocks_dropped", U64.pack(totals["blocks_dropped"] + len(seqs)), db=self.db_meta)
                txn.put(b"readings_dropped", U64.pack(totals["readings_dropped"] + readings), db=self.db_meta)
        except REFUSED as e:
            return (), 0, (f"drop: cannot even drop blocks ({e})",)
        return seqs, readings, ()

    def _unmap(self) -> None:
        """Drop this process's page-table entries of the map (module docstring, "Mapped pages")."""
        if self._mapped is None or self._mapped[0] is not self.env:
            self._mapped = (self.env, *_map_of(self.path / "data.mdb"))
        _, address, length = self._mapped
        if length and _libc is not None:
            _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), mmap.MADV_DONTNEED)

    # -- forwarder side ----------------------------------------------------------------------------

    def take(self, limit: int) -> list[Block]:
        """The oldest blocks not yet in flight (at most `limit`), marked in flight: the stored ones, then
        the staged ones. A block that fails its checksum is moved aside (rejected, reason "corrupt")
        instead of being returned."""
        out: list[Block] = []
        with self._lock:
            if self._damage is not None:
                return out
            skip = (self._in_flight | self._settling | {b.seq for b in self._acked}
                    | {b.seq for b, _ in self._rejecting})
            try:
                if not self._queue_empty:
                    seen = 0
                    with self.env.begin(db=self.db_blocks, buffers=True) as txn:
                        for key, value in queue_items(txn):
                            seen += 1
                            seq, n = parse_key(key)
                            if seq in skip:
                                continue
                            block = self._checked(Block(seq, n, bytes(value)), key)
                            if block is not None:
                                out.append(block)
                                if len(out) >= limit:
                                    break
                    self._queue_empty = not seen
            except DAMAGE as e:
                self._damage = str(e)  # recovered from at the next commit, when no write is running
                return []
            for seq, block in self._staged.items():
                if len(out) >= limit:
                    break
                if seq not in skip:
                    out.append(block)
            self._in_flight.update(b.seq for b in out)
        return out

    def _checked(self, block: Block, key: Any) -> Block | None:  # _lock held
        if not block_intact(block.value):
            self._rejecting.append((block, "corrupt: block checksum mismatch"))
            return None
        count = block_header(block.value)[1]
        if count != block.n:  # the key was damaged, the (checksummed) block was not: trust it
            self._once("key", logging.WARNING, "store: block %d: its key says %d readings, its checksummed "
                       "header %d: using the header", block.seq, block.n, count)
            self.counters.backlog_readings += count - block.n
            return Block(block.seq, count, block.value, bytes(key))
        return block

    def accept(self, blocks: Sequence[Block]) -> None:
        """Delivered: deleted in the next commit (a crash before it re-sends them: at-least-once)."""
        with self._lock:
            c = self.counters
            for b in blocks:
                if b.seq in self._in_flight:  # not from before a recovery, not dropped meanwhile
                    self._in_flight.discard(b.seq)
                    c.blocks_forwarded += 1
                    c.readings_forwarded += b.n
                    if self._staged.pop(b.seq, None) is None:
                        self._acked.append(b)
                    else:  # memory-first: it never reaches the flash
                        c.blocks_direct += 1
                        c.readings_direct += b.n
                        self._staged_settled()

    def reject(self, blocks: Sequence[Block], reason: str) -> None:
        """Refused by the receiver: moved to `rejected` in the next commit, kept for inspection."""
        with self._lock:
            for b in blocks:
                if b.seq in self._in_flight:
                    self._in_flight.discard(b.seq)
                    self._rejecting.append((b, reason))
                    if self._staged.pop(b.seq, None) is not None:
                        self._unstored.add(b.seq)
                        self._staged_settled()

    def _staged_readings(self) -> int:  # _lock held
        return sum(b.n for b in self._staged.values())

    def _staged_settled(self) -> None:  # _lock held
        """A staged block left: wake the commit loop waiting for their acknowledgements if none is left."""
        if not self._staged and self._all_acked is not None:
            loop, event = self._all_acked
            loop.call_soon_threadsafe(event.set)

    def keep(self, blocks: Sequence[Block]) -> None:
        """Not delivered (connection lost): back in the queue, taken again later, oldest first."""
        with self._lock:
            for b in blocks:
                self._in_flight.discard(b.seq)

    # -- observers and the end ---------------------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        with self._lock:
            return StoreSnapshot(replace(self.counters), self._oldest_ts, self.interval,
                                 len(self._window) + self._staged_readings())

    def pending(self) -> int:
        """Readings in the open window (RAM)."""
        with self._lock:
            return len(self._window)

    def close(self) -> None:
        """Commit the open window and close; a clean close clears the unclean-start marker."""
        self.commit()
        with self._commit_lock, self._lock:
            lost = len(self._window) + self._staged_readings() + sum(b.n for b, _ in self._rejecting
                                                            if b.seq in self._unstored)
            if lost:
                self.counters.readings_dropped += lost
                log.error("store: %d readings could not be committed at stop and are lost", lost)
            elif self._lease > self.next_seq:  # hand the lease back: the next start goes on without a gap
                with contextlib.suppress(*DAMAGE, *REFUSED), self.env.begin(write=True) as txn:
                    txn.put(b"next_seq", U64.pack(self.next_seq), db=self.db_meta)
            self.env.close()
            self.files.marker.unlink(missing_ok=True)

    def _once(self, kind: str, level: int, message: str, *args: object) -> None:
        log.log(level if kind not in self._logged else logging.DEBUG, message, *args)
        self._logged.add(kind)


def _identity(file: Path) -> tuple[int, int] | None:
    """(device, inode) of a file, None if it is not there."""
    try:
        st = os.stat(file)
    except OSError:
        return None
    return st.st_dev, st.st_ino


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
