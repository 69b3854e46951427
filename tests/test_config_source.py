"""edge.config.source: a document's [[device.tag]] tables parsed a batch at a time, and the cut checked.

Whatever the document, load() must give what tomllib's parse of the whole document gives: the same Config,
or the same problems. Documents are built from pieces that test the cut: header spellings, comments,
tables between a device's tags, tables inside a tag, multi-line strings and arrays holding lines that look
like headers, CRLF line ends, tags before any device.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.config import Config, ConfigError, load, parse, tag_id
from edge.config import source as source_module


def whole(path: Path) -> Config | list[str]:
    """The reference: the whole document parsed by tomllib, then validated."""
    try:
        return parse(tomllib.loads(path.read_text()), path.resolve().parent)
    except tomllib.TOMLDecodeError as e:
        return [f"{path}: invalid TOML: {e}"]
    except ConfigError as e:
        return e.problems


def loaded(path: Path) -> Config | list[str]:
    try:
        return load(path)
    except ConfigError as e:
        return e.problems


def tag(i: int, extra: str = "") -> str:
    return f'[[device.tag]]\nname = "t{i}"\naddress = {i * 2}\n{extra}'


def device(d: int) -> str:
    return f'[[device]]\nname = "dev{d}"\nhost = "127.0.0.1"\nunit = {d + 1}\n'


def test_a_large_config_is_streamed_and_loads_as_parsed_whole(tmp_path: Path) -> None:
    """2 x 1,500 tags of three kinds: the tags are handed over as streamed tables (never one list), and the
    Config equals the whole document's; tags alike share one kind."""
    parts = ['[appliance]\nid = "big"\n']
    for d in range(2):
        parts.append(device(d))
        for i in range(1500):
            if i % 3 == 0:
                parts.append(tag(i, f'type = "float32"\nscale = {1 + i % 400 / 8}\norder = "CDAB"\n'
                                    f'unit = "kW"\ndeadband = {1 + i % 5 / 4}\n'
                                    f'heartbeat = "{60 + i % 3}s"\n'))
            elif i % 3 == 1:
                parts.append(tag(i, f'type = "bool"\nbit = {i % 16}\n'))
            else:
                parts.append(tag(i, 'type = "string"\nlength = 4\n'))
        parts.append('[device.group.slow]\ninterval = "10s"\n')
    path = tmp_path / "big.toml"
    path.write_text("".join(parts))
    doc = source_module._streamed(path.read_text())
    assert all(isinstance(d["tag"], source_module._TagTables) for d in doc["device"])
    config = load(path)
    assert config == whole(path)
    pairs = [(d.name, t) for d in config.devices for t in d.tags]
    tags = [t for _, t in pairs]
    assert len(tags) == 3000 and len({t.scale for t in tags}) > 256
    kinds = {t.kind for t in tags}
    assert len({id(t.kind) for t in tags}) == len(kinds) < 1000
    dev, t = pairs[1234]
    assert config.tags.find(tag_id(dev, t.name)) == (dev, t) and config.tags.find(1) is None


PIECES = [
    device(0), device(1), tag(1), tag(2), tag(3), tag(4), tag(5),
    tag(6, 'type = "float32"\n'), tag(7, "scale = 2\n"),
    "[[ device.tag ]]  # spaced\nname = \"s\"\naddress = 100\n",
    '[["device".tag]]\nname = "q"\naddress = 102\n',
    "[device.tag.inner]\nx = 1\n",  # a table inside the last tag: an unknown key
    "[[device.tag.more]]\ny = 2\n",
    '[device.group.slow]\ninterval = "5s"\n',
    "[device.tag]\n",  # tag as a table: a TOML error after [[device.tag]]
    '[store]\ncommit_interval = "2s"\n',
    '[uplink]\nenabled = false\n',
    "# [[device.tag]]\n",
    'note = """\n[[device.tag]]\nname = "fake"\naddress = 9\n"""\n',
    "note = '''\n[[device]]\n'''\n",
    "[governor.low_power]\nschedule = [\n[\"22:00\", \"06:00\"],\n]\n",
    "schedule = [\n[[device.tag]]\n]\n",
    "x = [\n[\"a\"]\n]\n",
    "[[device.tag]]\r\nname = \"crlf\"\r\naddress = 200\r\n",
    "[device.group.fast]\r\ninterval = 1\r\n",
    "address = 300\n",
    "[[device]]  # a comment\nname = \"dc\"\nhost = \"h\"\n",
    "tag = []\n",
    "[bad\n",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=12))
def test_any_document_loads_as_parsed_whole(tmp_path: Path, pieces: list[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes("".join(pieces).encode())
    assert loaded(path) == whole(path)


@pytest.mark.parametrize("batch", [1, 2, 3, 1000])
def test_batches_of_any_size_give_the_same_tags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                batch: int) -> None:
    monkeypatch.setattr(source_module, "TAG_BATCH", batch)
    path = tmp_path / "c.toml"
    path.write_text(device(0) + "".join(tag(i) for i in range(7)) + '[device.group.g]\ninterval = 2\n'
                    + tag(7, 'group = "g"\n') + device(1) + tag(8))
    config = load(path)
    assert config == whole(path)
    assert [t.name for d in config.devices for t in d.tags] == [f"t{i}" for i in range(9)]


def test_templates_load_streamed_as_parsed_whole(tmp_path: Path) -> None:
    """300 devices of one template of 300 tags (some with their own tags over and beside the template's,
    streamed as [[device.tag]]): the same Config as the whole document's, every device with the template's
    tags under its own ids."""
    parts = ['[appliance]\nid = "tpl"\n[template.meter]\ninterval = "2s"\n']
    parts += [f'[[template.meter.tag]]\nname = "t{i}"\naddress = {i * 2}\ntype = "uint32"\n'
              for i in range(300)]
    for d in range(300):
        parts.append(f'[[device]]\nname = "dev{d}"\nhost = "10.0.{d // 100}.1"\nunit = {d % 100 + 1}\n'
                     'template = "meter"\n')
        if d % 7 == 0:
            parts.append('[[device.tag]]\nname = "t3"\nscale = 0.5\n' + tag(400))
    path = tmp_path / "tpl.toml"
    path.write_text("".join(parts))
    config = load(path)
    assert config == whole(path)
    assert len(config.devices) == 300 and {len(d.tags) for d in config.devices} == {300, 301}
    assert len({tag_id(d.name, t.name) for d in config.devices for t in d.tags}) == sum(
        len(d.tags) for d in config.devices)
    # the template's tags are one object each for all its devices; a device's own tag over one of them
    # (t3 scaled) is another, shared by the devices that changed it alike
    t0 = {id(d.tags[0]) for d in config.devices}
    t3 = {id(t) for d in config.devices for t in d.tags if t.name == "t3"}
    assert len(t0) == 1 and len(t3) == 2
    scaled = [t.scale for d in config.devices for t in d.tags if t.name == "t3"]
    assert scaled.count(0.5) == 43 and all(d.groups[0].interval == 2.0 for d in config.devices)
