"""The bench: run the appliance against devices and a broker through scenarios, check every reading arrived
(from the broker's side, by sequence numbers), and write a report.

    python -m hil.bench BENCH.toml [--out results/] [--short]

A bench file (hil/benches/*.toml):

    [bench]
    name = "demo"
    config = "../../config.toml"   # the appliance's config (relative to the bench file)
    edge = "auto"                  # "auto": dist/edge when built, else `python -m edge`; or a command
    simulate = true                # serve the config's devices with hil.sim (their map from hil.mapgen):
                                   # TCP devices on 127.0.0.1, each RS-485 bus on a socat pty pair
    broker = "local"               # "local": a mosquitto of the bench's own on 127.0.0.1; or "host:port"

    [[scenario]]                   # in order; `short` values replace the others with --short (CI)
    kind = "steady"                # steady | outage | power_cut | low_power | reload | device_faults
                                   # | memory_pressure
    seconds = 60
    short = { seconds = 10 }

Scenarios and what passes:

    steady     polling and forwarding for `seconds`: every reading stored in that time is delivered (within
               30 s more), >= 99 % of them good
    outage     the broker stopped for `seconds` (local broker only), then back: the backlog drains within
               `drain` seconds (default: [uplink] backoff_max, the longest wait between two connection
               attempts, 300 s by default, plus 120 s)
    power_cut  `kills` SIGKILLs of the appliance at random moments `every` seconds apart, each followed by
               a restart: nothing committed before a kill is missing afterwards
    low_power  SIGUSR2: edge_low_power goes to 1, readings keep arriving in the uplink's sessions; SIGUSR2
               again returns to normal
    reload     SIGHUP: the config is reloaded (edge_config_reloads_total + 1) and readings keep flowing
    device_faults
               on a simulated RS-485 `bus` (default: the first), `faults` (hil.sim's control file; default:
               unit 2 dead, unit 3 slow by 0.2 s, CRC noise at 5 % on the others) for `seconds` after a
               baseline of `seconds`: counted from the broker by the readings' timestamps, every healthy
               device keeps >= `keep` (0.9) of its baseline rate of good readings (less the CRC noise),
               the dead one delivers bad-quality readings only, the slow one still good ones, the noise
               shows as bad frames; then, faults cleared, every device is good again within `recover`
               seconds (default: the breaker's longest pause, 60 s, plus 30 s)
    memory_pressure
               the appliance restarted inside a memory cgroup of `limit_mib` MiB (default 160; hil.cgroup)
               with a flood of `tags` (30000) low-priority tags on an extra simulated device and
               [governor] memory_soft = `soft_mib` MiB (26): the governor stretches the flood (x2 or more)
               and never the priority-0 groups, whose tags without a deadband deliver >= 90 % of their
               polls over `seconds` (counted at the broker); no OOM kill, still running, RSS under the
               governor's hard limit; then the normal appliance is started again. Skipped where no
               memory cgroup can be made (not root, neither a v1 memory controller nor systemd on v2)

and, over the whole run: the data messages' sequence numbers have no gap (a message seen twice is
counted, not a failure: delivery is at least once), and at the end nothing committed is left unsent.
The report goes to OUT/<name>-<time>/: report.md, report.json, and timeline.png (rates, backlog and RSS
over time; needs matplotlib) from metrics sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import shutil
import signal
import sys
import threading
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge.config import parse  # noqa: E402
from edge.store import dump, inspect  # noqa: E402
from hil.cgroup import Group, Unavailable, limited  # noqa: E402
from hil.mapgen import map_from_device, toml_text, write_map  # noqa: E402
from tests.support import (  # noqa: E402
    BrokerHandle,
    EdgeProcess,
    Subscriber,
    free_port,
    pty_pair,
    set_faults,
    start_broker,
    start_sim,
)

KINDS = ("steady", "outage", "power_cut", "low_power", "reload", "device_faults", "memory_pressure")


@dataclass
class Sample:
    t: float
    appended: float
    delivered: float
    backlog: float
    rss_mib: float


@dataclass
class Run:
    """What one bench run knows: the processes, the subscriber, the timeline, the scenario results."""

    out: Path
    cfg: dict[str, Any]
    config_path: Path
    edge_cmd: list[str]
    sub: Subscriber
    broker: BrokerHandle | None = None
    edge: EdgeProcess | None = None
    samples: list[Sample] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    resumes: set[int] = field(default_factory=set)  # where sequence numbers go on after an unclean stop
    t0: float = field(default_factory=time.monotonic)
    stop_sampling: threading.Event = field(default_factory=threading.Event)
    later: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # peers started mid-run
    controls: dict[str, Path] = field(default_factory=dict)  # simulated bus -> hil.sim's fault control

    @property
    def port(self) -> int:
        return int(self.cfg["metrics"]["port"])

    def m(self, name: str) -> float:
        """A metric summed over its labels (0 if absent); -1 while the endpoint is down (a restart)."""
        return _value(scrape(self.port), name)

    def start_edge(self, config: Path | None = None, prefix: tuple[str, ...] | list[str] = ()) -> None:
        self.edge = EdgeProcess(config or self.config_path, [*prefix, *self.edge_cmd])
        # a window is committed, or sent from RAM and acknowledged (memory-first: nothing to commit)
        names = ("edge_store_commits_total", "edge_store_blocks_direct_total")
        self.wait(lambda: max(self.m(n) for n in names) > 0, 120, "the appliance committing or forwarding")

    def stop_edge(self) -> None:
        if self.edge is not None and self.edge.proc.poll() is None:
            self.edge.proc.send_signal(signal.SIGTERM)
            self.edge.proc.wait(60)

    def window(self, seconds: float) -> tuple[int, int]:
        """The next `seconds`, as (t0, t1) in ns; returns once everything stored by its end is delivered."""
        t0 = time.time_ns()
        time.sleep(seconds)  # the measuring period itself
        t1 = time.time_ns()
        stored = self.m("edge_store_readings_appended_total")
        self.wait(lambda: self.m("edge_uplink_readings_delivered_total") >= stored, 60,
                  "the readings stored in the window delivered")
        return t0, t1

    def readings(self, t0: int, t1: int) -> Iterator[dict[str, Any]]:
        """The readings the subscriber received whose timestamps fall in [t0, t1)."""
        for msg in self.sub.data():
            yield from (r for r in msg["readings"] if t0 <= r["ts"] < t1)

    def per_device(self, t0: int, t1: int) -> dict[str, Counter[str]]:
        counts: dict[str, Counter[str]] = {}
        for r in self.readings(t0, t1):
            counts.setdefault(r["device"], Counter())[r["quality"]] += 1
        return counts

    def wait(self, cond: Any, timeout: float, what: str) -> float:
        t = time.monotonic()
        while not cond():
            if time.monotonic() - t > timeout:
                raise TimeoutError(f"{what}: not within {timeout:g} s")
            time.sleep(0.2)
        return time.monotonic() - t

    def rss(self) -> float:
        if self.edge is None or self.edge.proc.poll() is not None:
            return 0.0
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(self.edge.proc.pid)
            rss: int = sum(q.memory_info().rss for q in [p, *p.children()])
            return rss / 2**20
        return 0.0

    def sample_forever(self) -> None:
        while not self.stop_sampling.wait(0.5):
            d = scrape(self.port)
            self.samples.append(Sample(time.monotonic() - self.t0,
                                       _value(d, "edge_store_readings_appended_total"),
                                       _value(d, "edge_uplink_readings_delivered_total"),
                                       _value(d, "edge_store_backlog_readings"), self.rss()))

    def drained(self, timeout: float) -> float:
        """Seconds until the backlog is down to about two seconds of readings (what is normally committed
        but not yet acknowledged)."""
        def done() -> bool:
            d = scrape(self.port)
            rate = (d.get("edge_store_readings_appended_total", 0.0)
                    / max(1.0, d.get("edge_uptime_seconds", 0.0)))
            return bool(d) and 0 <= d.get("edge_store_backlog_readings", 0.0) <= max(20.0, 2 * rate)
        return self.wait(done, timeout, "backlog drained")

    def reconnect_bound(self) -> float:
        """Seconds the uplink may wait before its next connection attempt ([uplink] backoff_max, capped
        exponential backoff), plus two minutes to drain."""
        return float(parse(self.cfg).uplink.backoff_max) + 120.0



def _value(scraped: dict[str, float], name: str) -> float:
    return scraped.get(name, 0.0) if scraped else -1.0


def scrape(port: int) -> dict[str, float]:
    """Prometheus text -> {family name: value summed over its label sets}; {} when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            out[m[1]] = out.get(m[1], 0.0) + float(m[3])
            if m[2]:
                out[m[1] + m[2]] = float(m[3])
            if m[1] == "edge_poll_stretch":
                out["edge_poll_stretch_max"] = max(out.get("edge_poll_stretch_max", 0.0), float(m[3]))
            if m[1] == "edge_device_errors_total" and (kind := re.search(r'kind="([^"]*)"', m[2] or "")):
                key = f"errors:{kind[1]}"
                out[key] = out.get(key, 0.0) + float(m[3])
    return out


# --------------------------------------------------------------------------------------------- scenarios

def steady(run: Run, p: dict[str, Any]) -> dict[str, Any]:
    """Polling and forwarding for `seconds`; then what was stored in that time must be delivered (within
    30 s more: the last windows are still being committed and acknowledged)."""
    seconds = float(p.get("seconds", 60))
    polled0, stored0 = run.m("edge_device_readings_total"), run.m("edge_store_readings_appended_total")
    delivered0, msgs0 = run.m("edge_uplink_readings_delivered_total"), len(run.sub.data())
    time.sleep(seconds)
    polled = run.m("edge_device_readings_total") - polled0
    stored = run.m("edge_store_readings_appended_total") - stored0
    lag = run.wait(lambda: run.m("edge_uplink_readings_delivered_total") - delivered0 >= stored, 30,
                   "the readings stored in the period delivered")
    readings = [r for m in run.sub.data()[msgs0:] for r in m["readings"]]
    good = sum(r["quality"] == "good" for r in readings) / max(1, len(readings))
    return {"polled_per_s": polled / seconds, "stored_per_s": stored / seconds, "delivered_lag_s": lag,
            "good_share": good, "pass": stored > 0 and good >= 0.99}


def outage(run: Run, p: dict[str, Any]) -> dict[str, Any]:
    if run.broker is None:
        return {"pass": None, "skipped": "the broker is not the bench's own"}
    seconds = float(p.get("seconds", 600))
    port = run.broker.port
    run.broker.proc.terminate()
    run.broker.proc.wait(10)
    time.sleep(seconds)
    peak = run.m("edge_store_backlog_readings")
    run.broker = run.later.enter_context(start_broker(run.out / "mqtt", port))  # stopped when the run ends
    drain = run.drained(float(p.get("drain", run.reconnect_bound())))
    return {"outage_s": seconds, "backlog_peak_readings": peak, "drain_s": drain, "pass": peak > 0}


def unpacked_dirs(main: psutil.Process) -> set[Path]:
    """Where the single binary (main, or its Python child) unpacked itself: the _MEI* directories of the
    files it maps. None for the package."""
    out = set()
    for proc in [main, *main.children()]:
        with contextlib.suppress(psutil.Error):
            out |= {d for m in proc.memory_maps() for d in Path(m.path).parents if d.name.startswith("_MEI")}
    return out


def power_cut(run: Run, p: dict[str, Any]) -> dict[str, Any]:
    """SIGKILLs at random moments; after each, the blocks in the store (committed, not yet acknowledged)
    are read directly: every one of them must reach the subscriber once the appliance is back."""
    kills, every = int(p.get("kills", 5)), float(p.get("every", 5))
    rng = random.Random(int(p.get("seed", 7)))
    store = parse(run.cfg).store
    pending: set[int] = set()
    restarts = []
    for _ in range(kills):
        time.sleep(every * rng.uniform(0.5, 1.5))
        assert run.edge is not None
        main = psutil.Process(run.edge.proc.pid)
        ram = unpacked_dirs(main)  # the binary's: a power cut empties RAM, /dev/shm with it
        for proc in [*main.children(), main]:  # the binary: its Python child, then the bootloader
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        run.edge.proc.wait(10)
        for d in ram:
            shutil.rmtree(d, ignore_errors=True)
        pending |= {seq for seq, _ in dump(store.path, store.map_size, 0, 10**6)}
        # A block sent from RAM (memory-first) is never written; the store reserves numbers ahead of such
        # blocks (a lease) and, after a crash, goes on above it: the gap before that number holds nothing
        run.resumes.add(inspect(store.path, store.map_size).next_seq)
        t = time.monotonic()
        run.start_edge()
        restarts.append(time.monotonic() - t)
    drain = run.drained(float(p.get("drain", 120)))
    run.wait(lambda: pending <= run.sub.seqs(), 30, "every block committed before a kill delivered")
    return {"kills": kills, "restart_s_max": max(restarts), "drain_s": drain,
            "blocks_in_store_at_kills": len(pending), "missing": len(pending - run.sub.seqs()),
            "pass": pending <= run.sub.seqs()}


def low_power(run: Run, p: dict[str, Any]) -> dict[str, Any]:
    assert run.edge is not None
    run.edge.proc.send_signal(signal.SIGUSR2)
    on = run.wait(lambda: run.m("edge_low_power") == 1.0, 15, "low-power mode on")
    time.sleep(float(p.get("seconds", 30)))
    appended = run.m("edge_store_readings_appended_total")
    run.edge.proc.send_signal(signal.SIGUSR2)
    run.wait(lambda: run.m("edge_low_power") == 0.0, 15, "low-power mode off")
    flowing = run.wait(lambda: run.m("edge_store_readings_appended_total") > appended, 30, "readings")
    return {"switch_s": on, "readings_again_s": flowing, "pass": True}


def reload(run: Run, p: dict[str, Any]) -> dict[str, Any]:
    assert run.edge is not None
    before, appended = run.m("edge_config_reloads_total"), run.m("edge_store_readings_appended_total")
    run.edge.proc.send_signal(signal.SIGHUP)
    took = run.wait(lambda: run.m("edge_config_reloads_total") > before, 30, "config reloaded")
    run.wait(lambda: run.m("edge_store_readings_appended_total") > appended + 1, 30, "readings after reload")
    return {"reload_s": took, "pass": True}


DEFAULT_FAULTS = {"2": {"mode": "silent"}, "3": {"mode": "slow", "delay": 0.2},
                  "*": {"mode": "crc", "rate": 0.05}}
BREAKER_CAP = 60.0  # edge.poll.health.Breaker: the longest pause between probes of a dead device


def device_faults(run: Run, p: dict[str, Any]) -> dict[str, Any]:
    if not run.controls:
        return {"pass": None, "skipped": "no simulated RS-485 bus in the config"}
    bus = str(p.get("bus", next(iter(run.controls))))
    faults = {str(k): v for k, v in p.get("faults", DEFAULT_FAULTS).items()}
    seconds, keep = float(p.get("seconds", 60)), float(p.get("keep", 0.9))
    units = {d["name"]: str(d["unit"]) for d in run.cfg["device"] if d.get("bus") == bus}
    mode = {name: faults.get(u, faults.get("*", {})).get("mode", "ok") for name, u in units.items()}
    noise = max((float(f.get("rate", 1.0)) for f in faults.values() if f.get("mode") == "crc"), default=0.0)
    base = run.per_device(*run.window(seconds))
    frames0 = run.m("errors:bad_frame")
    set_faults(run.controls[bus], faults)
    time.sleep(float(p.get("settle", 3)))  # the dead unit's first timeouts, until its breaker opens
    hit = run.per_device(*run.window(seconds))
    frames = run.m("errors:bad_frame") - frames0
    cleared = time.time_ns()
    set_faults(run.controls[bus], {})

    def good(counts: dict[str, Counter[str]], dev: str) -> int:
        return counts.get(dev, Counter())["good"]

    def recovered() -> bool:
        return set(units) <= {r["device"] for r in run.readings(cleared, 2**63) if r["quality"] == "good"}

    recover = run.wait(recovered, float(p.get("recover", BREAKER_CAP + 30)), "every device good again")
    checks = {}
    for dev, m in mode.items():
        if m in ("ok", "crc"):
            need = keep * good(base, dev) * (1 - (noise if m == "crc" else 0.0))
            checks[dev] = good(hit, dev) >= need > 0
        elif m in ("silent", "drop"):
            checks[dev] = sum(hit.get(dev, Counter()).values()) > 0 and good(hit, dev) == 0
        else:
            checks[dev] = good(hit, dev) > 0
    return {"faults": {d: mode[d] for d in units},
            "good_per_s_before": {d: round(good(base, d) / seconds, 2) for d in units},
            "good_per_s_faulty": {d: round(good(hit, d) / seconds, 2) for d in units},
            "bad_frames": frames, "recover_s": recover, "checks": checks,
            "pass": all(checks.values()) and (frames > 0 or noise == 0)}


def memory_pressure(run: Run, p: dict[str, Any]) -> dict[str, Any]:
    limit = int(p.get("limit_mib", 160)) << 20
    try:
        with limited(limit, "edge-bench") as group:
            try:
                return _flooded(run, p, group, limit)
            finally:
                run.stop_edge()  # out of the group before it is removed
    except Unavailable as e:
        return {"pass": None, "skipped": str(e)}
    finally:
        run.start_edge()  # the normal appliance again, outside the group


def _flooded(run: Run, p: dict[str, Any], group: Group, limit: int) -> dict[str, Any]:
    n, seconds = int(p.get("tags", 30000)), float(p.get("seconds", 60))
    cfg = json.loads(json.dumps(run.cfg))
    write_map(run.out / "flood-map.toml", [{"id": 1, "points": [
        {"table": "holding", "address": a, "type": "uint16", "value": 7.0} for a in range(n)]}])
    with start_sim(run.out / "flood-map.toml") as sim:
        cfg["device"].append({"name": "flood", "host": "127.0.0.1", "port": sim.port, "unit": 1,
                              "timeout": "2s", "interval": "1s",
                              "group": {"bulk": {"interval": "1s", "priority": 1}},
                              "tag": [{"name": f"b{a}", "address": a, "group": "bulk"} for a in range(n)]})
        cfg.setdefault("governor", {})["memory_soft"] = f"{int(p.get('soft_mib', 26))}MiB"
        flood_path = run.out / "config-flood.toml"
        flood_path.write_text(toml_text(cfg) + "\n")
        run.stop_edge()
        run.start_edge(flood_path, group.prefix)
        assert run.edge is not None
        since = time.monotonic() - run.t0
        flood = 'edge_poll_stretch{device="flood",group="bulk"}'
        run.wait(lambda: run.m("edge_governor_memory_level") >= 1, 120, "the governor above its soft limit")
        run.wait(lambda: run.m(flood) >= 2, 60, "the flood stretched")
        t0, t1 = run.window(seconds)
        scraped = scrape(run.port)
        alive = run.edge.proc.poll() is None
        run.stop_edge()
    counts = Counter(f"{r['device']}/{r['tag']}" for r in run.readings(t0, t1))
    config = parse(run.cfg)  # the priority-0 devices: everything but the flood
    expected = {f"{d.name}/{t.name}": (t1 - t0) / 1e9 / g.interval for d in config.devices for t in d.tags
                for g in d.groups if g.name == t.group and not (t.deadband or t.deadband_percent)}
    short = {k: counts[k] for k, e in expected.items() if counts[k] < 0.9 * e - 1}
    stretched = {k: v for k, v in scraped.items()
                 if k.startswith("edge_poll_stretch{") and k != flood and v != 1}
    rss = max((s.rss_mib for s in run.samples if s.t >= since), default=0.0)
    hard = scraped.get('edge_governor_limit_bytes{limit="hard"}', limit * 0.85) / 2**20
    result = {"limit_mib": limit >> 20, "flood_tags": n, "flood_stretch": scraped.get(flood),
              "peak_rss_mib": rss, "hard_limit_mib": hard, "cgroup_peak_mib": (group.peak() or 0) / 2**20,
              "oom_kills": group.oom_kills(), "alive": alive,
              "priority0_stretched": stretched, "priority0_tags_short": short}
    result["pass"] = (alive and result["oom_kills"] == 0 and rss < hard and not stretched and not short
                      and bool(expected))
    return result


SCENARIOS = {"steady": steady, "outage": outage, "power_cut": power_cut, "low_power": low_power,
             "reload": reload, "device_faults": device_faults, "memory_pressure": memory_pressure}


# ------------------------------------------------------------------------------------------------ checks

def sequence_check(sub: Subscriber, resumes: set[int]) -> dict[str, Any]:
    """Every sequence number once at least, none skipped but where a restart after a kill resumed
    (`resumes`: above the lease of numbers sent from RAM, a gap that holds no block)."""
    seqs = [m["seq"] for m in sub.data()]
    unique = sorted(set(seqs))
    gaps = [(a, b) for a, b in pairwise(unique) if b != a + 1 and b not in resumes]
    return {"messages": len(seqs), "repeated": len(seqs) - len(unique),
            "first": unique[0] if unique else None, "last": unique[-1] if unique else None,
            "resumed": sum(1 for a, b in pairwise(unique) if b != a + 1 and b in resumes),
            "gaps": gaps[:20], "pass": bool(unique) and not gaps}


# ------------------------------------------------------------------------------------------------ report

def plot(run: Run, path: Path) -> str:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "timeline.png not drawn: matplotlib is not installed (pip install '.[bench]')"
    s = run.samples
    t = [x.t for x in s]
    rate = [0.0] + [(b.appended - a.appended) / (b.t - a.t) if b.appended >= a.appended else 0.0
                    for a, b in pairwise(s)]
    sent = [0.0] + [(b.delivered - a.delivered) / (b.t - a.t) if b.delivered >= a.delivered else 0.0
                    for a, b in pairwise(s)]
    fig, ax = plt.subplots(3, 1, sharex=True, figsize=(10, 7))
    ax[0].plot(t, rate, label="stored /s")
    ax[0].plot(t, sent, label="delivered /s")
    ax[0].legend()
    ax[0].set_yscale("symlog")  # a few readings/s beside a flood of tens of thousands
    ax[1].plot(t, [x.backlog for x in s])
    ax[1].set_ylabel("backlog (readings)")
    ax[1].set_yscale("symlog")
    ax[2].plot(t, [x.rss_mib for x in s])
    ax[2].set_ylabel("RSS (MiB)")
    ax[2].set_xlabel("s")
    for r in run.results:
        for a in ax:
            a.axvline(r["start_s"], color="grey", lw=0.5)
        ax[0].annotate(r["kind"], (r["start_s"], 0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return "timeline.png"


def report(run: Run, name: str, seq: dict[str, Any], plot_note: str, verdict: bool) -> str:
    lines = [f"# Bench {name}: {'PASS' if verdict else 'FAIL'}", "",
             f"Appliance: `{' '.join(run.edge_cmd)}`; {len(run.samples)} samples over "
             f"{run.samples[-1].t if run.samples else 0:.0f} s.", "",
             "| scenario | pass | figures |", "|---|---|---|"]
    for r in run.results:
        figures = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in r.items() if k not in ("kind", "pass", "start_s"))
        lines.append(f"| {r['kind']} | {r['pass']} | {figures} |")
    lines += ["", f"Sequence numbers seen by the subscriber: {seq['messages']} messages, "
              f"first {seq['first']}, last {seq['last']}, repeated {seq['repeated']}, "
              f"resumed above a lease after a kill {seq['resumed']}, other gaps {seq['gaps'] or 'none'}: "
              f"{'PASS' if seq['pass'] else 'FAIL'}.", "", plot_note, ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main

def edge_command(spec: str) -> list[str]:
    if spec != "auto":
        return spec.split()
    binary = ROOT / "dist" / "edge"
    return [str(binary)] if binary.exists() else [sys.executable, "-m", "edge"]


@contextlib.contextmanager
def peers(bench: dict[str, Any], cfg: dict[str, Any], out: Path) -> Iterator[tuple[BrokerHandle | None,
                                                                                   dict[str, Path]]]:
    """The simulated devices and the local broker, as the bench file asks; fills in their ports. Yields
    the broker (None when it is not the bench's own) and each simulated bus's fault-control file."""
    controls: dict[str, Path] = {}
    with contextlib.ExitStack() as stack:
        if bench.get("simulate", True):
            probe = parse({**cfg, "appliance": {"id": "x", "state_dir": str(out)}})
            tcp = [d for d in probe.devices if d.host is not None]
            if tcp:
                write_map(out / "map.toml", [map_from_device(d) for d in tcp])
                sim = stack.enter_context(start_sim(out / "map.toml"))
                for d in cfg["device"]:
                    if "host" in d:  # each keeps its own connection, as at its own address
                        d["host"], d["port"] = "127.0.0.1", sim.port
                        d.setdefault("shared_connection", False)
            for bus in probe.buses:  # one pty pair per bus: the appliance on one end, hil.sim on the other
                here = out / f"bus-{bus.name}"
                here.mkdir()
                write_map(here / "map.toml", [map_from_device(d) for d in probe.devices if d.bus == bus.name])
                controls[bus.name] = here / "faults.json"
                client, server = stack.enter_context(pty_pair(here))
                stack.enter_context(start_sim(
                    here / "map.toml", tcp=False, rtu_path=server, baud=bus.baud, control=controls[bus.name],
                    extra_args=["--parity", bus.parity, "--stopbits", str(bus.stop_bits),
                                "--bytesize", str(bus.byte_size)]))
                next(b for b in cfg["bus"] if b["name"] == bus.name)["port"] = client
        broker = None
        if bench.get("broker", "local") == "local":
            broker = stack.enter_context(start_broker(out / "mqtt"))
            cfg.setdefault("uplink", {}).update(host="127.0.0.1", port=broker.port)
        else:
            host, _, port = str(bench["broker"]).rpartition(":")
            cfg.setdefault("uplink", {}).update(host=host, port=int(port))
        yield broker, controls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hil.bench", description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--short", action="store_true", help="the scenarios' short values (CI)")
    args = ap.parse_args(argv)
    doc = tomllib.loads(args.bench.read_text())
    bench = doc.get("bench", {})
    name = str(bench.get("name", args.bench.stem))
    with open((args.bench.parent / bench.get("config", "config.toml")).resolve(), "rb") as f:
        cfg = tomllib.load(f)
    out = (args.out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()  # state_dir: absolute
    out.mkdir(parents=True)
    cfg.setdefault("appliance", {})["state_dir"] = str(out / "state")
    cfg.setdefault("store", {})
    cfg["metrics"] = {**cfg.get("metrics", {}), "listen": "127.0.0.1", "port": free_port()}
    prefix = cfg.get("uplink", {}).get("topic_prefix", "edge")
    with peers(bench, cfg, out) as (broker, controls):
        config_path = out / "config.toml"
        config_path.write_text(toml_text(cfg) + "\n")
        uplink = cfg["uplink"]
        sub = Subscriber(int(uplink["port"]), f"{prefix}/{cfg['appliance']['id']}/data")
        run = Run(out, cfg, config_path, edge_command(str(bench.get("edge", "auto"))), sub, broker,
                  controls=controls)
        sampler = threading.Thread(target=run.sample_forever, daemon=True)
        try:
            run.start_edge()
            sampler.start()
            for sc in doc.get("scenario", []):
                kind = sc["kind"]
                if kind not in KINDS:
                    raise SystemExit(f"hil.bench: scenario kind {kind!r} not in {KINDS}")
                params = {**sc, **(sc.get("short", {}) if args.short else {})}
                start = time.monotonic() - run.t0
                print(f"hil.bench: {kind} ...", file=sys.stderr, flush=True)
                try:
                    result = SCENARIOS[kind](run, params)
                except (TimeoutError, RuntimeError, OSError) as e:  # a FAIL in the report, not a crash
                    result = {"pass": False, "error": str(e)}
                if run.edge is None or run.edge.proc.poll() is not None:  # died on its own: FAIL, restart
                    log = run.edge.log.splitlines()[-20:] if run.edge else []
                    result = {**result, "pass": False, "exited": "\n".join(log)}
                    run.start_edge()
                run.results.append({"kind": kind, "start_s": start, **result})
                shown = "FAIL" if result["pass"] is False else "PASS"
                print(f"hil.bench: {kind}: {shown}", file=sys.stderr)
                if result["pass"] is False:
                    print(json.dumps(result, indent=1, default=str), file=sys.stderr)
            try:
                end_drain: float | str = run.drained(run.reconnect_bound())
            except TimeoutError as e:
                end_drain = str(e)
                run.results.append({"kind": "end", "start_s": time.monotonic() - run.t0, "pass": False,
                                    "error": str(e)})
        finally:
            run.stop_sampling.set()
            run.stop_edge()
            time.sleep(1.0)  # the last PUBACKed messages reach the subscriber
            seq = sequence_check(sub, run.resumes)
            sub.close()
            run.later.close()
    verdict = seq["pass"] and all(r["pass"] is not False for r in run.results)
    note = plot(run, out / "timeline.png")
    (out / "report.md").write_text(report(run, name, seq, note, verdict))
    (out / "report.json").write_text(json.dumps({
        "name": name, "pass": verdict, "edge": run.edge_cmd, "scenarios": run.results, "sequence": seq,
        "end_drain_s": end_drain, "samples": [s.__dict__ for s in run.samples]}, indent=1))
    shutil.rmtree(out / "state", ignore_errors=True)
    print(f"hil.bench: {'PASS' if verdict else 'FAIL'}: {out / 'report.md'}")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
