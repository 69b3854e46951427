"""`edge ingest`: the receiving side. Data messages from a fleet of appliances, off an MQTT broker, into
PostgreSQL (TimescaleDB works too), every reading once, whatever the at-least-once delivery repeats.

    edge ingest --dsn "host=db dbname=plant" [--broker HOST[:PORT]] [--prefix edge] [--group ingest]
                [--client-id ID] [--table readings] [--username U --password-file F] [--tls-ca CA]

Several ingest processes share the fleet's traffic: each subscribes to the shared subscription
`$share/<group>/<prefix>/+/data` (MQTT 5), and the broker hands each message to one of them.

Exactly once in the table, from at-least-once on the wire:

- A message is acknowledged (PUBACK, sent by hand: paho's manual_ack) only after the transaction that
  holds its readings has committed. A process killed before that leaves the message unacknowledged in
  its persistent session (clean_start false, session expiry --session-expiry), and the broker sends it
  again when the process comes back with the same --client-id.
- Every row has the key (appliance, device, tag, ts), and rows go in with ON CONFLICT DO NOTHING: a block
  the appliance sent twice (its PUBACK lost), or a message redelivered after a kill, adds nothing. The
  key holds whatever the parts of a block ([uplink] max_message_bytes) are: each part's rows stand alone.

Hostile input: a message above MAX_MESSAGE bytes, not JSON, not the shape of docs/payload.md, or whose
`appliance` is not the one in its topic (a box publishing for another) is not dropped: it goes into
`<table>_rejected` (topic, reason, payload) in the same transaction, is counted, logged once per episode,
and acknowledged. A database that is down holds the batch (unacknowledged, so the broker holds the rest:
at most --receive-maximum messages in flight to this process) and is retried with a capped backoff.

Schema (created if missing; a TimescaleDB user may turn `readings` into a hypertable on ts first):

    CREATE TABLE readings (appliance text, device text, tag text, ts timestamptz, value double precision,
                           value_text text, unit text, quality text, seq bigint,
                           PRIMARY KEY (appliance, device, tag, ts))

value: numbers and booleans (1/0; NaN and infinities as PostgreSQL's); value_text: strings, booleans
("true"/"false") and integers beyond 2**53 (exact); both null for a reading without a value.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import queue
import re
import signal
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("edge.ingest")

MAX_MESSAGE = 4 << 20  # bytes: above the largest block the appliance sends in one message
MAX_TEXT = 256  # characters of an appliance id, device, tag, unit or quality
MAX_VALUE_TEXT = 64 << 10
BATCH_MESSAGES = 200  # messages in one transaction at most
BATCH_WAIT = 0.2  # seconds a batch waits for more messages after its first
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
EXACT = 2**53
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,47}")


class BadMessage(ValueError):
    """A message that is not a data message of docs/payload.md: the reason."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message as the network thread hands it over (immutable)."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int  # which connection it came on: its mid means nothing on another


Row = tuple[str, str, str, dt.datetime, float | None, str | None, str, str, int]


def _storable(text: str) -> bool:
    """PostgreSQL text: no NUL, and valid UTF-8 (JSON's \\ud800 escapes make lone surrogates)."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _text(doc: dict[str, Any], key: str, limit: int = MAX_TEXT) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or len(value) > limit or not _storable(value):
        raise BadMessage(f"{key}: not a string of at most {limit} characters (no NUL, valid UTF-8)")
    return value


def rows_of(topic: str, payload: bytes, prefix: str) -> list[Row]:
    """The rows of a data message on `<prefix>/<appliance>/data`; BadMessage if it is not one."""
    if len(payload) > MAX_MESSAGE:
        raise BadMessage(f"{len(payload)} bytes, above {MAX_MESSAGE}")
    parts = topic.split("/")
    if len(parts) != len(prefix.split("/")) + 2 or parts[-1] != "data" or not topic.startswith(prefix + "/"):
        raise BadMessage("not a data topic")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadMessage(f"not JSON: {type(e).__name__}") from None
    if not isinstance(doc, dict):
        raise BadMessage("not a JSON object")
    appliance = _text(doc, "appliance")
    if appliance != parts[-2]:
        raise BadMessage(f"appliance {appliance!r} published on the topic of {parts[-2]!r}")
    seq, readings = doc.get("seq"), doc.get("readings")
    if type(seq) is not int or not 0 <= seq < 2**63:
        raise BadMessage("seq: not an integer in 0..2**63")
    if not isinstance(readings, list):
        raise BadMessage("readings: not a list")
    out = []
    for i, r in enumerate(readings):
        if not isinstance(r, dict):
            raise BadMessage(f"readings[{i}]: not an object")
        ts = r.get("ts")
        if type(ts) is not int or not 0 <= ts < 2**63:
            raise BadMessage(f"readings[{i}].ts: not nanoseconds in 0..2**63")
        value, text = _value(r, i)
        when = EPOCH + dt.timedelta(microseconds=ts // 1000)
        out.append((appliance, _text(r, "device"), _text(r, "tag"), when, value, text, _text(r, "unit"),
                    _text(r, "quality"), seq))
    return out


def _value(r: dict[str, Any], i: int) -> tuple[float | None, str | None]:
    value = r.get("value")
    if value is None:
        nonfinite = r.get("nonfinite")
        if nonfinite is None:
            return None, None
        if nonfinite not in ("nan", "inf", "-inf"):
            raise BadMessage(f"readings[{i}].nonfinite: not nan, inf or -inf")
        return float(nonfinite), None
    if isinstance(value, bool):
        return float(value), "true" if value else "false"
    if isinstance(value, int):
        if not -(2**64) < value < 2**64:  # float() of a 400-digit integer raises
            raise BadMessage(f"readings[{i}].value: an integer beyond 64 bits")
        return float(value), str(value) if abs(value) > EXACT else None
    if isinstance(value, float):
        return value, None
    if isinstance(value, str) and len(value) <= MAX_VALUE_TEXT and _storable(value):
        return None, value
    raise BadMessage(f"readings[{i}].value: not a number, boolean, string or null")


@dataclass
class Totals:
    messages: int = 0
    readings: int = 0  # rows in the messages
    inserted: int = 0  # rows new to the table
    rejected: int = 0  # messages kept aside in <table>_rejected
    batches: int = 0
    db_failures: int = 0

    def line(self) -> str:
        return (f"{self.messages} messages, {self.readings} readings: {self.inserted} inserted, "
                f"{self.readings - self.inserted} already there, {self.rejected} messages rejected")


class Ingest:
    """The MQTT session (paho's network thread) and the database writer (the caller's thread): messages
    cross from the first to the second through a bounded queue, acknowledgements go back through paho."""

    def __init__(self, args: Any) -> None:
        import paho.mqtt.client as paho  # noqa: PLC0415 (only `edge ingest` needs them)
        from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415
        from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
        from paho.mqtt.properties import Properties  # noqa: PLC0415

        self.args = args
        self.table = args.table
        self.prefix = args.prefix.rstrip("/")
        self.topic = f"$share/{args.group}/{self.prefix}/+/data"
        self.inbox: queue.Queue[Message] = queue.Queue(maxsize=args.receive_maximum * 2)
        self.stop = threading.Event()
        self.connection = 0  # connections made (the network thread counts them)
        self.totals = Totals()
        self._logged: set[str] = set()
        client_id = args.client_id or f"edge-ingest-{socket.gethostname()}"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv5, manual_ack=True)
        self.client.enable_logger(logging.getLogger("edge.ingest.paho"))
        if args.username:
            password = args.password_file.read_text().strip() if args.password_file else None
            self.client.username_pw_set(args.username, password)
        if args.tls_ca:
            self.client.tls_set(ca_certs=str(args.tls_ca), cert_reqs=ssl.CERT_REQUIRED)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        self.props.SessionExpiryInterval = args.session_expiry
        self.props.ReceiveMaximum = args.receive_maximum
        self.props.MaximumPacketSize = MAX_MESSAGE + (64 << 10)  # larger ones the broker must not send us

    # -- the network thread --------------------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._once("mqtt", logging.WARNING, "ingest: the broker refused the connection: %s", reason)
            return
        self._logged.discard("mqtt")
        self.connection += 1  # written here only; an int read by the writer to skip stale acks
        log.info("ingest: connected to %s:%d, subscribing to %s", self.args.host, self.args.port, self.topic)
        client.subscribe(self.topic, qos=1)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not self.stop.is_set():
            self._once("mqtt", logging.WARNING, "ingest: disconnected from the broker (%s); reconnecting",
                       reason)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        # Waits while the writer is behind (paho stops reading the socket, the broker holds the rest), but
        # not past a stop: then the message stays unacknowledged in the session
        m = Message(str(msg.topic), bytes(msg.payload), int(msg.mid), int(msg.qos), self.connection)
        while not self.stop.is_set():
            try:
                self.inbox.put(m, timeout=1.0)
            except queue.Full:
                continue
            return

    # -- the writer ----------------------------------------------------------------------------------

    def run(self) -> int:
        import psycopg  # noqa: PLC0415

        self.client.connect_async(self.args.host, self.args.port, keepalive=30, clean_start=False,
                                  properties=self.props)
        self.client.loop_start()
        conn: psycopg.Connection[Any] | None = None
        failures = 0
        try:
            conn = psycopg.connect(self.args.dsn, connect_timeout=10)  # the tables, before any message
            self._schema(conn)
        except psycopg.Error as e:
            self._once("db", logging.ERROR, "ingest: database: %s; retrying when messages come",
                       _first_line(e))
            conn = None
        try:
            while not self.stop.is_set():
                batch = self._batch()
                while batch and not self.stop.is_set():
                    try:
                        if conn is None or conn.closed:
                            conn = psycopg.connect(self.args.dsn, connect_timeout=10)
                            self._schema(conn)
                        try:
                            self._write(conn, batch)
                        except psycopg.DataError:  # one message the database takes for bad data
                            self._write_each(conn, batch)
                    except psycopg.Error as e:
                        failures += 1
                        self.totals.db_failures += 1
                        self._once("db", logging.ERROR, "ingest: database: %s; %d messages held, retrying",
                                   _first_line(e), len(batch))
                        with contextlib.suppress(psycopg.Error):
                            if conn is not None:
                                conn.close()
                        conn = None
                        self.stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))
                        continue
                    if failures:
                        log.info("ingest: database back after %d failed attempts", failures)
                        self._logged.discard("db")
                    failures = 0
                    for m in batch:  # in the order received, as MQTT asks
                        if m.connection == self.connection:  # else the broker sends it again anyway
                            self.client.ack(m.mid, m.qos)
                    batch = []
        finally:
            self.client.disconnect()
            self.client.loop_stop()
            if conn is not None:
                conn.close()
            log.info("ingest: stopped: %s", self.totals.line())
        return 0

    def _batch(self) -> list[Message]:
        """The next messages: waits up to a second for the first, then BATCH_WAIT for more."""
        try:
            batch = [self.inbox.get(timeout=1.0)]
        except queue.Empty:
            return []
        end = time.monotonic() + BATCH_WAIT
        while len(batch) < BATCH_MESSAGES and (left := end - time.monotonic()) > 0:
            try:
                batch.append(self.inbox.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _schema(self, conn: Any) -> None:
        from psycopg import sql  # noqa: PLC0415

        t = sql.Identifier(self.table)
        rejected = sql.Identifier(f"{self.table}_rejected")
        with conn.transaction():
            conn.execute(sql.SQL("""
                CREATE TABLE IF NOT EXISTS {} (
                    appliance text NOT NULL, device text NOT NULL, tag text NOT NULL, ts timestamptz NOT NULL,
                    value double precision, value_text text, unit text NOT NULL, quality text NOT NULL,
                    seq bigint NOT NULL, PRIMARY KEY (appliance, device, tag, ts))""").format(t))
            conn.execute(sql.SQL("""
                CREATE TABLE IF NOT EXISTS {} (
                    received timestamptz NOT NULL DEFAULT now(), topic text NOT NULL, reason text NOT NULL,
                    payload bytea NOT NULL)""").format(rejected))
        self.insert = sql.SQL("INSERT INTO {} SELECT * FROM edge_incoming ON CONFLICT DO NOTHING").format(t)
        self.reject = sql.SQL("INSERT INTO {} (topic, reason, payload) VALUES (%s, %s, %s)").format(rejected)
        conn.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS edge_incoming (LIKE {}) ON COMMIT DELETE ROWS")
                     .format(t))
        conn.commit()

    def _write(self, conn: Any, batch: list[Message]) -> None:
        """One transaction: every row of the batch (COPY into a temporary table, then one INSERT ... ON
        CONFLICT DO NOTHING), and the rejected messages."""
        rows = 0
        rejected: list[tuple[str, str, bytes]] = []
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy("COPY edge_incoming FROM STDIN") as copy:
                for m in batch:
                    try:
                        for row in rows_of(m.topic, m.payload, self.prefix):
                            copy.write_row(row)
                            rows += 1
                    except BadMessage as e:
                        rejected.append((m.topic, str(e), m.payload))
            cur.execute(self.insert)
            inserted = max(0, cur.rowcount)
            for item in rejected:
                cur.execute(self.reject, item)
        t = self.totals
        t.messages += len(batch)
        t.readings += rows
        t.inserted += inserted
        t.rejected += len(rejected)
        t.batches += 1
        if rejected:
            self._once("bad", logging.WARNING, "ingest: %d messages rejected (kept in %s_rejected), the "
                       "first: %s: %s", len(rejected), self.table, rejected[0][0], rejected[0][1])
        else:
            self._logged.discard("bad")

    def _write_each(self, conn: Any, batch: list[Message]) -> None:
        """The batch a message at a time: one the database refuses as data goes to <table>_rejected with
        its reason, and the batch is not held for ever on it."""
        import psycopg  # noqa: PLC0415

        for m in batch:
            try:
                self._write(conn, [m])
            except psycopg.DataError as e:
                with conn.transaction(), conn.cursor() as cur:
                    reason = f"database refused: {_first_line(e)}"[:500]
                    cur.execute(self.reject, (m.topic, reason, m.payload))
                self.totals.messages += 1
                self.totals.rejected += 1
                self._once("bad", logging.WARNING, "ingest: a message rejected by the database (kept in "
                           "%s_rejected): %s: %s", self.table, m.topic, _first_line(e))

    def _once(self, kind: str, level: int, message: str, *args: object) -> None:
        log.log(level if kind not in self._logged else logging.DEBUG, message, *args)
        self._logged.add(kind)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def cmd_ingest(args: Any) -> int:
    """`edge ingest`: runs until SIGTERM or SIGINT; exit 2 on bad arguments."""
    problem = None
    if not IDENTIFIER.fullmatch(args.table) or args.table == "edge_incoming":
        problem = f"--table {args.table!r}: lower-case letters, digits and _, at most 48, not edge_incoming"
    elif not 1 <= args.receive_maximum <= 65535:
        problem = f"--receive-maximum {args.receive_maximum}: 1..65535"
    elif not 0 <= args.session_expiry <= 2**32 - 1:
        problem = f"--session-expiry {args.session_expiry}: 0..4294967295"
    elif not 1 <= args.port <= 65535:
        problem = f"--port {args.port}: 1..65535"
    if problem:
        print(f"edge: ingest: {problem}", file=sys.stderr)
        return 2
    try:
        import psycopg  # noqa: F401, PLC0415
    except ImportError:
        print("edge: ingest: needs psycopg: pip install 'edge[ingest]'", file=sys.stderr)
        return 2
    try:
        ingest = Ingest(args)
    except (OSError, ValueError) as e:  # the password file, the CA file
        print(f"edge: ingest: {e}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: Any) -> None:
        ingest.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    return ingest.run()
