"""What the tests share: real peers and the helpers around them.

Peers: the simulated device (python -m hil.sim) in a subprocess, socat pty pairs, map and fault-control
files, mosquitto and a subscriber, a CA, the appliance as a process (EdgeProcess) with its metrics.

    point = {"table": "holding", "address": 0, "type": "float32", "value": 1.0}
    write_map(tmp / "map.toml", [{"id": 1, "invalid": [[100, 109]], "points": [point]}])
    with start_sim(tmp / "map.toml", control=tmp / "faults.json") as sim:   # sim.host, sim.port
        set_faults(tmp / "faults.json", {"1": {"mode": "silent"}})
    with pty_pair(tmp) as (client, server), start_sim(map, tcp=False, rtu_path=server, baud=9600) as sim:
        ...                                                                  # sim.path == server

Helpers: a poller's sink that can be awaited (Collector) and config building for poller tests; the
appliance run in this process (run_app, until); a pipeline config on one simulated pump (config_dict,
simulated_pump) and the checks of what its subscriber received (check_delivery); the appliance's stop line
(STOPPED).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import os
import re
import select
import shutil
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
from paho.mqtt.enums import CallbackAPIVersion

from edge.app import Appliance
from edge.config import Config, parse
from edge.config import tag_id as crc_id
from edge.reading import Reading
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


class OneConnectionGateway:
    """A cheap Modbus gateway on 127.0.0.1 fronting `upstream` (the simulator's units): it serves ONE
    connection at a time (another is accepted, closed at once and counted in `refused`) and passes its
    bytes on, each reply `delay` seconds late (the RS-485 side's wire time)."""

    def __init__(self, upstream: tuple[str, int], delay: float = 0.0) -> None:
        self.upstream, self.delay = upstream, delay
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0  # accepted, refused ones included
        self.refused = 0
        self.busy = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.busy.is_set():
                self.refused += 1
                conn.close()
                continue
            self.busy.set()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, socket.create_connection(self.upstream, 5) as up:
                threading.Thread(target=self._replies, args=(up, conn), daemon=True).start()
                while data := conn.recv(4096):
                    up.sendall(data)
        except OSError:
            pass
        finally:
            self.busy.clear()

    def _replies(self, up: socket.socket, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := up.recv(4096):
                time.sleep(self.delay)  # the simulated wire time of the gateway's serial side
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def one_connection_gateway(upstream: tuple[str, int], delay: float = 0.0) -> Iterator[OneConnectionGateway]:
    gateway = OneConnectionGateway(upstream, delay)
    try:
        yield gateway
    finally:
        gateway.close()


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


# -------------------------------------------------------------------------------------------- HTTP

class Files(http.server.SimpleHTTPRequestHandler):
    """The files of a directory over HTTP, without a log line per request."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_server(handler: Callable[..., http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 with `handler`, in a thread of its own: its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def serve(directory: Path, kind: type[Files] = Files) -> contextlib.AbstractContextManager[int]:
    """The files of `directory` over HTTP on 127.0.0.1: the port."""
    return http_server(functools.partial(kind, directory=str(directory)))


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


@contextlib.contextmanager
def start_postgres() -> Iterator[str]:
    """PostgreSQL from Debian: a private cluster in a temporary directory, on 127.0.0.1:port, trust
    authentication, user and database "edge"; ready when the server says so. Run as the postgres user
    when this is root (the server refuses root). Yields the connection string."""
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    home = Path(tempfile.mkdtemp(prefix="edge-pg-"))
    as_pg: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
        as_pg = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
    data, port = home / "data", free_port()
    proc = None
    try:
        subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "edge",
                        "--no-sync"], check=True, capture_output=True)
        proc = subprocess.Popen([*as_pg, str(bindir / "postgres"), "-D", str(data), "-k", str(home), "-p",
                                 str(port), "-c", "listen_addresses=127.0.0.1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        _read_until(proc, proc.stderr, b"ready to accept connections", READY_TIMEOUT)
        log = home / "postgres.log"
        threading.Thread(target=lambda: log.write_bytes(proc.stderr.read() if proc and proc.stderr else b""),
                         daemon=True).start()
        dsn = f"host=127.0.0.1 port={port} user=edge dbname=postgres"
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "edge", "edge"],
                       check=True, capture_output=True)
        yield dsn.replace("dbname=postgres", "dbname=edge")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(home, ignore_errors=True)


class Subscriber:
    """A persistent-session QoS 1 subscriber (paho, its own thread) collecting every message."""

    def __init__(self, port: int, topic: str = "#", tls_ca: Path | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.connected = threading.Event()
        self.topic = topic
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sub-{port}",
                                  clean_session=False)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]  # paho takes seconds as floats
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self.connected.wait(15):
            raise TimeoutError("subscriber did not connect")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(self.topic, qos=1)
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def seqs(self) -> set[int]:
        """The distinct sequence numbers of the data messages received."""
        return {m["seq"] for m in self.data()}

    def data(self) -> list[dict[str, Any]]:
        """The data messages; a block sent in parts ([uplink] max_message_bytes) as one message, once all
        its parts came (again if they come again: at-least-once)."""
        with self.cond:
            docs = [json.loads(p) for t, p in self.messages if t.endswith("/data")]
        out: list[dict[str, Any]] = []
        parts: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
        for doc in docs:
            if "parts" not in doc:
                out.append(doc)
                continue
            got = parts.setdefault((doc["appliance"], doc["seq"]), {})
            got.setdefault(doc["part"], doc)
            if len(got) == doc["parts"]:
                ordered = [got[k] for k in range(doc["parts"])]
                out.append({"appliance": doc["appliance"], "seq": doc["seq"],
                            "count": sum(m["count"] for m in ordered),
                            "readings": [r for m in ordered for r in m["readings"]]})
        return out

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
    for section in ("appliance", "store", "uplink", "metrics", "governor", "commands", "update"):
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


# --------------------------------------------------------------------------------------------------
# Poller tests

class Collector:
    """A sink that keeps every reading and lets a test await a condition on them (no sleeps)."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.batches: list[tuple[float, list[Reading]]] = []
        self._changed = asyncio.Event()

    def __call__(self, readings: list[Reading]) -> None:
        self.readings.extend(readings)
        self.batches.append((time.monotonic(), readings))
        self._changed.set()

    async def until(self, predicate: Callable[[list[Reading]], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.readings):
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met after {timeout} s; last: {self.readings[-5:]}")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue

    def of(self, tag: int) -> list[Reading]:
        return [r for r in self.readings if r[0] == tag]


def config(devices: list[dict[str, Any]], buses: list[dict[str, Any]] | None = None) -> Config:
    return parse({"appliance": {"id": "test", "state_dir": "/tmp/edge-test"}, "device": devices,
                  "bus": buses or []})


def tag_id(cfg: Config, device: str, tag: str) -> int:
    """The id of a configured tag (StopIteration if the device has no such tag)."""
    d = next(d for d in cfg.devices if d.name == device)
    return next(crc_id(d.name, t.name) for t in d.tags if t.name == tag)


# --------------------------------------------------------------------------------------------------
# The appliance in this process, on one simulated pump, and what its subscriber receives

T0 = 1_790_000_000_000_000_000
MAP = [{"id": 1, "points": [
    {"table": "holding", "address": 0, "type": "uint32", "wave": "counter", "step": 100.0},
    {"table": "holding", "address": 2, "type": "float32", "value": 21.5},
    {"table": "holding", "address": 4, "type": "string", "length": 6, "value": "PUMP-1"}]}]
TAGS = [{"name": "count", "address": 0, "type": "uint32"},
        {"name": "temp", "address": 2, "type": "float32", "unit": "degC"},
        {"name": "name", "address": 4, "type": "string", "length": 6}]


def config_dict(tmp: Path, sim_port: int, broker_port: int, **uplink: Any) -> dict[str, Any]:
    return {"appliance": {"id": "t1", "state_dir": str(tmp / "state")},
            "device": [{"name": "pump", "host": "127.0.0.1", "port": sim_port, "interval": "50ms",
                        "timeout": "300ms", "tag": TAGS}],
            "store": {"commit_interval": "200ms", "map_size": "64MiB"},
            "uplink": {"host": "127.0.0.1", "port": broker_port, "backoff_min": "100ms",
                       "backoff_max": "500ms", "publish_timeout": "3s", **uplink},
            "metrics": {"port": 0}}


@contextlib.contextmanager
def simulated_pump(tmp: Path) -> Iterator[int]:
    write_map(tmp / "map.toml", MAP)
    with start_sim(tmp / "map.toml") as sim:
        assert sim.port is not None
        yield sim.port


def run_app(cfg: dict[str, Any], body: Callable[[Appliance], Any]) -> Appliance:
    """Run the appliance in this process while `body(app)` (a coroutine function) runs; then stop it."""
    app_box: list[Appliance] = []

    async def main() -> None:
        app = Appliance(parse(cfg))
        app_box.append(app)
        task = asyncio.create_task(app.run(), name="appliance")
        try:
            await body(app)
        finally:
            app.stopping.set()
            await asyncio.wait_for(task, 30)

    asyncio.run(main())
    return app_box[0]


async def until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    """Re-check a condition on the appliance's counters until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)


def received(sub: Subscriber) -> dict[int, dict[str, Any]]:
    """seq -> message; a duplicate (at-least-once) must be identical."""
    out: dict[int, dict[str, Any]] = {}
    for msg in sub.data():
        if msg["seq"] in out:
            assert out[msg["seq"]] == msg
        out[msg["seq"]] = msg
    return out


def delivered_count(sub: Subscriber) -> int:
    return sum(m["count"] for m in received(sub).values())



def check_values_and_order(msgs: dict[int, dict[str, Any]]) -> None:
    counts = []
    for seq in sorted(msgs):
        m = msgs[seq]
        assert m["appliance"] == "t1" and m["count"] == len(m["readings"])
        for r in m["readings"]:
            assert r["device"] == "pump" and r["quality"] == "good"
            if r["tag"] == "temp":
                assert (r["value"], r["unit"]) == (21.5, "degC")
            elif r["tag"] == "name":
                assert r["value"] == "PUMP-1"
            else:
                counts.append((r["ts"], r["value"]))
    assert [ts for ts, _ in counts] == sorted(ts for ts, _ in counts)  # order per tag kept
    assert [v for _, v in counts] == sorted(v for _, v in counts)  # the device's counter only rises


def check_delivery(sub: Subscriber) -> dict[int, dict[str, Any]]:
    """The messages received: contiguous sequence numbers (no block skipped), values and order right."""
    msgs = received(sub)
    seqs = sorted(msgs)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # contiguous: no block skipped
    check_values_and_order(msgs)
    return msgs


STOPPED = re.compile(r"stopped: (\d+) readings polled, (\d+) stored, (\d+) delivered, (\d+) in the store's "
                     r"backlog, (\d+) dropped")

# 8N2: 11 bits per character like 8E1 (Modbus requires 2 stop bits without parity); ptys refuse parity.
LINE = {"parity": "N", "stop_bits": 2}
