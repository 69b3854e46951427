"""Writes: one tag (never a raw address), one value, checked against the config, written on the device's
line between two polls.

Locally, `edge write CONFIG DEVICE/TAG VALUE` (a shell on the box is trusted). Remotely, over MQTT, only
when `[commands] remote = true`, and only commands signed with a configured key: the appliance then
subscribes to `<prefix>/<appliance id>/cmd/write` (QoS 1) and publishes one result per command on
`.../cmd/result` (docs/payload.md). A command travels in an envelope:

    {"key": "scada", "command": "<the command, a JSON object, as a string>", "sig": "<hex>"}
    command: {"id": "c-17", "tag": "pump1/setpoint", "value": 42.5, "expires": 1795459200, "by": "scada"}
    sig = HMAC-SHA256(key, the UTF-8 bytes of `command`), 64 lowercase hex digits

The signature covers the exact bytes of the command (no canonical form to agree on), its id and its
expiry among them. Checked in this order, each refusal counted by reason and answered:

    too large        the message is over MAX_COMMAND bytes (not parsed)
    bad command      not a JSON envelope of three strings, or a command that is not a JSON object with
                     an id (string or integer, at most MAX_ID characters) and a tag
    unknown key      `key` is not one of [commands.keys]
    bad signature    `sig` does not match (compared in constant time)
    expired          `expires` (unix seconds, required) has passed, or lies more than max_age ahead
    id reused        a different command signed with the same key and id was executed (a redelivery
                     of the same command gets its first result again instead, MQTT being at-least-once)
    then the write's own checks: unknown tag, not writable, bad value, out of range, device exception,
    timeout, disconnected

Only a verified command reaches the replay memory, so nobody without a key can occupy a future id. Ids
are remembered until their command expires; when MAX_REMEMBERED unexpired ids are held, new commands
are refused ("busy") rather than forgetting one that could then be replayed. Every command is logged with
its fields escaped and cut (a newline in `by` cannot forge a journal line); results carry no field longer
than MAX_ID / MAX_TAG characters.

Only tags with `writable = true` can be written; the value must fit the tag's type and its min/max
(engineering units, before scale and offset are undone); it is encoded with the tag's type and byte
order and written with FC 5 (coil), FC 6 (one register) or FC 16 (several). On an RS-485 bus the write
waits for the line, so it never falls inside another device's transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge.config import CommandsConfig, Config, DeviceConfig, Tag
from edge.poll import TYPES, RequestError, encode
from edge.reading import BAD_FRAME, EXCEPTION, TIMEOUT, quality_name

if TYPE_CHECKING:
    from edge.poll import Poller

log = logging.getLogger("edge.write")



class Refused(Exception):
    """A write that was not done. `reason` is one of: unknown tag, not writable, bad value, out of range,
    expired, bad command, device exception, timeout, disconnected."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def find(config: Config, name: str) -> tuple[DeviceConfig, Tag, float | None, float | None]:
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


def encode_write(tag: Tag, value: Any, low: float | None = None,
                 high: float | None = None) -> list[int] | bool:
    """What to write for `value` (engineering units): the registers' words, or the coil's state."""
    dtype = TYPES[tag.type]
    if dtype.writes == "coil":
        if not isinstance(value, bool):
            raise Refused("bad value", f"{tag.name} is a bool: true or false, not {value!r}")
        return value  # a coil: bits inside registers are never writable (config)
    if not dtype.numeric:
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
    code = dtype.code
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


def failure(e: RequestError) -> Refused:
    if e.quality & EXCEPTION:
        return Refused("device exception", quality_name(e.quality))
    return Refused("timeout" if e.quality in (TIMEOUT, BAD_FRAME) else "disconnected", str(e))


MAX_COMMAND = 4096  # bytes of a write command message
MAX_URL = 2048  # characters of a bundle's URL in cmd/update
MAX_CONFIG_COMMAND = 1 << 20  # bytes of a cmd/config message (the config's TOML inside its JSON)
MAX_ID = 64  # characters of a command id
MAX_TAG = 200  # characters of "device/tag"
MAX_REMEMBERED = 1000  # unexpired command ids held for redeliveries


def sign(key: bytes, key_name: str, command: dict[str, Any]) -> bytes:
    """The signed envelope of a command (what `edge sign` prints and a sender publishes).

    >>> env = json.loads(sign(b"k" * 32, "scada", {"id": "c-1", "tag": "d/t", "value": 1, "expires": 9}))
    >>> env["key"], env["command"], len(env["sig"])
    ('scada', '{"id":"c-1","tag":"d/t","value":1,"expires":9}', 64)
    """
    text = json.dumps(command, separators=(",", ":"), allow_nan=False)
    return json.dumps({"key": key_name, "command": text, "sig": _mac(key, text)}).encode()


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def safe(value: Any, limit: int = 80) -> str:
    """A field from outside, fit for one log line: what is not printable escaped, cut at `limit`.

    >>> print(safe("ok\\nforged: line\\x1b[31m"), safe("ünï"), safe("x" * 100, 8))
    ok\\nforged: line\\x1b[31m ünï xxxxxxxx...
    """
    text = value if isinstance(value, str) else str(value)
    cut = text[:limit]
    shown = cut if cut.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return shown + "..." if len(text) > limit else shown


@dataclass(frozen=True, slots=True)
class Verified:
    """A command whose signature checked out."""

    key: str
    id: str | int
    text: str
    fields: dict[str, Any]
    expires: float


class Commands:
    """Executes writes on the running poller's lines: local ones at once, remote ones once verified;
    remembers the results of remote ones by (key, id) until they expire."""

    def __init__(self, poller: Callable[[], Poller], config: CommandsConfig | None = None) -> None:
        self.poller = poller  # the running poller (a reload replaces it)
        self.config = config or CommandsConfig()
        self.results: dict[tuple[str, str | int], tuple[float, str, dict[str, Any]]] = {}
        self.executed = 0
        self.refused = 0
        self.refusals: Counter[str] = Counter()
        self._logged: set[str] = set()

    def reconfigure(self, config: CommandsConfig) -> None:
        """A reloaded [commands]: its keys and limits apply to the next command."""
        self.config = config

    async def handle(self, payload: bytes) -> dict[str, Any]:
        """The result of one remote command message (always a dict with "id" and "ok"); never raises."""
        try:
            command = self._verify(payload)
        except Refused as e:
            return self._refuse(None, e, None)
        answered = self._remembered(command)
        if answered is not None:
            return answered
        result = await self.execute(command.id, command.fields.get("tag"), command.fields.get("value"),
                                    command.fields.get("by", command.key))
        self.remember(command, result)
        return result

    def verify_signed(self, payload: bytes, kind: str) -> Verified | dict[str, Any]:
        """A cmd/config (kind "config": its command carries "config", the TOML text) or cmd/update message
        (kind "update": "url", the bundle's, http or https) verified like a write, or the result that
        answers it: a refusal, or the first result of a redelivery."""
        try:
            command = self._verify(payload, kind=kind)
        except Refused as e:
            return self._refuse(None, e, None)
        answered = self._remembered(command)
        return command if answered is None else answered

    def remember(self, command: Verified, result: dict[str, Any]) -> None:
        """The result of a verified command, sent again if the command is redelivered."""
        self.results[(command.key, command.id)] = (command.expires, command.text, result)

    def _verify(self, payload: bytes, kind: str = "write") -> Verified:
        limit = MAX_CONFIG_COMMAND if kind == "config" else MAX_COMMAND
        if len(payload) > limit:
            raise Refused("too large", f"{len(payload)} bytes; at most {limit}")
        envelope = _json(payload)
        keys = dict(self.config.keys)
        if not (isinstance(envelope, dict) and all(isinstance(envelope.get(k), str)
                                                    for k in ("key", "command", "sig"))):
            raise Refused("bad command", 'not a signed envelope {"key", "command", "sig"} (docs/payload.md)')
        key = keys.get(envelope["key"])
        if key is None:
            raise Refused("unknown key", f"no key {safe(envelope['key'], 32)} in [commands.keys]")
        if not hmac.compare_digest(_mac(key, envelope["command"]), envelope["sig"]):
            raise Refused("bad signature", f"not signed with key {safe(envelope['key'], 32)}")
        fields = _json(envelope["command"].encode())
        cid = fields.get("id") if isinstance(fields, dict) else None
        if not isinstance(cid, str | int) or isinstance(cid, bool) or len(str(cid)) > MAX_ID:
            raise Refused("bad command", f"the command needs an id: a string or integer of at most {MAX_ID} "
                                         "characters")
        assert isinstance(fields, dict)
        if kind == "config" and not isinstance(fields.get("config"), str):
            raise Refused("bad command", '"config" must be the whole config, as TOML text')
        url = fields.get("url")
        if kind == "update" and not (isinstance(url, str) and url.startswith(("http://", "https://"))
                                     and len(url) <= MAX_URL and url.isprintable()):
            raise Refused("bad command", f'"url" must be the bundle\'s http:// or https:// URL, at most '
                                         f"{MAX_URL} characters")
        if kind == "write" and (not isinstance(fields.get("tag"), str) or len(fields["tag"]) > MAX_TAG):
            raise Refused("bad command", f'"tag" must be "device/tag", at most {MAX_TAG} characters')
        expires = fields.get("expires")
        now = time.time()
        if isinstance(expires, bool) or not isinstance(expires, int | float) or not math.isfinite(expires):
            raise Refused("expired", "a signed command needs `expires` (unix seconds)")
        if expires < now or expires > now + self.config.max_age:
            raise Refused("expired", f"expires {expires:.0f}, now {now:.0f}, at most "
                                     f"{self.config.max_age:.0f} s ahead")
        return Verified(envelope["key"], cid, envelope["command"], fields, float(expires))

    def _remembered(self, command: Verified) -> dict[str, Any] | None:
        """The first result of a redelivered command; Refused for another command reusing its id."""
        now = time.time()
        for k in [k for k, (expires, _, _) in self.results.items() if expires < now]:
            del self.results[k]
        seen = self.results.get((command.key, command.id))
        if seen is not None:
            if seen[1] == command.text:
                log.info("write %s: already done (a redelivery); result sent again", safe(command.id, MAX_ID))
                return seen[2]
            return self._refuse(command.id, Refused("id reused", "another command used this id"), command.key)
        if len(self.results) >= MAX_REMEMBERED:
            return self._refuse(command.id, Refused("busy", f"{MAX_REMEMBERED} unexpired commands held; "
                                                            "retry later"), command.key)
        return None

    def _refuse(self, cid: str | int | None, e: Refused, key: str | None) -> dict[str, Any]:
        self.refused += 1
        self.refusals[e.reason] += 1
        level = logging.WARNING if e.reason not in self._logged else logging.DEBUG
        self._logged.add(e.reason)  # a flood of one kind of bad command: one line, then debug
        log.log(level, "command %s refused: %s: %s%s", safe(cid, MAX_ID) if cid is not None else "-",
                e.reason, e.detail, f" (key {safe(key, 32)})" if key else "")
        return {"id": cid, "ok": False, "error": e.reason, "detail": e.detail}

    async def execute(self, cid: str | int, tag: Any, value: Any, by: Any, *,
                      quiet: bool = False) -> dict[str, Any]:
        """One write, checked, with its result (also for a local `edge write`, which prints a refusal
        itself: `quiet` leaves it out of the log)."""
        name, who = str(tag), safe(by, 64)
        try:
            await self.write(name, value)
        except Refused as e:
            self.refused += 1
            self.refusals[e.reason] += 1
            if not quiet:
                log.warning("write %s by %s: %s = %s refused: %s", safe(cid, MAX_ID), who,
                            safe(name, MAX_TAG), safe(json.dumps(value), 64), e)
            return {"id": cid, "ok": False, "tag": name[:MAX_TAG], "error": e.reason, "detail": e.detail}
        self.executed += 1
        log.info("write %s by %s: %s = %s", safe(cid, MAX_ID), who, safe(name, MAX_TAG),
                 safe(json.dumps(value), 64))
        return {"id": cid, "ok": True, "tag": name, "value": value}

    async def write(self, name: str, value: Any) -> None:
        poller = self.poller()
        device, tag, low, high = find(poller.config, name)
        data = encode_write(tag, value, low, high)
        line, runner = poller.line_of(device.name)
        try:
            await line.write(runner, tag.table, tag.address, data)
        except RequestError as e:
            raise failure(e) from e


def _json(raw: bytes) -> Any:
    """JSON from outside: bounded by MAX_COMMAND already; nesting too deep or bad bytes are a refusal."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise Refused("bad command", f"not JSON: {type(e).__name__}") from e
