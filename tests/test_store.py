"""Contract suite of the store: what the pipeline and the uplink rely on, against real LMDB on disk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge.config import StoreConfig
from edge.policy import Policy
from edge.reading import Reading
from edge.store import Store, decode_block, encode_block
from edge.store.block import Window
from edge.store.layout import MAX_VALUE, parse_key, queue_items
from tests.store_writer import noisy_reading

T0 = 1_790_000_000_000_000_000


def cfg(path: Path, **kw: object) -> StoreConfig:
    return StoreConfig(path=path / "store", map_size=kw.pop("map_size", 64 << 20), **kw)  # type: ignore[arg-type]


def readings(n: int, start: int = 0) -> list[Reading]:
    kinds = [lambda i: float(i) / 7, lambda i: i, lambda i: i % 2 == 0, lambda i: None, lambda i: f"s{i}"]
    return [(i % 97, T0 + i * 1_000_000, kinds[i % 5](i), 0 if i % 5 != 3 else 1)
            for i in range(start, start + n)]


def drain(store: Store) -> list[Reading]:
    out = []
    while blocks := store.take(100):
        out.extend(r for b in blocks for r in b.readings())
        store.accept(blocks)
    return out


def test_every_value_kind_round_trips_exactly() -> None:
    rs: list[Reading] = [(1, T0, 2**64 - 1, 0), (2, T0 - 5, -(2**63), 0), (3, T0 + 7, math.inf, 0),
                         (4, T0, "ünïcode", 0), (5, T0, "", 0), (6, T0, True, 0), (7, T0, False, 0),
                         (8, T0, None, 0x42), (9, T0, 0.1, 0), (2**32 - 1, 2**63 - 1, 1, 255)]
    assert decode_block(encode_block(rs)) == rs
    nan = decode_block(encode_block([(1, T0, math.nan, 0)]))[0][2]
    assert isinstance(nan, float) and math.isnan(nan)



@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-(2**63), max_value=2**64 - 1), min_size=1, max_size=300))
def test_integer_only_windows_round_trip_as_integers(values: list[int]) -> None:
    rs: list[Reading] = [(i, T0 + i, v, 0) for i, v in enumerate(values)]
    back = decode_block(encode_block(rs))
    assert back == rs and all(type(v) is int for _, _, v, _ in back)


VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                  st.floats(allow_nan=False), st.text(max_size=5))


@settings(max_examples=200, deadline=None)
@given(st.lists(VALUES, max_size=60), st.lists(st.integers(0, 60), max_size=4), st.data())
def test_a_window_holds_values_encoded_and_cuts_them_anywhere(values: list[object], chunks: list[int],
                                                              data: st.DataObject) -> None:
    rs: list[Reading] = [(i, T0 + i, v, i % 3) for i, v in enumerate(values)]  # type: ignore[misc]
    w, at = Window(), 0
    for n in [*chunks, len(rs)]:  # appended as the poller does: a request's readings at a time
        w.extend(rs[at:at + n])
        at += len(rs[at:at + n])
    b = w.seal()
    assert len(w) == len(b) == len(rs) and b.values() == values
    i = data.draw(st.integers(0, len(rs)))
    j = data.draw(st.integers(i, len(rs)))
    assert b.slice(i, j).values() == values[i:j]
    if j > i:
        assert decode_block(encode_block(b.slice(i, j))) == rs[i:j]
    rest = Window()
    rest.prepend(b)
    rest.drop_oldest(i)
    assert rest.seal().values() == values[i:]
    rest.prepend(b.slice(0, i))  # a failed commit's readings go back in front
    assert rest.seal() == b
    if rs:
        assert decode_block(encode_block(rest.seal())) == rs


def test_one_transaction_per_window_and_blocks_fit_a_page(tmp_path: Path) -> None:
    s = Store(cfg(tmp_path), "a")
    s.add(readings(20_000))
    assert s.commit() > 1
    assert s.counters.commits == 1
    with s.env.begin() as txn:
        sizes = [len(v) for _, v in queue_items(txn)]
    assert max(sizes) <= MAX_VALUE
    assert s.counters.backlog_readings == 20_000
    assert drain(s) == readings(20_000)
    s.close()


def test_the_commit_loop_commits_by_time_by_bytes_and_when_the_policy_asks(tmp_path: Path) -> None:
    s = Store(cfg(tmp_path, commit_interval=1.0, commit_bytes=21 * 1000), "a")
    policy = [Policy(commit_interval=0.2)]
    commits: list[float] = []

    async def main() -> None:
        committed = asyncio.Event()

        def on_commit() -> None:
            commits.append(time.monotonic())
            committed.set()

        loop = asyncio.create_task(s.run(lambda: policy[0], on_commit))
        try:
            t0 = time.monotonic()
            s.add(readings(10))
            await asyncio.wait_for(committed.wait(), 5)  # by time: the policy's 0.2 s window
            assert 0.1 <= commits[0] - t0 < 1.0
            policy[0] = Policy(commit_interval=3600.0)  # read at the next turn of the loop
            await asyncio.sleep(1.2)  # the window it was waiting for passes: no commit without a reason
            committed.clear()
            s.add(readings(1000, 10))  # 1,000 readings of 21 B reach commit_bytes long before the window
            await asyncio.wait_for(committed.wait(), 5)
            assert s.snapshot().commit_interval == 3600.0
            committed.clear()
            s.add(readings(5, 2000))
            policy[0] = Policy(commit_interval=3600.0, commit_now=1)  # the governor: commit the window now
            await asyncio.wait_for(committed.wait(), 5)
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
    asyncio.run(main())
    assert len(commits) == 3 and s.counters.backlog_readings == 1015
    s.close()


def test_take_oldest_first_in_flight_keep_accept_reject(tmp_path: Path) -> None:
    s = Store(cfg(tmp_path), "a")
    for w in range(5):  # five windows, five blocks
        s.add(readings(10, 10 * w))
        s.commit()
    first = s.take(2)
    assert [b.readings()[0][2] for b in first] == [0.0, 10 / 7]
    second = s.take(2)
    assert [b.seq for b in second] == [first[1].seq + 1, first[1].seq + 2]  # in flight skipped
    s.keep(first)
    assert [b.seq for b in s.take(10)] == [first[0].seq, first[1].seq, second[1].seq + 1]
    s.accept(first)
    s.reject(second[:1], "broker refused: not authorised")
    s.keep(second[1:])
    s.commit()
    assert s.counters.backlog_blocks == 2 and s.counters.blocks_rejected == 1
    assert s.counters.blocks_forwarded == 2 and s.counters.readings_forwarded == 20
    with s.env.begin(db=s.db_rejected) as txn:
        (key, value), = list(txn.cursor())
    assert parse_key(key)[0] == second[0].seq and b"not authorised" in value
    s.close()


def mapped_kib(file: Path) -> int:
    """Resident KiB of this process's map of file (/proc/self/smaps)."""
    ino, rss, ours = os.stat(file).st_ino, 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and fields[4].isdigit():
                ours = int(fields[4]) == ino
            elif ours and fields[0] == "Rss:":
                rss += int(fields[1])
    return rss


def test_a_commit_leaves_none_of_the_map_resident(tmp_path: Path) -> None:
    """Pages read through the map (here a backlog of 2 MB, read back by take()) stop counting in RSS at
    the next commit, and what the store reads after that is still right."""
    s = Store(cfg(tmp_path), "a")
    data = tmp_path / "store" / "data.mdb"
    for w in range(100):
        s.add(readings(2_000, 2_000 * w))
        s.commit()
    blocks = s.take(1_000)
    assert sum(b.n for b in blocks) == 200_000 and mapped_kib(data) >= 256  # the backlog was read
    s.keep(blocks)
    s.add(readings(10, 200_000))
    s.commit()
    assert mapped_kib(data) == 0
    assert drain(s) == readings(200_010)
    s.close()


def test_sequence_numbers_never_repeat_across_reopen_and_drain(tmp_path: Path) -> None:
    s = Store(cfg(tmp_path), "a")
    for w in range(3):
        s.add(readings(10, 10 * w))
        s.commit()
    blocks = s.take(10)
    seen = [b.seq for b in blocks]
    assert seen == sorted(seen) and len(set(seen)) == 3
    s.accept(blocks)
    s.close()  # commits the deletes: the queue is empty, the last key is gone
    s = Store(cfg(tmp_path), "a")
    assert s.counters.backlog_blocks == 0  # next_seq now comes from meta
    s.add(readings(5))
    s.commit()
    (b,) = s.take(1)
    assert b.seq > max(seen)
    s.close()


def test_counters_and_backlog_survive_reopen(tmp_path: Path) -> None:
    s = Store(cfg(tmp_path), "a")
    for w in range(3):
        s.add(readings(100, 100 * w))
        s.commit()
    s.reject(s.take(1), "bad")
    s.commit()
    s.close()
    s = Store(cfg(tmp_path), "a")
    c = s.counters
    assert (c.backlog_blocks, c.backlog_readings, c.blocks_rejected, c.readings_rejected) == (2, 200, 1, 100)
    assert s.snapshot().oldest_ts == T0 + 100 * 1_000_000
    s.close()


def test_close_commits_the_open_window(tmp_path: Path) -> None:
    s = Store(cfg(tmp_path), "a")
    s.add(readings(7))
    s.close()
    s = Store(cfg(tmp_path), "a")
    assert drain(s) == readings(7)
    s.close()


def test_memory_first_acknowledged_blocks_never_reach_the_flash(tmp_path: Path) -> None:
    s = Store(cfg(tmp_path), "a")
    s.add(readings(30))
    assert s.stage() == 1 and s.snapshot().window_readings == 30
    txnid = s.env.info()["last_txnid"]
    s.add(readings(5, 30))  # arrives while the staged block waits: stays in the open window
    (block,) = s.take(10)
    assert block.readings() == readings(30)
    s.accept([block])
    assert s.commit(window=False) == 0
    assert s.env.info()["last_txnid"] == txnid, "a transaction for blocks acknowledged from RAM"
    c = s.counters
    assert (c.blocks_direct, c.readings_direct, c.readings_forwarded, c.backlog_readings) == (1, 30, 30, 0)
    assert s.snapshot().window_readings == 5

    assert s.stage() == 1
    (kept,) = s.take(10)
    s.keep([kept])  # its acknowledgement was lost: written by the commit that follows
    assert s.commit(window=False) == 1 and s.counters.backlog_readings == 5
    assert s.take(10)[0].seq == kept.seq

    s.add(readings(4, 35))
    s.stage()
    (refused,) = [b for b in s.take(10) if b.seq != kept.seq]
    s.reject([refused], "broker refused: quota")
    s.commit(window=False)
    assert (s.counters.blocks_rejected, s.counters.backlog_readings) == (1, 5)
    with s.env.begin(db=s.db_rejected) as txn:
        assert [parse_key(k)[0] for k, _ in txn.cursor()] == [refused.seq]
    next_seq = s.next_seq
    s.close()
    s = Store(cfg(tmp_path), "a")
    assert s.next_seq == next_seq, "a clean close hands the unused lease back: no gap"
    s.close()


def test_a_refused_staged_block_outlives_a_damaged_commit(tmp_path: Path) -> None:
    """No store holds a staged block: refused by the broker, then the commit finds damage, it goes to
    the fresh store's `rejected`, counted, not nowhere."""
    s = Store(cfg(tmp_path), "a")
    s.add(readings(30))
    s.stage()
    (b,) = s.take(10)
    s.reject([b], "broker refused: quota")
    write = s._transaction

    def damaged(*args: Any) -> Any:
        raise lmdb.CorruptedError("simulated")

    s._transaction = damaged  # type: ignore[method-assign]
    s.commit(window=False)
    s._transaction = write  # type: ignore[method-assign]
    s.commit()
    with s.env.begin(db=s.db_rejected) as txn:
        assert [parse_key(k)[0] for k, _ in txn.cursor()] == [b.seq]
    assert (s.counters.blocks_rejected, s.counters.readings_rejected) == (1, 30)
    s.close()


def test_a_block_acknowledged_while_the_watermark_drops_it_is_counted_once(tmp_path: Path) -> None:
    """The oldest block, taken and acknowledged while a commit that drops it at the high watermark is
    being written: the backlog counter stays exact, and take() finds every stored block to the end."""
    s = Store(cfg(tmp_path, map_size=1 << 20, commit_bytes=1024), "a")
    i = 0
    while s.counters.blocks_dropped == 0:
        s.add([noisy_reading(j) for j in range(i, i + 400)])
        i += 400
        s.commit()
    write = s._transaction

    def during_write(*args: Any) -> Any:  # the uplink, on its thread, while the worker writes
        s.accept(s.take(1))
        return write(*args)

    s._transaction = during_write  # type: ignore[method-assign]
    dropped = s.counters.blocks_dropped
    while s.counters.blocks_dropped == dropped:
        s.add([noisy_reading(j) for j in range(i, i + 4000)])
        i += 4000
        s.commit()
    s._transaction = write  # type: ignore[method-assign]
    s.commit()
    with s.env.begin(db=s.db_blocks) as txn:
        assert s.counters.backlog_blocks == sum(1 for _ in queue_items(txn))
    while blocks := s.take(1):
        s.accept(blocks)
        s.commit(window=False)
    with s.env.begin(db=s.db_blocks) as txn:
        assert s.counters.backlog_blocks == 0 and not list(queue_items(txn))
    s.close()


def test_a_stage_persists_a_lease_before_any_block_goes_out(tmp_path: Path) -> None:
    s = Store(cfg(tmp_path), "a")
    s.add(readings(10))
    s.stage()
    (block,) = s.take(1)
    with s.env.begin(db=s.db_meta) as txn:
        lease = int.from_bytes(txn.get(b"next_seq"), "little")
    assert lease > block.seq
    s.accept([block])
    txnid = s.env.info()["last_txnid"]
    for i in range(20):  # within the lease: no more transactions for it
        s.add(readings(10, 10 * (i + 1)))
        s.stage()
        s.accept(s.take(10))
        s.commit(window=False)
    assert s.env.info()["last_txnid"] == txnid and s.counters.blocks_direct == 21
    s.close()


class StoreMachine(RuleBasedStateMachine):
    """Any interleaving of the pipeline's calls, reopens included: what was committed and not accepted
    is delivered, in order, and nothing accepted comes back."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.store = Store(cfg(self.dir), "m")
        self.next = 0
        self.committed: list[Reading] = []  # committed, not accepted, in order
        self.pending: list[Reading] = []  # added, not committed
        self.flying: list = []
        self.accepted_seqs: set[int] = set()
        self.accepted_uncommitted = False
        self.staged = False  # blocks in RAM, not written (memory-first)

    @rule(n=st.integers(1, 400))
    def add(self, n: int) -> None:
        rs = readings(n, self.next)
        self.next += n
        self.store.add(rs)
        self.pending.extend(rs)

    @rule()
    def commit(self) -> None:
        self.store.commit()
        self.committed.extend(self.pending)
        self.pending = []
        self.accepted_uncommitted = self.staged = False

    @rule()
    def stage(self) -> None:  # memory-first: the window sealed into blocks kept in RAM
        self.store.stage()
        self.committed.extend(self.pending)
        self.pending = []
        self.staged = True

    @rule()
    def commit_staged(self) -> None:  # the commit after a stage: the window stays open
        self.store.commit(window=False)
        self.accepted_uncommitted = self.staged = False

    @rule(n=st.integers(1, 5))
    def take(self, n: int) -> None:
        blocks = self.store.take(n)
        for b in blocks:
            assert b.seq not in self.accepted_seqs
        self.flying.extend(blocks)

    @precondition(lambda self: self.flying)
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        b = self.flying.pop(data.draw(st.integers(0, len(self.flying) - 1)))
        if data.draw(st.booleans()):
            self.store.accept([b])
            self.accepted_uncommitted = True
            self.accepted_seqs.add(b.seq)
            for r in b.readings():
                self.committed.remove(r)
        else:
            self.store.keep([b])

    @rule()
    def reopen(self) -> None:
        self.store.close()  # commits the open window and pending acks
        self.committed.extend(self.pending)
        self.pending = []
        self.flying = []
        self.accepted_uncommitted = self.staged = False
        self.store = Store(cfg(self.dir), "m")

    @invariant()
    def backlog_counts(self) -> None:
        c = self.store.counters
        if not (self.pending or self.accepted_uncommitted or self.flying or self.staged):
            assert c.backlog_readings == len(self.committed)

    def teardown(self) -> None:
        self.store.keep(self.flying)
        self.store.commit()
        self.committed.extend(self.pending)
        assert drain(self.store) == self.committed
        self.store.close()


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=int(os.environ.get("EDGE_STATEFUL_EXAMPLES", "25")),
                                     stateful_step_count=25, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


def test_inspect_and_dump_read_while_open_elsewhere(tmp_path: Path) -> None:
    """edge store inspect|dump open the environment read-only from another process."""
    s = Store(cfg(tmp_path), "site-7")
    s.add(readings(300))
    s.commit()
    conf = tmp_path / "c.toml"
    conf.write_text(f'[appliance]\nid = "site-7"\n[store]\npath = "{tmp_path / "store"}"\n'
                    'map_size = "64MiB"\n')
    r = subprocess.run([sys.executable, "-m", "edge", "store", "inspect", "--config", str(conf), "--json"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["appliance"], info["readings"], info["blocks"]) == ("site-7", 300, s.counters.backlog_blocks)
    block = s.take(1)[0]
    r = subprocess.run([sys.executable, "-m", "edge", "store", "dump", "--config", str(conf), "--from",
                        str(block.seq), "--limit", "1", "--json"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == block.n and {row["seq"] for row in rows} == {block.seq}
    assert (rows[0]["ts"], rows[0]["value"], rows[1]["value"]) == (T0, 0.0, 1)
    s.close()


@pytest.mark.parametrize("bad", ["0", "not-a-number"])
def test_dump_rejects_bad_arguments(tmp_path: Path, bad: str) -> None:
    r = subprocess.run([sys.executable, "-m", "edge", "store", "dump", "--config", "config.toml", "--limit",
                        bad], capture_output=True, text=True, timeout=60, check=False,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2 and r.stderr.strip()


def test_blocks_being_deleted_are_not_taken_again_during_the_commit(tmp_path: Path) -> None:
    """The commit runs in a worker thread while the uplink keeps taking: an accepted block is still in
    the database until that commit is durable, and must not be sent a second time meanwhile."""
    s = Store(cfg(tmp_path), "a")
    for w in range(2):
        s.add(readings(10, 10 * w))
        s.commit()
    first, second = s.take(2)
    s.accept([first])
    s.keep([second])
    seen_during: list[int] = []
    inner = s._write

    def write(sealed: Any) -> Any:
        seen_during.extend(b.seq for b in s.take(10))  # what a concurrent take() sees mid-commit
        return inner(sealed)

    s._write = write  # type: ignore[method-assign]
    s.commit()
    assert seen_during == [second.seq]
    s.close()
