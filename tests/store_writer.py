"""Writer process for tests/test_store_crash.py: appends readings to a Store until it is killed.

    python -m tests.store_writer PATH FIRST_I [--memory-first]

Opens a Store on PATH, prints `OPEN <next_seq>`, then appends readings at RATE readings/s, reading i
being reading(i) for i = FIRST_I, FIRST_I + 1, ... (the test recomputes every one), and calls commit()
every COMMIT_EVERY seconds. After each commit() returns it prints, oldest first:

    C <seq> <n> <first_i>   one line per block that commit appended: readings first_i .. first_i + n - 1
    A <seq>                 one line per block accepted before that commit (deleted by it)

It also plays the forwarder, chosen by the commit count: take the 3 oldest blocks and accept them, or
take everything, accept it and commit at once with an empty window (the queue drains: the store must
persist next_seq). Each accepted block is announced with `P <seq>` before the commit that deletes it, so
a test that kills the writer between that commit and its `A` lines knows those blocks may be gone.

Every line is written with one os.write (atomic on a pipe or file; nothing buffered in the process), so a
SIGKILL loses no printed line and never leaves half of one.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from edge.config import StoreConfig
from edge.reading import Reading
from edge.store import Block, Store
from edge.store.layout import key_of, parse_key

BASE_NS = 1_790_000_000_000_000_000
RATE = 5_000  # readings per second
COMMIT_EVERY = 0.1  # seconds
MAP_SIZE = 64 << 20
APPLIANCE = "crash-test"


def reading(i: int) -> Reading:
    """Reading number i: every value kind, a few tags, two qualities."""
    kind = i % 5
    value: bool | int | float | str | None
    if kind == 0:
        value = float(i) / 4
    elif kind == 1:
        value = i * 7919 - 10**9
    elif kind == 2:
        value = f"s{i}"
    elif kind == 3:
        value = i % 2 == 0
    else:
        value = None
    return (i % 97, BASE_NS + i * 200_000, value, 0 if i % 3 == 0 else 1)


def noisy_reading(i: int) -> Reading:
    """Reading number i with hashed values: compresses ~3x (~380 readings per 4 KiB block), so a store
    holds many blocks; for the damage and churn tests."""
    h = (i * 2654435761) % 2**32
    kind = i % 5
    value: bool | int | float | str
    if kind < 2:
        value = h / 7
    elif kind == 2:
        value = h
    elif kind == 3:
        value = h % 2 == 0
    else:
        value = f"v{h}"
    return (h % 997, BASE_NS + i * 200_000 + h % 1000, value, 0 if i % 3 == 0 else 1)


def config(path: Path) -> StoreConfig:
    return StoreConfig(path=path, map_size=MAP_SIZE, commit_interval=COMMIT_EVERY)


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


def blocks_from(store: Store, seq: int) -> list[tuple[int, int]]:
    """(seq, n) of every block at or after sequence `seq`."""
    out = []
    with store.env.begin(db=store.db_blocks) as txn:
        cursor = txn.cursor()
        ok = cursor.set_range(key_of(seq, 0))
        while ok:
            out.append(parse_key(cursor.key()))
            ok = cursor.next()
    return out


class Writer:
    def __init__(self, store: Store, first_i: int) -> None:
        self.store = store
        self.i = first_i  # next reading to add
        self.committed_i = first_i  # first reading not yet in a committed block
        self.accepted: list[Block] = []

    def commit(self) -> None:
        before = self.store.next_seq
        self.store.commit()
        for seq, n in blocks_from(self.store, before):
            emit(f"C {seq} {n} {self.committed_i}")
            self.committed_i += n
        if self.committed_i != self.i:
            raise AssertionError(f"committed up to {self.committed_i}, added up to {self.i}")
        for b in self.accepted:
            emit(f"A {b.seq}")
        self.accepted = []

    def forward(self, limit: int) -> None:
        blocks = self.store.take(limit)
        for b in blocks:
            emit(f"P {b.seq}")
        self.store.accept(blocks)
        self.accepted = blocks

    def run(self) -> None:
        t0 = last_commit = time.monotonic()
        commits = 0
        first_i = self.i
        while True:
            now = time.monotonic()
            due = first_i + int((now - t0) * RATE)
            if due > self.i:
                self.store.add([reading(k) for k in range(self.i, due)])
                self.i = due
            if now - last_commit >= COMMIT_EVERY:
                last_commit = now
                self.commit()
                commits += 1
                action = commits % 4
                if action in (1, 3):
                    self.forward(3)
                elif action == 2:
                    self.forward(10**6)
                    self.commit()  # nothing added since the last commit: a drain-only commit
            time.sleep(0.002)


class MemoryFirstWriter(Writer):
    """The appliance's memory-first turn, every COMMIT_EVERY: stage the window, take every block (the
    stored ones, then the staged ones), print `S <seq> <n>` for each before it could reach a broker,
    accept two in three (the others' acknowledgement is lost), then commit what is left and print
    `W <seq>` for each block in the store after it returns."""

    def run(self) -> None:
        t0 = time.monotonic()
        first_i = self.i
        while True:
            due = first_i + int((time.monotonic() - t0) * RATE)
            if due > self.i:
                self.store.add([reading(k) for k in range(self.i, due)])
                self.i = due
            self.store.stage()
            blocks = self.store.take(10**6)
            for b in blocks:
                emit(f"S {b.seq} {b.n}")
            self.store.accept([b for b in blocks if b.seq % 3])
            self.store.keep([b for b in blocks if not b.seq % 3])
            self.store.commit(window=False)
            for seq, _ in blocks_from(self.store, 0):
                emit(f"W {seq}")
            time.sleep(COMMIT_EVERY)


def main(argv: list[str]) -> int:
    path, first_i = Path(argv[0]), int(argv[1])
    store = Store(config(path), APPLIANCE)
    emit(f"OPEN {store.next_seq}")
    (MemoryFirstWriter if argv[2:] == ["--memory-first"] else Writer)(store, first_i).run()
    return 0  # pragma: no cover - runs until killed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
