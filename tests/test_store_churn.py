"""The store as a long-running FIFO: more than a million readings through it while the uplink comes and
goes, the file stops growing (LMDB reuses its free pages), nothing is dropped below the watermark; and a
full store drops exactly its oldest blocks, counted, without ever raising.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edge.config import StoreConfig
from edge.reading import Reading
from edge.store import Store, decode_block
from edge.store.layout import pages_used, parse_key, queue_items
from tests.store_writer import noisy_reading

WINDOW = 5_000  # readings per commit window
PAGE = 4096

# (forwarder up?, commit windows): outages of 300k, 150k, 300k, 50k and 300k readings
SCHEDULE = [(True, 10), (False, 60), (True, 25), (False, 30), (True, 20), (False, 60), (True, 25),
            (False, 10), (True, 25), (False, 60), (True, 25)]
BATCH = 64  # blocks per take(), as [uplink] batch_blocks
BATCHES_PER_WINDOW = 2


@dataclass
class Sample:
    window: int
    appended: int
    backlog: int
    file_bytes: int  # the part of data.mdb LMDB has used: (last_pgno + 1) pages (the file is reserved whole)
    last_pgno: int
    used_pages: int


def used_pages(store: Store) -> int:
    with store.env.begin() as txn:
        return pages_used(txn, (store.db_blocks, store.db_rejected, store.db_meta))


def sample(store: Store, window: int, appended: int) -> Sample:
    last = store.env.info()["last_pgno"]
    backlog = store.counters.backlog_readings
    return Sample(window, appended, backlog, (last + 1) * PAGE, last, used_pages(store))


def keys(store: Store) -> list[tuple[int, int]]:
    with store.env.begin() as txn:
        return [parse_key(k) for k, _ in queue_items(txn)]


def test_fifo_churn_reuses_pages_and_drops_nothing(tmp_path: Path) -> None:
    store = Store(StoreConfig(path=tmp_path / "store", map_size=32 << 20), "churn")
    sent: list[Reading] = []  # every reading appended, in order
    delivered = 0  # readings the forwarder took, checked against `sent` and accepted
    samples: list[Sample] = []
    window = 0
    try:
        for up, windows in SCHEDULE:
            for _ in range(windows):
                batch = [noisy_reading(i) for i in range(len(sent), len(sent) + WINDOW)]
                sent += batch
                store.add(batch)
                store.commit()
                if up:
                    for _ in range(BATCHES_PER_WINDOW):
                        blocks = store.take(BATCH)
                        for b in blocks:
                            assert b.readings() == sent[delivered:delivered + b.n], f"block {b.seq}"
                            delivered += b.n
                        store.accept(blocks)
                window += 1
                samples.append(sample(store, window, len(sent)))
        while blocks := store.take(BATCH):  # the uplink catches up: everything arrives, in order
            for b in blocks:
                assert b.readings() == sent[delivered:delivered + b.n], f"block {b.seq}"
                delivered += b.n
            store.accept(blocks)
        store.commit()
        c = store.counters
        assert delivered == len(sent) == c.readings_appended == c.readings_forwarded >= 1_000_000
        assert (c.blocks_dropped, c.readings_dropped, c.commit_failures) == (0, 0, 0)
        assert (c.backlog_blocks, c.backlog_readings) == (0, 0) and keys(store) == []
    finally:
        store.close()

    backlog = [s.backlog for s in samples]
    peak = max(backlog)
    assert peak >= 290_000 and min(backlog[11:]) <= 2 * WINDOW  # the backlog swung
    # The full outages, each (its peak window, the window the backlog settled again)
    outages = []
    k = 0
    while k < len(samples):
        if backlog[k] >= 0.95 * peak:
            settled = next(m for m in range(k, len(samples)) if backlog[m] <= 2 * WINDOW)
            outages.append((k, settled))
            k = settled
        k += 1
    assert len(outages) == 3, outages
    report = "\n".join(f"  window {s.window:4d}  appended {s.appended:9,d}  backlog {s.backlog:7,d}  "
                       f"data.mdb {s.file_bytes:10,d}  last_pgno {s.last_pgno:5d}  used {s.used_pages:5d}"
                       for s in samples if s.window % 10 == 0)
    sizes = [max(s.file_bytes for s in samples[: settled + 1]) for _, settled in outages]
    print(f"churn: {len(sent):,} readings, max backlog {peak:,}, data.mdb after each full outage "
          f"{sizes}, {max(s.file_bytes for s in samples):,} B overall\n{report}")
    # Blocks of up to four pages need contiguous free runs, so a second outage may grow the file a little
    # (fragmentation); from then on the same backlog fits in the same file, and the file never exceeds
    # what the largest backlog needs plus a quarter.
    assert sizes[2] == sizes[1], "data.mdb kept growing with every outage"
    assert max(s.file_bytes for s in samples) == sizes[2]
    peak_used = max(s.used_pages for s in samples) * PAGE
    assert sizes[2] <= 1.25 * peak_used + 64 * PAGE, (sizes, peak_used)


def test_full_store_drops_exactly_the_oldest(tmp_path: Path) -> None:
    map_size = 4 << 20
    cfg = StoreConfig(path=tmp_path / "store", map_size=map_size)
    store = Store(cfg, "full")
    appended = 0
    first_seqs = []
    try:
        for _ in range(130):  # ~2x what the map holds
            store.add([noisy_reading(i) for i in range(appended, appended + WINDOW)])
            appended += WINDOW
            assert store.commit() > 0
            c = store.counters
            ks = keys(store)
            seqs = [s for s, _ in ks]
            present = sum(n for _, n in ks)
            assert seqs == list(range(seqs[0], store.next_seq)), "a gap: dropped blocks were not the oldest"
            assert appended - present - c.readings_forwarded == c.readings_dropped
            assert c.blocks_committed - len(ks) == c.blocks_dropped
            assert (c.backlog_blocks, c.backlog_readings) == (len(ks), present)
            assert c.commit_failures == 0
            assert store.env.info()["last_pgno"] < map_size // PAGE
            assert used_pages(store) <= cfg.high_watermark * map_size // PAGE
            first_seqs.append(seqs[0])
        assert c.blocks_dropped > 0 and appended > 1.5 * present
        assert first_seqs == sorted(first_seqs) and first_seqs[-1] > first_seqs[0]
        with store.env.begin() as txn:  # what is left is the newest, intact
            left = [r for _, v in queue_items(txn) for r in decode_block(v)]
        assert left == [noisy_reading(i) for i in range(appended - present, appended)]
        assert (store.path / "data.mdb").stat().st_size <= map_size
    finally:
        store.close()
    store = Store(cfg, "full")  # the counts are persisted
    try:
        c2 = store.counters
        assert (c2.blocks_dropped, c2.readings_dropped) == (c.blocks_dropped, c.readings_dropped)
        assert (c2.backlog_blocks, c2.backlog_readings) == (len(ks), present)
    finally:
        store.close()
    print(f"full store: {appended:,} appended, {present:,} kept, {c.readings_dropped:,} dropped in "
          f"{c.blocks_dropped} blocks, data.mdb {os.path.getsize(cfg.path / 'data.mdb'):,} B of {map_size:,}")


# -- the watermark with refused blocks ----------------------------------------------------------------

def rejected_pages(store: Store) -> int:
    with store.env.begin() as txn:
        s = txn.stat(store.db_rejected)
        return int(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"])


def test_watermark_with_fewer_blocks_than_pages_to_free_never_raises(tmp_path: Path) -> None:
    map_size = 4 << 20
    store = Store(StoreConfig(path=tmp_path / "store", map_size=map_size), "full")
    appended = 0
    try:
        while rejected_pages(store) < 0.76 * map_size // PAGE:  # the receiver refuses everything
            store.add([noisy_reading(i) for i in range(appended, appended + 4000)])
            appended += 4000
            store.commit()
            store.reject(store.take(10**6), "refused: schema")
        for _ in range(20):  # then no uplink at all: the store fills up
            store.add([noisy_reading(i) for i in range(appended, appended + 4000)])
            appended += 4000
            store.commit()  # the watermark frees more pages than `blocks` holds: trims `rejected`
        assert store.counters.commit_failures == 0
    finally:
        store.close()


def test_rejected_blocks_cannot_wedge_the_store(tmp_path: Path) -> None:
    store = Store(StoreConfig(path=tmp_path / "store", map_size=4 << 20), "full")
    appended = 0
    try:
        for _ in range(110):  # more than the map holds, every block refused upstream
            store.add([noisy_reading(i) for i in range(appended, appended + 4000)])
            appended += 4000
            store.commit()
            store.reject(store.take(10**6), "refused: schema")
        store.commit()
        assert store.counters.commit_failures == 0
        assert store.pending() == 0
    finally:
        store.close()
