"""Read-only access for `edge store inspect|dump`, safe while the appliance runs (LMDB readers)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge.reading import Reading
from edge.store.block import block_header, decode_block
from edge.store.layout import FIRST_KEY, U64, key_of, open_env, pages_used, parse_key, queue_items
from edge.store.recovery import PERSISTED


@dataclass
class StoreSummary:
    path: str
    appliance: str
    blocks: int
    readings: int
    first_seq: int | None
    last_seq: int | None
    oldest_ts: int | None
    newest_ts: int | None
    rejected_blocks: int
    file_bytes: int  # data.mdb's size (the map, when reserved)
    allocated_bytes: int  # the blocks of it the file system holds
    written_bytes: int  # the part LMDB has used: its last page
    used_bytes: int
    map_size: int
    next_seq: int
    persisted: dict[str, int]


def inspect(path: Path, map_size: int) -> StoreSummary:
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
        counters = dict.fromkeys(PERSISTED, 0)  # every total, 0 until it happened
        counters.update({k: U64.unpack(v)[0] for k, v in meta.items() if k not in ("appliance", "next_seq")})
        next_seq = U64.unpack(meta["next_seq"])[0] if "next_seq" in meta else 0
        st = (path / "data.mdb").stat()
        return StoreSummary(str(path), meta.get("appliance", b"").decode(), n_blocks, readings, first, last,
                       oldest, newest, n_rejected, st.st_size, st.st_blocks * 512,
                       (env.info()["last_pgno"] + 1) * 4096, used * 4096, map_size,
                       max(next_seq, (last or -1) + 1), counters)
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

