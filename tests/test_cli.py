"""The `edge` command as a user runs it: real subprocesses, real simulated device."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from edge.config import load
from hil.mapgen import map_from_device, write_map
from tests.peers import start_sim

ROOT = Path(__file__).resolve().parent.parent


def edge(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


def test_version() -> None:
    r = edge("--version")
    assert r.returncode == 0 and re.fullmatch(r"edge \d+\.\d+\.\d+\n", r.stdout)


def test_check_demo_config_prints_plan() -> None:
    r = edge("check", "config.toml")
    assert r.returncode == 0, r.stderr
    plan = "pump1 (tcp 127.0.0.1:5020 unit 1): 4 requests touching 18 registers and 1 bit for 7 tags"
    assert plan in r.stdout


def test_demo_config_polled_once_against_its_simulated_device(tmp_path: Path) -> None:
    """The README demo path: map generated from config.toml, every tag read good."""
    cfg = load(ROOT / "config.toml")
    write_map(tmp_path / "map.toml", [map_from_device(d) for d in cfg.devices])
    with start_sim(tmp_path / "map.toml") as sim:
        text = (ROOT / "config.toml").read_text().replace("port = 5020", f"port = {sim.port}")
        (tmp_path / "config.toml").write_text(text)
        r = edge("poll", "config.toml", "--once", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(row["tag"] for row in rows) == sorted(t.name for t in cfg.devices[0].tags)
    assert all(row["quality"] == "good" for row in rows), rows
    serial = next(row for row in rows if row["tag"] == "serial")
    assert serial["value"] == "SIM-pump"


def test_probe_reads_registers_and_fails_clearly(tmp_path: Path) -> None:
    write_map(tmp_path / "map.toml", [{"id": 3, "points": [
        {"table": "holding", "address": 10, "type": "int16", "value": -2}]}])
    with start_sim(tmp_path / "map.toml") as sim:
        r = edge("probe", f"tcp://127.0.0.1:{sim.port}/3", "--address", "10", "--count", "2")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\s+10\s+0xFFFE\s+65534\s+-2$", r.stdout, re.M), r.stdout
    bad = edge("probe", "ftp://x/1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown scheme" in bad.stderr
    gone = edge("probe", f"tcp://127.0.0.1:{sim.port}/3", "--timeout", "0.3")
    assert gone.returncode == 1 and "cannot connect" in gone.stderr


def test_bad_config_exits_2_with_key_path(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[[device]]\nname = "d"\nhost = "h"\n[[device.tag]]\nname = "t"\n'
                                     'address = 1\ntype = "flaot32"\n')
    r = edge("check", str(tmp_path / "c.toml"))
    assert r.returncode == 2
    assert r.stderr.startswith('edge: device[0].tag[0].type: unknown type "flaot32"')
    missing = edge("check", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
