"""Sparkplug B ([uplink] format = "sparkplug_b"): the appliance is an edge node, its devices Sparkplug
devices, every tag a metric. The payload is the specification's protobuf (sparkplug_b.proto beside
this file, generated code in sparkplug_b_pb2.py: scripts/gen-sparkplug).

Topics (namespace spBv1.0, group [uplink] sparkplug_group, node id = the appliance id):

    spBv1.0/<group>/NDEATH/<node>           the MQTT will registered at CONNECT: bdSeq; also published at
                                            a clean stop
    spBv1.0/<group>/NBIRTH/<node>           after each CONNECT and on a rebirth request: bdSeq (the
                                            will's), Node Control/Rebirth; seq 0
    spBv1.0/<group>/DBIRTH/<node>/<device>  then one per device: every tag as a metric with its name,
                                            alias (the tag id), datatype, unit (property engUnit), value
                                            null (the next DDATA brings it)
    spBv1.0/<group>/DDATA/<node>/<device>   each stored block: its readings of that device, by alias,
                                            each with its own timestamp (ms); readings older than the
                                            live window (2 commit_interval + ack_wait + 2 s) are marked
                                            is_historical (a backlog after an outage, a low-power
                                            session); a reading without
                                            a value is is_null, a quality other than good is property
                                            "quality"
    spBv1.0/<group>/NCMD/<node>             Node Control/Rebirth = true: NBIRTH and every DBIRTH again
    spBv1.0/<group>/DCMD/<node>/<device>    with [commands] remote: writes, each a String metric named
                                            "Edge Command/Write" holding the signed envelope of a cmd/write
                                            command (edge.write), checked and answered on cmd/result the
                                            same way; any other metric (an unsigned write) is refused there

With [uplink] sparkplug_host (the primary host application's id) the node subscribes to
spBv1.0/STATE/<host> (and Sparkplug 2's STATE/<host>) and publishes its births and data only while the
host's retained STATE says online ({"online": true, ...}; Sparkplug 2's "ONLINE"/"OFFLINE" read too);
meanwhile blocks stay in the store and go out, historical, when the host is back (after new births).

seq runs 0..255 over NBIRTH, DBIRTH and DDATA in the order they are published (stamped at publishing,
not at encoding, since blocks are in flight together). bdSeq counts CONNECTs, 0..255.

Departures from the specification, for store-and-forward: DDATA goes out at QoS 1 (the specification
says 0), so a block leaves the store only when the broker acknowledged all its messages; a block whose
DDATA is sent again after a lost PUBACK repeats its metrics with their timestamps (a host de-duplicates
on (node, device, alias, timestamp)). Births go at QoS 1 too (0 in the specification): through the same
queue as DDATA, or a rebirth could overtake DDATA stamped before it. The death (the will) is QoS 1.
While the primary host is offline the node stays connected and holds its data (the specification has
it disconnect).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge.config import tag_id
from edge.reading import quality_name
from edge.sparkplug.sparkplug_b_pb2 import Payload

if TYPE_CHECKING:
    from edge.config import Config, Tag
    from edge.store import Block

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
WRITE = "Edge Command/Write"
MAX_COMMAND = 16 * 1024  # bytes of an NCMD or DCMD we parse at most
MAX_WRITES = 16  # writes in one DCMD at most
# Sparkplug B datatypes (specification 6.4.16)
INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64 = 1, 2, 3, 4, 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING = 9, 10, 11, 12
DATATYPES = {"int8": INT8, "int16": INT16, "int32": INT32, "int64": INT64, "uint8": UINT8, "uint16": UINT16,
             "uint32": UINT32, "uint64": UINT64, "float16": FLOAT, "float32": FLOAT, "float64": DOUBLE,
             "bool": BOOLEAN, "bit": BOOLEAN, "string": STRING}
WIDE = {INT64, UINT64}  # long_value; the other integers int_value (two's complement in 32 bits)


def datatype(tag_type: str, scale: float, offset: float) -> int:
    """A tag's Sparkplug datatype: its own, or Double when scale or offset make its values fractional."""
    dt = DATATYPES[tag_type]
    if dt not in (FLOAT, DOUBLE, BOOLEAN, STRING) and (scale != 1.0 or offset != 0.0):
        return DOUBLE
    return dt


def set_value(metric: Any, dt: int, value: object) -> None:
    """The value in the field its datatype asks for; None: is_null."""
    if value is None:
        metric.is_null = True
    elif dt == BOOLEAN:
        metric.boolean_value = bool(value)
    elif dt == STRING:
        metric.string_value = str(value)
    elif dt == FLOAT:
        metric.float_value = float(value)  # type: ignore[arg-type]
    elif dt == DOUBLE or isinstance(value, float):
        metric.double_value = float(value)  # type: ignore[arg-type]
    elif dt in WIDE:
        metric.long_value = int(value) & 0xFFFF_FFFF_FFFF_FFFF  # type: ignore[call-overload]
    else:
        metric.int_value = int(value) & 0xFFFF_FFFF  # type: ignore[call-overload]


class Node:
    """The edge node's Sparkplug state for one uplink: bdSeq, seq, the births and the encoder. Used on the
    uplink's event loop only."""

    def __init__(self, config: Config, now_ms: Callable[[], int]) -> None:
        cfg = config.uplink
        self.group, self.node = cfg.sparkplug_group, config.appliance.id
        prefix = f"{NAMESPACE}/{self.group}"
        self.topic_ncmd = f"{prefix}/NCMD/{self.node}"
        self.topic_death = f"{prefix}/NDEATH/{self.node}"
        self.topic_nbirth = f"{prefix}/NBIRTH/{self.node}"
        self.topic_dcmd = f"{prefix}/DCMD/{self.node}/+"
        self.dcmd = f"{prefix}/DCMD/{self.node}/"
        host = cfg.sparkplug_host
        self.topics_state = (f"{NAMESPACE}/STATE/{host}", f"STATE/{host}") if host else ()  # 3.0, 2.x
        self.prefix = prefix
        self.tags = config.tags
        # each device's tags with their ids (the metrics' aliases)
        self.devices: dict[str, list[tuple[int, Tag]]] = {
            d.name: [(tag_id(d.name, t.name), t) for t in d.tags] for d in config.devices}
        self.types: dict[int, int] = {}
        for tags in self.devices.values():
            for tid, t in tags:
                k = t.kind
                self.types[tid] = datatype(k.type, k.scale, k.offset)
        live = 2 * config.store.commit_interval + config.store.ack_wait + 2.0
        self.live_ms = int(live * 1000)
        self.limit = cfg.max_message_bytes
        self.now_ms = now_ms
        self.bdseq = -1
        self.seq = 0
        self.will = ("", b"")

    def death(self) -> tuple[str, bytes]:
        """The NDEATH for the next CONNECT (its will), with the next bdSeq; kept for a clean stop. The
        number counts only once that CONNECT succeeded (connected())."""
        p = Payload(timestamp=self.now_ms())
        m = p.metrics.add(name="bdSeq", datatype=INT64, timestamp=p.timestamp)
        m.long_value = (self.bdseq + 1) % 256
        self.will = (self.topic_death, p.SerializeToString())
        return self.will

    def connected(self) -> None:
        """The CONNECT carrying the last death() succeeded: its bdSeq is the node's now."""
        self.bdseq = (self.bdseq + 1) % 256

    def births(self) -> list[tuple[str, Any]]:
        """NBIRTH and a DBIRTH for every device, unstamped: stamp and publish them in this order, with
        nothing published in between (seq starts again at 0 with the NBIRTH)."""
        now = self.now_ms()
        n = Payload(timestamp=now)
        bd = n.metrics.add(name="bdSeq", datatype=INT64, timestamp=now)
        bd.long_value = self.bdseq
        rebirth = n.metrics.add(name=REBIRTH, datatype=BOOLEAN, timestamp=now)
        rebirth.boolean_value = False
        self.seq = 0
        out: list[tuple[str, Any]] = [(self.topic_nbirth, n)]
        for device, tags in self.devices.items():
            d = Payload(timestamp=now)
            for tid, t in tags:
                m = d.metrics.add(name=t.name, alias=tid, timestamp=now, datatype=self.types[tid],
                                  is_null=True)
                if t.kind.unit:
                    m.properties.keys.append("engUnit")
                    m.properties.values.add(type=STRING, string_value=t.kind.unit)
            out.append((f"{self.prefix}/DBIRTH/{self.node}/{device}", d))
        return out

    def stamp(self, payload: Any) -> bytes:
        """The payload with the next seq, as bytes: call right before publishing it."""
        payload.seq = self.seq
        self.seq = (self.seq + 1) % 256
        data: bytes = payload.SerializeToString()
        return data

    def data(self, block: Block) -> list[tuple[str, Any]]:
        """A block's DDATA messages (unstamped): one per device, or more where one would exceed
        [uplink] max_message_bytes."""
        now = self.now_ms()
        old = now - self.live_ms
        by_device: dict[str, list[Any]] = {}
        find, types = self.tags.find, self.types
        for tid, ts, value, quality in block.readings():
            found = find(tid)
            if found is None or tid not in types:
                continue  # a tag no longer in the config: not in any DBIRTH
            ms = ts // 1_000_000
            m = Payload.Metric(alias=tid, timestamp=ms, datatype=types[tid])
            if ms < old:
                m.is_historical = True
            set_value(m, types[tid], value)
            if quality:
                m.properties.keys.append("quality")
                m.properties.values.add(type=STRING, string_value=quality_name(quality))
            by_device.setdefault(found[0], []).append(m)
        out: list[tuple[str, Any]] = []
        for device, metrics in by_device.items():
            topic = f"{self.prefix}/DDATA/{self.node}/{device}"
            out.extend((topic, p) for p in self._fit(metrics, now))
        return out

    def _fit(self, metrics: list[Any], now: int) -> list[Any]:
        p = Payload(timestamp=now)
        p.metrics.extend(metrics)
        if p.ByteSize() + 16 <= self.limit or len(metrics) == 1:
            return [p]
        half = len(metrics) // 2
        return self._fit(metrics[:half], now) + self._fit(metrics[half:], now)

    def writes(self, raw: bytes) -> list[bytes]:
        """A DCMD's commands, for edge.write.Commands.handle: each "Edge Command/Write" metric's signed
        envelope; b"" for any other metric (refused there as a bad command) or a payload that does not
        parse."""
        p = self._parse(raw)
        if p is None:
            return [b""]
        if len(p.metrics) > MAX_WRITES:  # each is answered: a flood of empty metrics gets one answer
            return [b""]
        return [m.string_value.encode() if m.name == WRITE and m.HasField("string_value") else b""
                for m in p.metrics] or [b""]

    @staticmethod
    def _parse(raw: bytes) -> Any:
        if len(raw) > MAX_COMMAND:
            return None
        p = Payload()
        try:
            p.ParseFromString(raw)
        except Exception:  # noqa: BLE001 (DecodeError, and whatever a hostile payload makes of the parser)
            return None
        return p

    @staticmethod
    def host_online(raw: bytes) -> bool:
        """A primary host's STATE: online? (3.0: JSON {"online": true, "timestamp": ms}; 2.x: "ONLINE")
        Anything else is offline."""
        if len(raw) > MAX_COMMAND:
            return False
        if raw.strip() in (b"ONLINE", b"OFFLINE"):
            return raw.strip() == b"ONLINE"
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            return False
        return isinstance(doc, dict) and doc.get("online") is True

    def wants_rebirth(self, raw: bytes) -> bool:
        """An NCMD asking for a rebirth (Node Control/Rebirth = true); anything else, or bytes that do
        not parse, is not one."""
        p = self._parse(raw)
        return p is not None and any(m.name == REBIRTH and m.HasField("boolean_value") and m.boolean_value
                                     for m in p.metrics)
