"""Real peers for tests: the simulated device (python -m hil.sim) in a subprocess, socat pty pairs, map and
fault-control files.

    point = {"table": "holding", "address": 0, "type": "float32", "value": 1.0}
    write_map(tmp / "map.toml", [{"id": 1, "invalid": [[100, 109]], "points": [point]}])
    with start_sim(tmp / "map.toml", control=tmp / "faults.json") as sim:   # sim.host, sim.port
        set_faults(tmp / "faults.json", {"1": {"mode": "silent"}})
    with pty_pair(tmp) as (client, server), start_sim(map, tcp=False, rtu_path=server, baud=9600) as sim:
        ...                                                                  # sim.path == server
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt

from hil.mapgen import write_map

__all__ = ["pty_pair", "set_faults", "start_sim", "write_map"]

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 15.0
SOCAT_TIMEOUT = 10.0


@dataclass
class SimHandle:
    proc: subprocess.Popen[bytes]
    host: str | None = None
    port: int | None = None
    path: str | None = None


def _read_until(proc: subprocess.Popen[bytes], stream: IO[bytes], marker: bytes, timeout: float) -> bytes:
    """Bytes of `stream` up to the end of the line holding `marker`; raises on exit or timeout."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = stream.fileno()
    while marker not in buf or not buf[buf.index(marker):].count(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {marker!r} within {timeout} s; got {buf!r}")
        readable, _, _ = select.select([fd], [], [], left)
        chunk = os.read(fd, 4096) if readable else b""
        if readable and not chunk:
            raise RuntimeError(f"process exited ({proc.wait()}) before {marker!r}; got {buf!r}")
        buf += chunk
    return buf


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sim_command(map_path: Path | str, *, tcp: bool = True, rtu_path: str | None = None, baud: int = 9600,
                control: Path | str | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "hil.sim", "--map", str(map_path)]
    if rtu_path is not None:
        cmd += ["--rtu", str(rtu_path), "--baud", str(baud)]
    elif tcp:
        cmd += ["--tcp", "127.0.0.1:0"]
    else:
        raise ValueError("start_sim needs tcp=True or an rtu_path")
    if control is not None:
        cmd += ["--control", str(control)]
    return cmd + list(extra_args)


@contextlib.contextmanager
def start_sim(map_path: Path | str, *, tcp: bool = True, rtu_path: str | None = None, baud: int = 9600,
              control: Path | str | None = None, extra_args: Sequence[str] = ()) -> Iterator[SimHandle]:
    """Run the simulator until the block ends; yields once it printed READY."""
    cmd = sim_command(map_path, tcp=tcp, rtu_path=rtu_path, baud=baud, control=control, extra_args=extra_args)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
        try:
            assert proc.stdout is not None
            try:
                line = _read_until(proc, proc.stdout, b"READY", READY_TIMEOUT)
            except (TimeoutError, RuntimeError) as exc:
                err.seek(0)
                stderr = err.read().decode(errors="replace")
                raise RuntimeError(f"hil.sim did not start: {exc}\n{stderr}") from exc
            yield _handle(proc, line)
        finally:
            _stop(proc)
            if proc.stdout is not None:
                proc.stdout.close()


def _handle(proc: subprocess.Popen[bytes], line: bytes) -> SimHandle:
    """`READY tcp 127.0.0.1:5020` or `READY rtu /dev/pts/7` -> handle."""
    kind, where = line[line.index(b"READY"):].split(b"\n", 1)[0].decode().split()[1:3]
    if kind == "tcp":
        host, port = where.rsplit(":", 1)
        return SimHandle(proc, host=host, port=int(port))
    return SimHandle(proc, path=where)


@contextlib.contextmanager
def pty_pair(tmp_path: Path | str) -> Iterator[tuple[str, str]]:
    """Two linked ptys (tmp_path/ptyA, tmp_path/ptyB): bytes written to one are read from the other."""
    a, b = str(Path(tmp_path) / "ptyA"), str(Path(tmp_path) / "ptyB")
    proc = subprocess.Popen(["socat", "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        _read_until(proc, proc.stderr, b"starting data transfer loop", SOCAT_TIMEOUT)
        yield a, b
    finally:
        _stop(proc)
        if proc.stderr is not None:
            proc.stderr.close()


def set_faults(control_path: Path | str, faults: dict[str, Any]) -> None:
    """Replace the fault-control file atomically, with an mtime no earlier write of it shares.

    The simulator notices a change by (st_ino, st_mtime_ns, st_size); a fresh file can reuse a freed inode
    and land in the same coarse mtime tick with the same size, so the mtime is set to time.time_ns().
    """
    path = Path(control_path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({str(k): v for k, v in faults.items()}, f)
        stamp = time.time_ns()
        with contextlib.suppress(FileNotFoundError):
            stamp = max(stamp, path.stat().st_mtime_ns + 1)
        os.utime(tmp, ns=(stamp, stamp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -------------------------------------------------------------------------------------------- MQTT

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BrokerHandle:
    proc: subprocess.Popen[bytes]
    port: int
    conf: Path


def broker_conf(path: Path, port: int, extra: str = "", persistence: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    conf = path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    f"persistence {'true' if persistence else 'false'}\npersistence_location {path}/\n"
                    f"user root\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
                    f"log_type information\n{extra}")
    return conf


@contextlib.contextmanager
def start_broker(path: Path, port: int | None = None, extra: str = "") -> Iterator[BrokerHandle]:
    """mosquitto from Debian on 127.0.0.1:port with its own config (persistence on, so sessions and
    queued QoS 1 messages of the test's subscriber survive a restart); ready when it says "running"."""
    port = port or free_port()
    conf = broker_conf(path, port, extra)
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        _read_until(proc, proc.stderr, b"running", READY_TIMEOUT)
        log = path / "mosquitto.log"  # keep draining its stderr so the pipe never fills
        threading.Thread(target=lambda: log.write_bytes(proc.stderr.read() if proc.stderr else b""),
                         daemon=True).start()
        yield BrokerHandle(proc, port, conf)
    finally:
        _stop(proc)


class Subscriber:
    """A persistent-session QoS 1 subscriber (paho, its own thread) collecting every message."""

    def __init__(self, port: int, topic: str = "#", tls_ca: Path | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{port}",
                                  clean_session=False)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.client.on_connect = lambda c, u, f, rc, p: (c.subscribe(topic, qos=1), self.connected.set())
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self.connected.wait(15):
            raise TimeoutError("subscriber did not connect")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def seqs(self) -> set[int]:
        """The distinct sequence numbers of the data messages received."""
        return {m["seq"] for m in self.data()}

    def data(self) -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(p) for t, p in self.messages if t.endswith("/data")]

    def wait(self, predicate: Any, timeout: float = 30.0) -> None:
        """Until predicate(self) holds (re-checked on every message)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"subscriber: condition not met in {timeout} s "
                                       f"({len(self.messages)} messages)")
                self.cond.wait(left)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def make_ca(path: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost (openssl)."""
    path.mkdir(parents=True, exist_ok=True)
    f = {k: path / f"{k}.pem" for k in ("ca", "ca_key", "server", "server_key")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edge test CA",
        "-keyout", str(f["ca_key"]), "-out", str(f["ca"]))
    csr = path / "server.csr"
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(f["server_key"]),
        "-out", str(csr))
    ext = path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(f["ca"]), "-CAkey", str(f["ca_key"]), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(f["server"]))
    return f


# ------------------------------------------------------------------------------------ edge run

class EdgeProcess:
    """`edge run` as a subprocess; its log is read continuously (a full pipe would block its logging)."""

    def __init__(self, config: Path, edge: Sequence[str] = (sys.executable, "-m", "edge")) -> None:
        self.proc = subprocess.Popen([*edge, "run", str(config)], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self.changed:
                self.lines.append(raw.decode(errors="replace"))
                self.changed.notify_all()

    @property
    def log(self) -> str:
        with self.changed:
            return "".join(self.lines)

    def metrics_port(self, timeout: float = 30.0) -> int:
        with self.changed:
            ok = self.changed.wait_for(lambda: any("/metrics" in x for x in self.lines) or
                                       self.proc.poll() is not None, timeout)
            line = next((x for x in self.lines if "/metrics" in x), None)
        if not ok or line is None:
            raise RuntimeError(f"appliance did not start:\n{self.log}")
        return int(line.split("127.0.0.1:")[1].split("/")[0])


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_metric(port: int, name: str, cond: Callable[[float], bool], timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while not cond(value := metric(port, name)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} = {value}")
        time.sleep(0.1)
    return value


def write_config(path: Path, cfg: dict[str, Any]) -> None:
    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    def table(name: str, entries: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {value(v)}" for k, v in entries.items() if not isinstance(v, dict))
        for k, v in entries.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    lines: list[str] = []
    for section in ("appliance", "store", "uplink", "metrics", "governor"):
        if section in cfg:
            table(section, cfg[section])
    for d in cfg["device"]:
        lines.append("[[device]]")
        lines += [f"{k} = {value(v)}" for k, v in d.items() if k != "tag"]
        for t in d["tag"]:
            lines.append("[[device.tag]]")
            lines += [f"{k} = {value(v)}" for k, v in t.items()]
    path.write_text("\n".join(lines) + "\n")


def stop(edge: EdgeProcess) -> int:
    """SIGTERM and the exit code; a process still running after 30 s has its stacks dumped (SIGUSR1) into
    the failure message before it is killed."""
    edge.proc.send_signal(signal.SIGTERM)
    try:
        return edge.proc.wait(30)
    except subprocess.TimeoutExpired:
        edge.proc.send_signal(signal.SIGUSR1)
        time.sleep(1)  # let faulthandler write the stacks before the kill
        edge.proc.kill()
        raise AssertionError(f"edge did not stop on SIGTERM:\n{edge.log[-6000:]}") from None
