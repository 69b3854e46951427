"""Simulator maps: write one (TOML), or derive one from an edge config so a simulated device serves every
tag of it with changing values. Used by scripts/demo and the bench.

    python -m hil.mapgen config.toml [--device pump1] > map.toml

Each device becomes a unit (its unit id); each tag a point: floats a sine (period 60 s, around a level
derived from the tag's name), integers a counter, bools a square wave (20 s), strings "SIM-<device>".
Scaled tags get raw values that decode to the same ranges.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from pathlib import Path
from typing import Any

from edge.config import DeviceConfig, Tag, load

__all__ = ["map_from_device", "write_map"]


def _point(device: DeviceConfig, tag: Tag) -> dict[str, Any]:
    point: dict[str, Any] = {"table": tag.table, "address": tag.address, "type": tag.type, "order": tag.order}
    if tag.type in ("bool", "bit"):
        point.update(type="bool", wave="square", period=20.0)
        if tag.bit is not None:
            point["bit"] = tag.bit
    elif tag.type == "string":
        point.update(length=tag.length, value=f"SIM-{device.name}"[: tag.length or 0])
    elif tag.type.startswith("float"):
        level = 20.0 + zlib.crc32(tag.name.encode()) % 80
        point.update(wave="sine", amplitude=level / 10, period=60.0, offset=level)
    elif tag.scale != 1.0 or tag.offset != 0.0:
        raw = max(1.0, abs((50.0 - tag.offset) / tag.scale))
        point.update(wave="sine", amplitude=raw / 10, period=60.0, offset=raw)
    else:
        point.update(wave="counter", step=1.0)
    return point


def map_from_device(device: DeviceConfig) -> dict[str, Any]:
    return {"id": device.unit, "points": [_point(device, t) for t in device.tags]}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _is_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def toml_text(doc: dict[str, Any], prefix: str = "") -> str:
    """A TOML document from nested dicts and lists of dicts (arrays of tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in doc.items()
             if not isinstance(v, dict) and not _is_tables(v)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += ["", f"[{prefix}{k}]", toml_text(v, f"{prefix}{k}.")]
        elif _is_tables(v):
            for item in v:
                lines += ["", f"[[{prefix}{k}]]", toml_text(item, f"{prefix}{k}.")]
    return "\n".join(lines)


def _toml_table(header: str, entries: dict[str, Any]) -> list[str]:
    return [header] + [f"{k} = {_toml_value(v)}" for k, v in entries.items()]


def map_text(units: list[dict[str, Any]]) -> str:
    """A simulator MAP: each unit {"id", "invalid"?, "points" (or "point"): [point dicts]}."""
    lines: list[str] = []
    for unit in units:
        points = unit.get("points", unit.get("point", []))
        lines += _toml_table("[[unit]]", {k: v for k, v in unit.items() if k not in ("points", "point")})
        for point in points:
            lines += _toml_table("[[unit.point]]", point)
        lines.append("")
    return "\n".join(lines)


def write_map(path: Path | str, units: list[dict[str, Any]]) -> None:
    Path(path).write_text(map_text(units))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hil.mapgen", description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--device", action="append", help="only these devices (default: every TCP device)")
    args = ap.parse_args(argv)
    cfg = load(args.config)
    devices = [d for d in cfg.devices if (d.name in args.device if args.device else d.host)]
    sys.stdout.write(map_text([map_from_device(d) for d in devices]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
