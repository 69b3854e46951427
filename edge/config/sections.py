"""The config's sections: each read from its TOML table into its `*Config`, with the checks across keys
(overlapping tags, duplicate names, colliding tag ids). parse() takes a parsed TOML document; edge.config.
source reads files into one."""

from __future__ import annotations

import itertools
import re
import shlex
import sys
from array import array
from pathlib import Path
from typing import Any

from edge import identity
from edge.config.reader import MISSING, NAME, Reader, Tables
from edge.config.schema import (
    ApplianceConfig,
    BusConfig,
    CommandsConfig,
    Config,
    ConfigError,
    DeviceConfig,
    GovernorConfig,
    LowPowerConfig,
    MetricsConfig,
    PollGroup,
    StoreConfig,
    TlsConfig,
    UpdateConfig,
    UplinkConfig,
    connections,
    default_frame_gap,
)
from edge.config.tag import DEFAULT_GROUP, Tag, tag_id
from edge.poll.types import (
    MAX_ADDRESS,
    MAX_BITS_PER_READ,
    MAX_REGISTERS_PER_READ,
    ORDER_ALIASES,
    ORDERS,
    TABLES,
    TYPES,
)


def _appliance(r: Reader) -> ApplianceConfig:
    app_id = r.name("id", required=False)
    state_dir = r.file("state_dir", Path("/var/lib/edge"))
    r.done()
    if app_id:
        return ApplianceConfig(app_id, state_dir)
    found = identity.derived(state_dir)
    if found is None:
        return ApplianceConfig("", state_dir, f"a machine id, made at the first run in {state_dir}")
    return ApplianceConfig(found[0], state_dir, found[1])


def _bus(r: Reader) -> BusConfig:
    name = r.name("name")
    port = r.text("port", "", required=True)
    baud = r.integer("baud", 19200, lo=300, hi=4_000_000)
    parity = r.text("parity", "E", choices=("N", "E", "O"))
    stop_bits = r.integer("stop_bits", 1, lo=1, hi=2)
    byte_size = r.integer("byte_size", 8, lo=7, hi=8)
    timeout = r.duration("timeout", 0.5, lo=0.01, hi=60.0)
    bits = 1 + byte_size + (parity != "N") + stop_bits
    frame_gap = r.duration("frame_gap", default_frame_gap(baud, bits), hi=1.0)
    rs485_rts = r.flag("rs485_rts", False)
    r.done()
    return BusConfig(name, port, baud, parity, stop_bits, byte_size, timeout, frame_gap, rs485_rts)


def _groups(r: Reader, device_interval: float) -> tuple[PollGroup, ...]:
    groups = {DEFAULT_GROUP: PollGroup(DEFAULT_GROUP, device_interval)}
    g = r.sub("group")
    for gname in g.table:
        g.used.add(gname)
        gr = Reader(g.table[gname], g.key_path(gname), r.problems, r.base)
        if not NAME.match(gname):
            r.problems.append(f"{gr.path}: invalid group name {gname!r}")
        groups[gname] = PollGroup(gname, gr.duration("interval", device_interval, lo=0.001, hi=86400.0),
                                  gr.integer("priority", 0, lo=0, hi=9))
        gr.done()
    return tuple(groups.values())


_NUMERIC_ONLY = ("scale", "offset", "deadband", "deadband_percent", "min", "max")
Writable = tuple[str, float | None, float | None]


class Alike:
    """The tags, and the devices' tuples of tags, made so far in one parse: a tag or a tuple equal to one
    of them (the same tag of another meter or of the same template, a template's whole list) is that
    object, not a copy."""

    def __init__(self) -> None:
        self.tags: dict[Tag, Tag] = {}
        self.tuples: dict[tuple[Tag, ...], tuple[Tag, ...]] = {}

    def tag(self, tag: Tag) -> Tag:
        return self.tags.setdefault(tag, tag)

    def tuple(self, tags: list[Tag]) -> tuple[Tag, ...]:
        t = tuple(tags)
        return self.tuples.setdefault(t, t)


def _tag(r: Reader, groups: set[str], alike: Alike) -> tuple[Tag, Writable | None] | None:
    """A validated tag and, if it may be written, (name, min, max); None when it has problems (recorded;
    kept out of the overlap checks)."""
    before = len(r.problems)
    name = r.name("name")
    table = r.text("table", "holding", choices=tuple(TABLES))
    address = r.integer("address", 0, lo=0, hi=MAX_ADDRESS, required=True)
    is_bits = TABLES.get(table, (0, False))[1]
    type_ = r.text("type", "bool" if is_bits else "uint16")
    dtype = TYPES.get(type_)
    if dtype is None:
        r.fail("type", f'unknown type "{type_}" (one of: {", ".join(TYPES)})')
    elif is_bits and not dtype.is_bool:
        r.fail("type", f"{type_} on the {table} table: coils and discrete inputs hold only bool")
    is_bool = dtype is not None and dtype.is_bool
    is_string = dtype is not None and dtype.registers is None
    order = r.text("order", "ABCD")
    order = ORDER_ALIASES.get(order, order)
    if order not in ORDERS:
        r.fail("order", f"unknown byte order {order!r} (one of: ABCD, BADC, CDAB, DCBA; 64-bit: "
                        "ABCDEFGH, BADCFEHG, GHEFCDAB, HGFEDCBA; 16-bit: AB, BA)")
    bit = r.integer("bit", None, lo=0, hi=15)
    if bit is not None and (is_bits or not is_bool):
        r.fail("bit", "only for bool/bit tags on the input or holding table")
    if not is_bits and is_bool and "bit" not in r.table:
        r.fail("bit", f"required for a {type_} tag on the {table} table (0..15)")
    length = r.integer("length", None, lo=1, hi=2 * MAX_REGISTERS_PER_READ)
    if is_string and "length" not in r.table:
        r.fail("length", "required for a string tag (bytes)")
    if not is_string and "length" in r.table:
        r.fail("length", "only for string tags")
    for key in (*_NUMERIC_ONLY, "order"):
        if key in r.table and (is_bool or (is_string and key != "order")):
            r.fail(key, f"not for {type_} tags")
    scale = r.number("scale", 1.0)
    if scale == 0.0:
        r.fail("scale", "must not be 0")
    offset = r.number("offset", 0.0)
    unit = r.text("unit", "", allow_empty=True)
    deadband = r.number("deadband", 0.0, lo=0.0)
    deadband_percent = r.number("deadband_percent", 0.0, lo=0.0, hi=100.0)
    if deadband and deadband_percent:
        r.fail("deadband_percent", "set deadband or deadband_percent, not both")
    on_change = r.flag("on_change", False)
    if on_change and (deadband or deadband_percent):
        r.fail("on_change", "set on_change or a deadband, not both (a deadband drops what did not move)")
    heartbeat = r.duration("heartbeat", 600.0, hi=86400.0)
    if "heartbeat" in r.table and not (deadband or deadband_percent or on_change):
        r.fail("heartbeat", "only with deadband, deadband_percent or on_change (without, every reading is "
                            "stored)")
    group = r.text("group", DEFAULT_GROUP)
    if group not in groups:
        r.fail("group", f'unknown poll group "{group}" (defined: {", ".join(sorted(groups))})')
    barrier = r.flag("barrier", False)
    writable = r.flag("writable", False)
    low, high = r.number("min", None), r.number("max", None)
    if writable and table not in ("holding", "coil"):
        r.fail("writable", f"the {table} table is read-only (writable tags: holding or coil)")
    elif writable and dtype is not None and dtype.writes == "coil" and not is_bits:
        r.fail("writable", "a bit inside a register cannot be written alone (it would take a read-modify-"
                           "write racing the device)")
    for key in ("min", "max"):
        if key in r.table and not writable:
            r.fail(key, "only for writable tags")
    if low is not None and high is not None and low > high:
        r.fail("max", f"{high} is below min ({low})")
    r.done()
    if len(r.problems) > before:
        return None
    intern = sys.intern  # the same few strings in every tag: one object each, not one per tag
    tag = Tag(name, intern(table), address, intern(type_), intern(order), bit, length, scale, offset,
              intern(unit), deadband, deadband_percent, heartbeat, intern(group), barrier, on_change)
    return alike.tag(tag), ((name, low, high) if writable else None)


def _device(r: Reader, buses: dict[str, BusConfig], alike: Alike | None = None,
            ) -> tuple[DeviceConfig, array[int]]:
    """The device and, for key paths, the file index of each of its (valid) tags; its tags shared with
    the devices parsed before it where they are alike."""
    alike = Alike() if alike is None else alike
    name = r.name("name")
    host = r.text("host", None)
    port = r.integer("port", 502, lo=1, hi=65535)
    bus = r.text("bus", None)
    if "host" not in r.table and "bus" not in r.table:
        r.fail("", 'needs "host" (Modbus TCP) or "bus" (Modbus RTU)')
    if "host" in r.table and "bus" in r.table:
        r.fail("bus", 'set "host" (Modbus TCP) or "bus" (Modbus RTU), not both')
    if bus is not None and bus not in buses:
        r.fail("bus", f'unknown bus "{bus}" (defined: {", ".join(sorted(buses)) or "none"})')
    if "bus" in r.table and "port" in r.table:
        r.fail("port", "only for Modbus TCP devices (the serial port belongs to the [[bus]])")
    rtu = "bus" in r.table
    unit = r.integer("unit", None if rtu else 1, lo=1 if rtu else 0, hi=247 if rtu else 255, required=rtu)
    timeout = r.duration("timeout", buses[bus].timeout if bus in buses else 1.0, lo=0.01, hi=60.0)
    retries = r.integer("retries", 1, lo=0, hi=10)
    max_registers = r.integer("max_registers", MAX_REGISTERS_PER_READ, lo=1, hi=MAX_REGISTERS_PER_READ)
    max_bits = r.integer("max_bits", MAX_BITS_PER_READ, lo=1, hi=MAX_BITS_PER_READ)
    single = r.flag("single_register_reads", False)
    pause = r.duration("pause", 0.0, hi=10.0)
    if rtu and "transport" in r.table:
        r.fail("transport", "only for Modbus TCP devices (a [[bus]] device speaks RTU)")
    if rtu and "shared_connection" in r.table:
        r.fail("shared_connection", "only for Modbus TCP devices (a [[bus]] is one connection)")
    for key in ("connect_pause", "close_after_cycle"):
        if rtu and key in r.table:
            r.fail(key, "only for Modbus TCP devices (a [[bus]]'s port stays open)")
    transport = r.text("transport", "tcp", choices=("tcp", "rtu-over-tcp"))
    shared = r.flag("shared_connection", True)
    connect_pause = r.duration("connect_pause", 0.0, hi=10.0)
    close_after_cycle = r.flag("close_after_cycle", False)
    write_multiple = r.flag("write_multiple", False)
    max_gap = r.integer("max_gap", None, lo=0, hi=MAX_REGISTERS_PER_READ)
    interval = r.duration("interval", 1.0, lo=0.001, hi=86400.0)
    groups = _groups(r, interval)
    names = {g.name for g in groups}
    tags: list[Tag] = []
    index = array("I")  # the file index of each valid tag, for key paths
    writable: list[Writable] = []
    first: dict[str, int] = {}
    duplicates: list[tuple[int, str, int]] = []
    for i, t in enumerate(r.table_list("tag")):  # one table at a time: a streamed document has no list
        parsed = _tag(t, names, alike)
        tag_name = t.table.get("name")
        if isinstance(tag_name, str) and tag_name and first.setdefault(tag_name, i) != i:
            duplicates.append((i, tag_name, first[tag_name]))
        if parsed is not None:
            tags.append(parsed[0])
            index.append(i)
            if parsed[1] is not None:
                writable.append(parsed[1])
    del first
    r.done()
    for i, tag_name, j in duplicates:
        r.problems.append(f'{r.item_path("tag", i)}.name: duplicate tag name "{tag_name}" (also '
                          f'{r.item_path("tag", j)}.name)')
    dev = DeviceConfig(name, unit if unit is not None else 0, alike.tuple(tags), groups, host, port, bus,
                       timeout, retries, max_registers, max_bits, single, pause, max_gap, tuple(writable),
                       transport == "rtu-over-tcp", shared, connect_pause, close_after_cycle, write_multiple)
    _check_tags(r, dev, index)
    return dev, index


def _check_tags(r: Reader, dev: DeviceConfig, index: array[int]) -> None:
    """Tags past 65535 or wider than one read, overlaps within one table.

    Overlaps are found by a sweep over tags sorted by address against the furthest-reaching tag so far,
    so a wide tag is checked against every tag it covers; bool tags may share a register on distinct bits.
    """
    def path(j: int) -> str:
        return r.item_path("tag", index[j])

    for j, t in enumerate(dev.tags):
        if t.end - 1 > MAX_ADDRESS:
            r.problems.append(f"{path(j)}.address: {t.type} at {t.address} ends at {t.end - 1}, beyond "
                              f"{MAX_ADDRESS}")
        limit = dev.max_bits if TABLES[t.table][1] else dev.max_registers
        if t.registers > limit:
            r.problems.append(f"{path(j)}.{'length' if t.type == 'string' else 'type'}: {t.type} of "
                              f"{t.registers} registers is wider than one read of this device "
                              f"(max_registers = {limit})")
    by_table: dict[str, list[int]] = {}
    for j, t in enumerate(dev.tags):
        by_table.setdefault(t.table, []).append(j)
    for members in by_table.values():
        members.sort(key=lambda j: dev.tags[j].address)  # stable: ties in file order
        reach: int | None = None  # the tag reaching furthest so far
        bits: dict[tuple[int, int], int] = {}
        for j in members:
            t = dev.tags[j]
            other = reach
            if t.bit is not None:
                other = bits.setdefault((t.address, t.bit), j)
                other = other if other != j else reach
            if other is not None and t.address < dev.tags[other].end and not _bits_share(dev.tags[other], t):
                o = dev.tags[other]
                r.problems.append(f'{path(j)}.address: "{t.name}" at {t.address} overlaps "{o.name}" '
                                  f"({path(other)}, {o.address}..{o.end - 1})")
            if reach is None or t.end > dev.tags[reach].end:
                reach = j


def _bits_share(a: Tag, b: Tag) -> bool:
    """Two bool tags on distinct bits of the same register do not overlap."""
    return a.bit is not None and b.bit is not None and a.address == b.address and a.bit != b.bit


def _store(r: Reader, state_dir: Path) -> StoreConfig:
    """Relative paths are relative to the state directory."""
    before = len(r.problems)
    path = state_dir / (r.text("path", None) or "store")
    s = StoreConfig(
        path=path,
        map_size=r.size("map_size", 1 << 30, lo=1 << 20),
        reserve=r.flag("reserve", True),
        commit_interval=r.duration("commit_interval", 1.0, lo=0.01, hi=3600.0),
        ack_wait=r.duration("ack_wait", 1.0, lo=0.0, hi=10.0),
        commit_bytes=r.size("commit_bytes", 256 * 1024, lo=1024),
        low_power_commit_interval=r.duration("low_power_commit_interval", 30.0, lo=0.01, hi=86400.0),
        high_watermark=r.number("high_watermark", 0.8, lo=0.1, hi=0.95),
        low_watermark=r.number("low_watermark", 0.7, lo=0.05, hi=0.9),
    )
    if len(r.problems) == before and s.low_watermark >= s.high_watermark:
        r.fail("low_watermark", f"{s.low_watermark} must be below high_watermark {s.high_watermark}")
    r.done()
    return s


def _tls(r: Reader) -> TlsConfig:
    """Present (even empty: system CAs, server name from host) means TLS on."""
    t = TlsConfig(r.file("ca"), r.file("cert"), r.file("key"), r.text("server_name", None))
    if (t.cert is None) != (t.key is None):
        r.fail("key" if t.key is None else "cert", "cert and key go together")
    r.done()
    return t


def _uplink(r: Reader) -> UplinkConfig:
    u = UplinkConfig(
        enabled=r.flag("enabled", True),
        host=r.text("host", "127.0.0.1"),
        port=r.integer("port", 8883 if "tls" in r.table else 1883, lo=1, hi=65535),
        topic_prefix=r.text("topic_prefix", "edge"),
        username=r.text("username", None),
        password_file=r.file("password_file"),
        tls=_tls(r.sub("tls")) if "tls" in r.table else None,
        keepalive=r.duration("keepalive", 30.0, lo=5.0, hi=3600.0),
        max_inflight=r.integer("max_inflight", 16, lo=1, hi=1000),
        batch_blocks=r.integer("batch_blocks", 64, lo=1, hi=10000),
        backoff_min=r.duration("backoff_min", 1.0, lo=0.01, hi=3600.0),
        backoff_max=r.duration("backoff_max", 300.0, lo=0.01, hi=86400.0),
        publish_timeout=r.duration("publish_timeout", 10.0, lo=0.1, hi=120.0),
        format=r.text("format", r.text("payload", "json", choices=("json",)),  # payload: the older spelling
                      choices=("json", "sparkplug_b")),
        sparkplug_group=r.text("sparkplug_group", "edge"),
        sparkplug_host=r.text("sparkplug_host", ""),
        health_interval=r.duration("health_interval", 60.0, hi=86400.0),
        protocol=r.text("protocol", "5", choices=("5", "3.1.1")),
        drain_rate=r.number("drain_rate", 0.0, lo=0.0, hi=10_000.0),
        max_message_bytes=r.size("max_message_bytes", 128 << 10, lo=4096),
        require_subscriber=r.flag("require_subscriber", False),
    )
    if 0 < u.health_interval < 1:
        r.fail("health_interval", f"{u.health_interval} s: 0 (no health messages) or at least 1 s")
    if any(c in u.topic_prefix for c in "#+") or u.topic_prefix.startswith("/"):
        r.fail("topic_prefix", f"invalid MQTT topic prefix {u.topic_prefix!r} (no #, +, leading /)")
    if u.backoff_min > u.backoff_max:
        r.fail("backoff_min", f"{u.backoff_min} s exceeds backoff_max {u.backoff_max} s")
    for key in ("sparkplug_group", "sparkplug_host"):
        if any(c in getattr(u, key) for c in "/#+"):
            r.fail(key, f"{getattr(u, key)!r}: a Sparkplug id has no /, # or +")
    r.done()
    return u


_CLOCK = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


def _low_power(r: Reader) -> LowPowerConfig:
    windows = []
    raw = r.typed("schedule", (list,), 'an array of ["HH:MM", "HH:MM"] windows')
    raw = [] if raw is MISSING else raw
    for i, w in enumerate(raw):
        ok = isinstance(w, list) and len(w) == 2 and all(isinstance(x, str) and _CLOCK.match(x) for x in w)
        if not ok:
            r.problems.append(f"{r.key_path('schedule')}[{i}]: expected [\"HH:MM\", \"HH:MM\"], got {w!r}")
            continue
        windows.append((w[0], w[1]))
    lp = LowPowerConfig(
        on_battery=r.flag("on_battery", True),
        control_file=r.file("control_file"),
        schedule=tuple(windows),
        interval_factor=r.number("interval_factor", 10.0, lo=1.0, hi=1000.0),
        uplink_session_interval=r.duration("uplink_session_interval", 900.0, lo=1.0, hi=86400.0),
    )
    r.done()
    return lp


def _governor(r: Reader) -> GovernorConfig:
    g = GovernorConfig(
        enabled=r.flag("enabled", True),
        memory_soft=r.size("memory_soft", None, lo=1 << 20),
        memory_hard=r.size("memory_hard", None, lo=1 << 20),
        cpu_budget=r.number("cpu_budget", 0.5, lo=0.01, hi=64.0),
        window=r.duration("window", 30.0, lo=1.0, hi=3600.0),
        max_stretch=r.number("max_stretch", 8.0, lo=1.0, hi=1000.0),
        low_power=_low_power(r.sub("low_power")),
    )
    if g.memory_soft and g.memory_hard and g.memory_soft >= g.memory_hard:
        r.fail("memory_soft", f"{g.memory_soft} must be below memory_hard {g.memory_hard}")
    r.done()
    return g


MIN_KEY_BYTES = 32


def _commands(r: Reader) -> CommandsConfig:
    remote = r.flag("remote", False)
    keys: list[tuple[str, bytes]] = []
    k = r.sub("keys")
    for name in k.table:
        path = k.file(name)
        if path is None:
            continue
        if not NAME.match(name):
            k.fail(name, f"invalid key name {name!r} (letters, digits, _ . -)")
            continue
        try:
            secret = path.read_bytes().strip()
        except OSError as e:
            k.fail(name, f"cannot read {path}: {e.strerror}")
            continue
        if len(secret) < MIN_KEY_BYTES:
            k.fail(name, f"{path} holds {len(secret)} bytes; a key needs at least {MIN_KEY_BYTES} "
                         "(e.g. `openssl rand -hex 32`)")
            continue
        keys.append((name, secret))
    c = CommandsConfig(remote, tuple(keys), r.duration("max_age", 600.0, lo=1.0, hi=86400.0),
                       r.flag("remote_config", False), r.duration("config_trial", 60.0, lo=1.0, hi=3600.0),
                       r.flag("remote_update", False))
    for flag in ("remote", "remote_config", "remote_update"):
        if getattr(c, flag) and not keys and not k.table:
            r.fail("keys", f"{flag} = true needs at least one key ([commands.keys] name = \"/path/to/key\")")
    r.done()
    return c


def _update(r: Reader) -> UpdateConfig:
    u = UpdateConfig(r.flag("enabled", False), r.duration("trial", 300.0, lo=1.0, hi=3600.0),
                     r.size("max_bundle", 1 << 30, lo=1 << 20), r.text("rauc", "rauc"),
                     r.text("reboot", "touch /run/edge/reboot"))
    for key in ("rauc", "reboot"):
        try:
            ok = bool(shlex.split(getattr(u, key)))
        except ValueError:
            ok = False
        if not ok:
            r.fail(key, "a command, as a shell would split it (quotes closed)")
    r.done()
    return u


def _metrics(r: Reader) -> MetricsConfig:
    m = MetricsConfig(r.flag("enabled", True), r.text("listen", "127.0.0.1"),
                r.integer("port", 9108, lo=0, hi=65535))
    r.done()
    return m


def _unique(problems: list[str], items: list[tuple[str, Any]], what: str) -> None:
    seen: dict[str, str] = {}
    for path, name in items:
        if name and name in seen:
            problems.append(f"{path}: duplicate {what} name \"{name}\" (also {seen[name]})")
        seen.setdefault(name, path)


def parse(data: dict[str, Any], base: Path | None = None) -> Config:
    """Validate a TOML document (already parsed) into a Config; raise ConfigError listing every problem.
    Relative paths are resolved against `base` (the config file's directory; default: the working one)."""
    problems: list[str] = []
    root = Reader(data, "", problems, base)
    appliance = _appliance(root.sub("appliance"))
    bus_readers = list(root.table_list("bus"))
    buses = [_bus(b) for b in bus_readers]
    _unique(problems, [(f"{b.path}.name", x.name) for b, x in zip(bus_readers, buses, strict=True)], "bus")
    ports = [(f"{b.path}.port", x.port) for b, x in zip(bus_readers, buses, strict=True)]
    _unique(problems, ports, "serial port")
    bus_map = {b.name: b for b in buses}
    templates = _templates(root.sub("template"), bus_map)
    dev_readers = [_from_template(d, templates) for d in root.table_list("device")]
    alike = Alike()
    parsed = [_device(d, bus_map, alike) for d in dev_readers]
    del alike
    devices = [d for d, _ in parsed]
    _unique(problems, [(f"{d.path}.name", x.name) for d, x in zip(dev_readers, devices, strict=True)],
            "device")
    _unique(problems, [(f"{d.path}.unit", f"{x.bus}/{x.unit}") for d, x in
                       zip(dev_readers, devices, strict=True) if x.bus and x.unit], "bus/unit")
    _check_ids(problems, [(d, x, index) for d, (x, index) in zip(dev_readers, parsed, strict=True)])
    _check_gateways(problems, {x.name: d.path for d, x in zip(dev_readers, devices, strict=True)}, devices)
    cfg = Config(appliance, tuple(buses), tuple(devices), _store(root.sub("store"), appliance.state_dir),
                 _uplink(root.sub("uplink")), _governor(root.sub("governor")), _metrics(root.sub("metrics")),
                 _commands(root.sub("commands")), _update(root.sub("update")))
    root.done()
    if cfg.uplink.protocol == "3.1.1":
        problems.extend(f'commands.{flag}: needs [uplink] protocol = "5": with 3.1.1 the broker cannot be '
                        f"asked to cap what it sends us, and a command is taken in whole before it is checked"
                        for flag in ("remote", "remote_config", "remote_update")
                        if getattr(cfg.commands, flag))
    if cfg.commands.remote_update and not cfg.update.enabled:
        problems.append("commands.remote_update: needs [update] enabled = true (an image with two root slots "
                        "and RAUC)")
    if problems:
        raise ConfigError(problems)
    return cfg


def _check_ids(problems: list[str], devices: list[tuple[Reader, DeviceConfig, array[int]]]) -> None:
    """Tag ids are crc32("device/tag"); two names hashing alike must be renamed, never merged. The ids that
    occur twice are found by sorting them; only those are looked at by name."""
    ordered = sorted(tag_id(d.name, t.name) for _, d, _ in devices for t in d.tags)
    twice = {a for a, b in itertools.pairwise(ordered) if a == b}
    del ordered
    ids: dict[int, tuple[str, str]] = {}
    for reader, d, index in devices:
        for t, i in zip(d.tags, index, strict=True):
            if (tid := tag_id(d.name, t.name)) not in twice:
                continue
            here = (f"{reader.item_path('tag', i)}.name", f"{d.name}/{t.name}")
            first = ids.setdefault(tid, here)
            if first[1] != here[1]:
                problems.append(f'{here[0]}: "{here[1]}" has the same tag id ({tid}, crc32) as "{first[1]}" '
                                f"({first[0]}); rename one of them")


def _check_gateways(problems: list[str], paths: dict[str, str], devices: list[DeviceConfig]) -> None:
    """Devices sharing a connection speak one framing on it: a gateway is MBAP or RTU over TCP."""
    for first, *rest in connections(devices):
        problems.extend(f'{paths[d.name]}.transport: "{d.transport}", but {paths[first.name]} on the same '
                        f'connection ({d.host}:{d.port}) is "{first.transport}": one connection speaks one '
                        f"framing (or set shared_connection = false on one of them)"
                        for d in rest if d.rtu_over_tcp != first.rtu_over_tcp)
        problems.extend(f"{paths[d.name]}.close_after_cycle: the connection to {d.host}:{d.port} is shared "
                        f"with {len(rest)} other device(s), whose cycles it would cut; set "
                        f"shared_connection = false on this device" for d in (first, *rest)
                        if rest and d.close_after_cycle)


PER_DEVICE = ("name", "host", "port", "bus", "unit", "template")  # never in a [template.NAME]


def _templates(r: Reader, buses: dict[str, BusConfig]) -> dict[str, Reader | None]:
    """[template.NAME] tables: a register map (tags, groups, and any device key but those of PER_DEVICE)
    used by many devices. Each is validated once, as a device of its own, with its own key paths; a
    template with problems is None (its devices are not checked again: one report, not one a device)."""
    out: dict[str, Reader | None] = {}
    for name in list(r.table):
        t = r.sub(name)
        if not NAME.match(name):
            t.fail("", "invalid template name (letters, digits, _ . -; not starting with . or -)")
        if not isinstance(t.table, dict):
            out[name] = None
            continue
        before = len(r.problems)
        for key in PER_DEVICE:
            if key in t.table:
                t.fail(key, "set per device, not in a template")
        check = Reader({**t.table, "name": "template", "host": "template"}, t.path, r.problems, r.base)
        check.used.update(PER_DEVICE)  # the placeholders above, and PER_DEVICE keys already refused
        _device(check, buses)
        out[name] = t if len(r.problems) == before else None
    return out


def _from_template(r: Reader, templates: dict[str, Reader | None]) -> Reader:
    """A device with `template = "NAME"`: the template's keys, then the device's own over them; its
    groups, then the device's; its tags, a device tag of the same name overriding keys of that tag (a
    scale, a unit, a writable) and other device tags added. Each tag keeps its own key path."""
    name = r.table.get("template")
    if name is None:
        return r
    r.used.add("template")
    if not isinstance(name, str) or name not in templates:
        r.fail("template", f"unknown template {name!r} (defined: {', '.join(sorted(templates)) or 'none'})")
        return r
    template = templates[name]
    if template is None:  # its problems are reported once, under its own key paths
        return Reader({}, r.path, [], r.base)
    merged = {k: v for k, v in template.table.items() if k not in ("tag", "group")}
    merged |= {k: v for k, v in r.table.items() if k != "template"}
    own_groups, own_tags = r.table.get("group", {}), r.table.get("tag", [])
    if not isinstance(own_groups, dict) or not isinstance(own_tags, list | Tables):
        return Reader(merged, r.path, r.problems, r.base)  # the device's own value, refused as it stands
    merged["group"] = {**template.table.get("group", {}), **own_groups}
    own_tags = list(own_tags)
    tags: list[Any] = []
    paths: list[str] = []
    by_name = {t["name"]: i for i, t in enumerate(own_tags)
               if isinstance(t, dict) and isinstance(t.get("name"), str)}
    used: set[int] = set()
    for j, t in enumerate(template.table.get("tag", [])):
        i = by_name.get(t.get("name"))
        if i is None:
            tags.append(t)
            paths.append(template.item_path("tag", j))
        else:
            tags.append({**t, **own_tags[i]})
            paths.append(r.item_path("tag", i))
            used.add(i)
    for i, t in enumerate(own_tags):
        if i not in used:
            tags.append(t)
            paths.append(r.item_path("tag", i))
    merged["tag"] = tags
    out = Reader(merged, r.path, r.problems, r.base)
    out.item_paths["tag"] = paths
    return out
