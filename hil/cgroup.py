"""A memory-limited cgroup for one process of the bench (the appliance under memory pressure).

    with limited(96 << 20, "edge-bench") as group:
        subprocess.Popen([*group.prefix, "dist/edge", "run", "config.toml"])
        ...
        group.oom_kills(), group.peak()

Where the process runs as root beside a writable memory controller:

    cgroup v1   a child of this process's own memory cgroup, memory.limit_in_bytes = the limit
    cgroup v2   `systemd-run --scope -p MemoryMax=...` (a transient scope of the system manager, which owns
                the tree: a child of a cgroup that holds processes cannot get the memory controller)

`prefix` is an argv prefix that moves the process into the group before it execs the command, so every
byte the appliance allocates is charged there. Elsewhere `limited` raises Unavailable with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class Unavailable(RuntimeError):
    """No memory cgroup can be made here (not root, no memory controller, no systemd)."""


@dataclass
class Group:
    prefix: list[str]
    path: Path | None  # v1: the group's directory; v2 (a systemd scope): None until the process runs
    unit: str | None = None

    def _dir(self) -> Path | None:
        if self.path is not None:
            return self.path
        if self.unit is None:
            return None
        out = subprocess.run(["systemctl", "show", "-P", "ControlGroup", self.unit], capture_output=True,
                             text=True, check=False).stdout.strip()
        return ROOT / out.lstrip("/") if out else None

    def _read(self, name: str) -> str:
        d = self._dir()
        try:
            return (d / name).read_text() if d is not None else ""
        except OSError:
            return ""

    def oom_kills(self) -> int:
        """Processes the kernel killed for the group's limit (v1 memory.oom_control, v2 memory.events)."""
        for name in ("memory.events", "memory.oom_control"):
            for line in self._read(name).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def peak(self) -> int | None:
        """The group's peak memory charge in bytes (v1 max_usage_in_bytes, v2 memory.peak)."""
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            text = self._read(name).strip()
            if text:
                return int(text)
        return None


def _own_v1_memory() -> Path | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                d = ROOT / "memory" / path.lstrip("/")
                return d if (d / "memory.limit_in_bytes").exists() else None
    return None


@contextlib.contextmanager
def limited(limit: int, name: str) -> Iterator[Group]:
    if os.geteuid() != 0:
        raise Unavailable("a memory cgroup needs root")
    parent = _own_v1_memory()
    if parent is not None:
        path = parent / f"{name}-{os.getpid()}"
        try:
            path.mkdir()
            (path / "memory.limit_in_bytes").write_text(str(limit))
        except OSError as e:
            raise Unavailable(f"cannot make a memory cgroup under {parent}: {e}") from e
        script = f'echo $$ > {path / "cgroup.procs"} && exec "$@"'
        try:
            yield Group(["sh", "-c", script, "sh"], path)
        finally:
            for _ in range(50):  # the processes must have left before the directory can go
                with contextlib.suppress(OSError):
                    path.rmdir()
                    break
                time.sleep(0.1)
            else:
                print(f"hil.cgroup: {path} still holds processes; not removed", file=sys.stderr)
        return
    systemd = shutil.which("systemd-run") and Path("/run/systemd/system").exists()
    if (ROOT / "cgroup.controllers").exists() and systemd:
        unit = f"{name}-{os.getpid()}.scope"
        yield Group(["systemd-run", "--scope", "--quiet", f"--unit={unit}", "-p", f"MemoryMax={limit}",
                     "-p", "MemorySwapMax=0"], None, unit)
        return
    raise Unavailable("no cgroup v1 memory controller here and no systemd managing cgroup v2")
