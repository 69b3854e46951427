"""A config and secrets dropped on the boot partition, taken into the state directory at boot
(`edge import-config DIR`, edge.config.boot). The boot partition is a directory here; the image runs the
same command on /boot/firmware/edge before the appliance starts."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.support import (
    ROOT,
    EdgeProcess,
    Subscriber,
    config_dict,
    simulated_pump,
    start_broker,
    stop,
    write_config,
)

GOOD = '''[appliance]
id = "from-the-card"
state_dir = "{state}"
[[device]]
name = "pump"
host = "127.0.0.1"
port = {port}
interval = "50ms"
[[device.tag]]
name = "count"
address = 0
type = "uint32"
[uplink]
host = "127.0.0.1"
port = {broker}
password_file = "secrets/mqtt.pass"
[metrics]
port = 0
'''


def import_config(source: Path, image_config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", "import-config", str(source), str(image_config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def image(tmp: Path, sim_port: int, broker_port: int) -> Path:
    """The config the image starts with (its state directory is the box's /data)."""
    cfg = config_dict(tmp, sim_port, broker_port)
    conf = tmp / "image.toml"
    write_config(conf, cfg)
    return conf


def test_a_good_config_and_its_secrets_are_taken_and_run(tmp_path: Path) -> None:
    card, state = tmp_path / "card", tmp_path / "state"
    (card / "secrets").mkdir(parents=True)
    (card / "secrets" / "mqtt.pass").write_text("s3cret\n")
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker:
        (card / "config.toml").write_text(GOOD.format(port=sim_port, broker=broker.port, state=state))
        conf = image(tmp_path, sim_port, broker.port)
        done = import_config(card, conf)
        assert done.returncode == 0, done.stderr
        assert "secret mqtt.pass moved" in done.stdout and "kept as" in done.stdout
        kept, secret = state / "config.toml", state / "secrets" / "mqtt.pass"
        assert kept.read_text() == (card / "config.toml").read_text()
        assert secret.read_text() == "s3cret\n" and not (card / "secrets" / "mqtt.pass").exists()
        assert stat.S_IMODE(os.stat(secret).st_mode) == stat.S_IMODE(os.stat(kept).st_mode) == 0o600
        assert "already the kept config" in import_config(card, conf).stdout  # on every boot: no change
        sub = Subscriber(broker.port, "edge/from-the-card/health")
        edge = EdgeProcess(conf)
        try:
            sub.wait(lambda s: len(s.messages) >= 1)
            assert f"running the kept config {kept}" in edge.log
            assert "unavailable" not in edge.log  # the secret found where the kept config names it
        finally:
            assert stop(edge) == 0, edge.log
            sub.close()
    health = json.loads(sub.messages[0][1])
    assert health["appliance"] == "from-the-card" and health["config_error"] is None


def test_a_bad_config_on_the_card_is_refused_and_published_and_the_last_good_runs(tmp_path: Path) -> None:
    card, state = tmp_path / "card", tmp_path / "state"
    card.mkdir()
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker:
        conf = image(tmp_path, sim_port, broker.port)
        (card / "config.toml").write_text(GOOD.format(port=sim_port, broker=broker.port, state=state)
                                          .replace('interval = "50ms"', 'interval = "often"'))
        done = import_config(card, conf)
        assert done.returncode == 0 and "refused, the last good config runs" in done.stderr
        assert "device[0].interval" in done.stderr and "Traceback" not in done.stderr
        assert not (state / "config.toml").exists()
        assert "device[0].interval" in (state / "config-error").read_text()
        sub = Subscriber(broker.port, "edge/t1/health")  # the image's config runs, under its id
        edge = EdgeProcess(conf)
        try:
            sub.wait(lambda s: len(s.messages) >= 1)
        finally:
            assert stop(edge) == 0, edge.log
            sub.close()
    health = json.loads(sub.messages[0][1])
    assert "device[0].interval" in health["config_error"]
    assert health["devices"] == [{"name": "pump", "up": True}]


def test_a_hostile_card_is_refused_without_being_read_whole(tmp_path: Path) -> None:
    """A config.toml far above MAX_CONFIG_BYTES and a 'secret' of 64 MiB (both sparse) on the card: the
    config is refused by its size, recorded, and the secret is left where it is (too large to be one)
    instead of copied to /data; the boot goes on (exit 0)."""
    card, state = tmp_path / "card", tmp_path / "state"
    (card / "secrets").mkdir(parents=True)
    with open(card / "config.toml", "wb") as f:
        f.truncate(64 << 20)
    with open(card / "secrets" / "huge.key", "wb") as f:
        f.truncate(64 << 20)
    conf = image(tmp_path, 1502, 1883)
    done = import_config(card, conf)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "config.toml: 67,108,864 bytes, above the 8,388,608 a config may have" in done.stderr  # its size
    assert "a config may have" in (state / "config-error").read_text()
    assert "huge.key" in done.stderr and "left on the boot partition" in done.stderr
    assert (card / "secrets" / "huge.key").exists() and not (state / "secrets" / "huge.key").exists()


def test_a_state_directory_that_cannot_be_written_fails_nothing(tmp_path: Path) -> None:
    """The state directory's place is a file (the disk full or read-only would be alike): the import says
    so in one line and exits 0, so the boot and the last good config go on; no traceback."""
    card = tmp_path / "card"
    card.mkdir()
    (card / "config.toml").write_text(GOOD.format(port=1502, broker=1883, state=tmp_path / "taken" / "state"))
    (tmp_path / "taken").write_text("a file where a directory should be\n")
    conf = tmp_path / "image.toml"
    write_config(conf, {**config_dict(tmp_path, 1502, 1883),
                        "appliance": {"id": "t1", "state_dir": str(tmp_path / "taken" / "state")}})
    done = import_config(card, conf)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "import-config: cannot take" in done.stderr and done.stderr.count("\n") == 1
