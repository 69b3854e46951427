"""A whole config pushed on <prefix>/<id>/cmd/config ([commands] remote_config), against `edge run`, a
simulated device and mosquitto: signed like a write, validated like a file, tried, and kept only when
the new config polled every device and delivered within config_trial; else the running one is restored.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

from edge.write import sign
from tests.support import (
    EdgeProcess,
    Subscriber,
    config_dict,
    free_port,
    metric,
    simulated_pump,
    start_broker,
    stop,
    wait_metric,
    write_config,
)

KEY = b"k" * 40


def config_text(tmp: Path, cfg: dict[str, Any]) -> str:
    path = tmp / "pushed.toml"
    write_config(path, cfg)
    return path.read_text()


def push(sender: Subscriber, cid: str, text: str, key: bytes = KEY, name: str = "ops") -> None:
    message = sign(key, name, {"id": cid, "expires": time.time() + 300, "config": text, "by": "test"})
    sender.client.publish("edge/t1/cmd/config", message, qos=1).wait_for_publish(10)


def result(sub: Subscriber, cid: str | None, timeout: float = 60.0) -> dict[str, Any]:
    """The result of command `cid` (None: of a command refused before its signature was checked, whose
    id is not trusted)."""
    def found(s: Subscriber) -> list[dict[str, Any]]:
        return [r for t, p in s.messages if t == "edge/t1/cmd/result" and (r := json.loads(p))["id"] == cid]

    sub.wait(lambda s: bool(found(s)), timeout=timeout)
    return found(sub)[0]


def test_a_pushed_config_is_tried_then_kept_or_rolled_back(tmp_path: Path) -> None:
    (tmp_path / "ops.key").write_bytes(KEY)
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker:
        cfg = config_dict(tmp_path, sim_port, broker.port)
        cfg["metrics"]["port"] = mport = free_port()
        keys = {"ops": str(tmp_path / "ops.key")}
        cfg["commands"] = {"remote_config": True, "config_trial": "4s", "keys": keys}
        conf = tmp_path / "config.toml"
        write_config(conf, cfg)
        kept = tmp_path / "state" / "config.toml"
        sub = Subscriber(broker.port, "edge/t1/cmd/result")
        edge = EdgeProcess(conf)
        try:
            edge.metrics_port()
            wait_metric(mport, "edge_uplink_blocks_acked_total", lambda v: v >= 1)

            good = {**cfg, "device": [{**cfg["device"][0], "name": "pump2"}]}  # the device renamed
            push(sub, "cfg-1", config_text(tmp_path, good))
            applied = result(sub, "cfg-1")
            assert (applied["ok"], applied["status"], applied["kept"]) == (True, "applied", str(kept))
            assert kept.read_text() == config_text(tmp_path, good)
            assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
            assert metric(mport, "edge_config_reloads_total") >= 1

            mute = {**good, "device": [{**good["device"][0], "name": "pump3", "port": free_port()}]}
            push(sub, "cfg-2", config_text(tmp_path, mute))  # valid, but nothing answers there
            rolled = result(sub, "cfg-2")
            assert (rolled["ok"], rolled["error"]) == (False, "rolled back")
            assert "no good reading from pump3" in rolled["detail"]
            assert kept.read_text() == config_text(tmp_path, good)
            before = metric(mport, "edge_device_readings_total")  # polling the kept config again
            wait_metric(mport, "edge_device_readings_total", lambda v: v > before)

            push(sub, "cfg-3", config_text(tmp_path, mute), key=b"x" * 40)  # not the configured key
            assert result(sub, None)["error"] == "bad signature"  # its id unread: nothing of it trusted
            bad = config_text(tmp_path, good).replace('interval = "50ms"', 'interval = "soon"')
            push(sub, "cfg-4", bad)
            invalid = result(sub, "cfg-4")
            assert invalid["error"] == "invalid config" and "device[0].interval" in invalid["detail"]
            assert kept.read_text() == config_text(tmp_path, good)
        finally:
            assert stop(edge) == 0, edge.log
        assert "pushed config cfg-2 rolled back" in edge.log and "Traceback" not in edge.log

        again = EdgeProcess(conf)  # a restart runs the kept config
        try:
            again.metrics_port()
            assert "running the kept config" in again.log
            devices = [line for line in again.log.splitlines() if "polling" in line]
            assert devices, again.log
        finally:
            again.proc.send_signal(signal.SIGTERM)
            assert stop(again) == 0, again.log
        sub.close()
