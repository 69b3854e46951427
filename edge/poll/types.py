"""The data types a tag may have, and the Modbus tables and byte orders: one table that validation
(edge.config), decoding and encoding (edge.poll.decode) and writes (edge.write) all read.

A leaf module: it imports nothing of the project, so the config can use it without importing the poll
stage. hil/sim.py keeps an encoder of its own on purpose: the simulator is an independent implementation
that the decoder is tested against, and sharing this table would let one mistake pass both sides.
"""

from __future__ import annotations

from typing import NamedTuple


class DataType(NamedTuple):
    """One tag type.

    registers  addresses occupied in its table (None: a string's, from its length in bytes)
    code       struct code of the value (numeric types; "" for bool and string)
    size       bytes the value takes (8-bit types: 1, in one register)
    numeric    scale, offset, deadbands and min/max apply
    writes     how a write sends it: "coil" (write coil, only on the coil table), "registers" (write
               registers, holding table), "" (never: a bit inside a register cannot be written alone)
    """

    name: str
    registers: int | None
    code: str = ""
    size: int = 0
    numeric: bool = True
    writes: str = "registers"

    @property
    def is_bool(self) -> bool:
        return self.code == "" and self.registers == 1


TYPES: dict[str, DataType] = {t.name: t for t in (
    DataType("bool", 1, numeric=False, writes="coil"), DataType("bit", 1, numeric=False, writes="coil"),
    DataType("int8", 1, "b", 1), DataType("uint8", 1, "B", 1),
    DataType("int16", 1, "h", 2), DataType("uint16", 1, "H", 2),
    DataType("int32", 2, "i", 4), DataType("uint32", 2, "I", 4), DataType("float32", 2, "f", 4),
    DataType("int64", 4, "q", 8), DataType("uint64", 4, "Q", 8), DataType("float64", 4, "d", 8),
    DataType("float16", 1, "e", 2),
    DataType("string", None, numeric=False),
)}

# table name -> (Modbus function code of a read, is a bit table)
TABLES: dict[str, tuple[int, bool]] = {
    "coil": (1, True),
    "discrete": (2, True),
    "holding": (3, False),
    "input": (4, False),
}

# Byte orders: canonical name -> (byte swap inside each word, reverse word order). The 64-bit spellings
# and the 16-bit spellings are aliases of the same two switches.
ORDERS: dict[str, tuple[bool, bool]] = {
    "ABCD": (False, False), "BADC": (True, False), "CDAB": (False, True), "DCBA": (True, True),
}
ORDER_ALIASES: dict[str, str] = {
    "AB": "ABCD", "BA": "BADC",
    "ABCDEFGH": "ABCD", "BADCFEHG": "BADC", "GHEFCDAB": "CDAB", "HGFEDCBA": "DCBA",
}

MAX_ADDRESS = 65535
MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000
