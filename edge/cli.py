"""The `edge` command. Every error is one clear line on stderr and a non-zero exit:
2 for a bad config or bad arguments, 1 for a runtime failure (device unreachable during probe, ...).

    edge check CONFIG                         validate, print the request plan per device
    edge poll CONFIG [--once|--follow] [--json]
    edge probe tcp://HOST:PORT/UNIT [--table holding --address 0 --count 10]
    edge probe rtu:///dev/ttyUSB0?baud=9600&parity=E&unit=1 [...]
    edge --version
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from edge import __version__
from edge.config import Config, ConfigError, connections, load, load_for_run, persisted, with_id
from edge.poll import MAX_BITS_PER_READ, MAX_REGISTERS_PER_READ, TABLES
from edge.reading import GOOD, Reading, Value, float32, quality_name, strict_json

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where available (lower per-request CPU), else asyncio."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return asyncio.run(main)
    return uvloop.run(main)


def plural(n: int, word: str) -> str:
    """Count and noun for messages.

    >>> plural(1, "bus"), plural(2, "bus"), plural(0, "tag")
    ('1 bus', '2 buses', '0 tags')
    """
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def cmd_import_config(args: argparse.Namespace) -> int:
    """At boot, before the appliance: exit 0 also when the config offered is refused (the reasons are
    printed, recorded for the health message, and the last good config runs); 2 only when the config
    the image starts with is itself bad."""
    from edge.config import import_dir  # noqa: PLC0415

    running = load_for_run(args.config, make_id=False)
    try:
        print(f"edge: import-config: {import_dir(args.source, running)}")
    except ConfigError as e:
        print(f"edge: import-config: refused, the last good config runs: {'; '.join(e.problems)}",
              file=sys.stderr)
    except OSError as e:  # the state directory full, read-only or not a directory: the boot goes on
        print(f"edge: import-config: cannot take {args.source} into {running.appliance.state_dir}: "
              f"{e.strerror or e}; the last good config runs", file=sys.stderr)
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    """The id the appliance runs with (the kept config's, if one was kept), then where it comes from: the
    config, the board's serial, or the machine id (edge.identity). Changes nothing unless --make: without
    a machine id yet, says that the first `edge run` makes it (--make: makes it now, as the run would)."""
    config = kept_or(Path(args.config), load)[0]
    if args.make:
        config = with_id(config)
    a = config.appliance
    print(f"{a.id or '(none yet)'}\t{a.id_source}")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    """Exit 0 when the bundle was installed, 1 when RAUC refused it or it could not be fetched or
    written (the reason printed), 2 when [update] is not enabled in the config."""
    from edge.update import UpdateError, install  # noqa: PLC0415

    config = kept_or(Path(args.config), load)[0]
    if not config.update.enabled:
        raise ConfigError(["update.enabled: false: this config does not take image updates (an image with "
                           "two root slots and RAUC sets it)"])
    try:
        install(config.update, config.appliance.state_dir, args.source, sys.stdout)
    except UpdateError as e:
        print(f"edge: update: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from edge.poll import plan_config, summarize  # noqa: PLC0415

    config = load_for_run(args.config, make_id=False)
    plans = plan_config(config)
    tags = sum(len(d.tags) for d in config.devices)
    print(f"{args.config}: ok: {plural(len(config.devices), 'device')}, {plural(len(config.buses), 'bus')}, "
          f"{plural(tags, 'tag')}")
    for d in config.devices:
        where = f"{d.transport} {d.host}:{d.port} unit {d.unit}" if d.host else f"bus {d.bus} unit {d.unit}"
        print(f"  {d.name} ({where}): {summarize(plans[d.name])}")
    for first, *rest in connections(config.devices):
        if rest:
            names = ", ".join(d.name for d in (first, *rest))
            print(f"  gateway {first.host}:{first.port}: one connection for {len(rest) + 1} devices, "
                  f"polled in turn ({names})")
    return 0


class Printer:
    """Prints readings as text lines or JSON lines (one object per reading)."""

    def __init__(self, config: Config, as_json: bool, out: TextIO) -> None:
        self.tags = config.tags
        self.as_json = as_json
        self.out = out
        self.count = 0
        self.good = 0

    def __call__(self, readings: list[Reading]) -> None:
        for tag, ts, raw, quality in readings:
            found = self.tags.find(tag)
            assert found is not None  # the poller reads only the config's tags
            device, t = found
            name, unit = t.name, t.unit
            value = float32(raw) if t.type == "float32" and isinstance(raw, float) else raw
            when = dt.datetime.fromtimestamp(ts / 1e9, dt.UTC).isoformat(timespec="milliseconds")
            if self.as_json:
                row = {"device": device, "tag": name, "ts": ts, "time": when, "value": value, "unit": unit,
                       "quality": quality_name(quality)}
                line = json.dumps(strict_json(row), allow_nan=False)
            else:
                shown = "-" if value is None else json.dumps(strict_json({"value": value})["value"])
                q = "" if quality == GOOD else f" [{quality_name(quality)}]"
                line = f"{when} {device}/{name} {shown}{' ' + unit if unit else ''}{q}"
            try:
                print(line, file=self.out)
            except BrokenPipeError:  # `| head`: the reader is gone (inside the event loop: end it all here)
                raise SystemExit(_closed_pipe()) from None
        self.count += len(readings)
        self.good += sum(1 for r in readings if r[3] == GOOD)
        try:
            self.out.flush()
        except BrokenPipeError:
            raise SystemExit(_closed_pipe()) from None


async def _poll(config: Config, once: bool, as_json: bool) -> int:
    from edge.poll import Poller  # noqa: PLC0415

    printer = Printer(config, as_json, sys.stdout)
    poller = Poller(config, printer)
    if once:
        await poller.run_once()
        if printer.good == 0:
            print(f"edge: poll: none of the {printer.count} readings is good (their qualities are above)",
                  file=sys.stderr)
            return EXIT_RUNTIME
        return 0
    task = asyncio.create_task(poller.run(), name="poll")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for line in poller.summary():
        print(f"edge: {line}", file=sys.stderr)
    return 0


def cmd_poll(args: argparse.Namespace) -> int:
    config = load(args.config)
    return run_loop(_poll(config, not args.follow, args.json))


async def _probe(url: str, table: str, address: int, count: int, timeout: float) -> int:
    from edge.poll import RequestError, url_link  # noqa: PLC0415

    link, unit = url_link(url, timeout)
    try:
        if not await link.connect(timeout):
            reason = f" ({link.last_error})" if link.last_error else ""
            print(f"edge: probe: cannot connect to {url}{reason}", file=sys.stderr)
            return EXIT_RUNTIME
        function, bits = TABLES[table]
        try:
            values = await link.read(unit, function, address, count, timeout)
        except RequestError as e:
            print(f"edge: probe: {url} {table} {address}+{count}: {quality_name(e.quality)}", file=sys.stderr)
            return EXIT_RUNTIME
    finally:
        link.close()
    print(f"# {url} unit {unit}, {table} {address}..{address + count - 1} (function {function})")
    if bits:
        print("#  addr  bit")
        for i, v in enumerate(list(values)[:count]):
            print(f"{address + i:7d}  {int(v)}")
        return 0
    regs = [int(v) for v in list(values)[:count]]
    print("#  addr     hex  uint16   int16  ascii  | float32 of this register and the next, by byte order:")
    print(f"#{'':37}|        ABCD         CDAB         BADC         DCBA")
    for i, v in enumerate(regs):
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in v.to_bytes(2, "big"))
        floats = "  ".join(f"{f:11.6g}" for f in _float_orders(v, regs[i + 1])) if i + 1 < len(regs) else ""
        signed = v - 65536 if v > 32767 else v
        print(f"{address + i:7d}  0x{v:04X}  {v:6d}  {signed:6d}  {text:>5}  | {floats}")
    return 0


def _float_orders(first: int, second: int) -> list[float]:
    """The float32 two registers hold in each byte order, ABCD, CDAB, BADC, DCBA: read by the poller's
    own decoder, so the probe shows what a tag of that order would read.

    >>> _float_orders(0x4148, 0x0000)[0], _float_orders(0x0000, 0x4148)[1]
    (12.5, 12.5)
    """
    from edge.config import Tag  # noqa: PLC0415
    from edge.poll import compile_block  # noqa: PLC0415

    tags = [Tag(order, "holding", 0, "float32", order) for order in ("ABCD", "CDAB", "BADC", "DCBA")]
    block = compile_block(tags, 0, 2, False)
    by_order = dict(zip((t.order for t in block.tags), block.decode([first, second]), strict=True))
    return [float(by_order[t.order]) for t in tags]


def cmd_probe(args: argparse.Namespace) -> int:
    limit = MAX_BITS_PER_READ if TABLES[args.table][1] else MAX_REGISTERS_PER_READ
    if not 1 <= args.count <= limit or not 0 <= args.address <= 65535 or args.address + args.count > 65536:
        raise ConfigError([f"probe: --address {args.address} --count {args.count} out of range "
                           f"(count 1..{limit}, addresses 0..65535)"])
    try:
        return run_loop(_probe(args.url, args.table, args.address, args.count, args.timeout))
    except ValueError as e:
        raise ConfigError([f"probe: {e}"]) from e


DEFAULT_CONFIG = "/etc/edge/config.toml"


def cmd_run(args: argparse.Namespace) -> int:
    from edge.app import Appliance  # noqa: PLC0415
    from edge.govern import tune_allocator  # noqa: PLC0415

    tune_allocator()
    config, path = kept_or(Path(args.config))

    async def main() -> int:
        return await Appliance(config, path).run()

    return run_loop(main())


def kept_or(path: Path, read: Callable[[Path], Config] = load_for_run) -> tuple[Config, Path]:
    """The config at `path`, unless one was kept in its state directory (from the boot partition, or
    pushed on cmd/config): that one then, if it still validates (else `path`'s, said in the log). `read`:
    load_for_run for the appliance, load for `edge id` (which makes nothing)."""
    config = read(path)
    kept = persisted(config)
    if not kept.exists():
        return config, path
    try:
        newer = read(kept)
    except ConfigError as e:
        problems = "; ".join(e.problems)
    else:
        logging.getLogger("edge.app").info("edge: running the kept config %s (from the boot partition or "
                                           "cmd/config; %s is the default)", kept, path)
        return newer, kept
    logging.getLogger("edge.app").error("edge: the kept config %s is refused (%s); running %s", kept,
                                        problems, path)
    return config, path


async def _write(config: Config, tag: str, value: Value, by: str) -> int:
    from edge.poll import Poller  # noqa: PLC0415
    from edge.write import Commands  # noqa: PLC0415

    poller = Poller(config, lambda readings: None)
    try:
        result = await Commands(lambda: poller).execute(f"local-{os.getpid()}", tag, value, by, quiet=True)
    finally:
        poller.close()
    if result["ok"]:
        print(f"{tag} = {json.dumps(value)}: written")
        return 0
    print(f"edge: write {tag} = {json.dumps(value)} refused: {result['error']}: {result.get('detail', '')}",
          file=sys.stderr)
    return EXIT_RUNTIME


def _value(text: str) -> Value:
    """42.5, true, "text" as JSON; anything else is taken as a string."""
    try:
        value: Value = json.loads(text)
    except ValueError:
        return text
    return value


def cmd_sign(args: argparse.Namespace) -> int:
    """Print a signed write command (docs/payload.md) for `mosquitto_pub -t <prefix>/<id>/cmd/write -m`."""
    import secrets  # noqa: PLC0415

    from edge.config import MIN_KEY_BYTES  # noqa: PLC0415
    from edge.write import sign  # noqa: PLC0415

    try:
        key = args.key_file.read_bytes().strip()
    except OSError as e:
        raise ConfigError([f"sign: cannot read {args.key_file}: {e.strerror}"]) from e
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError([f"sign: {args.key_file} holds {len(key)} bytes; a key needs {MIN_KEY_BYTES}"])
    command = {"id": args.id or f"{args.by}-{secrets.token_hex(6)}", "tag": args.tag,
               "value": _value(args.value), "expires": int(time.time() + args.expires), "by": args.by}
    print(sign(key, args.key or args.key_file.stem, command).decode())
    return 0


def cmd_write(args: argparse.Namespace) -> int:
    """Write one tag now, with the checks of a remote write (its own connection to the device)."""
    config = load(args.config)
    return run_loop(_write(config, args.tag, _value(args.value), args.by))


def cmd_status(args: argparse.Namespace) -> int:
    from edge.status import status  # noqa: PLC0415

    if args.window <= 0:
        raise ConfigError([f"status: --window {args.window}: must be above 0"])
    return status(load(args.config), args.watch, args.json, args.window)


def _when(ts: int | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts / 1e9, dt.UTC).isoformat(timespec="milliseconds")


def cmd_store_inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict  # noqa: PLC0415

    from edge.store import inspect  # noqa: PLC0415

    config = load(args.config)
    info = inspect(config.store.path, config.store.map_size)
    if args.json:
        print(json.dumps(asdict(info)))
        return 0
    now = dt.datetime.now(dt.UTC).timestamp()
    age = "-" if info.oldest_ts is None else f"{now - info.oldest_ts / 1e9:.0f} s"
    print(f"store {info.path} (appliance {info.appliance or '?'})")
    print(f"  backlog   {plural(info.readings, 'reading')} in {plural(info.blocks, 'block')}, "
          f"sequence {info.first_seq}..{info.last_seq}, next {info.next_seq}")
    print(f"  oldest    {_when(info.oldest_ts)} (age {age}), newest {_when(info.newest_ts)}")
    print(f"  rejected  {plural(info.rejected_blocks, 'block')} kept for inspection")
    mib = 2**20
    reserved = " (reserved)" if info.allocated_bytes >= info.file_bytes > info.written_bytes else ""
    print(f"  size      data.mdb {info.file_bytes / mib:.1f} MiB{reserved}, "
          f"{info.allocated_bytes / mib:.1f} MiB on disk, {info.written_bytes / mib:.1f} MiB written to, "
          f"{info.used_bytes / mib:.1f} MiB in use, map {info.map_size / mib:.0f} MiB")
    totals = sorted(info.persisted.items())
    print("  totals    " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in totals))
    return 0


def cmd_store_dump(args: argparse.Namespace) -> int:
    from edge.store import dump  # noqa: PLC0415

    if args.limit < 1 or args.start < 0:
        raise ConfigError([f"store dump: --from {args.start} --limit {args.limit}: need --from >= 0, "
                           "--limit >= 1"])
    config = load(args.config)
    for seq, readings in dump(config.store.path, config.store.map_size, args.start, args.limit):
        for tag, ts, raw, quality in readings:
            found = config.tags.find(tag)
            device, name, unit, kind = ((found[0], found[1].name, found[1].unit, found[1].type) if found
                                        else ("?", f"tag-{tag}", "", ""))
            value = float32(raw) if kind == "float32" and isinstance(raw, float) else raw
            if args.json:
                row = {"seq": seq, "device": device, "tag": name, "tag_id": tag, "ts": ts, "value": value,
                       "unit": unit, "quality": quality_name(quality)}
                print(json.dumps(strict_json(row), allow_nan=False))
            else:
                shown = "-" if value is None else json.dumps(strict_json({"value": value})["value"])
                print(f"{seq} {_when(ts)} {device}/{name} {shown}{' ' + unit if unit else ''} "
                      f"{quality_name(quality)}")
    return 0


def cmd_store_salvage_read(args: argparse.Namespace) -> int:
    """Stream the intact blocks of a moved-aside store to stdout (binary; read by the store itself)."""
    from edge.store import salvage_read  # noqa: PLC0415

    salvage_read(args.aside, sys.stdout.buffer)
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    """The config, named the same way in every subcommand: a first argument or --config."""
    default = os.environ.get("EDGE_CONFIG", DEFAULT_CONFIG)
    p.add_argument("config", type=Path, nargs="?", default=None,
                   help=f"the config file (default: $EDGE_CONFIG, else {DEFAULT_CONFIG}; here {default})")
    p.add_argument("--config", dest="config_option", type=Path, metavar="CONFIG",
                   help="the same, as an option")


def _config_of(args: argparse.Namespace) -> None:
    if getattr(args, "config_option", None) is not None:
        if args.config is not None and args.config != args.config_option:
            raise ConfigError([f"{args.command}: two configs named: {args.config} and "
                               f"--config {args.config_option}"])
        args.config = args.config_option
    if hasattr(args, "config_option") and args.config is None:
        args.config = Path(os.environ.get("EDGE_CONFIG", DEFAULT_CONFIG))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, exit 2 (argparse would print the whole usage first)."""
        print(f"edge: {self.prog.removeprefix('edge').strip() or 'usage'}: {message} (see --help)",
              file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edge", description="Modbus edge appliance: poll, store, forward.")
    p.add_argument("--version", action="version", version=f"edge {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a config and print its request plan")
    _config_args(c)
    c.set_defaults(fn=cmd_check)
    po = sub.add_parser("poll", help="poll the devices of a config and print readings")
    _config_args(po)
    mode = po.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="poll every group once and exit (default)")
    mode.add_argument("--follow", action="store_true", help="poll on schedule until interrupted")
    po.add_argument("--json", action="store_true", help="one JSON object per reading")
    po.set_defaults(fn=cmd_poll)
    pr = sub.add_parser("probe", help="read a register range from a device URL")
    pr.add_argument("url", help="tcp://host:port/unit or rtu:///dev/ttyX?baud=9600&parity=E&unit=1")
    pr.add_argument("--table", choices=list(TABLES), default="holding")
    pr.add_argument("--address", type=int, default=0)
    pr.add_argument("--count", type=int, default=10)
    pr.add_argument("--timeout", type=float, default=1.0)
    pr.set_defaults(fn=cmd_probe)
    imp = sub.add_parser("import-config", help="take a config and secrets from a directory (the boot "
                         "partition's edge/) into the state directory")
    imp.add_argument("source", type=Path, help="the directory: config.toml and secrets/ in it")
    _config_args(imp)
    imp.set_defaults(fn=cmd_import_config)
    ident = sub.add_parser("id", help="print this board's appliance id and where it comes from")
    _config_args(ident)
    ident.add_argument("--make", action="store_true", help="make the machine id now if the id needs one")
    ident.set_defaults(fn=cmd_id)
    run = sub.add_parser("run", help="run the appliance: poll, store, forward (until SIGTERM)")
    _config_args(run)
    run.set_defaults(fn=cmd_run)
    up = sub.add_parser("update", help="install a signed RAUC bundle (a file or an http(s) URL) into the "
                        "root slot not booted; the next boot puts it on trial")
    up.add_argument("source", help="the bundle: a path, or an http:// or https:// URL")
    _config_args(up)
    up.set_defaults(fn=cmd_update)
    wr = sub.add_parser("write", help="write one writable tag now (checked like a remote write)")
    _config_args(wr)
    wr.add_argument("tag", help="device/tag")
    wr.add_argument("value", help="a number, true/false, or text")
    wr.add_argument("--by", default=f"{os.environ.get('USER', 'local')}@cli", help="who writes (logged)")
    wr.set_defaults(fn=cmd_write)
    sg = sub.add_parser("sign", help="print a signed remote write command (to publish on .../cmd/write)")
    sg.add_argument("tag", help="device/tag")
    sg.add_argument("value", help="a number, true/false, or text")
    sg.add_argument("--key-file", type=Path, required=True, help="the HMAC key, as in [commands.keys]")
    sg.add_argument("--key", help="its name in [commands.keys] (default: the file name without suffix)")
    sg.add_argument("--expires", type=float, default=300.0, metavar="SECONDS", help="valid for (default 300)")
    sg.add_argument("--id", help="command id (default: by-<random>)")
    sg.add_argument("--by", default=f"{os.environ.get('USER', 'local')}@sign", help="who asks (logged)")
    sg.set_defaults(fn=cmd_sign)
    stat = sub.add_parser("status", help="summary from the running appliance's metrics endpoint")
    _config_args(stat)
    stat.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                      help="refresh every SECONDS (default 2) until interrupted")
    stat.add_argument("--window", type=float, default=5.0, metavar="SECONDS",
                      help="rates are averages over this many seconds (default 5)")
    stat.add_argument("--json", action="store_true", help="every metric with its labels, as one JSON object")
    stat.set_defaults(fn=cmd_status)
    st = sub.add_parser("store", help="look into the store (read-only; safe while the appliance runs)")
    stsub = st.add_subparsers(dest="store_command", required=True)
    si = stsub.add_parser("inspect", help="backlog, oldest/newest, sizes, counters")
    sd = stsub.add_parser("dump", help="decoded readings from a sequence number on")
    for x in (si, sd):
        _config_args(x)
        x.add_argument("--json", action="store_true")
    si.set_defaults(fn=cmd_store_inspect)
    sd.add_argument("--from", dest="start", type=int, default=0, help="first sequence number")
    sd.add_argument("--limit", type=int, default=10, help="blocks to print")
    sd.set_defaults(fn=cmd_store_dump)
    sv = stsub.add_parser("salvage-read", help=argparse.SUPPRESS)  # the store's own child (recovery.py)
    sv.add_argument("aside", type=Path)
    sv.set_defaults(fn=cmd_store_salvage_read)
    ing = sub.add_parser("ingest", help="a fleet's data messages from MQTT into PostgreSQL, each reading "
                         "once (needs the ingest extra: psycopg)")
    ing.add_argument("--dsn", required=True, help='libpq connection string, e.g. "host=db dbname=plant"')
    ing.add_argument("--host", default="127.0.0.1", help="MQTT broker (default 127.0.0.1)")
    ing.add_argument("--port", type=int, default=1883)
    ing.add_argument("--prefix", default="edge", help="the appliances' [uplink] topic_prefix")
    ing.add_argument("--group", default="ingest", help="shared subscription group ($share/GROUP/...)")
    ing.add_argument("--client-id", help="stable across restarts (default edge-ingest-<hostname>)")
    ing.add_argument("--table", default="readings")
    ing.add_argument("--username")
    ing.add_argument("--password-file", type=Path)
    ing.add_argument("--tls-ca", type=Path, help="CA to verify the broker (TLS)")
    ing.add_argument("--session-expiry", type=int, default=86_400,
                     help="seconds the broker keeps this session's messages while it is away")
    ing.add_argument("--receive-maximum", type=int, default=64,
                     help="unacknowledged messages in flight to this process at most")
    ing.set_defaults(fn=_ingest)
    return p


def _ingest(args: argparse.Namespace) -> int:
    from edge.ingest import cmd_ingest  # noqa: PLC0415 (paho and psycopg: only for this command)

    return cmd_ingest(args)


from edge.store import StoreUnavailable  # noqa: E402 (edge.store loads lmdb: here, not at the top)

try:
    from lmdb import Error as StoreError
except ImportError:  # pragma: no cover
    StoreError = OSError  # type: ignore[misc,assignment]


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="edge: %(levelname)s %(name)s: %(message)s")
    try:
        _config_of(args)
        code: int = args.fn(args)
    except BrokenPipeError:
        return _closed_pipe()
    except ConfigError as e:
        for problem in e.problems:
            print(f"edge: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except StoreUnavailable as e:
        print(f"edge: store: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as e:
        print(f"edge: store: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    return code


def _closed_pipe() -> int:
    """The reader of our output went away (`edge store dump | head`): end quietly. Python would complain
    once more while flushing stdout at exit, so stdout points at /dev/null from here."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


if __name__ == "__main__":
    sys.exit(main())
