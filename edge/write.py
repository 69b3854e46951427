"""Writes: one tag (never a raw address), one value, checked against the config, written on the device's
line between two polls.

From upstream, `<prefix>/<appliance id>/cmd/write` (QoS 1) carries JSON commands and every command gets
one result on `.../cmd/result` (docs/payload.md):

    {"id": "c-17", "tag": "pump1/setpoint", "value": 42.5, "expires": 1795459200, "by": "scada"}
    {"id": "c-17", "ok": true, "tag": "pump1/setpoint", "value": 42.5}
    {"id": "c-18", "ok": false, "error": "out of range", "detail": "42000 is above max 100"}

Only tags with `writable = true` can be written; the value must fit the tag's type and its min/max
(engineering units, before scale and offset are undone); it is encoded with the tag's type and byte
order and written with FC 5 (coil), FC 6 (one register) or FC 16 (several). On an RS-485 bus the write
waits for the line, so it never falls inside another device's transaction. A command id seen before is
not executed again: its first result is sent again (MQTT delivers at least once). A command whose
`expires` (unix seconds) has passed is refused. Every write is logged: by whom, which tag, which value.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge.config import Config, Device, Tag
from edge.poll.decode import CODES, encode
from edge.poll.transport import ReadError
from edge.reading import BAD_FRAME, EXCEPTION, TIMEOUT, quality_name

if TYPE_CHECKING:
    from edge.poll.engine import Poller

log = logging.getLogger("edge.write")

REMEMBERED = 1000  # command ids whose results are kept, to answer a redelivery without writing again


class Refused(Exception):
    """A write that was not done. `reason` is one of: unknown tag, not writable, bad value, out of range,
    expired, bad command, device exception, timeout, disconnected."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def find(config: Config, name: str) -> tuple[Device, Tag, float | None, float | None]:
    """The device, tag and (min, max) for "device/tag"; Refused if unknown or not writable."""
    device_name, _, tag_name = name.partition("/")
    device = next((d for d in config.devices if d.name == device_name), None)
    tag = next((t for t in device.tags if t.name == tag_name), None) if device else None
    if device is None or tag is None:
        raise Refused("unknown tag", f'no tag "{name}" (device/tag)')
    spec = next((w for w in device.writable if w[0] == tag_name), None)
    if spec is None:
        raise Refused("not writable", f'"{name}" is not writable = true in the config')
    return device, tag, spec[1], spec[2]


def registers(tag: Tag, value: Any, low: float | None = None, high: float | None = None) -> list[int] | bool:
    """What to write for `value` (engineering units): the registers, or the coil state."""
    if tag.type in ("bool", "bit"):
        if not isinstance(value, bool):
            raise Refused("bad value", f"{tag.name} is a bool: true or false, not {value!r}")
        return value  # a coil: bits inside registers are never writable (config)
    if tag.type == "string":
        if not isinstance(value, str):
            raise Refused("bad value", f"{tag.name} is a string, not {value!r}")
        if len(value.encode()) > (tag.length or 0):
            raise Refused("out of range", f"{len(value.encode())} bytes; {tag.name} holds {tag.length}")
        return encode(tag, value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Refused("bad value", f"{tag.name} is {tag.type}: a finite number, not {value!r}")
    if low is not None and value < low:
        raise Refused("out of range", f"{value} is below min {low:g}")
    if high is not None and value > high:
        raise Refused("out of range", f"{value} is above max {high:g}")
    raw: float = (value - tag.offset) / tag.scale
    code = CODES[tag.type][0]
    if code not in "efd":
        if abs(raw - round(raw)) > 1e-9 * max(1.0, abs(raw)):
            raise Refused("bad value", f"{value} is not a whole number of {tag.type} steps "
                                       f"(scale {tag.scale:g})")
        raw = round(raw)
    try:
        struct.pack(">" + code, raw)
    except (struct.error, OverflowError) as e:
        raise Refused("out of range", f"{value} does not fit {tag.type}") from e
    return encode(tag, raw)


def failure(e: ReadError) -> Refused:
    if e.quality & EXCEPTION:
        return Refused("device exception", quality_name(e.quality))
    return Refused("timeout" if e.quality in (TIMEOUT, BAD_FRAME) else "disconnected", str(e))


def _check_expiry(expires: Any) -> None:
    if expires is not None and (not isinstance(expires, int | float) or time.time() > expires):
        raise Refused("expired", f"expires {expires!r}, now {time.time():.0f}")


class Commands:
    """Executes write commands on the running poller's lines; remembers results by command id."""

    def __init__(self, poller: Callable[[], Poller]) -> None:
        self.poller = poller  # the running poller (a reload replaces it)
        self.results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.executed = 0
        self.refused = 0

    async def handle(self, payload: bytes) -> dict[str, Any]:
        """The result of one command message (always a dict with "id" and "ok")."""
        try:
            cmd = json.loads(payload)
        except ValueError as e:
            cmd = str(e)
        if not isinstance(cmd, dict) or not isinstance(cmd.get("id"), str | int):
            self.refused += 1
            detail = cmd if isinstance(cmd, str) else "not a JSON object with an id"
            return {"id": None, "ok": False, "error": "bad command", "detail": detail}
        cid = str(cmd["id"])
        if cid in self.results:
            log.info("write %s: already done (a redelivery); result sent again", cid)
            return self.results[cid]
        result = await self._execute(cid, cmd)
        self.results[cid] = result
        while len(self.results) > REMEMBERED:
            self.results.popitem(last=False)
        return result

    async def _execute(self, cid: str, cmd: dict[str, Any]) -> dict[str, Any]:
        name, value, by = str(cmd.get("tag", "")), cmd.get("value"), str(cmd.get("by", "upstream"))
        try:
            _check_expiry(cmd.get("expires"))
            await self.write(name, value)
        except Refused as e:
            self.refused += 1
            log.warning("write %s by %s: %s = %r refused: %s", cid, by, name, value, e)
            return {"id": cmd["id"], "ok": False, "tag": name, "error": e.reason, "detail": e.detail}
        self.executed += 1
        log.warning("write %s by %s: %s = %r", cid, by, name, value)
        return {"id": cmd["id"], "ok": True, "tag": name, "value": value}

    async def write(self, name: str, value: Any) -> None:
        poller = self.poller()
        device, tag, low, high = find(poller.config, name)
        data = registers(tag, value, low, high)
        line, runner = poller.line_of(device.name)
        try:
            await line.write(runner, tag.table, tag.address, data)
        except ReadError as e:
            raise failure(e) from e
