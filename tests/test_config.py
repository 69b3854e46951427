"""Config schema and `edge check`: golden cases in tests/cases, plus focused tests of edge.config.parse.

Each tests/cases/<name>/ holds a config.toml and either expected.txt (the exact stdout of
`edge check config.toml`, exit 0) or error.txt (the exact stderr, exit 2). To add a case, write its
config.toml, run `python -m edge check config.toml` inside the directory, check the output by hand and
save it as expected.txt or error.txt.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zlib
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import config as config_module
from edge.cli import main
from edge.config import (
    Config,
    ConfigError,
    default_frame_gap,
    load,
    parse,
    tag_id,
)
from edge.poll.types import ORDER_ALIASES

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "cases"
CASE_DIRS = sorted(p for p in CASES.iterdir() if (p / "config.toml").is_file())
GOOD = [p for p in CASE_DIRS if (p / "expected.txt").is_file()]
BAD = [p for p in CASE_DIRS if (p / "error.txt").is_file()]


# --------------------------------------------------------------------------------------------------
# Golden cases


def test_case_inventory() -> None:
    assert len(BAD) >= 20, f"only {len(BAD)} bad cases"
    assert len(GOOD) >= 5, f"only {len(GOOD)} good cases"
    for case in CASE_DIRS:
        has = [(case / f).is_file() for f in ("expected.txt", "error.txt")]
        assert sum(has) == 1, f"{case.name}: needs exactly one of expected.txt, error.txt"
        kind = "good" if has[0] else "bad"
        assert case.name.startswith(f"{kind}_"), f"{case.name}: a {kind} case should be named {kind}_*"


@pytest.mark.parametrize("case", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_golden(case: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(case)
    code = main(["check", "config.toml"])
    out, err = capsys.readouterr()
    if (case / "expected.txt").is_file():
        assert (code, err) == (0, "")
        assert out == (case / "expected.txt").read_text()
        assert out.startswith("config.toml: ok: ")
    else:
        assert (code, out) == (2, "")
        assert err == (case / "error.txt").read_text()
        assert err and all(line.startswith("edge: ") for line in err.splitlines())


def test_check_subprocess_exits_2_on_bad_config() -> None:
    case = CASES / "bad_type_typo"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "edge", "check", "config.toml"], cwd=case, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (case / "error.txt").read_text()
    assert proc.stderr.startswith("edge: device[1].tag[2].type: unknown type \"flaot32\"")


@pytest.mark.parametrize("name", ["bad_not_utf8", "bad_nested_too_deeply", "bad_empty", "bad_no_device"])
def test_run_refuses_what_check_refuses_with_exit_2_and_no_traceback(name: str) -> None:
    """Bytes that are not UTF-8, nesting deeper than the parser's stack, a file truncated to nothing:
    `edge run` exits 2 with the one line `edge check` prints."""
    case = CASES / name
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "edge", "run", "config.toml"], cwd=case, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stderr) == (2, (case / "error.txt").read_text())


def test_a_deeply_nested_config_is_refused_with_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text("extra = " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError) as info:
        config_module.load(conf)
    assert info.value.problems == [f"{conf}: invalid TOML: arrays or tables nested too deeply"]


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "too large"])
def test_a_config_that_is_not_a_bounded_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """/dev/zero would be read until memory runs out, a FIFO would block `edge run` forever, a huge file
    would take minutes and far more memory than the unit allows: each is one line, exit 2, at once."""
    path = {"device": Path("/dev/zero"), "fifo": tmp_path / "fifo.toml", "directory": tmp_path,
            "too large": tmp_path / "big.toml"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "too large":
        with open(path, "wb") as f:
            f.truncate(config_module.MAX_CONFIG_BYTES + 1)  # sparse: its size is what is refused
    for command in ("check", "run"):
        proc = subprocess.run([sys.executable, "-m", "edge", command, str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 2 and proc.stdout == "", proc
        expected = (f"above the {config_module.MAX_CONFIG_BYTES:,}" if kind == "too large"
                    else f"not a regular file (a {kind.replace('fifo', 'FIFO')})")
        assert proc.stderr.startswith(f"edge: {path}: ") and expected in proc.stderr
        assert proc.stderr.count("\n") == 1


def test_check_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["check", "missing.toml"]) == 2
    assert capsys.readouterr().err == "edge: missing.toml: cannot read: No such file or directory\n"


# --------------------------------------------------------------------------------------------------
# parse() on dicts


def tcp_device(name: str = "d", **extra: Any) -> dict[str, Any]:
    return {"name": name, "host": "10.0.0.1", **extra}


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value.problems


def test_empty_config_has_defaults() -> None:
    cfg = parse({})
    assert isinstance(cfg, Config)
    assert cfg.devices == () and cfg.buses == ()
    assert cfg.store.map_size == 1 << 30
    assert cfg.store.path == Path("/var/lib/edge/store")
    assert cfg.uplink.tls is None
    assert cfg.governor.memory_soft is None


@pytest.mark.parametrize(("raw", "seconds"), [
    ("250ms", 0.25), ("1.5s", 1.5), ("5m", 300.0), ("1h", 3600.0), (" 2 s ", 2.0), (".5", 0.5),
    (2, 2.0), (0.75, 0.75),
])
def test_durations(raw: Any, seconds: float) -> None:
    dev = parse({"device": [tcp_device(interval=raw, group={"slow": {"interval": raw}})]}).devices[0]
    groups = {g.name: g for g in dev.groups}
    for value in (groups["default"].interval, groups["slow"].interval):
        assert value == seconds
        assert type(value) is float


def test_duration_1h_and_units_in_other_sections() -> None:
    cfg = parse({"store": {"low_power_commit_interval": "1h", "commit_interval": "250ms"},
                 "uplink": {"backoff_max": "1h", "keepalive": 60}})
    assert cfg.store.low_power_commit_interval == 3600.0
    assert cfg.store.commit_interval == 0.25
    assert cfg.uplink.backoff_max == 3600.0
    assert cfg.uplink.keepalive == 60.0


@pytest.mark.parametrize(("raw", "message"), [
    ("5 parsecs", "invalid duration '5 parsecs'"),
    ("-1s", "invalid duration '-1s'"),
    ("1e3", "invalid duration '1e3'"),
    (True, "expected a duration"),
    (-1, "-1 s out of range 0.001..86400.0 s"),
])
def test_bad_durations(raw: Any, message: str) -> None:
    (problem,) = problems_of({"device": [tcp_device(interval=raw)]})
    assert problem.startswith(f"device[0].interval: {message}")


@pytest.mark.parametrize(("raw", "size"), [
    ("64MiB", 64 * 1024 * 1024), ("1GB", 10**9), ("512MiB", 512 << 20), ("2GiB", 2 << 30),
    (16_777_216, 16_777_216), ("1048576", 1 << 20),
])
def test_sizes(raw: Any, size: int) -> None:
    assert parse({"store": {"map_size": raw}}).store.map_size == size


def test_sizes_in_other_sections() -> None:
    cfg = parse({"store": {"commit_bytes": "512KiB"},
                 "governor": {"memory_soft": "96MiB", "memory_hard": "1GiB"}})
    assert cfg.store.commit_bytes == 512 * 1024
    assert (cfg.governor.memory_soft, cfg.governor.memory_hard) == (96 << 20, 1 << 30)


def test_bad_sizes() -> None:
    problems = problems_of({"store": {"map_size": "64M", "commit_bytes": 10},
                            "governor": {"memory_soft": 1.5}})
    assert problems == [
        "store.map_size: invalid size '64M' (e.g. 1048576, \"64MiB\", \"1GB\")",
        "store.commit_bytes: 10 bytes is below the minimum 1024 bytes",
        "governor.memory_soft: expected a size (bytes, or \"64MiB\", \"1GB\"), got number 1.5",
    ]


def bus(**extra: Any) -> dict[str, Any]:
    return {"bus": [{"name": "rs485", "port": "/dev/ttyUSB0", **extra}]}


def test_frame_gap_default_9600_8e1() -> None:
    b = parse(bus(baud=9600, parity="E")).buses[0]
    assert b.bits_per_char == 11
    assert math.isclose(b.frame_gap, 3.5 * 11 / 9600)
    assert math.isclose(b.frame_gap, 0.0040104, rel_tol=1e-4)


def test_frame_gap_default_other_framings() -> None:
    assert math.isclose(parse(bus(baud=9600, parity="N")).buses[0].frame_gap, 3.5 * 10 / 9600)
    assert math.isclose(parse(bus(baud=9600, parity="N", stop_bits=2)).buses[0].frame_gap, 3.5 * 11 / 9600)
    assert math.isclose(parse(bus(baud=19200)).buses[0].frame_gap, 3.5 * 11 / 19200)  # not above 19200
    assert parse(bus()).buses[0].frame_gap == default_frame_gap(19200, 11)


@pytest.mark.parametrize("baud", [38400, 57600, 115200, 19201])
def test_frame_gap_fixed_above_19200(baud: int) -> None:
    assert parse(bus(baud=baud)).buses[0].frame_gap == 0.00175
    assert default_frame_gap(baud, 11) == 0.00175


def test_frame_gap_explicit() -> None:
    assert parse(bus(baud=9600, frame_gap="5ms")).buses[0].frame_gap == 0.005


TAGS = [
    {"name": "flow", "address": 0, "type": "float32"},
    {"name": "pressure", "address": 2, "type": "int16"},
    {"name": "running", "address": 3, "type": "bool", "bit": 0},
    {"name": "alarm", "table": "coil", "address": 0},
]


def ids_of(config: Config) -> dict[tuple[str, str], int]:
    """(device, tag) -> id, as the config's index of tags by id has them."""
    index = config.tags
    return {(index.names[index.device_of[j]], t.name): index.ids[j] for j, t in enumerate(index.slots)
            if t is not None}


def test_tag_ids_are_crc32_of_device_slash_tag() -> None:
    cfg = parse({"device": [tcp_device("pump1", tag=TAGS)]})
    tags = cfg.devices[0].tags
    assert ids_of(cfg) == {("pump1", t.name): zlib.crc32(f"pump1/{t.name}".encode()) for t in tags}
    assert tag_id("pump1", "flow") == zlib.crc32(b"pump1/flow")
    assert len(set(ids_of(cfg).values())) == len(TAGS) == len(cfg.devices[0].tags)
    for t in cfg.devices[0].tags:
        assert cfg.tags.find(tag_id("pump1", t.name)) == ("pump1", t)


def test_tag_ids_stable_across_reordering() -> None:
    def ids(devices: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
        return ids_of(parse({"device": devices}))

    one = ids([tcp_device("pump1", tag=TAGS), tcp_device("pump2", tag=TAGS)])
    other = ids([tcp_device("pump2", tag=TAGS[::-1]), tcp_device("pump1", tag=TAGS[1:] + TAGS[:1])])
    assert one == other
    assert one[("pump1", "flow")] != one[("pump2", "flow")]
    index = parse({"device": [tcp_device("pump1", tag=TAGS)]}).tags
    for (dev, name), tid in one.items():
        found = index.find(tid)
        assert (found[1].name if found else None) == (name if dev == "pump1" else None)


@pytest.mark.parametrize(("spelling", "canonical"), [
    ("GHEFCDAB", "CDAB"), ("HGFEDCBA", "DCBA"), ("ABCDEFGH", "ABCD"), ("BADCFEHG", "BADC"),
    ("AB", "ABCD"), ("BA", "BADC"), ("ABCD", "ABCD"), ("BADC", "BADC"), ("CDAB", "CDAB"), ("DCBA", "DCBA"),
])
def test_order_aliases(spelling: str, canonical: str) -> None:
    tag = {"name": "t", "address": 0, "type": "float64", "order": spelling}
    assert parse({"device": [tcp_device(tag=[tag])]}).devices[0].tags[0].order == canonical
    assert ORDER_ALIASES.get(spelling, spelling) == canonical


def test_unknown_order_is_reported_as_written() -> None:
    tag = {"name": "t", "address": 0, "type": "float32", "order": "cdab"}
    (problem,) = problems_of({"device": [tcp_device(tag=[tag])]})
    assert problem.startswith("device[0].tag[0].order: unknown byte order 'cdab' (one of: ABCD,")


def test_all_errors_collected() -> None:
    data = {
        "appliance": {"id": "edge-1", "colour": "blue"},
        "device": [
            tcp_device("a", tag=[{"name": "x", "address": 0, "type": "flaot32"}]),
            tcp_device("b", port="502", tag=[{"name": "y", "address": 70000},
                                             {"name": "y", "address": 1, "type": "string"}]),
            {"name": "a", "tag": [{"name": "z", "address": 0, "table": "coil", "type": "int16"}]},
        ],
        "store": {"low_watermark": 0.9, "high_watermark": 0.85},
        "uplink": {"tls": {"cert": "/c.pem"}},
        "metrics": {"port": 99999},
        "extra": 1,
    }
    assert problems_of(data) == [
        "appliance.colour: unknown key",
        'device[0].tag[0].type: unknown type "flaot32" (one of: bool, bit, int8, uint8, int16, uint16, '
        "int32, uint32, float32, int64, uint64, float64, float16, string)",
        "device[1].port: expected an integer, got string '502'",
        "device[1].tag[0].address: 70000 out of range 0..65535",
        "device[1].tag[1].length: required for a string tag (bytes)",
        'device[1].tag[1].name: duplicate tag name "y" (also device[1].tag[0].name)',
        'device[2]: needs "host" (Modbus TCP) or "bus" (Modbus RTU)',
        "device[2].tag[0].type: int16 on the coil table: coils and discrete inputs hold only bool",
        'device[2].name: duplicate device name "a" (also device[0].name)',
        "store.low_watermark: 0.9 must be below high_watermark 0.85",
        "uplink.tls.key: cert and key go together",
        "metrics.port: 99999 out of range 0..65535",
        "extra: unknown key",
    ]


def test_config_error_message_joins_problems() -> None:
    err = ConfigError(["a: one", "b: two"])
    assert str(err) == "a: one\nb: two"
    assert err.problems == ["a: one", "b: two"]


def test_unit_ranges_tcp_and_rtu() -> None:
    assert parse({"device": [tcp_device(unit=0)]}).devices[0].unit == 0
    assert parse({"device": [tcp_device(unit=255)]}).devices[0].unit == 255
    rtu = {**bus(), "device": [{"name": "m", "bus": "rs485", "unit": 0}]}
    assert problems_of(rtu) == ["device[0].unit: 0 out of range 1..247"]
    rtu["device"][0]["unit"] = 247
    dev = parse(rtu).devices[0]
    assert (dev.transport, dev.unit, dev.timeout) == ("rtu", 247, 0.5)


def test_bit_tags_may_share_a_register_but_not_a_word_tag() -> None:
    tags = [{"name": f"b{i}", "address": 7, "type": "bool", "bit": i} for i in range(16)]
    assert len(parse({"device": [tcp_device(tag=tags)]}).devices[0].tags) == 16
    tags.append({"name": "word", "address": 7})
    assert problems_of({"device": [tcp_device(tag=tags)]}) == [
        'device[0].tag[16].address: "word" at 7 overlaps "b0" (device[0].tag[0], 7..7)'
    ]


def test_load_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[[device]\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: invalid TOML: ")


def test_tags_alike_share_one_kind_and_tags_are_immutable() -> None:
    tags = [{"name": f"t{i}", "address": i} for i in range(50)]
    tags.append({"name": "x", "address": 60, "type": "float32", "scale": 2.0})
    (device,) = parse({"device": [tcp_device(tag=tags)]}).devices
    assert len({id(t.kind) for t in device.tags}) == 2
    x = device.tags[-1]
    assert (x.name, x.address, x.type, x.scale) == ("x", 60, "float32", 2.0)
    assert device.tags[0].scale == 1.0
    with pytest.raises(FrozenInstanceError):
        x.address = 1
    assert x != device.tags[0] and x != bytes(x) and str(x) == repr(x) == (
        "Tag(name='x', table='holding', address=60, type='float32', order='ABCD', bit=None, "
        "length=None, scale=2.0, offset=0.0, unit='', deadband=0.0, deadband_percent=0.0, heartbeat=600.0, "
        "group='default', barrier=False, on_change=False)")
    assert sys.getsizeof(x) < 80  # one object: address, bit, kind and name packed


# --------------------------------------------------------------------------------------------------
# Known bugs (found while writing the golden cases). Each test
# states the correct behaviour and is expected to fail until the bug is fixed.


def test_same_bit_twice_is_an_overlap() -> None:
    tags = [{"name": "a", "address": 5, "type": "bool", "bit": 0},
            {"name": "b", "address": 5, "type": "bool", "bit": 1},
            {"name": "c", "address": 5, "type": "bool", "bit": 0}]
    assert any("overlaps" in p for p in problems_of({"device": [tcp_device(tag=tags)]}))


def test_every_overlap_of_a_wide_tag_is_reported() -> None:
    tags = [{"name": "a", "address": 0, "type": "uint64"},
            {"name": "b", "address": 1},
            {"name": "c", "address": 3}]
    problems = problems_of({"device": [tcp_device(tag=tags)]})
    assert any(p.startswith("device[0].tag[2].address") for p in problems)


def test_memory_soft_zero_is_rejected() -> None:
    problems_of({"governor": {"memory_soft": 0}})


def test_empty_names_and_host_rejected() -> None:
    problems_of({"device": [tcp_device("", host=""), tcp_device("", host="")]})


def test_a_name_ending_in_a_newline_is_refused() -> None:
    """Names go into ids, topics and payloads: a trailing newline is not a name character."""
    tags = [{"name": "t\n", "address": 0}]
    assert problems_of({"device": [tcp_device("m1\n", tag=tags)]}) == [
        "device[0].name: invalid name 'm1\\n' (letters, digits, _ . -; not starting with . or -)",
        "device[0].tag[0].name: invalid name 't\\n' (letters, digits, _ . -; not starting with . or -)"]


def test_no_spurious_overlap_after_bad_address() -> None:
    tags = [{"name": "a", "address": 0}, {"name": "b", "address": 400001}]
    assert problems_of({"device": [tcp_device(tag=tags)]}) == [
        "device[0].tag[1].address: 400001 out of range 0..65535"]


HOSTILE_VALUES = st.one_of(st.integers(-3, 3), st.text(max_size=3), st.booleans(), st.none(),
                           st.lists(st.integers(0, 2), max_size=2),
                           st.dictionaries(st.text(max_size=2), st.integers(0, 2), max_size=2))


@settings(max_examples=300, deadline=None)
@given(template=st.one_of(HOSTILE_VALUES, st.just({"tag": [{"name": "a", "address": 0}]})),
       device_template=HOSTILE_VALUES | st.just("m"), group=HOSTILE_VALUES,
       tag=HOSTILE_VALUES | st.lists(st.fixed_dictionaries({"name": HOSTILE_VALUES | st.just("a"),
                                                            "address": st.integers(0, 3)}), max_size=2))
def test_templates_of_any_shape_are_refused_with_key_paths_never_a_crash(
        template: object, device_template: object, tag: object, group: object) -> None:
    """Whatever sits where a template, a device's template name, its tags or its groups belong: a Config
    or a ConfigError whose every problem names a key path, never another exception."""
    device: dict[str, object] = {"name": "d", "host": "h", "template": device_template}
    if tag is not None:
        device["tag"] = tag
    if group is not None:
        device["group"] = group
    doc: dict[str, object] = {"device": [device]}
    if template is not None:
        doc["template"] = {"m": template}
    try:
        parse(doc)
    except ConfigError as e:
        assert e.problems and all(p.split(":", 1)[0].startswith(("device", "template")) for p in e.problems)


def test_mqtt_3_1_1_is_an_option_but_not_with_remote_commands(tmp_path: Path) -> None:
    key = tmp_path / "ops.key"
    key.write_text("k" * 64)
    base = {"device": [{"name": "d", "host": "h", "tag": [{"name": "t", "address": 0}]}]}
    assert parse({**base, "uplink": {"protocol": "3.1.1"}}).uplink.protocol == "3.1.1"
    assert parse(base).uplink.protocol == "5"
    with pytest.raises(ConfigError) as e:
        parse({**base, "uplink": {"protocol": "3.1.1"},
               "commands": {"remote": True, "remote_config": True, "keys": {"ops": str(key)}}})
    assert [p.split(":", 1)[0] for p in e.value.problems] == ["commands.remote", "commands.remote_config"]
    with pytest.raises(ConfigError) as e:
        parse({**base, "uplink": {"protocol": "3"}})
    assert e.value.problems == ["uplink.protocol: unknown value '3' (one of: 5, 3.1.1)"]
