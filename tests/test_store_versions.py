"""One store carried across versions of `edge run`, as an update and a rollback leave it on /data.

The previous version is real code: the package as it was at PREVIOUS, taken from this repository's
history (`git archive`), run beside the current one against the same simulated device, the same state
directory and a real mosquitto. The versions take turns, online and offline:

    previous offline  a backlog in the previous version's store
    current  online   the update: that backlog delivered, new blocks from RAM (memory-first)
    current  offline  a backlog in the current version's store (its sequence lease in meta)
    previous online   the rollback: the current version's backlog delivered by the previous one
    current  online   updated again

Every reading any run stored arrives, once, and no two blocks share a sequence number: a version never
reuses a number the other used (the subscriber's copies of one number must be identical).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    MAP,
    ROOT,
    STOPPED,
    EdgeProcess,
    Subscriber,
    check_values_and_order,
    config_dict,
    free_port,
    received,
    start_broker,
    start_sim,
    stop,
    wait_metric,
    write_config,
    write_map,
)

# The last version before memory-first forwarding, which added the sequence lease (meta next_seq ahead of
# what is used) and blocks sent from RAM before they are written.
PREVIOUS = "87c71eed475969590475477ef9d1ffe6a51eb070"


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The command that runs the previous version's `edge` (its package first on sys.path)."""
    known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS}^{{commit}}"],
                           capture_output=True, check=False)
    if known.returncode != 0:  # a shallow clone or a tree without its history
        pytest.skip(f"the previous version ({PREVIOUS[:12]}) is not in this checkout's git history")
    dest = tmp_path_factory.mktemp("previous")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS, "edge"], capture_output=True,
                             check=False)
    assert archive.returncode == 0, f"the previous version is taken from git history: {archive.stderr!r}"
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    boot = f"import sys; sys.path.insert(0, {str(dest)!r}); from edge.cli import main; sys.exit(main())"
    where = subprocess.run([sys.executable, "-c", boot.replace("from edge.cli import main; sys.exit(main())",
                                                                 "import edge; print(edge.__file__)")],
                           capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(dest)), where.stdout  # not the current package
    return [sys.executable, "-c", boot]


def run_until(cmd: list[str], conf: Path, readings: int) -> tuple[int, int]:
    """`edge run` until it stored `readings` more, then SIGTERM: (readings this run stored, readings left
    in the store's backlog at its stop)."""
    edge = EdgeProcess(conf, cmd)
    try:
        port = edge.metrics_port()
        wait_metric(port, "edge_store_readings_appended_total", lambda v: v >= readings)
    finally:
        code = stop(edge)
    m = STOPPED.search(edge.log)
    assert code == 0 and m is not None, edge.log[-4000:]
    assert "Traceback" not in edge.log and int(m.group(5)) == 0, edge.log[-4000:]  # nothing dropped
    return int(m.group(2)), int(m.group(4))


def delivered(sub: Subscriber) -> int:
    return sum(m["count"] for m in received(sub).values())


def test_a_store_survives_an_update_and_a_rollback(tmp_path: Path, previous: list[str]) -> None:
    current = [sys.executable, "-m", "edge"]
    write_map(tmp_path / "map.toml", MAP)
    with start_sim(tmp_path / "map.toml") as sim, start_broker(tmp_path / "mqtt") as broker:
        assert sim.port is not None
        sub = Subscriber(broker.port)
        try:
            online, offline = tmp_path / "online.toml", tmp_path / "offline.toml"
            write_config(online, config_dict(tmp_path, sim.port, broker.port))
            write_config(offline, config_dict(tmp_path, sim.port, free_port()))  # nothing listens there
            stored = 0
            new: list[set[int]] = []  # per online run, the sequence numbers it delivered
            for cmd, conf in [(previous, offline), (current, online), (current, offline), (previous, online),
                              (current, online)]:
                before = set(received(sub))
                n, backlog = run_until(cmd, conf, 60)
                stored += n
                if conf == online:  # the backlog it found and its own blocks, but for its last window
                    sub.wait(lambda s, want=stored - backlog: delivered(s) >= want)
                    new.append(set(received(sub)) - before)
            msgs = received(sub)  # a number received twice must carry the same block
        finally:
            sub.close()
    left = subprocess.run([*current, "store", "dump", "--json", str(online)], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.splitlines()
    assert delivered_total(msgs) + len(left) == stored and len(left) == backlog  # every reading, once
    check_values_and_order(msgs)
    for earlier, later in itertools.pairwise(new):
        assert max(earlier) < min(later)  # each version went on above the numbers used before it


def delivered_total(msgs: dict[int, dict[str, Any]]) -> int:
    return sum(m["count"] for m in msgs.values())
