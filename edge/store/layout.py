"""The store on disk: one LMDB environment (the directory `[store] path`, default /var/lib/edge/store:
data.mdb, lock.mdb), its keys and the flags it is opened with.

    main      the queue. key 12 B: (sequence | 2**63) u64 big-endian | readings in the block u32 big-endian
              value: one block (edge.store.block), at most MAX_VALUE = 16,368 B (four 4 KiB overflow
              pages). The same tree holds LMDB's records of the two named databases, b"meta" and
              b"rejected": their keys are ASCII, so they sort before every block key (top bit set) and
              appends stay appends.
    rejected  the same keys; value = reason length u16 LE | reason UTF-8 | the original block
    meta      b"next_seq" u64 LE, b"blocks_dropped", b"readings_dropped", b"blocks_rejected",
              b"readings_rejected", b"recoveries", b"rejected_trimmed" u64 LE, b"appliance" UTF-8

Keys sort by sequence, so put(append=True) always appends to the right edge of the B-tree; the reading
count in the key gives the backlog from the keys alone (no value is read at start-up).

Worked example: block 5 of 1,000 readings has the key 80 00 00 00 00 00 00 05 | 00 00 03 e8.

Sequence numbers never repeat for one appliance: a new store starts at its creation time in
microseconds (~1.7e15, far below 2**63) and counts up by one per block, so upstream de-duplicates on
(appliance id, sequence) even after the store was replaced. At open, next_seq is the larger of meta's
b"next_seq" and the last key + 1. meta's is written when the last key cannot tell it (the newest block
was delivered or the queue drained, or a store is created) and, memory-first, as a lease ahead of the
blocks sent from RAM and never written (edge.store.queue): a crash then skips the rest of the lease.

Flags and their flash cost (figures: docs/performance.md, scripts/bench-store): sync=True and
metasync=True, so every commit is durable when it returns and the loss window on a power cut is the
open commit window, which lives only in RAM; writemap=False and readahead=False. A commit writes 3 fixed
pages (the queue's leaf, the free list, the meta page) plus the blocks' overflow pages. That is why the
queue lives in the main database (a named one would rewrite the catalog page at every commit) and why a
window is one block of up to four pages (many small blocks waste page tails, and values under ~2 KB
stored inside the leaf make the tree split and deepen). sync=False or map_async save nothing measurable
and corrupted the database under simulated power cuts: never.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from edge.reading import Reading
from edge.store.block import decode_block

KEY = struct.Struct(">QI")
KEY_BIAS = 1 << 63  # set in every stored key: block keys sort after the records of the named databases
NAMED = (b"meta", b"rejected")
U64 = struct.Struct("<Q")
PAGE = 4096
MAX_VALUE = 4 * PAGE - 16  # at most four overflow pages (16-byte page header)


def key_of(seq: int, n: int) -> bytes:
    """
    >>> key_of(5, 1000).hex(" ")
    '80 00 00 00 00 00 00 05 00 00 03 e8'
    """
    return KEY.pack(seq | KEY_BIAS, n)


def parse_key(key: bytes | memoryview) -> tuple[int, int]:
    seq, n = KEY.unpack(bytes(key))
    return int(seq) & ~KEY_BIAS, int(n)


FIRST_KEY = key_of(0, 0)  # every block key sorts at or after it; the named databases' records before it


def pages_of(value: bytes | memoryview) -> int:
    """4 KiB pages a value takes: its overflow pages, or a share of a leaf page (counted as one)."""
    return max(1, -(-(len(value) + 16) // PAGE))


def pages_used(txn: lmdb.Transaction, dbs: Sequence[Any]) -> int:
    """Pages the databases `dbs` (all of the environment's) hold, plus the two meta pages and the
    free-list root."""
    used = 3
    for db in dbs:
        s = txn.stat(db)
        used += s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
    return used


def queue_items(txn: lmdb.Transaction, db: Any = None) -> Iterator[tuple[Any, Any]]:
    """(key, value) of every block of `db` (default: the queue, LMDB's main database), oldest first."""
    cursor = txn.cursor(db=db)
    if cursor.set_range(FIRST_KEY):
        yield from cursor


def open_env(path: Path, map_size: int, readonly: bool = False) -> lmdb.Environment:
    return lmdb.open(str(path), map_size=map_size, max_dbs=4, sync=True, metasync=True, writemap=False,
                     readahead=False, meminit=False, readonly=readonly, lock=True, max_readers=64,
                     subdir=True, create=not readonly)


@dataclass(frozen=True, slots=True)
class Block:
    """A stored block: its sequence number, reading count and bytes."""

    seq: int
    n: int
    value: bytes
    stored_key: bytes | None = None  # the key as found, if it disagrees with (seq, n)

    @property
    def key(self) -> bytes:
        return self.stored_key or key_of(self.seq, self.n)

    def readings(self) -> list[Reading]:
        return decode_block(self.value)
