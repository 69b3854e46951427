"""MQTT uplink: forwards store blocks, oldest first, one message per block, QoS 1 (aiomqtt on paho-mqtt).

Topics (prefix from [uplink] topic_prefix, default "edge"):

    <prefix>/<appliance id>/data     one message per block; payload in docs/payload.md
    <prefix>/<appliance id>/status   retained "online" after connecting; the last will sets a retained
                                     "offline" when the connection dies; a clean stop publishes "offline"
    <prefix>/<appliance id>/health   retained health message (edge.snapshot, docs/payload.md) at each
                                     connection, every [uplink] health_interval and as soon as a device
                                     goes up or down, low power or the governor's level changes, or a
                                     reload is refused
    <prefix>/<appliance id>/cmd/...  write (a tag) and config (a whole config), signed (edge.write), when
                                     [commands] remote / remote_config; results on cmd/result

Outcome of a block, from the broker's PUBACK (MQTT 5 reason codes):

    reason < 0x80 (success)          store.accept: deleted at the next commit
    reason 0x10 (no matching         with [uplink] require_subscriber: store.keep, sent again after a
    subscribers)                     pause (1 s, doubling up to NO_SUBSCRIBER_MAX); else a success
    reason >= 0x80 (e.g. 0x87 not    store.reject: moved aside, counted, never retried
    authorized, 0x97 quota)
    no PUBACK (timeout, connection   store.keep: taken again after reconnecting, oldest first
    lost)

Delivery is at-least-once: a block whose PUBACK was lost is sent again; every message carries the
appliance id and the block's sequence number (and a block above [uplink] max_message_bytes goes out in
parts, each with its part number), so the receiver de-duplicates on (appliance, seq, part). With
MQTT 3.1.1 a broker cannot refuse a publish (it acknowledges and drops it), so rejections are only seen
with protocol 5, the default.

Up to [uplink] max_inflight blocks await their PUBACK at once; the backlog drains as fast as the broker
acknowledges. Reconnects back off with jitter (backoff_min .. backoff_max). The password comes from
password_file and is never logged. In low-power mode (the policy's session_interval, read at each turn)
the uplink works in sessions: connect, drain, disconnect, wait.

Every payload is strict JSON: a NaN or infinite value is written as null with a "nonfinite" field
(edge.reading.strict_json). An uplink built by a reload takes over the statistics of the one it
replaces (they keep counting up).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from edge.config import Config, Tag
from edge.policy import Policy, normal
from edge.poll import backoff
from edge.reading import float32, quality_name, strict_json
from edge.store import Block, Store

if TYPE_CHECKING:
    from edge.mqtt import Client
    from edge.snapshot import Snapshot
    from edge.sparkplug import Node
    from edge.write import Commands

log = logging.getLogger("edge.uplink")
MAX_OUTBOX = 16  # results waiting for a connection; the oldest go first
STOP_WAIT = 15.0  # seconds a stop waits at most for in-flight publishes (systemd's TimeoutStopSec is 45)
NO_SUBSCRIBERS = 0x10  # PUBACK reason code: accepted, but nobody subscribes: dropped by the broker
NO_SUBSCRIBER_MAX = 60.0  # seconds between attempts at most while nobody subscribes
HOST_WAIT = 10.0  # s a low-power session waits for a Sparkplug primary host's STATE after connecting
UNKNOWN_TAG = Tag("?", "", 0, "")  # a reading of a tag no longer in the config (its device: "?")


@dataclass
class UplinkStats:
    connected: bool = False
    connects: int = 0
    connect_failures: int = 0
    published: int = 0
    acked: int = 0
    rejected: int = 0
    kept: int = 0
    readings_delivered: int = 0
    bytes_published: int = 0
    last_delivery: float = 0.0  # unix time of the last acknowledged block
    last_progress: float = field(default_factory=time.monotonic)  # monotonic: an ack, "nothing to send",
    # or a finished connection attempt: the uplink loop is alive (offline is not a stall)


class Payloads:
    """Block -> JSON message (docs/payload.md), encoded a slice of ROWS rows at a time: a whole block's rows
    as dicts at once would scatter small objects over the allocator's arenas, which then stay resident."""

    ROWS = 256

    def __init__(self, config: Config) -> None:
        self.appliance = config.appliance.id
        self.tags = config.tags
        self.dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
        self.limit = config.uplink.max_message_bytes
        self.room = len(self.dumps(self.appliance)) + 128  # a part's head: the id, seq, part, parts, count

    def encode(self, block: Block) -> list[bytes]:
        """The block's message, or its parts where one message would exceed [uplink] max_message_bytes:
        each part a whole JSON document with "part" and "parts" beside "seq" (docs/payload.md)."""
        index = self.tags
        slots, device_of, names, ids, mask = index.slots, index.device_of, index.names, index.ids, index.mask
        unknown, dumps = UNKNOWN_TAG, self.dumps
        chunks: list[tuple[int, bytes | memoryview]] = []  # (rows, their JSON without "[" and "]")
        readings = block.readings()
        for i in range(0, len(readings), self.ROWS):
            rows = []
            for tag, ts, raw, quality in readings[i:i + self.ROWS]:
                j = tag & mask  # TagIndex.find(), inlined: it runs once per reading
                while (t := slots[j]) is not None and ids[j] != tag:
                    j = (j + 1) & mask
                k, name = (t or unknown).kind_and_name()
                device = names[device_of[j]] if t is not None else "?"
                value = float32(raw) if k.type == "float32" and raw.__class__ is float else raw
                rows.append({"device": device, "tag": name, "unit": k.unit, "ts": ts, "value": value,
                             "quality": quality_name(quality) if quality else "good"})
            text = self._rows(rows)
            if len(text) + self.room > self.limit and len(rows) > 1:  # too big a slice: a row at a time
                chunks.extend((1, self._rows([row])) for row in rows)
            else:
                chunks.append((len(rows), text))
        whole = sum(len(c) + 1 for _, c in chunks) + self.room <= self.limit
        groups: list[list[tuple[int, bytes | memoryview]]] = [[]]
        size = 0
        for chunk in chunks:
            if not whole and groups[-1] and size + len(chunk[1]) + 1 + self.room > self.limit:
                groups.append([])
                size = 0
            groups[-1].append(chunk)
            size += len(chunk[1]) + 1
        out = []
        for n, group in enumerate(groups):
            head = {"appliance": self.appliance, "seq": block.seq}
            if len(groups) > 1:
                head |= {"part": n, "parts": len(groups)}
            head |= {"count": sum(rows for rows, _ in group), "readings": []}
            pieces: list[bytes | memoryview] = [dumps(head)[:-2].encode()]  # without the closing "]}"
            for m, (_, body) in enumerate(group):
                if m:
                    pieces.append(b",")
                pieces.append(body)
            pieces.append(b"]}")
            # One join of small pieces: the message is built once, not as three full-size copies
            out.append(b"".join(pieces))
        return out

    def _rows(self, rows: list[dict[str, Any]]) -> memoryview:
        try:
            text = self.dumps(rows)
        except ValueError:  # a NaN or an infinity: rare, so checked only when the encoder refuses
            text = self.dumps([strict_json(row) for row in rows])
        return memoryview(text.encode())[1:-1]  # the rows, without "[" and "]"


class Uplink:
    """Forwards the store's blocks while connected; reconnects with jittered, capped backoff."""

    def __init__(self, config: Config, store: Store, commands: Commands | None = None,
                 policy: Callable[[], Policy] = normal, *, stats: UplinkStats | None = None,
                 report: Callable[[], Snapshot] | None = None,
                 configure: Callable[[bytes], Awaitable[dict[str, Any] | None]] | None = None,
                 update: Callable[[bytes], Awaitable[dict[str, Any] | None]] | None = None) -> None:
        self.config = config
        self.cfg = config.uplink
        self.store = store
        self.commands = commands  # remote writes: <prefix>/<id>/cmd/write -> .../cmd/result
        self.payloads = Payloads(config)
        prefix = f"{self.cfg.topic_prefix}/{config.appliance.id}"
        self.topic_data = f"{prefix}/data"
        self.topic_status = f"{prefix}/status"
        self.topic_write = f"{prefix}/cmd/write"
        self.topic_result = f"{prefix}/cmd/result"
        self.topic_config = f"{prefix}/cmd/config"
        self.configure = configure  # a cmd/config message -> its result, or None (posted after the trial)
        self.topic_update = f"{prefix}/cmd/update"
        self.update = update  # a cmd/update message -> its result, or None (posted as it installs)
        self.sparkplug: Node | None = None
        if self.cfg.format == "sparkplug_b":
            from edge.sparkplug import Node  # noqa: PLC0415 (protobuf: only for this format)

            self.sparkplug = Node(config, lambda: time.time_ns() // 1_000_000)
        self.outbox: list[dict[str, Any]] = []  # results to publish on cmd/result (post_result)
        self.topic_health = f"{prefix}/health"
        self.report = report  # the app's snapshot, for the health message (None: no health messages)
        self.stats = stats or UplinkStats()
        if stats is not None:
            stats.connected = False
        self.policy = policy
        self.wake = asyncio.Event()  # set after each commit: new blocks to send
        self.stopping = False
        self._stop = asyncio.Event()
        self._failures = 0
        self._unheard_kept = self.cfg.require_subscriber and self.cfg.protocol == "5"  # 0x10: keep
        self._held_until = 0.0  # require_subscriber: no block taken before (monotonic)
        self._unheard = 0  # blocks in a row that found no subscriber
        self._rounds = 0  # rounds of sending in a row that found none
        self._host_online = False  # Sparkplug: the primary host's STATE, while connected
        self._connected_at = 0.0

    async def run(self) -> None:
        """Connect, forward, and on any connection problem back off and try again, until cancelled."""
        from edge import mqtt  # noqa: PLC0415 (aiomqtt and paho load after READY=1, not before)

        while not self.stopping:
            try:
                spb = self.sparkplug
                will = spb.death() if spb else None  # Sparkplug: NDEATH with a new bdSeq
                async with mqtt.connect(self.config, self.topic_status, will) as client:
                    # with a primary host, data waits for its STATE (which may come with the subscription)
                    self._host_online = spb is None or not spb.topics_state
                    self._connected_at = time.monotonic()
                    commands = None
                    remote = self.commands is not None and self.config.commands.remote
                    pushed = self.configure is not None and self.config.commands.remote_config
                    updates = self.update is not None and self.config.commands.remote_update
                    for topic, wanted in ((self.topic_write, remote), (self.topic_config, pushed),
                                          (self.topic_update, updates),
                                          (spb.topic_ncmd if spb else "", spb is not None),
                                          (spb.topic_dcmd if spb else "", spb is not None and remote),
                                          *((t, True) for t in (spb.topics_state if spb else ()))):
                        if wanted:
                            await client.subscribe(topic, qos=1)
                    if remote or pushed or updates or spb:
                        commands = asyncio.create_task(self._commands(client), name="uplink:commands")
                    self._connected()  # and listening for commands
                    if spb:
                        spb.connected()
                        if not spb.topics_state:  # else births when the host's STATE says online
                            self._births(client, spb)
                    else:
                        await client.publish(self.topic_status, b"online", qos=1, retain=True)
                    health = asyncio.create_task(self._every_second(client), name="uplink:health")
                    try:
                        await self._forward(client)
                    finally:
                        for task in (commands, health):
                            if task is not None:
                                task.cancel()
                                with contextlib.suppress(asyncio.CancelledError):
                                    await task
                    if spb:  # a clean stop: the death the will would have brought
                        await client.publish(*spb.will, qos=1)
                    else:
                        await client.publish(self.topic_status, b"offline", qos=1, retain=True)
                if (session := self.policy().session_interval) and not self.stopping:
                    log.info("uplink: session done (backlog drained); next in %.0f s", session)
                    await self._pause(session)
            except mqtt.CONNECTION_ERRORS as e:
                self._disconnected(e)
                await self._pause(backoff(self._failures - 1, self.cfg.backoff_min, self.cfg.backoff_max))

    async def _commands(self, client: Client) -> None:
        """Each command in turn (a write, or a pushed config); its result published (a config's when its
        trial ends: post_result). Ends quietly when the connection drops (the forwarding loop notices and
        reconnects). A command is hostile input: whatever it does, it gets a result and the loop goes on."""
        from edge import mqtt  # noqa: PLC0415 (loaded by run())

        with contextlib.suppress(*mqtt.CONNECTION_ERRORS):
            async for message in client.messages:
                topic = str(message.topic)
                raw = message.payload
                payload = raw if isinstance(raw, bytes) else str(raw).encode()
                result: dict[str, Any] | None
                try:
                    if self.sparkplug is not None and topic in self.sparkplug.topics_state:
                        online = self.sparkplug.host_online(payload)
                        if online and not self._host_online:
                            log.info("uplink: Sparkplug primary host online: births, then data")
                            self._births(client, self.sparkplug)
                        elif not online and self._host_online:
                            log.warning("uplink: Sparkplug primary host offline: data held in the store")
                        self._host_online = online
                        self.wake.set()
                        continue
                    if self.sparkplug is not None and topic == self.sparkplug.topic_ncmd:
                        if self.sparkplug.wants_rebirth(payload):
                            log.info("uplink: Sparkplug rebirth requested: NBIRTH and DBIRTHs again")
                            self._births(client, self.sparkplug)
                        continue
                    if (self.sparkplug is not None and self.commands is not None
                            and topic.startswith(self.sparkplug.dcmd)):
                        for envelope in self.sparkplug.writes(payload):  # each answered on cmd/result
                            await self._answer(client, await self.commands.handle(envelope))
                        continue
                    if topic == self.topic_write and self.commands is not None:
                        result = await self.commands.handle(payload)
                    elif topic == self.topic_config and self.configure is not None:
                        result = await self.configure(payload)
                    elif topic == self.topic_update and self.update is not None:
                        result = await self.update(payload)
                    else:
                        continue
                except Exception as e:
                    log.exception("uplink: a command failed unexpectedly: %s", type(e).__name__)
                    result = {"id": None, "ok": False, "error": "internal error", "detail": type(e).__name__}
                if result is not None:
                    await self._answer(client, result)

    async def _answer(self, client: Client, result: dict[str, Any]) -> None:
        await client.publish(self.topic_result, json.dumps(result, allow_nan=False).encode(), qos=1)

    @staticmethod
    def _births(client: Client, spb: Node) -> None:
        """NBIRTH and the DBIRTHs, stamped and published with nothing in between (seq 0, 1, ...), at QoS
        1 like DDATA: paho queues QoS 1 messages beyond its in-flight window and sends QoS 0 at once, so
        births at QoS 0 could overtake DDATA stamped before them."""
        for topic, payload in spb.births():
            client.publish_now(topic, spb.stamp(payload))  # its PUBACK is not waited for

    async def _publish(self, client: Client, block: Block) -> int:
        """A block's messages; the worst PUBACK reason code (JSON: its parts in order, each acknowledged
        before the next; Sparkplug: its DDATA messages stamped and published at once, then their PUBACKs)."""
        if self.sparkplug is not None:
            spb = self.sparkplug
            messages = [(topic, spb.stamp(p)) for topic, p in spb.data(block)]
            self.stats.bytes_published += sum(len(data) for _, data in messages)
            sent = [client.publish_now(topic, data) for topic, data in messages]
            del messages
            reasons = [await client.acked(mid, fut, self.cfg.publish_timeout) for mid, fut in sent]
            return max(reasons, default=0)
        parts = self.payloads.encode(block)
        self.stats.bytes_published += sum(len(part) for part in parts)
        reason = 0
        while parts and reason < 0x80:  # a block's parts in order, each acknowledged
            reason = await client.publish_acked(self.topic_data, parts.pop(0), self.cfg.publish_timeout)
            if reason == NO_SUBSCRIBERS and self._unheard_kept:
                break
        return reason

    def post_result(self, result: dict[str, Any]) -> None:
        """A command's result to publish on cmd/result once connected (the end of a config's trial)."""
        self.outbox = [*self.outbox[-(MAX_OUTBOX - 1):], result]

    async def _every_second(self, client: Client) -> None:
        """While connected: the results posted (post_result), and the health message at once, then every
        health_interval or as soon as its state changes. Ends quietly when the connection drops."""
        from edge import mqtt  # noqa: PLC0415 (loaded by run())
        from edge.snapshot import health_message, health_state  # noqa: PLC0415

        last: tuple[object, ...] | None = None
        sent = 0.0
        with contextlib.suppress(*mqtt.CONNECTION_ERRORS):
            while True:
                while self.outbox:
                    await self._answer(client, self.outbox[0])
                    self.outbox.pop(0)
                if self.report is not None and self.cfg.health_interval:
                    snapshot = self.report()
                    state = health_state(snapshot)
                    if state != last or time.monotonic() - sent >= self.cfg.health_interval:
                        message = health_message(snapshot, self.config.appliance.id)
                        await client.publish(self.topic_health, json.dumps(message, separators=(",", ":"),
                                                                           allow_nan=False).encode(),
                                             qos=1, retain=True)
                        last, sent = state, time.monotonic()
                await asyncio.sleep(1.0)

    async def _pause(self, seconds: float) -> None:
        """Wait (beating every second) until `seconds` passed or stop() was called."""
        end = time.monotonic() + seconds
        while not self._stop.is_set() and (left := end - time.monotonic()) > 0:
            self.stats.last_progress = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await self._stop.wait()

    def progress(self) -> float:
        """The uplink's heartbeat (monotonic): an ack, "nothing to send", or a finished connection
        attempt. Offline is not a stall."""
        return self.stats.last_progress

    def snapshot(self) -> UplinkStats:
        return replace(self.stats)

    def stop(self) -> None:
        """Finish the blocks in flight, publish "offline", disconnect."""
        self.stopping = True
        self._stop.set()
        self.wake.set()

    def _connected(self) -> None:
        if self._failures:
            log.info("uplink: connected to %s:%d after %d failed attempts", self.cfg.host, self.cfg.port,
                     self._failures)
        else:
            log.info("uplink: connected to %s:%d", self.cfg.host, self.cfg.port)
        self._failures = 0
        self.stats.connected = True
        self.stats.connects += 1

    def _disconnected(self, e: BaseException) -> None:
        level = logging.WARNING if self._failures == 0 else logging.DEBUG
        if self.stats.connected or self._failures == 0:
            log.log(level, "uplink: %s:%d unavailable (%s); readings stay in the store",
                    self.cfg.host, self.cfg.port, e)
        self.stats.connected = False
        self.stats.last_progress = time.monotonic()
        self._failures += 1
        self.stats.connect_failures += 1

    async def _forward(self, client: Client) -> None:
        """Keep up to max_inflight blocks in flight; returns when stopping; raises on connection loss."""
        pending: set[asyncio.Task[None]] = set()
        failure: list[BaseException] = []
        rate = self.cfg.drain_rate
        tokens, filled = max(1.0, rate), time.monotonic()  # drain_rate: a second's worth at once, then rate
        try:
            while not self.stopping and not failure:
                self.wake.clear()
                free = self.cfg.max_inflight - len(pending)
                held = self._held_until - time.monotonic()
                if held > 0:
                    free = 0
                if self.sparkplug is not None and not self._host_online:
                    free = 0  # the primary host is offline: its data waits in the store
                if rate:
                    now = time.monotonic()
                    tokens, filled = min(max(1.0, rate), tokens + (now - filled) * rate), now
                    free = min(free, int(tokens))
                blocks = self.store.take(free) if free > 0 else []
                tokens -= len(blocks)
                for block in blocks:
                    task = asyncio.create_task(self._send(client, block, failure),
                                               name=f"uplink:block-{block.seq}")
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    # One block encoded and queued per turn of the loop, so its packet is written before
                    # the next is built: not max_inflight payloads and their packets in RAM at once
                    await asyncio.sleep(0)
                self.stats.last_progress = time.monotonic()  # heartbeat: the forwarding loop is alive
                if blocks:
                    continue
                throttled = bool(rate) and tokens < 1.0  # not drained, maybe: held back by drain_rate
                awaiting = (self.sparkplug is not None and not self._host_online
                            and time.monotonic() - self._connected_at < HOST_WAIT)  # its STATE may come
                if self.policy().session_interval and not pending and not throttled and not awaiting:
                    return  # low power: drained (or held: no subscriber, the host offline), end the session
                wait = min(1.0, (1.0 - tokens) / rate) if throttled else 1.0
                if held > 0:
                    wait = min(wait, held)
                with contextlib.suppress(TimeoutError):  # a commit or a PUBACK sets wake
                    async with asyncio.timeout(wait):
                        await self.wake.wait()
            if pending:  # stopping: let what is in flight finish (what is not acknowledged stays stored)
                await asyncio.wait(pending, timeout=min(self.cfg.publish_timeout, STOP_WAIT))
        finally:
            for task in pending:
                task.cancel()
        if failure:
            raise failure[0]

    async def _send(self, client: Client, block: Block, failure: list[BaseException]) -> None:
        from edge import mqtt  # noqa: PLC0415 (loaded by run())

        try:
            self.stats.published += 1
            try:
                reason = await self._publish(client, block)
            except mqtt.PUBLISH_ERRORS as e:
                self.store.keep([block])
                self.stats.kept += 1
                failure.append(e)
                return
            except asyncio.CancelledError:
                self.store.keep([block])
                raise
            if reason == NO_SUBSCRIBERS and self._unheard_kept:
                self.store.keep([block])
                self.stats.kept += 1
                self._no_subscriber(block)
            elif reason >= 0x80:
                self.store.reject([block], f"broker refused: reason code {reason:#04x}")
                self.stats.rejected += 1
                log.warning("uplink: broker refused block %d (reason %#04x); kept aside in the store",
                            block.seq, reason)
            else:
                self.store.accept([block])
                self.stats.acked += 1
                self.stats.readings_delivered += block.n
                self.stats.last_delivery = time.time()
                self.stats.last_progress = time.monotonic()
                if self._unheard:
                    log.info("uplink: %s has a subscriber again after %d blocks found none",
                             self.topic_data, self._unheard)
                    self._unheard = self._rounds = 0
        finally:
            self.wake.set()

    def _no_subscriber(self, block: Block) -> None:
        """[uplink] require_subscriber: nobody reads the data topic, so the broker dropped the block; it
        stays in the store and no block goes out before a pause, doubling at each round that finds none."""
        self._unheard += 1
        now = time.monotonic()
        if now < self._held_until:
            return  # a block of the same round: paused already
        pause = min(NO_SUBSCRIBER_MAX, 2.0 ** min(self._rounds, 6))
        if not self._rounds:
            log.warning("uplink: no subscriber for %s (PUBACK 0x10): block %d and the rest stay in the "
                        "store; trying again in %.0f s, then up to every %.0f s", self.topic_data, block.seq,
                        pause, NO_SUBSCRIBER_MAX)
        self._rounds += 1
        self._held_until = now + pause
