"""Typed reading of one TOML table with key-path errors: every problem is recorded (never raised), so one
pass reports them all, and a key the schema does not read is an error (a typo must not silently disable a
setting)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*([0-9]+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 1 << 10, "MiB": 1 << 20,
               "GiB": 1 << 30}
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")  # \Z: "$" would take a trailing newline
MISSING: Any = object()


class Tables(Iterable[Any]):
    """An array of tables handed over one at a time instead of as a list (edge.config.source streams a
    device's [[device.tag]] tables this way)."""


class Reader:
    """Typed access to one TOML table with key-path error reporting and unknown-key detection."""

    def __init__(self, table: Any, path: str, problems: list[str], base: Path | None = None) -> None:
        self.path = path
        self.problems = problems
        self.base = base or Path.cwd()  # relative paths are relative to the config file's directory
        if not isinstance(table, dict):
            self.fail("", f"expected a table, got {_kind(table)}")
            table = {}
        self.table: dict[str, Any] = table
        self.used: set[str] = set()
        # where an array's items come from, when not all from this table (a device's tags from its
        # template): key -> each item's own path
        self.item_paths: dict[str, list[str]] = {}

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path and key else self.path or key

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{self.key_path(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.table

    def typed(self, key: str, kinds: tuple[type, ...], what: str, required: bool = False) -> Any:
        """The value if present and of the right kind, else MISSING (a problem recorded if wrong)."""
        self.used.add(key)
        if key not in self.table:
            if required:
                self.fail(key, "required")
            return MISSING
        value = self.table[key]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            self.fail(key, f"expected {what}, got {_kind(value)} {value!r}")
            return MISSING
        if isinstance(value, str) and not value.strip() and str in kinds and kinds != (str,):
            self.fail(key, "must not be empty")
            return MISSING
        return value

    def _range(self, key: str, value: Any, lo: float | None, hi: float | None, unit: str = "") -> bool:
        if lo is not None and hi is not None and not lo <= value <= hi:
            self.fail(key, f"{value}{unit} out of range {lo}..{hi}{unit}")
            return False
        if lo is not None and value < lo:
            self.fail(key, f"{value}{unit} is below the minimum {lo}{unit}")
            return False
        if hi is not None and value > hi:
            self.fail(key, f"{value}{unit} is above the maximum {hi}{unit}")
            return False
        return True

    def text(self, key: str, default: Any = None, *, required: bool = False, allow_empty: bool = False,
             choices: tuple[str, ...] | None = None) -> Any:
        value = self.typed(key, (str,), "a string", required)
        if value is MISSING:
            return default
        if not value.strip() and not allow_empty:
            self.fail(key, "must not be empty")
            return default
        if choices is not None and value not in choices:
            self.fail(key, f"unknown value {value!r} (one of: {', '.join(choices)})")
            return default
        return value

    def name(self, key: str, *, required: bool = True) -> str:
        value: str = self.text(key, "", required=required)
        if value and not NAME.match(value):
            self.fail(key, f"invalid name {value!r} (letters, digits, _ . -; not starting with . or -)")
            return ""
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.typed(key, (bool,), "true or false")
        return default if value is MISSING else bool(value)

    def integer(self, key: str, default: Any = None, *, lo: int | None = None, hi: int | None = None,
                required: bool = False) -> Any:
        value = self.typed(key, (int,), "an integer", required)
        if value is MISSING or not self._range(key, value, lo, hi):
            return default
        return value

    def number(self, key: str, default: Any = None, *, lo: float | None = None,
               hi: float | None = None) -> Any:
        value = self.typed(key, (int, float), "a number")
        if value is MISSING:
            return default
        if not math.isfinite(value):
            self.fail(key, f"{value} is not finite")
            return default
        return float(value) if self._range(key, value, lo, hi) else default

    def duration(self, key: str, default: Any, *, lo: float = 0.0, hi: float = 7 * 86400.0) -> Any:
        value = self.typed(key, (int, float, str), 'a duration (seconds, or "250ms", "5s", "2m", "1h")')
        if value is MISSING:
            return default
        if isinstance(value, str):
            m = _DURATION.match(value)
            if not m:
                self.fail(key, f'invalid duration {value!r} (e.g. 0.5, "250ms", "5s", "2m", "1h")')
                return default
            value = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        if not math.isfinite(value):
            self.fail(key, f"{value} is not finite")
            return default
        return float(value) if self._range(key, value, lo, hi, " s") else default

    def size(self, key: str, default: Any, *, lo: int = 0) -> Any:
        value = self.typed(key, (int, str), 'a size (bytes, or "64MiB", "1GB")')
        if value is MISSING:
            return default
        if isinstance(value, str):
            m = _SIZE.match(value)
            if not m:
                self.fail(key, f'invalid size {value!r} (e.g. 1048576, "64MiB", "1GB")')
                return default
            value = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
        return int(value) if self._range(key, value, lo, None, " bytes") else default

    def file(self, key: str, default: Path | None = None) -> Any:
        """A path, relative ones against the config file's directory (`base`)."""
        value = self.text(key, None)
        return self.base / value if value else default

    def table_list(self, key: str) -> Iterator[Reader]:
        self.used.add(key)
        items = self.table.get(key, [])
        if not isinstance(items, list | Tables):
            self.fail(key, f"expected an array of tables ([[{self.key_path(key)}]]), got {_kind(items)}")
            return
        paths = self.item_paths.get(key)
        for i, item in enumerate(items):
            yield Reader(item, paths[i] if paths else f"{self.key_path(key)}[{i}]", self.problems, self.base)

    def item_path(self, key: str, i: int) -> str:
        """The key path of item `i` of the array of tables `key`."""
        paths = self.item_paths.get(key)
        return paths[i] if paths else f"{self.key_path(key)}[{i}]"

    def sub(self, key: str) -> Reader:
        self.used.add(key)
        return Reader(self.table.get(key, {}), self.key_path(key), self.problems, self.base)

    def done(self) -> None:
        """Every key not read by the schema is an error: a typo must not silently disable a setting."""
        for key in self.table:
            if key not in self.used:
                self.fail(key, "unknown key")


def _kind(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)
