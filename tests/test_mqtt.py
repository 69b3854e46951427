"""edge.mqtt on its own, against a real mosquitto on 127.0.0.1: the PUBACK reason code of each publish,
the status will, the incoming packet limit, and TLS verified against [uplink.tls] server_name."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import threading
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edge import mqtt
from edge.config import Config, parse
from tests.support import Subscriber, free_port, make_ca, start_broker


def config(port: int, **uplink: Any) -> Config:
    return parse({"appliance": {"id": "m1", "state_dir": "/tmp/edge-test"},
                  "uplink": {"host": "127.0.0.1", "port": port, "publish_timeout": "3s", **uplink}})


def test_a_publish_returns_the_brokers_reason_code(tmp_path: Path) -> None:
    """0 for an accepted publish (and the subscriber has it); 0x87 (not authorized) for a topic the broker's
    ACL denies: the caller can tell a refusal from a loss."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite edge/m1/status\ntopic readwrite edge/m1/ok\ntopic read #\n")
    with start_broker(tmp_path / "mqtt", extra=f"acl_file {acl}\n") as broker:
        sub = Subscriber(broker.port, "edge/m1/#")

        async def main() -> tuple[int, int]:
            async with mqtt.connect(config(broker.port), "edge/m1/status") as client:
                return (await client.publish_acked("edge/m1/ok", b"fine", 3.0),
                        await client.publish_acked("edge/m1/denied", b"no", 3.0))

        accepted, denied = asyncio.run(main())
        sub.wait(lambda s: any(t == "edge/m1/ok" for t, _ in s.messages))
        sub.close()
    assert (accepted, denied) == (0, 0x87)
    assert ("edge/m1/denied", b"no") not in sub.messages


def test_the_will_says_offline_when_the_connection_is_lost(tmp_path: Path) -> None:
    with start_broker(tmp_path / "mqtt") as broker:
        sub = Subscriber(broker.port, "edge/m1/status")

        async def main() -> None:
            client = mqtt.connect(config(broker.port, keepalive="5s"), "edge/m1/status")
            await client.__aenter__()
            await client.publish("edge/m1/status", b"online", qos=1, retain=True)
            sock = client._client.socket()
            assert sock is not None
            sock.shutdown(socket.SHUT_RDWR)  # the link drops: no DISCONNECT reaches the broker
            with pytest.raises(aiomqtt.MqttError):
                await client.publish_acked("edge/m1/data", b"x", 3.0)

        asyncio.run(main())
        sub.wait(lambda s: (("edge/m1/status", b"offline") in s.messages), timeout=20)
        sub.close()
    status = [p for t, p in sub.messages if t == "edge/m1/status"]
    assert status.index(b"online") < status.index(b"offline")


def test_a_reset_connection_is_logged_by_paho_at_debug_only(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A broker that accepts the session and then resets the connection (RST): paho's own "failed to receive
    on socket" line is there, at DEBUG, not ERROR; the uplink's warning is the episode's one line."""
    caplog.set_level(logging.DEBUG)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def broker() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)  # CONNECT
                conn.sendall(bytes([0x20, 0x03, 0x00, 0x00, 0x00]))  # CONNACK v5: accepted, no properties
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        peer = threading.Thread(target=broker)
        peer.start()

        async def main() -> None:
            with pytest.raises(aiomqtt.MqttError):
                async with mqtt.connect(config(port), "edge/m1/status") as client:
                    await client.publish_acked("edge/m1/data", b"x", 3.0)

        asyncio.run(main())
        peer.join(5)
    paho = [r for r in caplog.records if r.name == "edge.mqtt.paho"]
    assert any("failed to receive on socket" in r.getMessage() for r in paho), caplog.text
    assert {r.levelno for r in paho} == {logging.DEBUG}, caplog.text
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == [], caplog.text


def test_mqtt_3_1_1_for_brokers_that_speak_only_that(tmp_path: Path) -> None:
    """[uplink] protocol = "3.1.1": the broker sees a 3.1.1 client (mosquitto logs p2, not p5), a publish
    is acknowledged (3.1.1 has no reason codes: 0) and delivered, and the will still says offline."""
    log_file = tmp_path / "broker.log"  # written as it happens (its stderr is kept only at its end)
    with start_broker(tmp_path / "mqtt", extra=f"log_dest file {log_file}\n") as broker:
        sub = Subscriber(broker.port, "edge/m1/#")

        async def main() -> int:
            client = mqtt.connect(config(broker.port, protocol="3.1.1", keepalive="5s"), "edge/m1/status")
            await client.__aenter__()
            code = await client.publish_acked("edge/m1/data", b"fine", 3.0)
            sock = client._client.socket()
            assert sock is not None
            sock.shutdown(socket.SHUT_RDWR)  # the link drops: the will goes out
            with pytest.raises(aiomqtt.MqttError):
                await client.publish_acked("edge/m1/data", b"lost", 3.0)
            return code

        code = asyncio.run(main())
        sub.wait(lambda s: ("edge/m1/status", b"offline") in s.messages, timeout=20)
        sub.close()
        log = log_file.read_text()
    assert code == 0 and ("edge/m1/data", b"fine") in sub.messages
    assert "as edge-m1 (p2," in log, log


def test_a_packet_above_the_limit_never_reaches_the_client(tmp_path: Path) -> None:
    """MaximumPacketSize in CONNECT: the broker drops an oversized command meant for the appliance instead
    of making it read one; the next small one arrives."""
    with start_broker(tmp_path / "mqtt") as broker:
        sender = Subscriber(broker.port, "unused/topic")

        async def main() -> list[bytes]:
            got: list[bytes] = []
            async with mqtt.connect(config(broker.port), "edge/m1/status") as client:
                await client.subscribe("edge/m1/cmd/write", qos=1)
                for payload in (b"x" * (mqtt.MAX_INCOMING + 1), b"small"):
                    sender.client.publish("edge/m1/cmd/write", payload, qos=1).wait_for_publish(5)
                async with asyncio.timeout(10):
                    async for message in client.messages:
                        got.append(bytes(message.payload))
                        if message.payload == b"small":
                            break
            return got

        got = asyncio.run(main())
        sender.close()
    assert got == [b"small"]


def test_tls_is_verified_against_the_configured_server_name(tmp_path: Path) -> None:
    """The broker's certificate names localhost and 127.0.0.1: server_name "localhost" connects, a name the
    certificate does not hold is refused, and so is the test CA's certificate without [uplink.tls] ca."""
    ca = make_ca(tmp_path / "ca")
    port = free_port()
    extra = (f"listener {port} 127.0.0.1\ncafile {ca['ca']}\ncertfile {ca['server']}\n"
             f"keyfile {ca['server_key']}\n")

    async def attempt(cfg: Config) -> str:
        try:
            async with mqtt.connect(cfg, "edge/m1/status") as client:
                reason = await client.publish_acked("edge/m1/data", b"x", 3.0)
                return "accepted" if reason < 0x80 else f"reason {reason:#04x}"
        except mqtt.CONNECTION_ERRORS as e:
            return "refused" if "certificate" in str(e).lower() or isinstance(e, ssl.SSLError) else repr(e)

    with start_broker(tmp_path / "mqtt", extra=extra):
        good = asyncio.run(attempt(config(port, tls={"ca": str(ca["ca"]), "server_name": "localhost"})))
        wrong = asyncio.run(attempt(config(port, tls={"ca": str(ca["ca"]), "server_name": "other.example"})))
        unknown = asyncio.run(attempt(config(port, tls={})))
    assert (good, wrong, unknown) == ("accepted", "refused", "refused")
