"""Compile a device's tags into read requests: pure functions, run once at start (and on reload).

Per device, poll group and table, tags sorted by address are coalesced greedily into requests of at most
`max_registers` registers (125 by the spec) or `max_bits` bits (2000). A request reads across a gap of
unused addresses only when the gap is at most `max_gap`: reading the gap costs its bytes, a new request
costs a whole frame. Default gaps, from the bytes one more request puts on the wire:

    RTU: request 8 B + reply header/CRC 5 B + two t3.5 silences (7 chars) = 20 chars = 10 registers
    TCP: MBAP+PDU 12 B + reply header 9 B + 2 x 40 B TCP/IP headers = 101 B ~ 50 registers
    bit tables: the same bytes in bits (x 16 per register)

A barrier tag is read alone: no request crosses it (registers with side effects, or holes a device
rejects). `single_register_reads` devices get one request per tag.

Greedy is minimal: the feasible requests are contiguous runs of the sorted tags and every sub-run of a
feasible run is feasible, so taking the longest feasible prefix each time never needs more requests.

Worked example (max_registers 125, max_gap 10): tags at 0 (float32), 2 (uint16), 20 (uint16), 200
(uint32) -> [0..2], [20..20], [200..201]: 3 requests touching 3 + 1 + 2 = 6 registers; with max_gap 20:
[0..20] and [200..201], 2 requests touching 23 registers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edge.config import Config, DeviceConfig, Tag
from edge.poll.decode import BlockDecoder, compile_block
from edge.poll.types import TABLES

GAP_RTU = 10
GAP_TCP = 50


@dataclass(frozen=True, slots=True)
class Request:
    """One Modbus read: function code `function` for `count` addresses from `start` of `table`."""

    table: str
    start: int
    count: int
    tags: tuple[Tag, ...]
    decoder: BlockDecoder = field(compare=False, repr=False)

    @property
    def function(self) -> int:
        return TABLES[self.table][0]

    @property
    def bits(self) -> bool:
        return TABLES[self.table][1]

    def __str__(self) -> str:
        return f"{self.table} {self.start}..{self.start + self.count - 1}"


def make_request(table: str, tags: Sequence[Tag]) -> Request:
    start = min(t.address for t in tags)
    count = max(t.end for t in tags) - start
    return Request(table, start, count, tuple(tags), compile_block(tags, start, count, TABLES[table][1]))


def default_gap(device: DeviceConfig, bits: bool) -> int:
    gap = device.max_gap if device.max_gap is not None else GAP_TCP if device.host else GAP_RTU
    return gap * 16 if bits else gap


def coalesce(tags: Sequence[Tag], limit: int, max_gap: int) -> list[list[Tag]]:
    """Group tags of one table into runs: each spans <= limit addresses, inner gaps <= max_gap.

    >>> from edge.config import Tag
    >>> t = [Tag(f"t{i}", "holding", a, "uint16") for i, a in enumerate([0, 1, 5, 30])]
    >>> [[x.address for x in run] for run in coalesce(t, 125, 10)]
    [[0, 1, 5], [30]]
    """
    runs: list[list[Tag]] = []
    start = end = -1
    last_barrier = False
    spans = sorted((t.address, t.bit or 0, i, t.end, t.barrier) for i, t in enumerate(tags))
    for address, _, i, t_end, barrier in spans:  # each tag's fields read once: they are properties
        if (runs and not barrier and not last_barrier and address - end <= max_gap
                and max(end, t_end) - start <= limit):
            runs[-1].append(tags[i])
            end = max(end, t_end)
        else:
            runs.append([tags[i]])
            start, end = address, t_end
        last_barrier = barrier
    return runs


def plan_device(device: DeviceConfig) -> dict[str, tuple[Request, ...]]:
    """Requests per poll group name (config validation guarantees every tag fits in one request)."""
    plan: dict[str, tuple[Request, ...]] = {}
    by_group_table: dict[tuple[str, str], list[Tag]] = {}
    for t in device.tags:
        k = t.kind
        by_group_table.setdefault((k.group, k.table), []).append(t)
    for group in device.groups:
        requests: list[Request] = []
        for table, (_fc, bits) in TABLES.items():
            tags = by_group_table.get((group.name, table), [])
            limit = device.max_bits if bits else device.max_registers
            if device.single_register_reads:
                runs = [[t] for t in sorted(tags, key=lambda t: t.address)]
            else:
                runs = coalesce(tags, limit, default_gap(device, bits))
            requests.extend(make_request(table, run) for run in runs)
        if requests:
            plan[group.name] = tuple(requests)
    return plan


@dataclass(frozen=True)
class PlanSummary:
    requests: int
    registers: int
    bits: int
    tags: int

    def __str__(self) -> str:
        def n(k: int, word: str) -> str:
            return f"{k} {word}{'' if k == 1 else 's'}"
        bits = f" and {n(self.bits, 'bit')}" if self.bits else ""
        return (f"{n(self.requests, 'request')} touching {n(self.registers, 'register')}{bits} for "
                f"{n(self.tags, 'tag')}")


def summarize(plan: dict[str, tuple[Request, ...]]) -> PlanSummary:
    reqs = [r for group in plan.values() for r in group]
    return PlanSummary(len(reqs), sum(r.count for r in reqs if not r.bits),
                       sum(r.count for r in reqs if r.bits), sum(len(r.tags) for r in reqs))


def plan_config(config: Config) -> dict[str, dict[str, tuple[Request, ...]]]:
    """Plans of every device by name."""
    return {d.name: plan_device(d) for d in config.devices}
