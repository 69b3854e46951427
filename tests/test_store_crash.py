"""kill -9 of a process writing the store, again and again on the same store: nothing committed is lost,
nothing deleted comes back, nothing is invented, and a kill is never mistaken for damage.

The writer (tests/store_writer.py) prints what each commit made durable; the test kills it at a random
moment, opens the store itself and compares. EDGE_CRASH_KILLS (default 50) sets the number of kills,
EDGE_CRASH_SEED the seed of the kill moments (printed, and named in every failure).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge.store import Store, decode_block
from edge.store.block import block_intact
from edge.store.layout import parse_key, queue_items
from edge.store.recovery import CRASHED_OPENS, MARKER
from tests.store_writer import APPLIANCE, config, reading

ROOT = Path(__file__).resolve().parent.parent
KILLS = int(os.environ.get("EDGE_CRASH_KILLS", "50"))
SEED = int(os.environ.get("EDGE_CRASH_SEED", str(random.SystemRandom().randrange(2**32))))
FIRST_I_STEP = 10_000_000  # run k appends readings k * FIRST_I_STEP, ...: far more than one run writes


@dataclass
class Run:
    """What one writer run printed before it was killed (complete lines only)."""

    open_seq: int
    committed: list[tuple[int, int, int]] = field(default_factory=list)  # (seq, n, first_i), in order
    accepted: list[int] = field(default_factory=list)  # P: accepted, deleted by the next commit
    deleted: list[int] = field(default_factory=list)  # A: that commit returned


def parse(out: str) -> Run:
    complete = out[: out.rfind("\n") + 1]  # a line cut by the kill is not a printed line
    lines = complete.splitlines()
    assert lines and lines[0].startswith("OPEN "), out
    run = Run(int(lines[0].split()[1]))
    for line in lines[1:]:
        kind, *fields = line.split()
        if kind == "C":
            seq, n, first_i = map(int, fields)
            run.committed.append((seq, n, first_i))
        elif kind == "P":
            run.accepted.append(int(fields[0]))
        elif kind == "A":
            run.deleted.append(int(fields[0]))
        else:
            raise AssertionError(f"unexpected line {line!r}")
    return run


def start_writer(path: Path, first_i: int, out: Path, err: Path,
                 *args: str) -> subprocess.Popen[bytes]:
    with out.open("wb") as o, err.open("wb") as e:
        return subprocess.Popen([sys.executable, "-m", "tests.store_writer", str(path), str(first_i), *args],
                                cwd=ROOT, stdout=o, stderr=e)


def wait_open(proc: subprocess.Popen[bytes], out: Path, err: Path, ctx: str) -> None:
    deadline = time.monotonic() + 30
    while b"\n" not in out.read_bytes():
        if proc.poll() is not None:
            raise AssertionError(f"{ctx}: writer exited {proc.returncode} before OPEN:\n{err.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{ctx}: writer did not open the store within 30 s")
        time.sleep(0.002)


def kill_writer(path: Path, first_i: int, delay: float, ctx: str, *args: str) -> None:
    """Start a writer (its output in writer.out and writer.err beside the store), let it run `delay`
    seconds after it opened the store, SIGKILL it."""
    out, err = path.parent / "writer.out", path.parent / "writer.err"
    proc = start_writer(path, first_i, out, err, *args)
    try:
        wait_open(proc, out, err, ctx)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"{ctx}: writer died by itself:\n{err.read_text()}"


@dataclass
class Seen:
    """The test's model of the store across runs."""

    blocks: dict[int, tuple[int, int]] = field(default_factory=dict)  # seq -> (n, first_i): must be there
    max_seq: int = -1  # highest sequence number ever printed or found
    commits: int = 0
    deletes: int = 0
    extras: int = 0
    uncertain_deletes: int = 0


def present_blocks(path: Path) -> tuple[list[tuple[int, int, bytes]], Store]:
    """(seq, n, value) of every stored block, read in this process; the closed Store for its counters."""
    store = Store(config(path), APPLIANCE)
    try:
        with store.env.begin() as txn:
            rows = []
            for key, value in queue_items(txn):
                assert len(key) == 12, key
                seq, n = parse_key(key)
                rows.append((seq, n, bytes(value)))
    finally:
        store.close()
    return rows, store


def check_block(seq: int, n: int, value: bytes, first_i: int, ctx: str) -> None:
    assert block_intact(value), f"{ctx}: block {seq} fails its checksum"
    got = decode_block(value)
    want = [reading(k) for k in range(first_i, first_i + n)]
    assert got == want, f"{ctx}: block {seq} (readings {first_i}..) holds other readings"


def check_after_kill(path: Path, run: Run, first_i: int, seen: Seen, ctx: str) -> None:
    assert run.open_seq > seen.max_seq, f"{ctx}: next_seq {run.open_seq} reuses <= {seen.max_seq}"
    for seq, n, fi in run.committed:
        assert seq not in seen.blocks, f"{ctx}: sequence {seq} committed twice"
        seen.blocks[seq] = (n, fi)
        seen.max_seq = max(seen.max_seq, seq)
    seen.commits += len(run.committed)
    for seq in run.deleted:
        assert seq in seen.blocks, f"{ctx}: A {seq} for a block never committed"
        del seen.blocks[seq]
    seen.deletes += len(run.deleted)
    # accepted and not yet confirmed deleted: the kill fell before or after the commit that deletes them
    pending = [s for s in run.accepted if s not in run.deleted]
    assert all(s in seen.blocks for s in pending), f"{ctx}: accepted a block never committed"

    rows, store = present_blocks(path)
    seqs = [seq for seq, _, _ in rows]
    assert seqs == sorted(set(seqs)), f"{ctx}: keys not strictly increasing"
    present = {seq: (n, value) for seq, n, value in rows}

    # what must be there is there, with exactly its readings
    for seq, (n, fi) in seen.blocks.items():
        if seq in present:
            assert present[seq][0] == n, f"{ctx}: block {seq} has n={present[seq][0]}, committed {n}"
            check_block(seq, n, present[seq][1], fi, ctx)
        else:
            assert seq in pending, f"{ctx}: committed block {seq} (readings {fi}..) is lost"
    gone = [s for s in pending if s not in present]
    assert not gone or len(gone) == len(pending), f"{ctx}: half of one commit's deletes applied: {gone}"
    for seq in gone:
        del seen.blocks[seq]
    seen.uncertain_deletes += len(gone)

    # the rest: blocks of the commit the kill interrupted before it printed them; nothing else
    extras = [seq for seq in seqs if seq not in seen.blocks]
    if extras:
        if run.committed:
            last_seq, last_n, last_fi = run.committed[-1]
            next_seq, next_i = last_seq + 1, last_fi + last_n
        else:
            next_seq, next_i = run.open_seq, first_i
        assert extras == list(range(next_seq, next_seq + len(extras))), (
            f"{ctx}: unexpected blocks {extras}, the next sequence was {next_seq}")
        assert not pending or gone, f"{ctx}: the interrupted commit appended but did not delete {pending}"
        for seq in extras:
            n, value = present[seq]
            check_block(seq, n, value, next_i, ctx)
            seen.blocks[seq] = (n, next_i)
            next_i += n
        seen.max_seq = max(seen.max_seq, extras[-1])
        seen.extras += len(extras)
    assert set(present) == set(seen.blocks), ctx

    c = store.counters
    assert (c.backlog_blocks, c.backlog_readings) == (len(rows), sum(n for _, n, _ in rows)), ctx
    assert store.next_seq > seen.max_seq, f"{ctx}: next_seq {store.next_seq} <= {seen.max_seq}"
    assert c.recoveries == 0, f"{ctx}: a kill was taken for damage"
    assert not list(path.parent.glob(f"{path.name}.damaged-*")), f"{ctx}: a kill was taken for damage"
    assert not (path.parent / f".{path.name}{MARKER}").exists(), f"{ctx}: open marker left behind"


@pytest.mark.timeout(60 + 2 * KILLS)
def test_kill_9_while_writing_never_loses_or_invents_a_block(tmp_path: Path) -> None:
    print(f"EDGE_CRASH_SEED={SEED} EDGE_CRASH_KILLS={KILLS}")
    rng = random.Random(SEED)
    path = tmp_path / "store"
    out = tmp_path / "writer.out"
    seen = Seen()
    delays = []
    for k in range(KILLS):
        ctx = f"seed={SEED} kill {k + 1}/{KILLS}"
        first_i = k * FIRST_I_STEP
        delay = rng.uniform(0.020, 0.300)
        if rng.random() < 0.5:  # aim near a commit (every 100 ms from OPEN): inside one, more often
            delay = min(0.300, rng.choice((0.1, 0.2, 0.3)) + rng.uniform(-0.002, 0.008))
        delays.append(delay)
        kill_writer(path, first_i, delay, ctx)
        check_after_kill(path, parse(out.read_text()), first_i, seen, ctx)
    print(f"{KILLS} kills: {seen.commits} blocks committed, {seen.deletes} deleted and confirmed, "
          f"{seen.uncertain_deletes} deleted by a commit the kill cut short, {seen.extras} appended by one, "
          f"{len(seen.blocks)} left")
    if KILLS >= 20:  # the run exercised the interesting cases (not a property of the store)
        assert seen.commits > 0 and seen.deletes > 0, f"seed={SEED}: the writer never committed"


def test_kills_in_a_row_without_a_clean_close_are_not_damage(tmp_path: Path) -> None:
    """The marker counts unclean stops; a start that opened and read the store through resets it, so
    writers killed one after the other (no clean close between them) never add up to "damaged"."""
    rng = random.Random(SEED + 1)
    path = tmp_path / "store"
    out = tmp_path / "writer.out"
    marker = path.parent / f".{path.name}{MARKER}"
    committed: dict[int, tuple[int, int]] = {}  # seq -> (n, first_i), printed C and not A
    maybe_gone: set[int] = set()  # accepted, deleted by a commit that may have landed before the kill
    deleted: set[int] = set()
    max_seq = -1
    for k in range(CRASHED_OPENS + 3):
        ctx = f"seed={SEED} kill {k + 1} in a row"
        kill_writer(path, k * FIRST_I_STEP, rng.uniform(0.1, 0.3), ctx)
        run = parse(out.read_text())
        assert run.open_seq > max_seq, f"{ctx}: next_seq {run.open_seq} reuses <= {max_seq}"
        for seq, n, first_i in run.committed:
            committed[seq] = (n, first_i)
            max_seq = max(max_seq, seq)
        for seq in run.deleted:
            committed.pop(seq, None)
            deleted.add(seq)
        maybe_gone |= set(run.accepted) - set(run.deleted)
        assert marker.read_text().strip() == "1", f"{ctx}: an unclean stop counted more than once"
        assert not list(path.parent.glob(f"{path.name}.damaged-*")), f"{ctx}: a kill was taken for damage"
    rows, store = present_blocks(path)
    present = {seq: (n, value) for seq, n, value in rows}
    for seq, (n, first_i) in committed.items():
        if seq in present:
            check_block(seq, n, present[seq][1], first_i, f"seed={SEED}")
        else:
            assert seq in maybe_gone, f"seed={SEED}: committed block {seq} is lost"
    for seq in set(present) - set(committed):  # appended by a commit a kill cut short before its C line
        assert seq not in deleted and block_intact(present[seq][1]), f"seed={SEED}: block {seq}"
    assert store.counters.recoveries == 0 and not marker.exists()
    assert (store.counters.backlog_blocks, store.counters.backlog_readings) == (
        len(rows), sum(n for _, n, _ in rows))


def test_kill_9_with_memory_first_never_hands_out_a_sequence_number_again(tmp_path: Path) -> None:
    """Staged blocks go out from RAM before anything is written: after a kill, the next start must not
    use any sequence number a block was sent under (the lease in meta), and every block in the store
    when the kill came is still there or was acknowledged."""
    rng = random.Random(SEED + 2)
    path = tmp_path / "store"
    out = tmp_path / "writer.out"
    sent: dict[int, int] = {}  # seq -> n, every block ever sent
    direct = 0
    for k in range(max(5, KILLS // 5)):
        ctx = f"seed={SEED} memory-first kill {k + 1}"
        kill_writer(path, k * FIRST_I_STEP, rng.uniform(0.05, 0.4), ctx, "--memory-first")
        lines = out.read_text()
        lines = lines[: lines.rfind("\n") + 1].splitlines()
        open_seq = int(lines[0].split()[1])
        assert all(open_seq > seq for seq in sent), f"{ctx}: next_seq {open_seq} was sent before"
        written = set()
        for line in lines[1:]:
            kind, seq, *rest = line.split()
            if kind == "S":
                n = int(rest[0])
                assert sent.setdefault(int(seq), n) == n, f"{ctx}: block {seq} sent again, changed"
            else:
                written.add(int(seq))
        rows, store = present_blocks(path)
        assert store.next_seq > max(sent, default=-1), ctx
        present = {seq for seq, _, _ in rows}
        assert written <= present, f"{ctx}: a written block (its acknowledgement lost) is gone"
        direct += sum(1 for s in sent if s % 3)
    assert direct > 0, "no block went out from RAM"
