"""The store on a bad day: a state directory that cannot be used, a full file system, the store removed
while the appliance runs. Real file systems (tmpfs mounts in a private mount namespace), real `edge run`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge.store import inspect
from tests.support import STOPPED, EdgeProcess, start_sim, stop, wait_metric, write_map

ROOT = Path(__file__).resolve().parent.parent


def conf(tmp: Path, state_dir: Path, *, port: int = 1, interval: str = "1s", tags: int = 1,
         **store: str) -> Path:
    """A config of one TCP device (`tags` uint16 registers from 0) on 127.0.0.1:port."""
    path = tmp / "config.toml"
    extra = "".join(f'{k} = "{v}"\n' for k, v in store.items())
    tag = "".join(f'[[device.tag]]\nname = "t{a}"\naddress = {a}\n' for a in range(tags))
    path.write_text(f'[appliance]\nid = "f"\nstate_dir = "{state_dir}"\n[[device]]\nname = "d"\n'
                    f'host = "127.0.0.1"\nport = {port}\ninterval = "{interval}"\n{tag}'
                    f'[store]\nmap_size = "16MiB"\n{extra}[metrics]\nport = 0\n[uplink]\nport = 1\n')
    return path


def in_mount_namespace(script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a shell script in a private mount namespace (its mounts vanish with it); skip where that is not
    allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) not installed")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")
    return subprocess.run(["unshare", "-m", "sh", "-ec", script], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=ROOT)


def test_a_state_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory\n")
    proc = subprocess.run([sys.executable, "-m", "edge", "run", str(conf(tmp_path, state))], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stderr) == (2, f"edge: store: cannot use {state}: Not a directory\n")


def test_a_read_only_state_dir_is_one_line_and_exit_2_and_its_store_is_kept(tmp_path: Path) -> None:
    """A state directory on a read-only file system (empty, or holding a store: never moved aside)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = conf(tmp_path, mnt / "state")
    edge = f"{sys.executable} -m edge run {config}"
    make_store = (f"{sys.executable} -c 'from edge.config import load; from edge.store import Store; "
                  f"c = load(\"{config}\"); s = Store(c.store, \"f\"); s.add([(1, 1, 1.0, 0)]); s.close()'")
    proc = in_mount_namespace(f"""
        mount -t tmpfs -o ro,size=4m tmpfs {mnt}
        {edge} 2> {tmp_path}/empty.err || echo "exit $?" >> {tmp_path}/empty.err
        mount -o remount,rw {mnt}
        {make_store}
        mount -o remount,ro {mnt}
        {edge} 2> {tmp_path}/kept.err || echo "exit $?" >> {tmp_path}/kept.err
        ls -a {mnt}/state
    """)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "empty.err").read_text() == (
        f"edge: store: cannot use {mnt}/state: Read-only file system\nexit 2\n")
    assert (tmp_path / "kept.err").read_text() == (
        f"edge: store: cannot use {mnt}/state: Read-only file system\nexit 2\n")
    assert proc.stdout.split() == [".", "..", "store"]  # the store, not moved aside


def test_the_store_removed_while_edge_runs_is_noticed_counted_and_replaced(tmp_path: Path) -> None:
    """rm -rf of the state directory under a running appliance (offline: a backlog builds): the lost
    backlog is counted and logged once, a fresh store takes the readings from then on, and the stop's
    account adds up."""
    points = [{"table": "holding", "address": a, "type": "uint16", "wave": "counter", "step": 1.0}
              for a in range(20)]
    write_map(tmp_path / "map.toml", [{"id": 1, "points": points}])
    state = tmp_path / "state"
    with start_sim(tmp_path / "map.toml") as sim:
        assert sim.port is not None
        path = conf(tmp_path, state, port=sim.port, interval="20ms", tags=20, commit_interval="100ms")
        edge = EdgeProcess(path)
        try:
            mport = edge.metrics_port()
            lost = wait_metric(mport, "edge_store_backlog_readings", lambda v: v >= 2000)
            shutil.rmtree(state)
            wait_metric(mport, "edge_store_readings_dropped_total", lambda v: v >= lost, timeout=30)
            assert (state / "store" / "data.mdb").exists()  # a fresh store, taking readings again
            wait_metric(mport, "edge_store_backlog_readings", lambda v: v >= 1000)
        finally:
            code = stop(edge)
    assert code == 0, edge.log
    assert edge.log.count("was removed while edge ran") == 1, edge.log
    found = STOPPED.search(edge.log)
    assert found, edge.log
    polled, stored, delivered, backlog, dropped = map(int, found.groups())
    assert polled == stored == backlog + dropped and delivered == 0 and dropped >= lost
    assert inspect(state / "store", 16 << 20).readings == backlog  # what the fresh store holds at the end


def test_the_reservation_leaves_room_and_is_taken_when_the_file_system_grows(tmp_path: Path) -> None:
    """A map larger than the file system can hold (a small /data before it is grown at first boot):
    nothing is reserved (a failed fallocate could keep what it got and fill the disk), one line says
    so, the store works; once the file system has room, the next attempt reserves the file."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
import logging, os, subprocess, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
import edge.store.queue as queue
from pathlib import Path
from edge.config import StoreConfig
queue.RESERVE_RETRY = 0.0
data = Path("{mnt}/store/data.mdb")
s = queue.Store(StoreConfig(path=data.parent, map_size=64 << 20), "r")
print("ALLOCATED", os.stat(data).st_blocks * 512)
subprocess.run(["mount", "-o", "remount,size=256m", "{mnt}"], check=True)
s.add([(1, 1, 1.0, 0)])
s.commit()
print("ALLOCATED", os.stat(data).st_blocks * 512)
s.close()
"""
    proc = in_mount_namespace(f"mount -t tmpfs -o size=48m tmpfs {mnt}\n{sys.executable} -c '{script}'")
    assert proc.returncode == 0, proc.stderr
    allocated = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("ALLOCATED")]
    assert allocated[0] < 1 << 20 and allocated[1] >= 64 << 20, proc.stdout
    lines = proc.stdout.splitlines()
    assert sum("cannot reserve 64 MiB" in line for line in lines) == 1, lines
    assert any("64 MiB reserved for" in line for line in lines), lines
