"""Damage beyond LMDB's guarantees (truncation, flipped bytes, garbage meta pages): the appliance always
starts, a damaged store is moved aside and counted, a damaged block is rejected as "corrupt" while the
others are still delivered, and sequence numbers never go back.

LMDB may crash the process on arbitrary page damage, so a damaged store is only ever opened in a
subprocess (OPENER): it must exit 0, or die by a signal and exit 0 on a later start (the crash marker
moves the store aside after CRASHED_OPENS crashed opens, so at most CRASHED_OPENS + 1 starts); never hang,
never exit on a Python exception. EDGE_DAMAGE_SEEDS (default "1,2,3,4,5,6") sets the seeds of the
random-flip cases; a wider sweep (1..80) also hits the bug pinned by
test_damage_found_by_a_commit_is_recovered (seeds 21, 42, 79, 80 of the "anywhere" case).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

import edge.store.recovery
from edge.config import StoreConfig
from edge.store import Block, Store
from edge.store.block import HEADER
from edge.store.layout import key_of, parse_key, queue_items
from edge.store.recovery import CRASHED_OPENS, MARKER
from tests.store_writer import noisy_reading

ROOT = Path(__file__).resolve().parent.parent
MAP_SIZE = 64 << 20
PAGE = 4096
APPLIANCE = "damage-test"
SEEDS = [int(s) for s in os.environ.get("EDGE_DAMAGE_SEEDS", "1,2,3,4,5,6").split(",")]
F_BIGDATA, F_SUBDATA = 0x01, 0x02  # LMDB node flags
P_BRANCH, P_LEAF = 0x01, 0x02  # LMDB page flags


def seeds(kind: str) -> list[object]:
    return list(SEEDS)


# Opens the store like the appliance does, then: "read" takes every block (digest of its readings, or
# why it does not decode), commits (corrupt blocks move to `rejected`) and lists `rejected`; "roundtrip"
# appends 1,000 readings, takes and accepts everything and checks the new readings came back.
OPENER = r"""
import dataclasses, hashlib, json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
from edge.config import StoreConfig
from edge.store import Store
from edge.store.layout import parse_key
path, map_size, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
store = Store(StoreConfig(path=path, map_size=map_size), "damage-test")
out = {"next_seq": store.next_seq}
if mode == "read":
    blocks = store.take(10**6)
    out["delivered"], out["undecodable"] = {}, {}
    for b in blocks:
        try:
            rs = b.readings()
        except Exception as e:
            out["undecodable"][b.seq] = repr(e)
            continue
        out["delivered"][b.seq] = [b.n, len(rs), hashlib.sha256(repr(rs).encode()).hexdigest()]
    store.keep(blocks)
    store.commit()
    with store.env.begin(db=store.db_rejected) as txn:
        out["rejected"] = {}
        for k, v in txn.cursor():
            size = int.from_bytes(v[:2], "little")
            out["rejected"][parse_key(k)[0]] = [parse_key(k)[1], bytes(v[2:2 + size]).decode()]
else:
    first = store.next_seq
    rs = [(5, 1_000_000 + k, float(k), 0) for k in range(1000)]
    store.add(rs)
    store.commit()
    got, seqs = [], []
    while blocks := store.take(100):
        for b in blocks:
            if b.seq >= first:
                got += b.readings()
                seqs.append(b.seq)
        store.accept(blocks)
    store.commit()
    out["roundtrip"] = got == rs
    out["new_seqs"] = seqs
    out["backlog_after"] = store.counters.backlog_blocks
out["counters"] = dataclasses.asdict(store.counters)
store.close()
print(json.dumps(out))
"""


def digest(first_i: int, n: int) -> str:
    return hashlib.sha256(repr([noisy_reading(k) for k in range(first_i, first_i + n)]).encode()).hexdigest()


class Template:
    """An intact store of a few hundred blocks, built once; each test damages its own copy."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Not reserved: the file is the pages LMDB uses, so truncating or flipping it hits them (a
        # reserved file's tail is unused; opening a copy reserves it after the damage checks)
        store = Store(StoreConfig(path=path, map_size=MAP_SIZE, reserve=False), APPLIANCE)
        i = 0
        for _ in range(20):  # twenty commit windows
            store.add([noisy_reading(k) for k in range(i, i + 12_000)])
            i += 12_000
            store.commit()
        self.blocks: dict[int, tuple[int, int]] = {}  # seq -> (n, first_i)
        self.values: dict[int, bytes] = {}
        i = 0
        with store.env.begin() as txn:
            for key, value in queue_items(txn):
                seq, n = parse_key(key)
                self.blocks[seq] = (n, i)
                self.values[seq] = bytes(value)
                i += n
        self.next_seq = store.next_seq
        store.close()
        assert len(self.blocks) >= 120, len(self.blocks)

    def copy(self, tmp_path: Path) -> Path:
        path = tmp_path / "store"
        shutil.copytree(self.path, path)
        return path

    def overflow_block(self, index: int) -> int:
        """The seq of a block stored in an overflow page (value bigger than half a page)."""
        big = [seq for seq, v in self.values.items() if len(v) > PAGE // 2 + 100]
        return big[index]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    return Template(tmp_path_factory.mktemp("template") / "store")


# ---------------------------------------------------------------------------------------------------
# Running the appliance's open on a damaged store

def start(path: Path, mode: str = "read") -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-c", OPENER, str(path), str(MAP_SIZE), mode], cwd=ROOT,
                              capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"opening {path} hung for 30 s") from e


def start_until_ok(path: Path, mode: str = "read") -> tuple[dict, list[subprocess.CompletedProcess[str]]]:
    """Start like systemd would restart: until an exit 0, at most CRASHED_OPENS + 1 times."""
    runs = []
    for _ in range(CRASHED_OPENS + 1):
        r = start(path, mode)
        runs.append(r)
        if r.returncode == 0:
            return json.loads(r.stdout), runs
        assert r.returncode < 0, f"start exited {r.returncode} on a Python exception:\n{r.stderr}"
    raise AssertionError(f"every start crashed: {[r.returncode for r in runs]}\n{runs[-1].stderr}")


def moved_aside(path: Path) -> list[Path]:
    """Moved-aside stores, salvaged since (renamed) or not."""
    return sorted([*path.parent.glob(f"{path.name}.damaged-*"), *path.parent.glob(f"{path.name}.salvaged-*")])


def assert_usable(path: Path, old_max_seq: int) -> None:
    out, _ = start_until_ok(path, "roundtrip")
    assert out["roundtrip"], out
    assert out["backlog_after"] == 0, out
    assert out["new_seqs"] and min(out["new_seqs"]) > old_max_seq, (out["new_seqs"], old_max_seq)


def assert_recovered(path: Path, template: Template, out: dict,
                     runs: list[subprocess.CompletedProcess[str]], why: str) -> None:
    """The store was found damaged: moved aside with its files, counted, logged, and a fresh one works."""
    aside = moved_aside(path)
    assert len(aside) == 1, aside
    assert (aside[0] / "data.mdb").exists()
    assert out["counters"]["recoveries"] >= 1, out["counters"]
    assert out["delivered"] == {} and out["rejected"] == {}, out
    log = "".join(r.stderr for r in runs)
    named = aside[0].with_name(aside[0].name.replace(".salvaged-", ".damaged-"))  # renamed once salvaged
    assert f"store {path} is damaged" in log and why in log and f"moved to {named}" in log, log
    assert out["next_seq"] > max(template.blocks), "the fresh store reuses sequence numbers"
    assert_usable(path, max(template.blocks))


def assert_all_delivered_or_rejected(template: Template, out: dict) -> None:
    """Damage not detected at open: every block is delivered with exactly its readings or rejected as
    corrupt; nothing vanishes, nothing is altered, nothing is invented."""
    delivered = {int(k): v for k, v in out["delivered"].items()}
    rejected = {int(k): v for k, v in out["rejected"].items()}
    assert out["undecodable"] == {}, f"delivered blocks that do not decode: {out['undecodable']}"
    assert not set(delivered) & set(rejected)
    assert set(delivered) | set(rejected) == set(template.blocks), (
        sorted(set(template.blocks) ^ (set(delivered) | set(rejected)))[:10])
    for seq, (n, length, sha) in delivered.items():
        want_n, first_i = template.blocks[seq]
        assert (n, length, sha) == (want_n, want_n, digest(first_i, want_n)), f"block {seq} altered"
    for seq, (n, reason) in rejected.items():
        assert n == template.blocks[seq][0] and reason.startswith("corrupt"), (seq, n, reason)
    c = out["counters"]
    assert c["blocks_rejected"] == len(rejected), c
    assert c["readings_rejected"] == sum(n for n, _ in rejected.values()), c


# ---------------------------------------------------------------------------------------------------
# Damaging data.mdb

def flip(data: Path, offsets: list[int], rng: random.Random) -> None:
    with data.open("r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)[0]
            f.seek(off)
            f.write(bytes([b ^ rng.randrange(1, 256)]))


def page_flags(raw: bytes, pgno: int) -> int:
    _, _, flags = struct.unpack_from("<QHH", raw, pgno * PAGE)
    return int(flags)


def occurrences(raw: bytes, needle: bytes) -> list[int]:
    out, pos = [], raw.find(needle)
    while pos >= 0:
        out.append(pos)
        pos = raw.find(needle, pos + 1)
    return out


def leaf_nodes(raw: bytes, key: bytes, flags: int) -> list[int]:
    """Offsets of the LMDB leaf nodes (lo u16, hi u16, flags u16, ksize u16, key, data) with this key
    and node flags, in every copy of their page (old copies sit in free pages)."""
    return [pos - 8 for pos in occurrences(raw, key)
            if pos >= 8 and struct.unpack_from("<HH", raw, pos - 4) == (flags, len(key))]


# ---------------------------------------------------------------------------------------------------

def test_truncated_to_half_is_moved_aside(template: Template, tmp_path: Path) -> None:
    path = template.copy(tmp_path)
    data = path / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    out, runs = start_until_ok(path)
    assert_recovered(path, template, out, runs, "shorter than")


def test_truncated_to_one_page_is_moved_aside(template: Template, tmp_path: Path) -> None:
    path = template.copy(tmp_path)
    os.truncate(path / "data.mdb", PAGE)
    out, runs = start_until_ok(path)
    assert_recovered(path, template, out, runs, "MDB_INVALID")


def test_garbage_meta_pages_are_moved_aside(template: Template, tmp_path: Path) -> None:
    path = template.copy(tmp_path)
    with (path / "data.mdb").open("r+b") as f:
        f.write(random.Random(7).randbytes(2 * PAGE))
    out, runs = start_until_ok(path)
    assert_recovered(path, template, out, runs, "MDB_INVALID")


def assert_recovered_or_intact(path: Path, template: Template) -> None:
    """Started on damage that may or may not be detectable: either the store was moved aside and a
    fresh one works, or every block was delivered or rejected as corrupt and the store stays usable."""
    out, runs = start_until_ok(path)
    if moved_aside(path):
        assert_recovered(path, template, out, runs, "")
    else:
        assert_all_delivered_or_rejected(template, out)
        assert_usable(path, max(template.blocks))


@pytest.mark.parametrize("seed", seeds("anywhere"))
def test_flipped_bytes_anywhere_after_the_meta_pages(template: Template, tmp_path: Path, seed: int) -> None:
    """Eight bytes flipped at random offsets of pages 2..: most land in block values (overflow pages)."""
    path = template.copy(tmp_path)
    data = path / "data.mdb"
    rng = random.Random(seed)
    flip(data, [rng.randrange(2 * PAGE, data.stat().st_size) for _ in range(8)], rng)
    assert_recovered_or_intact(path, template)


@pytest.mark.parametrize("seed", seeds("btree"))
def test_flipped_bytes_in_btree_pages(template: Template, tmp_path: Path, seed: int) -> None:
    """Four bytes flipped in branch and leaf pages: keys, node headers, database records."""
    path = template.copy(tmp_path)
    data = path / "data.mdb"
    raw = data.read_bytes()
    tree = [p for p in range(2, len(raw) // PAGE) if page_flags(raw, p) & (P_BRANCH | P_LEAF)]
    rng = random.Random(seed)
    flip(data, [rng.choice(tree) * PAGE + rng.randrange(16, PAGE) for _ in range(4)], rng)
    assert_recovered_or_intact(path, template)


def test_corrupt_block_is_rejected_and_every_other_block_delivered(template: Template,
                                                                   tmp_path: Path) -> None:
    path = template.copy(tmp_path)
    data = path / "data.mdb"
    seq = template.overflow_block(len(template.blocks) // 3)
    value = template.values[seq]
    (at,) = occurrences(data.read_bytes(), value)
    rng = random.Random(3)
    flip(data, [at + HEADER.size + rng.randrange(len(value) - HEADER.size) for _ in range(3)], rng)
    out, runs = start_until_ok(path)
    assert len(runs) == 1 and not moved_aside(path)
    assert_all_delivered_or_rejected(template, out)
    assert {int(k) for k in out["rejected"]} == {seq}
    assert out["rejected"][str(seq)] == [template.blocks[seq][0], "corrupt: block checksum mismatch"]
    assert out["counters"]["recoveries"] == 0
    assert_usable(path, max(template.blocks))
    out, _ = start_until_ok(path)  # rejected persisted, the rest was accepted by the round trip
    assert out["counters"]["blocks_rejected"] == 1 and out["delivered"] == {}


def test_fresh_store_after_recovery_continues_above_the_damaged_stores_sequences(template: Template,
                                                                                tmp_path: Path) -> None:
    path = template.copy(tmp_path)
    with (path / "data.mdb").open("r+b") as f:
        f.write(bytes(2 * PAGE))
    out, _ = start_until_ok(path)
    assert moved_aside(path)
    assert out["next_seq"] > max(template.blocks) and out["next_seq"] >= template.next_seq
    assert_usable(path, template.next_seq - 1)


# -- the crash marker -------------------------------------------------------------------------------

@pytest.mark.parametrize(("crashed", "moved"), [(1, False), (CRASHED_OPENS - 1, False),
                                                (CRASHED_OPENS, True), (CRASHED_OPENS + 5, True)])
def test_crash_marker(template: Template, tmp_path: Path, caplog: pytest.LogCaptureFixture, crashed: int,
                      moved: bool) -> None:
    """The marker counts starts not followed by a clean close: CRASHED_OPENS of them in a row move the
    store aside (LMDB keeps crashing on it); fewer (power cuts) leave it alone, after reading it through."""
    path = template.copy(tmp_path)
    marker = tmp_path / f".store{MARKER}"
    marker.write_text(str(crashed))
    with caplog.at_level(logging.ERROR, "edge.store"):
        store = Store(StoreConfig(path=path, map_size=MAP_SIZE), APPLIANCE)
    try:
        assert marker.read_text() == "1"  # this start is pending until a clean close
        c = store.counters
        if moved:
            assert len(moved_aside(path)) == 1
            assert c.recoveries == 1 and c.backlog_blocks == 0
            assert f"the last {crashed} starts with it ended in a crash" in caplog.text
            assert store.next_seq > max(template.blocks)
        else:
            assert not moved_aside(path)
            assert c.recoveries == 0 and c.backlog_blocks == len(template.blocks)
            assert store.next_seq == template.next_seq
            assert caplog.text == ""
    finally:
        store.close()
    assert not marker.exists()


def test_crashed_open_is_counted_by_the_marker(template: Template, tmp_path: Path) -> None:
    """A process killed inside an open leaves the marker one higher: the count the next start reads."""
    path = template.copy(tmp_path)
    marker = tmp_path / f".store{MARKER}"
    marker.write_text("1")
    crash = ("import os, sys, lmdb\n"
             "from pathlib import Path\n"
             "from edge.config import StoreConfig as C\n"
             "from edge.store import Store\n"
             "def die(*a, **k): os.kill(os.getpid(), 9)\n"
             "lmdb.open = die\n"
             f"Store(C(path=Path(sys.argv[1]), map_size={MAP_SIZE}))\n")
    r = subprocess.run([sys.executable, "-c", crash, str(path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == -9, r.stderr
    assert marker.read_text().strip() == "2"


# -- damage found in review, now detected -----------------------------------------------------------

def test_flipped_block_header_is_rejected(template: Template, tmp_path: Path) -> None:
    path = template.copy(tmp_path)
    data = path / "data.mdb"
    seq = template.overflow_block(10)
    (at,) = occurrences(data.read_bytes(), template.values[seq])
    flip(data, [at + 9], random.Random(1))  # second byte of t0: timestamps would move by k * 256 ns
    out, _ = start_until_ok(path)
    assert_all_delivered_or_rejected(template, out)
    assert {int(k) for k in out["rejected"]} == {seq}


def test_damaged_reading_count_in_a_key_is_detected(template: Template, tmp_path: Path) -> None:
    path = template.copy(tmp_path)
    data = path / "data.mdb"
    seq = template.overflow_block(20)
    n = template.blocks[seq][0]
    raw = bytearray(data.read_bytes())
    nodes = leaf_nodes(bytes(raw), key_of(seq, n), F_BIGDATA)
    assert nodes
    for node in nodes:
        raw[node + 8 + 9] ^= 0x40  # the key's u32 reading count, big-endian: n + 4,194,304
    data.write_bytes(raw)
    out, _ = start_until_ok(path)
    assert_all_delivered_or_rejected(template, out)  # delivered with the count of its checksummed header


def test_empty_data_file_is_damage(template: Template, tmp_path: Path) -> None:
    path = template.copy(tmp_path)
    os.truncate(path / "data.mdb", 0)
    out, runs = start_until_ok(path)
    assert out["next_seq"] > max(template.blocks), f"next_seq {out['next_seq']}: sequence numbers reused"
    assert_recovered(path, template, out, runs, "")


def test_damaged_node_size_does_not_crash_every_start(template: Template, tmp_path: Path) -> None:
    path = template.copy(tmp_path)
    data = path / "data.mdb"
    seq = template.overflow_block(-1)
    raw = bytearray(data.read_bytes())
    nodes = leaf_nodes(bytes(raw), key_of(seq, template.blocks[seq][0]), F_BIGDATA)
    assert nodes
    for node in nodes:
        struct.pack_into("<H", raw, node + 2, struct.unpack_from("<H", raw, node + 2)[0] + 0x10)
    data.write_bytes(raw)
    out, runs = start_until_ok(path)  # SIGBUS in take(), then in the full read of the unclean starts
    assert moved_aside(path) or str(seq) in out["rejected"], [r.returncode for r in runs]


def test_damaged_database_record_neither_drops_everything_nor_raises(template: Template,
                                                                    tmp_path: Path) -> None:
    path = template.copy(tmp_path)
    data = path / "data.mdb"
    raw = bytearray(data.read_bytes())
    nodes = leaf_nodes(bytes(raw), b"meta", F_SUBDATA)
    assert nodes
    for node in nodes:  # MDB_db: pad u32, flags u16, depth u16, branch, leaf, overflow, entries, root u64
        struct.pack_into("<Q", raw, node + 8 + 4 + 24, 1 << 38)
    data.write_bytes(raw)
    out, _ = start_until_ok(path, "roundtrip")
    assert moved_aside(path) or out["counters"]["blocks_dropped"] == 0


# -- known bugs, pinned (xfail strict: they fail until edge/store.py is fixed) ------------------------

def test_damage_found_by_a_commit_is_recovered(template: Template, tmp_path: Path) -> None:
    path = template.copy(tmp_path)
    data = path / "data.mdb"
    raw = bytearray(data.read_bytes())
    (at,) = occurrences(bytes(raw), template.values[template.overflow_block(5)])
    assert at % PAGE == 16  # the value starts right after its overflow page's 16-byte header
    struct.pack_into("<H", raw, at - 16 + 10, 0)  # mp_flags: P_OVERFLOW cleared
    data.write_bytes(raw)
    out, _ = start_until_ok(path)  # reading is fine: every block delivered intact
    assert_all_delivered_or_rejected(template, out)
    out, _ = start_until_ok(path, "roundtrip")  # fails: accept + commit raises lmdb.CorruptedError
    assert out["roundtrip"]


def main_root(raw: bytes) -> tuple[int, int]:
    """(root page of LMDB's main database, last page) per the newer of the two meta pages."""
    metas = []
    for p in (0, 1):  # page header 16 B; MDB_meta: magic, version u32, address, mapsize, dbs[2] of 48 B
        dbs = p * PAGE + 16 + 24
        root = struct.unpack_from("<Q", raw, dbs + 48 + 40)[0]
        last_pg, txnid = struct.unpack_from("<QQ", raw, dbs + 96)
        metas.append((txnid, root, last_pg))
    _, root, last_pg = max(metas)
    return root, last_pg


def test_truncation_is_detected_without_crashing(template: Template, tmp_path: Path) -> None:
    path = template.copy(tmp_path)
    data = path / "data.mdb"
    root, last_pg = main_root(data.read_bytes())
    assert 2 <= root < last_pg
    os.truncate(data, root * PAGE)  # the file ends just before the main database's root page
    out, runs = start_until_ok(path)
    assert [r.returncode for r in runs] == [0]  # fails: [-7, -7, -7, 0]
    assert_recovered(path, template, out, runs, "shorter than")


def test_totals_carry_over_a_recovery_at_open(tmp_path: Path) -> None:
    cfg = StoreConfig(path=tmp_path / "store", map_size=MAP_SIZE)
    store = Store(cfg, APPLIANCE)
    store.add([noisy_reading(k) for k in range(20_000)])
    store.commit()
    store.recover("first")  # its backlog counts as dropped, recoveries = 1
    store.add([noisy_reading(k) for k in range(20_000, 60_000)])
    store.commit()
    before = store.counters.recoveries, store.counters.blocks_dropped, store.counters.readings_dropped
    store.close()
    assert before[0] == 1 and before[2] == 20_000
    data = cfg.path / "data.mdb"
    root, last_pg = main_root(data.read_bytes())
    assert root < last_pg
    os.truncate(data, last_pg * PAGE)  # only the last page is cut off
    out, _ = start_until_ok(cfg.path)
    assert len(moved_aside(cfg.path)) == 2
    c = out["counters"]
    assert (c["recoveries"], c["blocks_dropped"], c["readings_dropped"]) == (2, *before[1:])


# -- recover() while running ------------------------------------------------------------------------

def small_store(tmp_path: Path) -> Store:
    store = Store(StoreConfig(path=tmp_path / "store", map_size=MAP_SIZE), APPLIANCE)
    store.add([noisy_reading(k) for k in range(20_000)])
    store.commit()
    return store


def present(store: Store) -> int:
    with store.env.begin() as txn:
        return sum(1 for _ in queue_items(txn))


def test_recover_moves_aside_and_continues(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = small_store(tmp_path)
    last = store.next_seq - 1
    with caplog.at_level(logging.ERROR, "edge.store"):
        store.recover("CRC of page 7 wrong")
    try:
        assert len(moved_aside(store.path)) == 1
        assert "is damaged (CRC of page 7 wrong)" in caplog.text
        assert store.counters.recoveries == 1 and store.counters.backlog_blocks == 0
        assert store.next_seq > last
        store.add([noisy_reading(k) for k in range(100)])
        store.commit()  # salvages the moved-aside store first: its blocks come back, oldest first
        blocks = store.take(1000)
        old, new = [b for b in blocks if b.seq <= last], [b for b in blocks if b.seq > last]
        assert [r for b in old for r in b.readings()] == [noisy_reading(k) for k in range(20_000)]
        assert [r for b in new for r in b.readings()] == [noisy_reading(k) for k in range(100)]
        assert (store.counters.blocks_salvaged, store.counters.readings_salvaged) == (len(old), 20_000)
        assert [p.name for p in moved_aside(store.path)] == [
            moved_aside(store.path)[0].name.replace(".damaged-", ".salvaged-")]
    finally:
        store.close()


def test_recover_counts_the_lost_backlog_as_dropped(tmp_path: Path) -> None:
    store = small_store(tmp_path)
    blocks, readings = store.counters.backlog_blocks, store.counters.backlog_readings
    try:
        store.recover("test")
        assert (store.counters.blocks_dropped, store.counters.readings_dropped) == (blocks, readings)
    finally:
        store.close()


def test_backlog_stays_exact_when_blocks_in_flight_survive_a_recovery(tmp_path: Path) -> None:
    store = small_store(tmp_path)
    try:
        taken = store.take(3)
        store.recover("test")
        store.accept(taken)  # the uplink's acknowledgements arrive after the recovery: ignored
        store.add([noisy_reading(k) for k in range(100)])
        store.commit()  # the salvaged blocks (those acknowledged included: at least once) and the new one
        assert store.counters.backlog_blocks == present(store) == store.counters.blocks_salvaged + 1
    finally:
        store.close()


def test_two_recoveries_in_the_same_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge.store.recovery.time, "strftime", lambda fmt, *a: "20300101T000000")
    store = small_store(tmp_path)
    try:
        store.recover("first")
        store.recover("second")
        assert len(moved_aside(store.path)) == 2
    finally:
        with contextlib.suppress(lmdb.Error):
            store.close()


def test_a_store_moved_aside_after_crashed_starts_is_salvaged_whole(template: Template,
                                                                   tmp_path: Path) -> None:
    """Three unclean starts in a row move an intact store aside: every block comes back into the fresh
    store under its own sequence number, with exactly its readings; nothing is stranded."""
    path = template.copy(tmp_path)
    (path.parent / f".{path.name}{MARKER}").write_text(str(CRASHED_OPENS))
    store = Store(StoreConfig(path=path, map_size=MAP_SIZE), APPLIANCE)
    try:
        assert store.counters.recoveries == 1 and store.counters.backlog_blocks == 0
        store.commit()
        got = {}
        while blocks := store.take(100):
            got.update((b.seq, digest_of(b)) for b in blocks)
            store.accept(blocks)
        assert got == {seq: digest(first, n) for seq, (n, first) in template.blocks.items()}
        assert store.counters.blocks_salvaged == len(template.blocks)
        (done,) = moved_aside(path)
        assert ".salvaged-" in done.name
    finally:
        store.close()


def test_a_salvage_child_that_crashes_leaves_the_appliance_running(template: Template,
                                                                  tmp_path: Path) -> None:
    """Half the file cut off: walking it kills the reader on a page beyond the end of the file. That
    reader is a child process: the store goes on, and what it salvaged is exactly what was stored."""
    path = template.copy(tmp_path)
    data = path / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    store = Store(StoreConfig(path=path, map_size=MAP_SIZE), APPLIANCE)
    try:
        store.add([noisy_reading(k) for k in range(10)])
        store.commit()
        got = {}
        while blocks := store.take(100):
            got.update((b.seq, digest_of(b)) for b in blocks)
            store.accept(blocks)
        salvaged = {seq: d for seq, d in got.items() if seq in template.blocks}
        assert salvaged == {seq: digest(*template.blocks[seq][::-1]) for seq in salvaged}
        assert len(got) - len(salvaged) == 1  # and the new block
        assert store.counters.blocks_salvaged == len(salvaged) < len(template.blocks)
    finally:
        store.close()


def digest_of(block: Block) -> str:
    return hashlib.sha256(repr(block.readings()).encode()).hexdigest()
