"""The appliance's id when [appliance] id is not set: one image flashed on many boards gives each its own.

    1. the board's serial number: the device tree's serial-number (a Raspberry Pi's, among others), else
       the "Serial" line of /proc/cpuinfo (older Raspberry Pi kernels): "edge-" + the serial in lower-case
       hex without leading zeros, e.g. edge-a1b2c3d4e5f60718
    2. else a machine id made once, at the first `edge run`, in the state directory (machine-id: 16
       random hex digits) and read from there ever after: "edge-" + those digits

The id names the MQTT client and the topics, so two boards never share one. Reading is side-effect free
(`edge check`, `edge id`); only `edge run` (or `edge id --make`) makes the machine id, written whole
(edge.durable), so a power cut leaves either none or the one that was made.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from edge.durable import write_whole

DEVICE_TREE_SERIAL = "proc/device-tree/serial-number"
CPUINFO = "proc/cpuinfo"
MACHINE_ID = "machine-id"
_HEX = re.compile(r"^[0-9a-fA-F]{4,32}$")


def board_serial(root: Path = Path("/")) -> tuple[str, str] | None:
    """(serial, where it was read) of this board; None where the board has none (a PC, a VM)."""
    try:
        raw = (root / DEVICE_TREE_SERIAL).read_bytes().rstrip(b"\0\n ").decode("ascii", "replace")
        if _HEX.match(raw) and raw.strip("0"):
            return raw.lower().lstrip("0"), f"/{DEVICE_TREE_SERIAL}"
    except OSError:
        pass
    try:
        for line in (root / CPUINFO).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Serial" and _HEX.match(value.strip()) and value.strip().strip("0"):
                return value.strip().lower().lstrip("0"), f"/{CPUINFO}"
    except OSError:
        pass
    return None


def machine_id(state_dir: Path, *, create: bool = False) -> str | None:
    """The machine id kept in the state directory; made there first when `create` (raises OSError if it
    cannot be written)."""
    path = state_dir / MACHINE_ID
    try:
        value = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{16}", value):
            return value
    except OSError:
        pass
    if not create:
        return None
    value = secrets.token_hex(8)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_whole(path, f"{value}\n".encode(), 0o644)
    return value


def derived(state_dir: Path, *, create: bool = False, root: Path = Path("/")) -> tuple[str, str] | None:
    """(id, where it comes from) for a config without [appliance] id; None when there is no board serial
    and no machine id yet (and `create` is false)."""
    serial = board_serial(root)
    if serial is not None:
        return f"edge-{serial[0]}", f"board serial ({serial[1]})"
    made = machine_id(state_dir, create=create)
    if made is not None:
        return f"edge-{made}", f"machine id ({state_dir / MACHINE_ID})"
    return None
