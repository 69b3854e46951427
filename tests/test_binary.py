"""The single binary (scripts/build-binary -> dist/edge, or $EDGE_BINARY): it answers, checks a config
and runs the whole appliance against a simulated device and Debian's mosquitto, unpacking into /dev/shm
and cleaning up after itself."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import edge
from tests.support import (
    ROOT,
    EdgeProcess,
    Subscriber,
    check_delivery,
    config_dict,
    delivered_count,
    simulated_pump,
    start_broker,
    stop,
    write_config,
)

BINARY = Path(os.environ.get("EDGE_BINARY", ROOT / "dist" / "edge"))
pytestmark = pytest.mark.skipif(
    not BINARY.exists(), reason=f"no binary at {BINARY}: scripts/build-binary builds it (.ci/run does)")


def unpacked() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("_MEI*")}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BINARY), *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)


def test_version_and_check() -> None:
    before = unpacked()
    out = run("--version")
    assert (out.returncode, out.stdout.strip()) == (0, f"edge {edge.__version__}")
    out = run("check", "config.toml")
    assert out.returncode == 0 and "ok: 1 device" in out.stdout, out
    case = ROOT / "tests" / "cases" / "bad_address_range"
    out = run("check", str(case / "config.toml"))
    want = (case / "error.txt").read_text().split()[0]  # the key path
    assert out.returncode == 2 and want in out.stderr, out
    assert unpacked() == before  # every run removed its /dev/shm/_MEI* directory


def test_run_delivers_every_block(tmp_path: Path) -> None:
    before = unpacked()
    with simulated_pump(tmp_path) as sim_port, start_broker(tmp_path / "mqtt") as broker:
        sub = Subscriber(broker.port, "edge/t1/#")
        conf = tmp_path / "config.toml"
        write_config(conf, config_dict(tmp_path, sim_port, broker.port))
        proc = EdgeProcess(conf, edge=[str(BINARY)])
        try:
            sub.wait(lambda s: delivered_count(s) >= 60)
            assert len(unpacked() - before) == 1  # the binary runs from a RAM file system
        finally:
            assert stop(proc) == 0, proc.log
        sub.wait(lambda s: any(t.endswith("/status") and p == b"offline" for t, p in s.messages))
        sub.close()
    check_delivery(sub)
    assert unpacked() == before
