"""Small files that must survive a power cut whole: the machine id, a kept config, moved secrets."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """`path` holds `data`, whole or not at all, also after a power cut: written to a temporary file beside
    it, fsync, renamed over it, then the directory fsync'd (the rename is metadata: on /data, mounted
    commit=60, it could otherwise be lost for up to a minute)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path
