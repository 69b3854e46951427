"""Read a config file into a Config: the file checked (a bounded regular file, UTF-8), the TOML parsed,
the sections validated (edge.config.sections).

A large config is mostly [[device.tag]] tables, and a TOML tree of them all costs about eight times the
file's size in small objects at once. So the document is parsed in two parts:

- the skeleton: the document without its [[device.tag]] tables, parsed whole by tomllib;
- the tags: each device's [[device.tag]] tables, cut from the text at their header lines and parsed by
  tomllib a batch of TAG_BATCH at a time while the device is validated, each batch dropped before the
  next is parsed.

The cut is checked, not trusted: a document holding multi-line strings (the one TOML construct whose
lines may look like headers) is parsed whole; every batch must parse to exactly the tag tables cut for it;
the skeleton must hold exactly the [[device]] tables counted, none of them with tags of its own. Anything
else (a syntax error, a header spelled in a way the cut does not see, tables before any [[device]]) makes
the document parsed whole, the way tomllib alone reads it: the result, and every error message, are the
same as without the cut.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from array import array
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge import identity
from edge.config.reader import Tables
from edge.config.schema import Config, ConfigError
from edge.config.sections import parse
from edge.durable import write_whole

MAX_CONFIG_BYTES = 8 << 20  # about 100,000 tags
TAG_BATCH = 256  # [[device.tag]] tables parsed at once

_LINE_START = re.compile(r"^[ \t]*\[", re.M)  # every header line starts so (and some array lines do)
_TAG = ("device", "tag")


def load(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError (unreadable file, not a regular file, larger
    than MAX_CONFIG_BYTES, not UTF-8, TOML syntax, schema)."""
    try:
        raw = read_bounded(path)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from e
    return loads(raw, Path(path).resolve().parent, str(path))


def loads(raw: bytes, base: Path, name: str) -> Config:
    """A config from its bytes (a file's, or a pushed one's), relative paths resolved against `base`,
    problems prefixed with `name`. Raises ConfigError."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{name}: {len(raw):,} bytes, above the {MAX_CONFIG_BYTES:,} a config may have"])
    try:
        text = raw.decode()
        try:
            return parse(_streamed(text), base)
        except (_Whole, tomllib.TOMLDecodeError, ConfigError):
            return parse(tomllib.loads(text), base)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{name}: invalid TOML: {e}"]) from e
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"{name}: not UTF-8 text: byte 0x{e.object[e.start]:02x} on line {line}"]) from e
    except RecursionError as e:
        raise ConfigError([f"{name}: invalid TOML: arrays or tables nested too deeply"]) from e


PERSISTED = "config.toml"  # in the state directory: the last config pushed (cmd/config) and kept


def persisted(config: Config) -> Path:
    """Where a pushed config that passed its trial is kept: the state directory of the config given."""
    return config.appliance.state_dir / PERSISTED


def keep(path: Path, raw: bytes) -> Path:
    """Write a kept config's (or a secret's) bytes to `path`, whole or not at all (edge.durable), mode
    0600 (it may name key files and broker credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_whole(path, raw)


def check_devices(config: Config, name: str) -> Config:
    """The config, or ConfigError if it would poll nothing (no [[device]]: an empty or truncated file)."""
    if not config.devices:
        raise ConfigError([f"{name}: no device configured (a [[device]] table with its tags): nothing to "
                           "poll"])
    return config


def load_for_run(path: str | Path, *, make_id: bool = True) -> Config:
    """load(), and a config that would poll nothing (no [[device]]: an empty or truncated file) refused;
    without [appliance] id nor a board serial, the machine id is made now (edge.identity) unless
    `make_id` is false (`edge check` changes nothing)."""
    config = check_devices(load(path), str(path))
    return with_id(config) if make_id else config


def with_id(config: Config) -> Config:
    """The config with its appliance id: without [appliance] id nor a board serial, the machine id is
    made now (edge.identity); ConfigError if it cannot be."""
    if config.appliance.id:
        return config
    state_dir = config.appliance.state_dir
    try:
        made = identity.derived(state_dir, create=True)
    except OSError as e:
        raise ConfigError([f"appliance.id: not set, and no machine id can be made in {state_dir}: "
                           f"{e.strerror}"]) from e
    assert made is not None
    return replace(config, appliance=replace(config.appliance, id=made[0], id_source=made[1]))


def _check_file(path: str | Path, st: os.stat_result) -> None:
    """A regular file (not a device, FIFO or directory: /dev/zero never ends, a FIFO blocks) of at most
    MAX_CONFIG_BYTES."""
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a file")
        raise ConfigError([f"{path}: not a regular file ({kind})"])
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: {st.st_size:,} bytes, above the {MAX_CONFIG_BYTES:,} a config may have"])


def read_bounded(path: str | Path) -> bytes:
    """The file's bytes, checked on the open file (O_NONBLOCK: opening a FIFO does not block)."""
    _check_file(path, os.stat(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        _check_file(path, os.fstat(fd))  # it may have been replaced since
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:  # it grew
        raise ConfigError([f"{path}: above the {MAX_CONFIG_BYTES:,} bytes a config may have"])
    return data


class _Whole(Exception):
    """The cut does not hold for this document: parse it whole."""


class _TagTables(Tables):
    """One device's [[device.tag]] tables: spans of the document's text, parsed a batch at a time."""

    def __init__(self, text: str, starts: array[int], ends: array[int]) -> None:
        self.text, self.starts, self.ends = text, starts, ends

    def __iter__(self) -> Iterator[Any]:
        starts, ends, n, i = self.starts, self.ends, len(self.starts), 0
        while i < n:
            j = i + 1  # a batch: up to TAG_BATCH tables, each starting where the one before ends
            while j < n and j - i < TAG_BATCH and starts[j] == ends[j - 1]:
                j += 1
            doc = tomllib.loads(self.text[starts[i]:ends[j - 1]])
            device = doc.get("device") if len(doc) == 1 else None
            tables = device.get("tag") if isinstance(device, dict) and len(device) == 1 else None
            if not isinstance(tables, list) or len(tables) != j - i:
                raise _Whole
            yield from tables
            i = j


def _header(line: str) -> tuple[tuple[str, ...], bool] | None:
    """(key path, array of tables?) of a header line; None when the line is not one on its own."""
    bare = line.strip()
    if bare == "[[device.tag]]":
        return _TAG, True
    if bare == "[[device]]":
        return ("device",), True
    try:
        doc: Any = tomllib.loads(line)
    except tomllib.TOMLDecodeError:
        return None
    path: list[str] = []
    while isinstance(doc, dict) and len(doc) == 1:
        key, doc = next(iter(doc.items()))
        path.append(key)
        if isinstance(doc, list):
            return (tuple(path), True) if doc == [{}] else None
    return (tuple(path), False) if doc == {} and path else None


def _streamed(text: str) -> dict[str, Any]:
    """The document with each device's tag tables as a _TagTables (see the module's docstring); raises
    _Whole when the cut does not hold."""
    if '"""' in text or "'''" in text:
        raise _Whole
    skeleton: list[str] = []
    devices: list[tuple[array[int], array[int]]] = []
    kept = 0  # the text up to here is in the skeleton or in a tag table
    in_tag = False
    for m in _LINE_START.finditer(text):
        at = m.start()
        end = text.find("\n", at)
        header = _header(text[at:end if end >= 0 else len(text)].rstrip("\r"))
        if header is not None and header[0][:2] == _TAG and len(header[0]) > 2 and in_tag:
            continue  # a table inside the tag ([device.tag.x]): part of it, an unknown key to validation
        if in_tag:
            devices[-1][1].append(at)
            kept, in_tag = at, False
        if header == (_TAG, True):
            if not devices:
                raise _Whole
            if at > kept:
                skeleton.append(text[kept:at])
            devices[-1][0].append(at)
            kept, in_tag = at, True
        elif header == (("device",), True):
            devices.append((array("L"), array("L")))
    if in_tag:
        devices[-1][1].append(len(text))
    else:
        skeleton.append(text[kept:])
    doc = tomllib.loads("".join(skeleton))
    del skeleton
    if not any(starts for starts, _ in devices):
        return doc
    tables = doc.get("device")
    if not isinstance(tables, list) or len(tables) != len(devices):
        raise _Whole
    for table, (starts, ends) in zip(tables, devices, strict=True):
        if not isinstance(table, dict) or (starts and "tag" in table):
            raise _Whole
        if starts:
            table["tag"] = _TagTables(text, starts, ends)
    return doc
