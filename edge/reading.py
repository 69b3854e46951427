"""A Reading: (tag id u32, timestamp ns u64, value, quality u8), the unit that flows poll -> store -> uplink.

Quality codes (u8). 0 is good; a failed read yields readings with one of the others and value None,
never silence:

    0x00 GOOD          value decoded from a valid reply
    0x01 TIMEOUT       no reply within the (adaptive) timeout, after the configured retries
    0x02 DISCONNECTED  no connection / serial port not open
    0x03 BAD_FRAME     bytes arrived but no valid frame (CRC error, garbled reply)
    0x04 BREAKER_OPEN  not asked: the device's circuit breaker is open after repeated failures
    0x05 BAD_EXCEPTION the device answered with an exception code outside 1..63 (the code is logged)
    0x40 | code        the device answered with Modbus exception `code`
                       (0x41 illegal function, 0x42 illegal address, 0x43 illegal value,
                        0x44 device failure, 0x46 busy, 0x4B gateway target failed to respond)
"""

from __future__ import annotations

import math
import struct
from typing import TypeAlias

GOOD = 0x00
TIMEOUT = 0x01
DISCONNECTED = 0x02
BAD_FRAME = 0x03
BREAKER_OPEN = 0x04
BAD_EXCEPTION = 0x05
EXCEPTION = 0x40

_NAMES = {GOOD: "good", TIMEOUT: "timeout", DISCONNECTED: "disconnected", BAD_FRAME: "bad_frame",
          BREAKER_OPEN: "breaker_open", BAD_EXCEPTION: "exception_out_of_range"}
_EXCEPTIONS = {1: "illegal_function", 2: "illegal_address", 3: "illegal_value", 4: "device_failure",
               5: "acknowledge", 6: "busy", 8: "memory_parity", 10: "gateway_path",
               11: "gateway_no_response"}


Value: TypeAlias = bool | int | float | str
# (tag id, unix time ns, value or None, quality): a plain tuple, built at C speed in the poll hot path.
Reading: TypeAlias = tuple[int, int, Value | None, int]


def quality_name(q: int) -> str:
    """Name of a quality code for logs, metrics and the CLI.

    >>> quality_name(0x42)
    'exception_2_illegal_address'
    """
    if q & EXCEPTION:
        code = q & 0x3F
        return f"exception_{code}_{_EXCEPTIONS.get(code, 'unknown')}"
    return _NAMES.get(q, f"quality_{q}")


_F32 = struct.Struct("<f")


def float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32: what a float32 device meant, not the
    binary expansion of its float32 (51.90218, not 51.90217971801758). Tried at 7, 8 and 9 significant
    digits (%g drops trailing zeros, so a value of fewer digits comes out whole); for about 2 of 100,000
    values a shorter decimal off that path exists. Applied where values are written out (payloads,
    `edge poll`, `edge store dump`), not in the poll loop: it costs about a microsecond a value.

    >>> float32(_F32.unpack(_F32.pack(51.90218))[0]), float32(_F32.unpack(_F32.pack(0.1))[0]), float32(21.5)
    (51.90218, 0.1, 21.5)
    """
    try:
        want = _F32.pack(value)
    except OverflowError:  # beyond float32 (a scaled value): nothing to shorten
        return value
    if not math.isfinite(value):
        return value
    for digits in (7, 8):
        short = float(f"{value:.{digits}g}")
        if _F32.pack(short) == want:
            return short
    return float(f"{value:.9g}")


def nonfinite(value: object) -> str | None:
    """"nan", "inf" or "-inf" for a float strict JSON cannot carry, else None. Such a value travels as
    `"value": null` with `"nonfinite"` beside it (docs/payload.md).

    >>> nonfinite(float("-inf")), nonfinite(float("nan")), nonfinite(1.5), nonfinite("x")
    ('-inf', 'nan', None, None)
    """
    if not isinstance(value, float) or math.isfinite(value):
        return None
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def strict_json(row: dict[str, object]) -> dict[str, object]:
    """The row with a non-finite "value" replaced as nonfinite() says (the row itself, changed in place).

    >>> strict_json({"value": float("inf"), "quality": "good"})
    {'value': None, 'quality': 'good', 'nonfinite': 'inf'}
    """
    if (kind := nonfinite(row.get("value"))) is not None:
        row["value"] = None
        row["nonfinite"] = kind
    return row
