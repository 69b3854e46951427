"""The uplink's MQTT session: aiomqtt's client with the PUBACK reason code of each publish, and TLS.

Imported by the uplink when it starts, after READY=1: aiomqtt and paho are a sixth of the start-up time.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import Config
from edge.write import MAX_CONFIG_COMMAND

CONNECTION_ERRORS = (aiomqtt.MqttError, OSError, ssl.SSLError)
MAX_INCOMING = 16 * 1024  # bytes of an MQTT packet to us (only commands arrive: edge.write.MAX_COMMAND)
MAX_INCOMING_CONFIG = MAX_CONFIG_COMMAND + 64 * 1024  # with [commands] remote_config: room for the envelope
PUBLISH_ERRORS = (aiomqtt.MqttError, OSError)


def _at_debug(record: logging.LogRecord) -> bool:
    """paho's socket failures at DEBUG: a lost connection is paho's ERROR ("failed to receive on socket")
    beside the uplink's own warning for the episode, which is the one line the journal gets. paho's
    other lines (an exception in a callback) keep their level."""
    if not str(record.msg).startswith("failed to"):
        return True
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return PAHO_LOG.isEnabledFor(logging.DEBUG)


PAHO_LOG = logging.getLogger("edge.mqtt.paho")
PAHO_LOG.addFilter(_at_debug)


class Client(aiomqtt.Client):
    """aiomqtt's client, plus the PUBACK reason code of each publish (aiomqtt 2.5 drops it); paho's log
    lines at DEBUG (aiomqtt's own, such as a full message queue, keep their levels)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client.enable_logger(PAHO_LOG)
        self.acks: dict[int, asyncio.Future[int]] = {}

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        fut = self.acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(int(getattr(reason_code, "value", 0)))
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await super().__aexit__(*exc_info)
        finally:  # an error aiomqtt's socket callbacks set, with no disconnect from paho: read it too
            if self._disconnected.done() and not self._disconnected.cancelled():
                self._disconnected.exception()

    def _on_disconnect(self, *args: Any, **kwargs: Any) -> None:
        super()._on_disconnect(*args, **kwargs)
        # aiomqtt 2.5 leaves a lost connection's error unread when the client is already disconnected, and
        # drops it unread when the connection is lost before __aenter__ returns: read it here, so asyncio
        # does not log it with a traceback as never retrieved. Whoever awaits it still gets it; the uplink
        # logs the episode itself.
        if self._disconnected.done() and not self._disconnected.cancelled():
            self._disconnected.exception()

    async def publish_acked(self, topic: str, payload: bytes, timeout: float) -> int:
        """Publish at QoS 1 and return the PUBACK reason code; raises MqttError if none comes."""
        mid, fut = self.publish_now(topic, payload)
        del payload  # paho keeps its own copy until the PUBACK: one copy in RAM, not two
        return await self.acked(mid, fut, timeout)

    def publish_now(self, topic: str, payload: bytes) -> tuple[int, asyncio.Future[int]]:
        """Publish at QoS 1 at once (in this order among publishes: Sparkplug's seq), without waiting:
        (message id, its PUBACK reason code to come), for acked()."""
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "could not publish")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.acks[info.mid] = fut
        return info.mid, fut

    async def acked(self, mid: int, fut: asyncio.Future[int], timeout: float) -> int:
        """The PUBACK reason code of a publish_now(); raises MqttError if none comes."""
        try:
            waiting: set[asyncio.Future[Any]] = {fut, self._disconnected}
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.acks.pop(mid, None)
        if fut in done:
            return fut.result()
        raise aiomqtt.MqttError("no PUBACK" if not done else "connection lost")


class _NamedContext(ssl.SSLContext):
    """Verifies the broker's certificate against `server_name` instead of the host connected to."""

    server_name: str | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        if self.server_name:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


def tls_context(config: Config) -> ssl.SSLContext | None:
    """TLS 1.2+, certificate and host name verified (against [uplink.tls] server_name when set)."""
    tls = config.uplink.tls
    if tls is None:
        return None
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca:
        ctx.load_verify_locations(cafile=str(tls.ca))
    else:
        ctx.load_default_certs()
    if tls.cert and tls.key:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.server_name = tls.server_name
    return ctx


def connect(config: Config, topic_status: str, will: tuple[str, bytes] | None = None) -> Client:
    """A client for [uplink] (entered with `async with`), its will "offline" on topic_status, or `will`
    (topic, payload: Sparkplug's NDEATH)."""
    cfg = config.uplink
    password = None
    if cfg.password_file:
        password = cfg.password_file.read_text().strip()
    connect_properties = None
    if cfg.protocol == "5":  # 3.1.1 has no properties: no commands with it (edge.config refuses them)
        connect_properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # the broker drops anything larger meant for us
        limit = MAX_INCOMING_CONFIG if config.commands.remote_config else MAX_INCOMING
        connect_properties.MaximumPacketSize = limit
    protocol = aiomqtt.ProtocolVersion.V5 if cfg.protocol == "5" else aiomqtt.ProtocolVersion.V311
    return Client(
        cfg.host, cfg.port, username=cfg.username, password=password, properties=connect_properties,
        identifier=f"edge-{config.appliance.id}", protocol=protocol,
        will=aiomqtt.Will(topic_status, b"offline", qos=1, retain=True) if will is None
        else aiomqtt.Will(will[0], will[1], qos=1, retain=False),
        keepalive=int(cfg.keepalive), timeout=cfg.publish_timeout,
        tls_context=tls_context(config),
        tls_insecure=False if cfg.tls else None, max_inflight_messages=cfg.max_inflight,
    )
