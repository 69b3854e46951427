"""Planner properties (hypothesis): every tag covered exactly once, limits respected, minimal counts."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import DeviceConfig, PollGroup, Tag
from edge.poll.plan import coalesce, default_gap, plan_device, summarize

WIDTH = {"uint16": 1, "float32": 2, "float64": 4}


@st.composite
def tag_layouts(draw: st.DrawFn) -> list[Tag]:
    """Non-overlapping tags in one table, random widths, gaps and barriers."""
    n = draw(st.integers(1, 60))
    addr, tags = 0, []
    for i in range(n):
        addr += draw(st.integers(0, 40))
        ty = draw(st.sampled_from(list(WIDTH)))
        barrier = draw(st.booleans()) and draw(st.booleans())
        tags.append(Tag(f"t{i}", "holding", addr, ty, barrier=barrier))
        addr += WIDTH[ty]
    return tags


@given(tag_layouts(), st.integers(4, 125), st.integers(0, 60))
@settings(max_examples=300, deadline=None)
def test_every_tag_once_and_limits(tags: list[Tag], limit: int, gap: int) -> None:
    runs = coalesce(tags, limit, gap)
    seen = [t.name for run in runs for t in run]
    assert sorted(seen) == sorted(t.name for t in tags)
    for run in runs:
        start, end = run[0].address, max(t.end for t in run)
        assert end - start <= limit
        for a, b in itertools.pairwise(run):
            assert b.address - a.end <= gap
        if len(run) > 1:
            assert not any(t.barrier for t in run)


@given(st.lists(st.sampled_from(list(WIDTH)), min_size=1, max_size=200), st.integers(4, 125))
@settings(max_examples=200, deadline=None)
def test_contiguous_run_is_minimal(types: list[str], limit: int) -> None:
    """Back to back tags: the request count is the minimum any packing could reach."""
    addr, tags = 0, []
    for i, ty in enumerate(types):
        tags.append(Tag(f"t{i}", "holding", addr, ty))
        addr += WIDTH[ty]
    runs = coalesce(tags, limit, 0)
    # Lower bound: total registers / limit; and greedy never leaves room for the next tag.
    assert len(runs) >= -(-addr // limit)
    for run, nxt in itertools.pairwise(runs):
        span = max(t.end for t in run) - run[0].address
        assert span + nxt[0].registers > limit
    if addr <= limit:
        assert len(runs) == 1


def _device(tags: list[Tag], **kw: object) -> DeviceConfig:
    groups = (PollGroup("default", 1.0), PollGroup("fast", 0.1))
    return DeviceConfig("d", 1, tuple(tags), groups, host="h", **kw)


def test_worked_example_from_docstring() -> None:
    tags = [Tag("a", "holding", 0, "float32"), Tag("b", "holding", 2, "uint16"),
            Tag("c", "holding", 20, "uint16"), Tag("d", "holding", 200, "uint32")]
    s = summarize(plan_device(_device(tags, max_gap=10)))
    assert (s.requests, s.registers) == (3, 6)
    s = summarize(plan_device(_device(tags, max_gap=20)))
    assert (s.requests, s.registers) == (2, 23)
    assert str(s) == "2 requests touching 23 registers for 4 tags"


def test_groups_tables_and_workarounds_split_requests() -> None:
    tags = [Tag("a", "holding", 0, "uint16"), Tag("b", "holding", 1, "uint16", group="fast"),
            Tag("c", "input", 2, "uint16"), Tag("d", "coil", 0, "bool"), Tag("e", "coil", 5, "bool")]
    plan = plan_device(_device(tags))
    assert [str(r) for r in plan["default"]] == ["coil 0..5", "holding 0..0", "input 2..2"]
    assert [str(r) for r in plan["fast"]] == ["holding 1..1"]
    single = plan_device(_device(tags, single_register_reads=True))
    assert summarize(single).requests == 5


def test_max_registers_limit_and_bit_gap_scale() -> None:
    tags = [Tag(f"t{i}", "holding", i * 2, "float32") for i in range(10)]
    assert summarize(plan_device(_device(tags, max_registers=4))).requests == 5
    dev = _device([])
    assert default_gap(dev, True) == 16 * default_gap(dev, False)
    assert default_gap(replace(dev, host=None, bus="b"), False) == 10
