"""Decode the registers of one read request into tag values: pure, table-driven, compiled once per request.

Byte orders name where the bytes of a value travel on the wire, A being the most significant byte.
Registers arrive as 16-bit words, so every order is one of two buffers read with one of two endians:

    registers [0xAABB, 0xCCDD]
    big   = struct.pack(">2H") -> AA BB CC DD        little = struct.pack("<2H") -> BB AA DD CC

    order  wire bytes  decode with                   64-bit spelling
    ABCD   A B C D     ">" on big                    ABCDEFGH
    DCBA   D C B A     "<" on big                    HGFEDCBA
    BADC   B A D C     ">" on little (bytes swapped)  BADCFEHG
    CDAB   C D A B     "<" on little (words swapped)  GHEFCDAB

Worked example: float32 1.0 is 0x3F800000; a CDAB device sends [0x0000, 0x3F80]; little = 00 00 80 3F,
read "<f" -> 1.0. 16-bit types have one word: CDAB reads as ABCD, DCBA as BADC. 8-bit types sit in the
low byte of their register (ABCD) or the high byte (BADC). Strings are bytes in register order (ABCD) or
byte-swapped in each register (BADC), NULs trimmed. A bool on a register table is one bit of it (bit 0 =
least significant).

All tags of one request that share (buffer, endian) are read by a single precompiled struct with pad
bytes between them, so decoding costs one unpack_from per request and group, not one per tag.
"""

from __future__ import annotations

import functools
import operator
import struct
import weakref
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edge.config import Tag
from edge.poll.types import ORDERS, TYPES
from edge.reading import Value

# Requests of the same layout share one compiled format (a Struct holds about 33 B per field); bounded,
# as reloads of changed configs add formats over the years.
_struct = functools.lru_cache(maxsize=4096)(struct.Struct)

def _layout(tag: Tag, start: int) -> tuple[bool, str, int]:
    """(little buffer?, endian, byte offset) of a numeric or string tag in a request starting at `start`."""
    byte_swap, word_swap = ORDERS[tag.order]
    offset = 2 * (tag.address - start)
    size = TYPES[tag.type].size
    if size == 1:
        return False, ">", offset + (0 if byte_swap else 1)
    if size == 0:  # a string
        return byte_swap, ">", offset
    if size == 2:
        return False, "<" if byte_swap else ">", offset
    if byte_swap == word_swap:
        return False, "<" if word_swap else ">", offset
    return True, "<" if word_swap else ">", offset


class _Compiled:
    """One request layout's decode function, and the order its values come in (indices into the tags it
    was compiled for). Requests of the same layout share it: the devices of one template, identical
    meters written out, the same map reloaded. Held by the decoders that use it, dropped with the last."""

    __slots__ = ("__weakref__", "decode", "order")

    def __init__(self, decode: Callable[[Sequence[int]], list[Value]], order: tuple[int, ...]) -> None:
        self.decode = decode
        self.order = order


_COMPILED: weakref.WeakValueDictionary[tuple[Any, ...], _Compiled] = weakref.WeakValueDictionary()


@dataclass(frozen=True, slots=True)
class BlockDecoder:
    """Decodes one request's registers; values come back in the order of `tags` (not config order)."""

    tags: tuple[Tag, ...]
    compiled: _Compiled

    @property
    def decode(self) -> Callable[[Sequence[int]], list[Value]]:
        return self.compiled.decode


def compile_block(tags: Sequence[Tag], start: int, count: int, bit_table: bool) -> BlockDecoder:
    """The decoder of a request reading `count` registers (or bits) from `start`: compiled once per
    layout (what decoding depends on: each tag's offset, type, order, length, bit, scale and offset).

    >>> from edge.config import Tag
    >>> t = Tag("t", "holding", 10, "float32", "CDAB")
    >>> compile_block([t], 10, 2, False).decode([0x0000, 0x3F80])
    [1.0]
    """
    key = (start, count, bit_table, b"".join(_key_part(t, start) for t in tags))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = _bits(tags, start) if bit_table else _registers(tags, start, count)
    return BlockDecoder(tuple(tags[i] for i in compiled.order), compiled)


_KEY = struct.Struct("<iiidd")


def _key_part(t: Tag, start: int) -> bytes:
    """What decoding one tag depends on, packed: about 30 B in the key, where a tuple of its fields held
    about 100 (the keys live as long as their decoders: one part per polled tag). Unambiguous: a fixed
    part, then "type/order;" (names without "/" or ";")."""
    fixed = _KEY.pack(t.address - start, -1 if t.bit is None else t.bit, t.length or 0, t.scale, t.offset)
    return fixed + f"{t.type}/{t.order};".encode()


def _bits(tags: Sequence[Tag], start: int) -> _Compiled:
    offsets = [t.address - start for t in tags]
    order = tuple(range(len(tags)))
    if len(offsets) == 1:
        only = offsets[0]
        return _Compiled(lambda bits: [bool(bits[only])], order)
    get = operator.itemgetter(*offsets)
    return _Compiled(lambda bits: [bool(b) for b in get(bits)], order)


def _registers(tags: Sequence[Tag], start: int, count: int) -> _Compiled:
    groups: dict[tuple[bool, str], list[tuple[int, int]]] = {}
    bit_tags = []
    for i, t in enumerate(tags):
        if TYPES[t.type].is_bool:
            bit_tags.append(i)
            continue
        little, endian, offset = _layout(t, start)
        groups.setdefault((little, endian), []).append((offset, i))
    steps: list[tuple[bool, struct.Struct]] = []
    order: list[int] = []
    for (little, endian), members in groups.items():
        members.sort(key=lambda m: m[0])
        fmt, pos = endian, 0
        for offset, i in members:
            t = tags[i]
            dtype = TYPES[t.type]
            code, size = (dtype.code, dtype.size) if dtype.numeric else ("s", t.length or 0)
            fmt += f"{offset - pos}x" if offset > pos else ""
            fmt += f"{size}s" if code == "s" else code
            pos = offset + size
            order.append(i)
        steps.append((little, _struct(fmt)))
    bit_refs = [(tags[i].address - start, tags[i].bit or 0) for i in bit_tags]
    order.extend(bit_tags)
    strings, linear = _fixups([tags[i] for i in order])
    fmt_big = _struct(f">{count}H")
    fmt_little = _struct(f"<{count}H")
    need_little = any(little for little, _ in steps)

    def decode(regs: Sequence[int]) -> list[Value]:
        big = fmt_big.pack(*regs)
        little = fmt_little.pack(*regs) if need_little else big
        out: list[Value] = []
        for is_little, s in steps:
            out.extend(s.unpack_from(little if is_little else big))
        out.extend([bool(regs[i] >> b & 1) for i, b in bit_refs])
        for i in strings:
            out[i] = _string(out[i])
        for scale, offset, indices in linear:
            for i in indices:
                out[i] = float(out[i]) * scale + offset
        return out

    return _Compiled(decode, tuple(order))


def _fixups(tags: list[Tag]) -> tuple[list[int], list[tuple[float, float, array[int]]]]:
    """Post-processing only where needed: the strings' indices, and the scaled or offset numbers' indices
    grouped by (scale, offset), 4 bytes a tag instead of a function each."""
    strings: list[int] = []
    linear: dict[tuple[float, float], array[int]] = {}
    for i, t in enumerate(tags):
        if t.type == "string":
            strings.append(i)
        elif TYPES[t.type].numeric and (t.scale != 1.0 or t.offset != 0.0):
            linear.setdefault((t.scale, t.offset), array("I")).append(i)
    return strings, [(scale, offset, indices) for (scale, offset), indices in linear.items()]


def _string(raw: Value) -> Value:
    assert isinstance(raw, bytes)
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def encode(tag: Tag, value: Value) -> list[int]:
    """Registers a device holding `value` for this tag would send (inverse of decode, before scaling).

    >>> from edge.config import Tag
    >>> encode(Tag("t", "holding", 0, "int8", "BADC"), -1)
    [65280]
    """
    dtype = TYPES[tag.type]
    if dtype.is_bool:
        return [(1 << (tag.bit or 0)) if value else 0]
    byte_swap, word_swap = ORDERS[tag.order]
    if tag.type == "string":
        assert isinstance(value, str)
        raw = value.encode().ljust(2 * tag.registers, b"\0")[: 2 * tag.registers]
        word_swap = False
    else:
        raw = struct.pack(">" + dtype.code, value)
        if dtype.size == 1:
            raw = b"\0" + raw
    words = [raw[i:i + 2] for i in range(0, len(raw), 2)]
    if word_swap:
        words.reverse()
    if byte_swap:
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]
