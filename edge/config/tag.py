"""A configured tag, packed: what it shares with the tags alike (its Kind) is one interned object, the rest
(address, bit, the kind's index, the name) one bytes object. A tag does not know its device: the same
tag of many devices (a template's, or identical meters written out) is one object, and its id,
crc32("device/tag"), is tag_id() of the device it is polled for."""

from __future__ import annotations

import operator
import struct
import zlib
from array import array
from collections.abc import Iterable
from dataclasses import FrozenInstanceError
from typing import NamedTuple

from edge.poll.types import TYPES

DEFAULT_GROUP = "default"


class Kind(NamedTuple):
    """What a tag has that most tags share: one interned object for all the tags alike."""

    table: str
    type: str
    order: str = "ABCD"
    length: int | None = None
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    deadband: float = 0.0
    deadband_percent: float = 0.0
    heartbeat: float = 600.0  # s; with a deadband, a reading is stored at least this often (0: never)
    group: str = DEFAULT_GROUP
    barrier: bool = False
    on_change: bool = False  # report by exception on any change (any type): stored when the value differs


# Every kind this process has made, each once, by index: a tag holds its kind's index. Reloads add only
# the kinds not seen before, so the list grows with the distinct kinds ever configured, not with reloads.
_KIND_LIST: list[Kind] = []
_KIND_INDEX: dict[Kind, int] = {}
_PACKED = struct.Struct("<HbI")  # address, bit (-1: none), kind index; then the name in UTF-8
_ADDRESS, _BIT, _KIND = (struct.Struct(f"<{at}x{code}") for at, code in ((0, "H"), (2, "b"), (3, "I")))


def tag_id(device: str, name: str) -> int:
    """u32, crc32 of "device/tag": a reading's tag in the store and upstream, stable across reordering
    of the config."""
    return zlib.crc32(f"{device}/{name}".encode())


class Tag(bytes):
    """A configured tag, immutable: one bytes object of its address, bit, the index of its kind (what it
    shares with the tags alike: one Kind object for all of them) and its name: one object per tag, not
    one per field (docs/performance.md has the figures), and one for all the devices that have it alike.
    Every field is a property: hot paths read what they need once."""

    __slots__ = ()
    FIELDS = ("name", "table", "address", "type", "order", "bit", "length", "scale", "offset", "unit",
              "deadband", "deadband_percent", "heartbeat", "group", "barrier", "on_change")
    # read from kind (properties set below the class)
    table: str
    type: str
    order: str
    length: int | None
    scale: float
    offset: float
    unit: str
    deadband: float
    deadband_percent: float
    heartbeat: float
    group: str
    barrier: bool
    on_change: bool

    def __new__(cls, name: str, table: str, address: int, type: str,  # noqa: PLR0917
                order: str = "ABCD", bit: int | None = None, length: int | None = None, scale: float = 1.0,
                offset: float = 0.0, unit: str = "", deadband: float = 0.0, deadband_percent: float = 0.0,
                heartbeat: float = 600.0, group: str = DEFAULT_GROUP, barrier: bool = False,
                on_change: bool = False) -> Tag:
        index = cls.intern_kind(Kind(table, type, order, length, scale, offset, unit, deadband,
                                     deadband_percent, heartbeat, group, barrier, on_change))
        packed = _PACKED.pack(address, -1 if bit is None else bit, index)
        return super().__new__(cls, packed + name.encode())

    @staticmethod
    def intern_kind(kind: Kind) -> int:
        """The index of `kind` in this process's list of kinds, added if new."""
        index = _KIND_INDEX.get(kind)
        if index is None:
            index = _KIND_INDEX[kind] = len(_KIND_LIST)
            _KIND_LIST.append(kind)
        return index

    @property
    def address(self) -> int:
        return _ADDRESS.unpack_from(self)[0]  # type: ignore[no-any-return]

    @property
    def bit(self) -> int | None:
        bit: int = _BIT.unpack_from(self)[0]
        return None if bit < 0 else bit

    @property
    def kind(self) -> Kind:
        return _KIND_LIST[_KIND.unpack_from(self)[0]]  # type: ignore[no-any-return]

    @property
    def name(self) -> str:
        return self[_PACKED.size:].decode()

    def kind_and_name(self) -> tuple[Kind, str]:
        """Both at once, for hot paths (the uplink's encoder): one call instead of two properties."""
        return _KIND_LIST[_KIND.unpack_from(self)[0]], self[_PACKED.size:].decode()

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tag) and bytes.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return bytes.__hash__(self)

    def __repr__(self) -> str:
        return f"Tag({', '.join(f'{f}={getattr(self, f)!r}' for f in self.FIELDS)})"

    __str__ = __repr__  # not the bytes

    @property
    def registers(self) -> int:
        """Addresses this tag occupies in its table (bits for coil/discrete)."""
        n = TYPES[self.type].registers
        return n if n is not None else -(-(self.length or 0) // 2)

    @property
    def end(self) -> int:
        return self.address + self.registers


for _field in Kind._fields:
    setattr(Tag, _field, property(operator.attrgetter(f"kind.{_field}")))


class TagIndex:
    """Tags by id: the one map from the ids in readings (and the store) to their devices and tags.

    Open addressing: an entry's slot is its id's low bits (ids are crc32s, evenly spread), the next slot
    on a collision, the table at most 2/3 full. A dict would hold one int object per id as its keys; this
    holds the ids in one array, and each entry's device as an index into `names`. The uplink's encoder
    inlines find() over `slots`, `device_of`, `names`, `ids` and `mask`."""

    __slots__ = ("device_of", "ids", "mask", "names", "slots")

    def __init__(self, entries: Iterable[tuple[str, Tag]]) -> None:
        """`entries`: (device name, tag) of every tag of every device."""
        entries = list(entries)
        size = 1 << max(4, (len(entries) * 3 // 2).bit_length())
        self.mask = size - 1
        self.ids = array("I", bytes(4 * size))
        self.slots: list[Tag | None] = [None] * size
        self.device_of = array("I", bytes(4 * size))
        self.names: list[str] = []
        numbers: dict[str, int] = {}
        for device, t in entries:
            tid = tag_id(device, t.name)
            j = tid & self.mask
            while self.slots[j] is not None:
                j = (j + 1) & self.mask
            if (n := numbers.get(device)) is None:
                n = numbers[device] = len(self.names)
                self.names.append(device)
            self.slots[j], self.device_of[j], self.ids[j] = t, n, tid

    def find(self, tag_id: int) -> tuple[str, Tag] | None:
        """(device name, tag) of a tag id, or None."""
        slots, ids, mask = self.slots, self.ids, self.mask
        j = tag_id & mask
        while (t := slots[j]) is not None and ids[j] != tag_id:
            j = (j + 1) & mask
        return None if t is None else (self.names[self.device_of[j]], t)
