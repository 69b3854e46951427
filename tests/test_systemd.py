"""The shipped unit (systemd/edge.service) under a real systemd: a private manager started with
../shared/tools/systemd-sandbox (its own cgroup; never `systemd --user` directly).

The unit is installed as the shipped file with only what a user manager and this checkout require
changed: no User=/Group=/SupplementaryGroups= (a user manager runs units as its own user), ExecStart
pointing at the installed edge, ProtectHome=read-only (the interpreter lives under /root here),
PrivateTmp=no when the checkout itself is under /tmp, no ProtectKernelLogs= (the sandbox bind-mounts a
file over /dev/kmsg to capture the manager's log, and that mount cannot be hidden: 226/NAMESPACE), a 2 s
watchdog and 1 s restart delay so the test is quick, and the test hooks' environment. Every other
hardening line stays.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge.store import dump
from tests.support import free_port, start_sim, write_map

ROOT = Path(__file__).resolve().parent.parent
SANDBOX = ROOT.parent / "shared" / "tools" / "systemd-sandbox"
UNIT = "edge-test.service"


class Manager:
    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.base = base
        self.env = {**os.environ, **env}
        self.home = Path(env["HOME"])
        self.state = self.home / ".config" / "edge"  # StateDirectory=edge of a user unit (systemd 252)

    def ctl(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(["systemctl", "--user", *args], env=self.env, capture_output=True, text=True,
                           timeout=60, check=False)
        if check and r.returncode != 0:
            raise RuntimeError(f"systemctl {' '.join(args)}: {r.stderr}\n{self.log()}")
        return r.stdout.strip()

    def prop(self, name: str) -> str:
        return self.ctl("show", "-p", name, "--value", UNIT)

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout} s\n{self.log()}")
            time.sleep(0.1)  # systemd state is polled: Result=watchdog shows only during RestartSec

    def log(self) -> str:
        """The service's output and the manager's own log, tails."""
        parts = [(self.base / name) for name in ("edge.log", "manager.log")]
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in parts if p.exists())


@pytest.fixture(scope="module")
def manager() -> Iterator[Manager]:
    if not SANDBOX.exists():
        pytest.skip(f"{SANDBOX} not found (../shared beside the checkout)")
    if shutil.which("systemctl") is None:
        pytest.skip("systemd is not installed (apt-get install systemd dbus)")
    base = Path(f"/var/lib/edge-systemd-test-{os.getpid()}")  # not under /tmp: the unit has PrivateTmp
    r = subprocess.run([str(SANDBOX), "start", str(base)], capture_output=True, text=True, timeout=60,
                       check=False)
    if r.returncode == 3:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"systemd-sandbox cannot run here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    env = dict(kv.split("=", 1) for kv in shlex.split(r.stdout.strip().removeprefix("export ")))
    try:
        # The sandbox gives its manager an empty /run/systemd, and a manager run as root mounts the
        # "inaccessible" nodes from there over what the unit hides (ProtectKernelModules=: /usr/lib/modules,
        # on every machine with kernel modules): without them, 226/NAMESPACE. The manager made the same
        # nodes in its runtime directory; they are copied in, inside its own mount namespace.
        m = Manager(base, env)
        copy = 'mkdir -p /run/systemd/inaccessible && cp -a "$0"/. /run/systemd/inaccessible/'
        r = in_manager(m, "sh", "-c", copy, f"{env['XDG_RUNTIME_DIR']}/systemd/inaccessible")
        assert r.returncode == 0, r.stderr
        yield m
    finally:
        subprocess.run([str(SANDBOX), "stop", str(base)], capture_output=True, timeout=60, check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[int]:
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": 0, "type": "uint32", "wave": "counter", "step": 10.0},
        {"table": "holding", "address": 2, "type": "float32", "value": 1.5}]}])
    with start_sim(tmp_path / "map.toml") as sim:
        assert sim.port is not None
        yield sim.port


def test_unit_file_verifies_and_is_hardened(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / "edge.service"
    edge = shutil.which("edge") or sys.executable
    unit.write_text((ROOT / "systemd" / "edge.service").read_text().replace("/usr/bin/edge", edge))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
    sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                         text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", sec.stdout)
    assert m and float(m.group(1)) <= 2.0, sec.stdout[-500:]


def install(m: Manager, sim_port: int, metrics: int, *, commit: str = "500ms", env: str = "",
            extra: str = "", service: str = "", store: str = "", tags: str = "") -> None:
    m.state.mkdir(parents=True, exist_ok=True)
    conf = m.base / "config.toml"
    conf.write_text(f"""[appliance]
id = "sd"
state_dir = "{m.state}"
[[device]]
name = "pump"
host = "127.0.0.1"
port = {sim_port}
interval = "100ms"
timeout = "300ms"
[[device.tag]]
name = "count"
address = 0
type = "uint32"
[[device.tag]]
name = "temp"
address = 2
type = "float32"
{tags}
[store]
commit_interval = "{commit}"
map_size = "32MiB"
{store}[uplink]
port = {free_port()}
backoff_min = "200ms"
backoff_max = "1s"
[metrics]
port = {metrics}
{extra}""")
    text = (ROOT / "systemd" / "edge.service").read_text()
    text = re.sub(r"^(User|Group|SupplementaryGroups)=.*\n", "", text, flags=re.M)
    edge = shutil.which("edge")
    exec_start = f"{edge} run {conf}" if edge else f"{sys.executable} -m edge run {conf}"
    text = re.sub(r"^ExecStart=.*$", f"ExecStart={exec_start}", text, flags=re.M)
    text = re.sub(r"^WatchdogSec=.*$", "WatchdogSec=2", text, flags=re.M)
    text = re.sub(r"^RestartSec=.*$", "RestartSec=1", text, flags=re.M)
    text = text.replace("ProtectHome=yes", "ProtectHome=read-only").replace("ProtectKernelLogs=yes\n", "")
    if str(ROOT).startswith(("/tmp/", "/var/tmp/")):
        text = text.replace("PrivateTmp=yes", "PrivateTmp=no")
    for line in service.splitlines():  # Key=value: replaces the unit's own line for that key
        key = line.split("=", 1)[0]
        text = re.sub(rf"^{key}=.*$", line, text, flags=re.M)
    text = text.replace("[Service]\n", f"[Service]\nEnvironment=PYTHONUNBUFFERED=1 {env}\n"
                        f"StandardOutput=append:{m.base}/edge.log\nStandardError=append:{m.base}/edge.log\n")
    units = m.home / ".config" / "systemd" / "user"
    units.mkdir(parents=True, exist_ok=True)
    (units / UNIT).write_text(text)
    m.ctl("daemon-reload")


@contextlib.contextmanager
def running(m: Manager) -> Iterator[None]:
    try:
        yield
    finally:
        m.ctl("stop", UNIT, check=False)
        m.ctl("reset-failed", UNIT, check=False)
        shutil.rmtree(m.state, ignore_errors=True)


def metric(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        pass
    return -1.0


def seqs(m: Manager) -> set[int]:
    return {seq for seq, _ in dump(m.state / "store", 32 << 20, 0, 10**6)}


def test_active_only_after_ready(manager: Manager, device: int) -> None:
    install(manager, device, free_port(), env="EDGE_TEST_READY_DELAY=2")
    with running(manager):
        t0 = time.monotonic()
        manager.ctl("start", UNIT)  # Type=notify: returns when READY=1 arrived
        assert time.monotonic() - t0 >= 2.0
        start = int(manager.prop("ExecMainStartTimestampMonotonic"))
        active = int(manager.prop("ActiveEnterTimestampMonotonic"))
        assert active - start >= 2_000_000
        assert manager.prop("ActiveState") == "active"
        status = manager.prop("StatusText")
        assert re.match(r"1 devices \(1 up\), backlog \d+ readings, uplink offline", status), status


def test_blocked_loop_is_killed_by_the_watchdog_and_restarted(manager: Manager, device: int) -> None:
    mport = free_port()
    once = manager.state / "blocked-once"
    install(manager, device, mport, env=f"EDGE_TEST_BLOCK_LOOP_AFTER=3 EDGE_TEST_ONCE_FILE={once}")
    with running(manager):
        manager.ctl("start", UNIT)
        pid = manager.prop("MainPID")
        manager.wait(lambda: metric(mport, "edge_store_blocks_committed_total") >= 2,
                     "commits before the hang")
        before = seqs(manager)
        manager.wait(lambda: manager.prop("Result") == "watchdog", "watchdog kill")
        manager.wait(lambda: manager.prop("ActiveState") == "active" and manager.prop("MainPID") != pid
                     and int(manager.prop("NRestarts")) >= 1, "restart")
        appended = metric(mport, "edge_store_readings_appended_total")
        manager.wait(lambda: metric(mport, "edge_store_readings_appended_total") > appended + 20,
                     "readings flowing again")
        manager.wait(lambda: len(seqs(manager)) > len(before), "new commits")
        assert before <= seqs(manager)  # nothing committed before the hang was lost
    assert "Current thread" in manager.log() or "Thread 0x" in manager.log()  # faulthandler on SIGABRT


def test_memory_max_kills_and_systemd_restarts(manager: Manager, device: int) -> None:
    hog = manager.state / "hog"
    install(manager, device, free_port(), env=f"EDGE_TEST_HOG_FILE={hog}")
    with running(manager):
        manager.ctl("start", UNIT)
        pid = manager.prop("MainPID")
        hog.write_text("go")
        manager.wait(lambda: manager.prop("MainPID") not in (pid, "0")
                     and manager.prop("ActiveState") == "active", "restart after the OOM kill")
        assert int(manager.prop("NRestarts")) >= 1
        assert not hog.exists()


def test_stop_commits_the_open_window_and_exits_cleanly(manager: Manager, device: int) -> None:
    mport = free_port()
    install(manager, device, mport, commit="30s")  # without the final commit this window would be lost
    with running(manager):
        manager.ctl("start", UNIT)
        manager.wait(lambda: metric(mport, "edge_store_readings_appended_total") >= 40, "readings buffered")
        assert not seqs(manager)  # nothing committed yet: all of it is in the open window
        stopped_at = time.time_ns()
        manager.ctl("stop", UNIT)
        assert manager.prop("Result") == "success"
        assert manager.prop("ExecMainStatus") == "0"
        readings = [r for _, rs in dump(manager.state / "store", 32 << 20, 0, 10**6) for r in rs]
        assert len(readings) >= 40
        assert max(ts for _, ts, _, _ in readings) > stopped_at - 1_000_000_000


FLOOD_TAGS = 30_000  # ~30 MiB of anonymous RSS running; parsing the config takes ~35 MiB more for a while
FLOOD_MEMORY_MAX = 96 << 20  # the hard limit is 85 % of it, read from the cgroup
FLOOD_SOFT = 26 << 20  # [governor] memory_soft: above the 2-tag appliance (~22 MiB), below the flood


def labeled(port: int, name: str, labels: str) -> float:
    """A labeled sample, e.g. labeled(p, "edge_poll_stretch", 'device="bulk",group="bulk"'); -1 if absent."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(f"{name}{{") and labels in line:
                    return float(line.split()[-1])
    except OSError:
        pass
    return -1.0


def test_a_flood_of_tags_stays_inside_the_cgroup_memory_limit(manager: Manager, tmp_path: Path) -> None:
    """A real cgroup memory limit (MemoryMax: this host's hybrid layout has no MemoryHigh) and a flood of
    low-priority tags whose memory crosses the governor's soft limit: the hard limit is read from the
    cgroup, the governor stretches the flood's group and never the priority-0 one, the unit is never
    OOM-killed, its peak RSS stays under the hard limit, and the priority-0 readings keep flowing.
    The soft limit is set in the config: at 60 % of a MemoryMax that lets the config's parse through,
    it would sit above the flood's running RSS."""
    write_map(tmp_path / "map.toml", [
        {"id": 1, "points": [
            {"table": "holding", "address": 0, "type": "uint32", "wave": "counter", "step": 10.0},
            {"table": "holding", "address": 2, "type": "float32", "value": 1.5}]},
        {"id": 2, "points": [{"table": "holding", "address": a, "type": "uint16", "value": 7.0}
                             for a in range(FLOOD_TAGS)]}])
    mport = free_port()
    with start_sim(tmp_path / "map.toml") as sim:
        assert sim.port is not None
        flood = "\n".join(f'[[device.tag]]\nname = "b{a}"\naddress = {a}\ngroup = "bulk"'
                          for a in range(FLOOD_TAGS))
        install(manager, sim.port, mport, commit="1s", service=f"MemoryMax={FLOOD_MEMORY_MAX}",
                extra=f"""[[device]]
name = "bulk"
host = "127.0.0.1"
port = {sim.port}
unit = 2
timeout = "2s"
[device.group.bulk]
interval = "1s"
priority = 1
{flood}
[governor]
memory_soft = "{FLOOD_SOFT >> 20}MiB"
""")
        with running(manager):
            manager.ctl("start", UNIT)
            pid = manager.prop("MainPID")
            manager.wait(lambda: metric(mport, "edge_governor_memory_level") >= 0, "metrics (after READY)")
            assert labeled(mport, "edge_governor_limit_bytes", 'limit="hard"') == int(FLOOD_MEMORY_MAX * 0.85)
            assert labeled(mport, "edge_governor_limit_bytes", 'limit="soft"') == FLOOD_SOFT
            manager.wait(lambda: metric(mport, "edge_governor_memory_level") >= 1, "governor above soft",
                         timeout=120)
            manager.wait(lambda: labeled(mport, "edge_poll_stretch", 'device="bulk",group="bulk"') >= 2,
                         "the flood's group stretched", timeout=60)
            assert labeled(mport, "edge_poll_stretch", 'device="pump",group="default"') == 1.0
            before = labeled(mport, "edge_device_readings_total", 'device="pump"')
            manager.wait(lambda: labeled(mport, "edge_device_readings_total", 'device="pump"') > before + 20,
                         "priority-0 readings flowing under pressure")
            assert manager.prop("MainPID") == pid
            assert int(manager.prop("NRestarts")) == 0
            hwm = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
            assert hwm and int(hwm[1]) * 1024 < FLOOD_MEMORY_MAX * 0.85
    assert "governor: memory soft" in manager.log()


def in_manager(m: Manager, *cmd: str) -> subprocess.CompletedProcess[str]:
    """A command in the manager's mount namespace (private: a mount made outside is not seen there)."""
    return subprocess.run(["nsenter", "-t", m.env["SYSTEMD_SANDBOX_PID"], "-m", *cmd], capture_output=True,
                          text=True, timeout=60, check=False)


@contextlib.contextmanager
def small_tmpfs(m: Manager, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at the unit's state directory, in the manager's mount namespace."""
    m.state.mkdir(parents=True, exist_ok=True)
    r = in_manager(m, "mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(m.state))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield m.state
    finally:
        in_manager(m, "umount", "-l", str(m.state))


def fill(m: Manager) -> str:
    """A file taking every free byte of the unit's state file system; returns its path."""
    filler = f"{m.state}/filler"
    in_manager(m, "sh", "-c", f"cat /dev/zero > {filler} 2>/dev/null; true")
    r = in_manager(m, "df", "--output=avail", "-B1", str(m.state))
    assert int(r.stdout.split()[-1]) < 64 << 10, r.stdout
    return filler


@pytest.fixture
def busy_device(tmp_path: Path) -> Iterator[int]:
    """200 changing registers: 2,000 readings/s at 100 ms, so the store needs new pages every second."""
    write_map(tmp_path / "map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": a, "type": "uint16", "wave": "counter", "step": 1.0}
        for a in range(200)]}])
    with start_sim(tmp_path / "map.toml") as sim:
        assert sim.port is not None
        yield sim.port


BUSY = "\n".join(f'[[device.tag]]\nname = "r{a}"\naddress = {a}\ntype = "uint16"' for a in range(4, 200))


@pytest.mark.parametrize("reserve", [True, False])
def test_a_full_file_system_stops_nothing_and_damages_nothing(manager: Manager, busy_device: int,
                                                             reserve: bool) -> None:
    """The state directory on a small tmpfs, filled by another program while edge runs. Reserved (the
    default), the store goes on committing inside its own blocks. Not reserved, commits fail: readings
    wait in RAM, polling goes on, and when room returns they are committed. Either way: no restart, no
    crash, no store moved aside as damaged."""
    mport = free_port()
    with small_tmpfs(manager, "48m"):
        install(manager, busy_device, mport, commit="200ms", store=f"reserve = {str(reserve).lower()}\n",
                tags=BUSY)
        with running(manager):
            manager.ctl("start", UNIT)
            pid = manager.prop("MainPID")
            manager.wait(lambda: metric(mport, "edge_store_commits_total") >= 3, "commits")
            filler = fill(manager)
            commits = metric(mport, "edge_store_commits_total")
            if reserve:
                manager.wait(lambda: metric(mport, "edge_store_commits_total") >= commits + 10,
                             "commits inside the reserved file")
                assert metric(mport, "edge_store_commit_failures_total") == 0
            else:
                manager.wait(lambda: metric(mport, "edge_store_commit_failures_total") >= 3, "failures")
                appended = metric(mport, "edge_store_readings_appended_total")
                manager.wait(lambda: metric(mport, "edge_store_readings_appended_total") > appended + 20,
                             "polling going on")
                assert metric(mport, "edge_store_window_readings") > 20  # waiting in RAM
                in_manager(manager, "rm", filler)  # room returns
                manager.wait(lambda: metric(mport, "edge_store_commits_total") >= commits + 3,
                             "commits again")
                manager.wait(lambda: metric(mport, "edge_store_window_readings") < 20, "RAM committed")
            assert manager.prop("MainPID") == pid and int(manager.prop("NRestarts")) == 0
            assert metric(mport, "edge_store_recoveries_total") == 0
            assert metric(mport, "edge_store_readings_dropped_total") == 0  # RAM held them all
            listing = in_manager(manager, "ls", "-a", str(manager.state)).stdout.split()
            assert "store" in listing and not [n for n in listing if ".damaged-" in n], listing
    log = manager.log()
    assert "Traceback" not in log and log.count("commit failed") <= 1, log


BINARY = Path(os.environ.get("EDGE_BINARY", ROOT / "dist" / "edge"))


@pytest.mark.skipif(not BINARY.exists(), reason=f"no binary at {BINARY}: scripts/build-binary builds it")
def test_the_single_binary_needs_notify_access_all(manager: Manager, device: int) -> None:
    """The binary's main process is PyInstaller's unpacking parent; READY=1 comes from its Python child.
    With the shipped NotifyAccess=all the unit becomes active; with `main`, systemd drops the child's
    messages and the start times out. This is why the unit says all. The child's watchdog pings are
    taken too (WATCHDOG_PID names the parent)."""
    conf = manager.base / "config.toml"
    install(manager, device, free_port(), service=f"ExecStart={BINARY} run {conf}")
    with running(manager):
        manager.ctl("start", UNIT)
        assert manager.prop("ActiveState") == "active"
        # and it pings the watchdog (WatchdogSec=2): the pings systemd took go on past two periods
        pid, first = manager.prop("MainPID"), int(manager.prop("WatchdogTimestampMonotonic"))
        manager.wait(lambda: int(manager.prop("WatchdogTimestampMonotonic")) > first + 4_000_000,
                     "watchdog pings from the binary", timeout=20)
        assert manager.prop("MainPID") == pid and manager.prop("NRestarts") == "0"
    install(manager, device, free_port(),
            service=f"ExecStart={BINARY} run {conf}\nNotifyAccess=main\nTimeoutStartSec=8")
    with running(manager):
        manager.ctl("start", UNIT, check=False)
        assert manager.prop("Result") == "timeout"
    assert "reception only permitted for main PID" in manager.log()
