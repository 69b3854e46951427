"""Decoder: round trips against the encoder for every type and byte order; worked examples."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import Tag
from edge.poll.decode import compile_block, encode
from edge.poll.types import ORDERS

RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
          "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1), "int64": (-(2**63), 2**63 - 1),
          "uint64": (0, 2**64 - 1)}
FLOATS = {"float16": 16, "float32": 32, "float64": 64}


def values_for(ty: str) -> st.SearchStrategy[object]:
    if ty in RANGES:
        lo, hi = RANGES[ty]
        return st.integers(lo, hi)
    if ty in FLOATS:
        return st.floats(width=FLOATS[ty], allow_nan=False)
    if ty == "string":
        return st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
    return st.booleans()


@st.composite
def blocks(draw: st.DrawFn) -> tuple[list[Tag], list[object], int]:
    """A request of several tags of random types and orders, with gaps, and the values they hold."""
    n = draw(st.integers(1, 12))
    addr, tags, values = draw(st.integers(0, 5)), [], []
    for i in range(n):
        ty = draw(st.sampled_from([*RANGES, *FLOATS, "string", "bool"]))
        order = draw(st.sampled_from(list(ORDERS)))
        kw = {"length": 12} if ty == "string" else {"bit": draw(st.integers(0, 15))} if ty == "bool" else {}
        tag = Tag(f"t{i}", "holding", addr, ty, order, **kw)
        tags.append(tag)
        values.append(draw(values_for(ty)))
        addr = tag.end + draw(st.integers(0, 3))
    return tags, values, addr


@given(blocks())
@settings(max_examples=400, deadline=None)
def test_round_trip(block: tuple[list[Tag], list[object], int]) -> None:
    tags, values, end = block
    regs = [0] * end
    for t, v in zip(tags, values, strict=True):
        regs[t.address:t.end] = encode(t, v)
    dec = compile_block(tags, 0, end, False)
    got = dict(zip([t.name for t in dec.tags], dec.decode(regs), strict=True))
    for t, v in zip(tags, values, strict=True):
        assert got[t.name] == v or (isinstance(v, float) and math.isnan(v) and math.isnan(got[t.name]))


@pytest.mark.parametrize(("order", "regs"), [
    ("ABCD", [0x3F80, 0x0000]), ("CDAB", [0x0000, 0x3F80]), ("BADC", [0x803F, 0x0000]),
    ("DCBA", [0x0000, 0x803F]),
])
def test_float32_orders_worked_examples(order: str, regs: list[int]) -> None:
    t = Tag("f", "holding", 0, "float32", order)
    assert compile_block([t], 0, 2, False).decode(regs) == [1.0]
    assert encode(t, 1.0) == regs


def test_int64_word_swapped_and_8bit_halves() -> None:
    value = 0x0102030405060708
    t = Tag("q", "holding", 0, "uint64", "CDAB")  # GHEFCDAB
    assert encode(t, value) == [0x0708, 0x0506, 0x0304, 0x0102]
    lo = Tag("lo", "holding", 0, "int8", "ABCD")
    hi = Tag("hi", "holding", 1, "uint8", "BADC")
    dec = compile_block([lo, hi], 0, 2, False)
    assert dec.decode([0x12FE, 0xAB34]) == [-2, 0xAB]


def test_scale_offset_bits_and_string_nul_trim() -> None:
    temp = Tag("t", "input", 0, "int16", scale=0.1, offset=-40.0)
    flag = Tag("f", "input", 1, "bool", bit=15)
    name = Tag("n", "input", 2, "string", length=6)
    dec = compile_block([temp, flag, name], 0, 5, False)
    raw = [struct.unpack(">H", struct.pack(">h", 650))[0], 0x8000, 0x4142, 0x4300, 0x0000]
    values = dict(zip([t.name for t in dec.tags], dec.decode(raw), strict=True))
    assert values["t"] == pytest.approx(25.0)
    assert values["f"] is True
    assert values["n"] == "ABC"


def test_coils_by_bit_offset() -> None:
    tags = [Tag("a", "coil", 10, "bool"), Tag("b", "coil", 13, "bool")]
    dec = compile_block(tags, 10, 4, True)
    assert dec.decode([False, False, False, True, False, False, False, False]) == [False, True]


def test_requests_of_one_layout_share_their_compiled_decoder() -> None:
    """Two devices' identical requests (a template's, or meters written out alike) share one compiled
    decode function, each decoder keeping its tags in the order of the values; another scale is another
    layout."""
    def tags(prefix: str, scale: float = 0.1) -> list[Tag]:
        return [Tag(f"{prefix}{i}", "holding", 100 + 2 * i, ty, "CDAB" if ty == "float32" else "ABCD",
                    scale=scale if ty == "int16" else 1.0)
                for i, ty in enumerate(("float32", "int16", "uint32", "int16"))]

    a, b = compile_block(tags("t"), 100, 8, False), compile_block(tags("u"), 100, 8, False)
    other = compile_block(tags("t", scale=0.5), 100, 8, False)
    assert a.compiled is b.compiled and other.compiled is not a.compiled
    assert [t.name[1:] for t in a.tags] == [t.name[1:] for t in b.tags]
    assert {t.name[0] for t in a.tags} == {"t"} and {t.name[0] for t in b.tags} == {"u"}
    regs = [0x0000, 0x3F80, 0xFFF6, 0x0000, 0x0000, 0x0007, 0x0014, 0x0000]
    assert a.decode(regs) == b.decode(regs)
    values = dict(zip((t.name for t in a.tags), a.decode(regs), strict=True))
    assert values == {"t0": 1.0, "t1": -1.0, "t2": 7, "t3": 2.0}


def test_a_compiled_decoder_is_shared_only_by_the_same_layout() -> None:
    """What decoding depends on (offset, type, order, bit, length, scale, offset) each makes another
    layout; what it does not (name, unit, deadband) is shared."""
    base = {"table": "holding", "address": 10, "type": "uint32", "order": "ABCD"}
    same = compile_block([Tag("a", **base)], 10, 3, False)
    assert compile_block([Tag("b", **base, unit="V", deadband=1.0)], 10, 3,
                         False).compiled is same.compiled
    changes: list[dict[str, object]] = [
        {"address": 11}, {"type": "int32"}, {"order": "CDAB"}, {"scale": 0.1}, {"offset": 1.0},
        {"type": "bit", "bit": 3}, {"type": "bit", "bit": 4}, {"type": "string", "length": 4},
        {"type": "string", "length": 2},
    ]
    compiled = [compile_block([Tag("a", **{**base, **c})], 10, 3, False).compiled for c in changes]
    compiled.append(same.compiled)
    assert len({id(c) for c in compiled}) == len(compiled)
