"""The hand-off between the producer (poll, on the event loop) and the commit (a worker thread), under
thread switches forced every few microseconds: every reading is stored exactly once and every block
decodes, in every run."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.config import StoreConfig
from edge.policy import Policy
from edge.reading import Reading
from edge.store import Store, decode_block
from edge.store.layout import queue_items

BATCH = 37  # readings a request hands over
VALUES = (float, lambda i: i, lambda i: f"s{i}", lambda i: None, lambda i: i % 2 == 0)


def batch(start: int, n: int) -> list[Reading]:
    """Readings numbered by their timestamp; the value kinds vary (strings have their own column)."""
    return [(i % 1000, i, VALUES[i % 5](i), 0 if i % 5 != 3 else 1) for i in range(start, start + n)]


@pytest.fixture
def switchy() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def stored(store: Store) -> list[Reading]:
    """Every reading of every block in the queue, in order (a block that does not decode fails here)."""
    out: list[Reading] = []
    with store.env.begin(buffers=True) as txn:
        for _, value in queue_items(txn):
            out.extend(decode_block(bytes(value)))
    return out


def test_a_producer_thread_and_a_commit_thread_lose_nothing(tmp_path: Path, switchy: None) -> None:
    """add() in one thread, commit() in a loop in another: 400,000 readings."""
    n = 400_000
    store = Store(StoreConfig(path=tmp_path / "store", map_size=256 << 20), "a")
    done, committed = threading.Event(), threading.Event()
    waited: list[bool] = []

    def produce() -> None:
        for k, i in enumerate(range(0, n, BATCH)):
            store.add(batch(i, min(BATCH, n - i)))
            if k % 500 == 499:  # now and then a commit in the middle, however the threads are scheduled
                committed.clear()
                waited.append(committed.wait(30))
        done.set()

    def commit() -> None:
        while not done.is_set():
            store.commit()
            committed.set()

    threads = [threading.Thread(target=produce), threading.Thread(target=commit)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    store.commit()
    assert stored(store) == batch(0, n)  # each once, in order, every value intact
    assert store.counters.readings_appended == store.counters.backlog_readings == n
    assert waited and all(waited)  # the commits really ran beside the producer
    assert store.counters.commits > len(waited)
    store.close()


def test_the_commit_loop_beside_poll_and_forward_on_one_event_loop(tmp_path: Path, switchy: None) -> None:
    """The appliance's own arrangement: add() and take()/accept() on the event loop, the commit loop
    writing in its worker thread with a 10 ms window; 300,000 readings forwarded exactly once."""
    n = 300_000
    store = Store(StoreConfig(path=tmp_path / "store", map_size=256 << 20), "a")
    forwarded: list[Reading] = []
    committed = asyncio.Event()

    async def produce() -> None:
        for i in range(0, n, BATCH):
            store.add(batch(i, min(BATCH, n - i)))
            if i % (BATCH * 20) == 0:
                await asyncio.sleep(0)

    async def forward() -> None:
        while len(forwarded) < n:
            blocks = store.take(8)
            forwarded.extend(r for b in blocks for r in b.readings())
            store.accept(blocks)
            if not blocks:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(committed.wait(), 1.0)
                committed.clear()

    async def main() -> None:
        loop = asyncio.create_task(store.run(lambda: Policy(commit_interval=0.01), committed.set))
        try:
            await asyncio.wait_for(asyncio.gather(produce(), forward()), 120)
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop

    asyncio.run(main())
    assert forwarded == batch(0, n)
    store.commit()  # the deletes of the last acknowledged blocks
    c = store.counters
    assert (c.readings_forwarded, c.backlog_readings, c.readings_dropped) == (n, 0, 0)
    assert c.commits > 10
    assert stored(store) == []
    store.close()
