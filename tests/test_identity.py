"""One image on many boards: the appliance id when [appliance] id is not set (edge.identity).

A board serial cannot exist on this machine (no device tree, no "Serial" in /proc/cpuinfo), so the
serial tests give edge.identity a directory laid out like /proc with the files a Raspberry Pi has; the
machine-id tests use the real paths of a state directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge import identity
from edge.config import ConfigError, load, load_for_run, parse
from tests.support import ROOT


def fake_root(tmp: Path, *, device_tree: bytes | None = None, cpuinfo: str | None = None) -> Path:
    if device_tree is not None:
        (tmp / "proc" / "device-tree").mkdir(parents=True)
        (tmp / "proc" / "device-tree" / "serial-number").write_bytes(device_tree)
    if cpuinfo is not None:
        (tmp / "proc").mkdir(parents=True, exist_ok=True)
        (tmp / "proc" / "cpuinfo").write_text(cpuinfo)
    return tmp


def test_the_board_serial_comes_from_the_device_tree_else_from_cpuinfo(tmp_path: Path) -> None:
    dt = fake_root(tmp_path / "a", device_tree=b"10000000A1B2C3D4\0")
    assert identity.derived(tmp_path / "state", root=dt) == (
        "edge-10000000a1b2c3d4", "board serial (/proc/device-tree/serial-number)")
    cpu = fake_root(tmp_path / "b", cpuinfo="processor\t: 0\nHardware\t: BCM2835\n"
                                             "Serial\t\t: 00000000deadbeef\n")
    assert identity.derived(tmp_path / "state", root=cpu) == ("edge-deadbeef", "board serial (/proc/cpuinfo)")
    zeros = fake_root(tmp_path / "c", cpuinfo="Serial\t\t: 0000000000000000\n")  # a VM's: not an identity
    assert identity.derived(tmp_path / "state", root=zeros) is None
    assert not (tmp_path / "state").exists()  # reading made nothing


def test_without_a_serial_a_machine_id_is_made_once_and_kept(tmp_path: Path) -> None:
    none = tmp_path / "empty-root"
    none.mkdir()
    state = tmp_path / "state"
    assert identity.derived(state, root=none) is None
    made = identity.derived(state, create=True, root=none)
    assert made is not None and made[0].startswith("edge-") and len(made[0]) == 21
    assert made == identity.derived(state, root=none) == identity.derived(state, create=True, root=none)
    assert (state / "machine-id").read_text() == made[0].removeprefix("edge-") + "\n"
    assert [p.name for p in state.iterdir()] == ["machine-id"]  # no temporary file left
    other = identity.derived(tmp_path / "other-board", create=True, root=none)
    assert other is not None and other[0] != made[0]


def test_a_damaged_machine_id_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "machine-id").write_text("not hex at all\n")
    assert identity.machine_id(tmp_path) is None
    value = identity.machine_id(tmp_path, create=True)
    assert value is not None and (tmp_path / "machine-id").read_text() == value + "\n"


def test_two_boards_flashed_from_one_config_get_two_ids(tmp_path: Path) -> None:
    """The same config without an id: check changes nothing and says the id is still to be made; the
    first run of each board makes its own, and the config then reads it back."""
    for board in ("a", "b"):
        (tmp_path / board).mkdir()
        (tmp_path / board / "config.toml").write_text(
            f'[appliance]\nstate_dir = "{tmp_path / board / "state"}"\n[[device]]\nname = "d"\n'
            'host = "127.0.0.1"\n[[device.tag]]\nname = "t"\naddress = 0\n')
    conf_a, conf_b = tmp_path / "a" / "config.toml", tmp_path / "b" / "config.toml"
    checked = load_for_run(conf_a, make_id=False).appliance
    assert checked.id == "" and "made at the first run" in checked.id_source
    assert not (tmp_path / "a" / "state").exists()
    a, b = load_for_run(conf_a).appliance, load_for_run(conf_b).appliance
    assert a.id != b.id and a.id.startswith("edge-") and b.id.startswith("edge-")
    assert load(conf_a).appliance == a and a.id_source.startswith("machine id (")
    assert parse({"appliance": {"id": "pump-station-7"}}).appliance.id_source == "config"


def test_edge_id_prints_the_id_and_its_source_and_changes_nothing(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(f'[appliance]\nstate_dir = "{tmp_path / "state"}"\n')

    def edge_id(*flags: str) -> str:
        return subprocess.run([sys.executable, "-m", "edge", "id", *flags, str(conf)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=True).stdout

    assert edge_id().startswith("(none yet)\ta machine id, made at the first run in ")
    assert not (tmp_path / "state").exists()
    made = edge_id("--make")  # at boot, to name the host before the appliance runs
    path = tmp_path / "state" / "machine-id"
    expected = f"edge-{identity.machine_id(tmp_path / 'state')}\tmachine id ({path})\n"
    assert made == edge_id() == expected


def test_a_state_dir_that_cannot_hold_a_machine_id_is_a_config_error(tmp_path: Path) -> None:
    """The state directory's place is taken by a file (as root, a read-only directory would not stop
    the write): the run is refused with the key path, exit 2, before anything starts."""
    (tmp_path / "taken").write_text("a file, not a directory\n")
    conf = tmp_path / "config.toml"
    conf.write_text(f'[appliance]\nstate_dir = "{tmp_path / "taken" / "state"}"\n[[device]]\nname = "d"\n'
                    'host = "127.0.0.1"\n[[device.tag]]\nname = "t"\naddress = 0\n')
    with pytest.raises(ConfigError) as info:
        load_for_run(conf)
    assert info.value.problems[0].startswith("appliance.id: not set, and no machine id can be made in ")
    run = subprocess.run([sys.executable, "-m", "edge", "run", str(conf)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 2 and "appliance.id: not set" in run.stderr and "Traceback" not in run.stderr
