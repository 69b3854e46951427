"""The `edge` command as a user runs it: real subprocesses, real simulated device."""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

from edge.config import load, tag_id
from edge.store import Store
from edge.store.recovery import PERSISTED
from hil.mapgen import map_from_device, write_map
from tests.support import start_sim

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
    assert re.search(r"^\s+10\s+0xFFFE\s+65534\s+-2\s+\.\.\s+\|", r.stdout, re.M), r.stdout
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


def test_probe_shows_each_float_order_and_text_and_why_a_port_cannot_open(tmp_path: Path) -> None:
    """A user finding a device's byte order: 12.5 as float32 CDAB reads 12.5 in the CDAB column only;
    the ASCII column shows text registers; a serial port that cannot be opened says why."""
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": 0, "type": "float32", "order": "CDAB", "value": 12.5},
        {"table": "holding", "address": 2, "type": "string", "length": 4, "value": "PUMP"}]}])
    with start_sim(tmp_path / "map.toml") as sim:
        r = edge("probe", f"tcp://127.0.0.1:{sim.port}/1", "--count", "4")
    assert r.returncode == 0, r.stderr
    header = [line for line in r.stdout.splitlines() if line.startswith("#")]
    assert len(header) == 3 and "ABCD" in header[2] and "CDAB" in header[2], r.stdout
    rows = [line for line in r.stdout.splitlines() if not line.startswith("#")]
    floats = rows[0].split("|")[1].split()
    assert floats[1] == "12.5" and floats[0] != "12.5", rows[0]  # ABCD, CDAB, BADC, DCBA
    assert '"PU"' not in rows[2] and "PU" in rows[2] and "MP" in rows[3]
    bad = edge("probe", "rtu:///dev/no-such-port?baud=9600&unit=1")
    assert bad.returncode == 1 and "/dev/no-such-port: No such file or directory" in bad.stderr, bad.stderr


def test_poll_once_fails_when_no_tag_read_good(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(f'[appliance]\nid = "p"\nstate_dir = "{tmp_path}"\n[[device]]\n'
                                     'name = "d"\nhost = "127.0.0.1"\nport = 1\ntimeout = "200ms"\n'
                                     '[[device.tag]]\nname = "t"\naddress = 0\n')
    r = edge("poll", str(tmp_path / "c.toml"), "--once")
    assert r.returncode == 1, r
    assert "[disconnected]" in r.stdout and "none of the 1 readings is good" in r.stderr
    assert "retrying" not in r.stderr  # nothing is retried in one pass


def test_every_subcommand_names_its_config_the_same_two_ways(tmp_path: Path) -> None:
    for args in (("check", "config.toml"), ("check", "--config", "config.toml")):
        r = edge(*args)
        assert r.returncode == 0 and "ok: 1 device" in r.stdout, (args, r.stderr)
    both = edge("check", "config.toml", "--config", "other.toml")
    assert both.returncode == 2 and "two configs named" in both.stderr
    for command in ("run", "status", "poll", "write"):
        help_text = edge(command, "--help").stdout
        assert "--config CONFIG" in help_text and "/etc/edge/config.toml" in help_text, command


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`edge ... | head`: the reader goes away; no traceback, no "no appliance answers", exit 0."""
    script = (f"{sys.executable} -m edge check config.toml | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}}")
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       check=False)
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": a, "type": "uint16", "value": a} for a in range(2000)]}])
    with start_sim(tmp_path / "map.toml") as sim:
        big = tmp_path / "big.toml"
        big.write_text(f'[appliance]\nid = "b"\n[[device]]\nname = "d"\nhost = "127.0.0.1"\n'
                       f"port = {sim.port}\n"
                       + "".join(f'[[device.tag]]\nname = "t{i}"\naddress = {i}\n' for i in range(2000)))
        bulk = subprocess.run(["bash", "-c", f"{sys.executable} -m edge poll {big} --once --json "
                               "| head -c 10 >/dev/null; echo ${PIPESTATUS[0]}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, check=False)
    assert r.stdout.strip() == "0" and r.stderr == "", r
    assert bulk.stdout.strip() == "0" and "Traceback" not in bulk.stderr and "Error" not in bulk.stderr, bulk


def test_store_inspect_fills_every_total_and_dump_shows_units(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'[appliance]\nid = "s"\nstate_dir = "{tmp_path}"\n[[device]]\nname = "d"\nhost = "h"\n'
                    '[[device.tag]]\nname = "p"\naddress = 0\nunit = "bar"\n[store]\nmap_size = "16MiB"\n')
    config = load(conf)
    store = Store(config.store, "s")
    store.add([(tag_id("d", "p"), 1_790_000_000_000_000_000, 2.5, 0)])
    store.close()
    inspect = edge("store", "inspect", str(conf))
    assert inspect.returncode == 0, inspect.stderr
    totals = next(line for line in inspect.stdout.splitlines() if line.strip().startswith("totals"))
    for name in PERSISTED:
        assert f"{name.replace('_', ' ')} 0" in totals, totals
    size = next(line for line in inspect.stdout.splitlines() if line.strip().startswith("size"))
    # Reserved where its file system has room to spare (CI machines may not): either way the real size.
    reserved = (tmp_path / "store" / "data.mdb").stat().st_blocks * 512 >= 16 << 20
    assert ("data.mdb 16.0 MiB (reserved)" if reserved else "data.mdb 0.0 MiB,") in size, size
    assert "written to" in size, size
    dump = edge("store", "dump", "--config", str(conf))
    assert dump.returncode == 0 and " d/p 2.5 bar good" in dump.stdout, dump


def listen_ports(n: int) -> list[int]:
    """`n` distinct free ports below the ephemeral range: a port the kernel hands out for outgoing
    connections may be held (TIME_WAIT) by one of them by the time a server wants to listen on it."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def test_demo_runs_on_the_ports_it_is_given_and_refuses_taken_ones(tmp_path: Path) -> None:
    """The README's main command with its flags: its own device, broker and metrics ports, readings
    flowing to its private broker; a port another program holds is named and nothing starts."""
    config = tmp_path / "demo.toml"
    config.write_text((ROOT / "config.toml").read_text().replace('state_dir = "./state"',
                                                                   f'state_dir = "{tmp_path / "state"}"'))
    device, broker, metrics = listen_ports(3)
    args = ["scripts/demo", "--config", str(config), "--device-port", str(device), "--broker",
            "--broker-port", str(broker), "--metrics-port", str(metrics)]
    r = subprocess.run([*args, "--seconds", "6"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pump1" in r.stdout and " up " in r.stdout and "connected, delivered" in r.stdout, r.stdout
    with socket.create_server(("127.0.0.1", 0)) as held:
        taken = held.getsockname()[1]
        args[args.index(str(broker))] = str(taken)
        refused = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert refused.returncode == 1 and f"port {taken} (broker) is taken" in refused.stderr, refused.stderr
    assert "edge run" not in refused.stderr
