"""The governor: keeps the appliance inside its memory and CPU budget, and runs low-power mode.

Limits come from [governor] and from the cgroup the process lives in (systemd's MemoryHigh, MemoryMax,
CPUQuota), read once at start:

    cgroup v2: <mount>/<path from /proc/self/cgroup "0::">/memory.high, memory.max, cpu.max
    cgroup v1: memory/<path>/memory.limit_in_bytes (MemoryMax; v1 has no MemoryHigh),
               cpu/<path>/cpu.cfs_quota_us / cpu.cfs_period_us

    soft memory limit = [governor] memory_soft, else memory.high, else 60 % of memory.max
    hard memory limit = [governor] memory_hard, else 85 % of memory.max
    CPU budget        = [governor] cpu_budget (fraction of one core), capped by the cgroup quota

Every `tick` seconds it samples its own RSS and CPU time (psutil). Decisions use the median RSS of the
last `window` seconds and the CPU used over that window, never a single noisy sample, and need a full
window before the first one. Every minute, and at every decision above normal, it collects garbage and
returns free heap pages to the system (release_memory). Levels, each entered and left with one log
line and visible as metrics:

    normal    nothing changed
    soft      RSS above the soft limit: poll groups with priority >= 1 stretched x2 (again each window
              while above, up to max_stretch), the open window committed at once (its readings leave
              RAM), release_memory()
    shed      RSS above the hard limit: the lowest-priority groups (the highest priority number > 0)
              are stopped until RSS is back under the soft limit
    CPU above budget: every group's interval stretched by used/budget (up to max_stretch); relaxed
              step by step once under 70 % of the budget
    recovery  below 90 % of the soft limit (and CPU under budget): back to normal, one step per window

Low-power mode (on battery via psutil.sensors_battery(), inside a [governor.low_power] schedule
window, while the control file exists, or toggled by SIGUSR2) multiplies every poll interval by
interval_factor, uses [store] low_power_commit_interval (fewer, larger commits: fewer flash writes),
and makes the uplink work in sessions (connect, drain, disconnect) every uplink_session_interval.

The governor steers by one immutable value, its Policy (edge.policy), replaced whenever a decision
changes it; poll, store and uplink read it at each turn of their loops. It never touches a stage. On a
config reload it is reconfigured (its [governor] section, the store's commit intervals, the poll
priorities) and keeps its state: low power, stretches and levels carry over to the new stages.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import gc
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.config import Config, LowPowerConfig
from edge.policy import Policy

log = logging.getLogger("edge.govern")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameters
LEVELS = ("normal", "soft", "shed")  # memory levels, in order
RELEASE_EVERY = 60.0  # seconds between release_memory() calls in normal operation
_libc: ctypes.CDLL | None = None


def tune_allocator() -> None:
    """glibc only (a no-op elsewhere). Fixed thresholds instead of glibc's dynamic ones, which rise after
    a large buffer is freed (a parsed config, a block, a payload) and then leave every later large buffer
    on the heap, where freed memory stays resident: buffers of 128 KiB and more are mapped and unmapped
    on free, and the heap is trimmed once 256 KiB at its top are free."""
    global _libc  # noqa: PLW0603
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library it runs on
        libc.malloc_trim, libc.mallopt  # noqa: B018  (musl has neither)
    except (OSError, AttributeError):
        return
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 256 * 1024)
    _libc = libc


def _median(values: list[int]) -> float:
    """statistics.median without importing statistics (it loads decimal and fractions, RAM held for good).

    >>> _median([3, 1, 2]), _median([4, 1, 3, 2])
    (2, 2.5)
    """
    s = sorted(values)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def release_memory() -> None:
    """Collect cycles, then hand the allocator's free pages back to the system (glibc malloc_trim)."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


@dataclass(frozen=True)
class Limits:
    memory_max: int | None = None
    memory_high: int | None = None
    cpu_cores: float | None = None  # quota / period
    source: str = "none"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _bytes(text: str | None) -> int | None:
    if text is None or text == "max":
        return None
    value = int(text)
    return None if value >= 1 << 60 else value  # v1 "unlimited" is a huge number


def read_limits(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> Limits:
    """The memory and CPU limits of this process's cgroup (v2, else v1); Limits() where there are none."""
    lines = (_read(proc) or "").splitlines()
    v1 = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (root / path.lstrip("/") / "memory.max").exists():
            d = root / path.lstrip("/")
            cpu = (_read(d / "cpu.max") or "max 100000").split()
            return Limits(_bytes(_read(d / "memory.max")), _bytes(_read(d / "memory.high")),
                          None if cpu[0] == "max" else int(cpu[0]) / int(cpu[1]), "cgroup2")
        for c in controllers.split(","):
            v1[c] = path.lstrip("/")
    if "memory" in v1 or "cpu" in v1:
        mem = _bytes(_read(root / "memory" / v1.get("memory", "") / "memory.limit_in_bytes"))
        cpu_dir = root / "cpu" / v1.get("cpu", "")
        quota = int(_read(cpu_dir / "cpu.cfs_quota_us") or -1)
        period = int(_read(cpu_dir / "cpu.cfs_period_us") or 100000)
        return Limits(mem, None, quota / period if quota > 0 else None, "cgroup1")
    return Limits()


def in_schedule(windows: tuple[tuple[str, str], ...], now: dt.datetime) -> bool:
    """Is local time `now` inside one of the ("HH:MM", "HH:MM") windows (which may wrap midnight)?

    >>> in_schedule((("22:00", "06:00"),), dt.datetime(2026, 1, 1, 23, 30))
    True
    >>> in_schedule((("22:00", "06:00"),), dt.datetime(2026, 1, 1, 12, 0))
    False
    """
    hm = now.strftime("%H:%M")
    return any((a <= hm < b) if a <= b else (hm >= a or hm < b) for a, b in windows)


class Sampler:
    """This process's anonymous RSS (bytes) and CPU time (seconds).

    RSS minus its file-backed part: the store's memory-mapped pages and the shared libraries are clean
    file pages the kernel reclaims under pressure (before any OOM kill), so they are not pressure.
    """

    def __init__(self) -> None:
        self.proc: Any = None

    def __call__(self) -> tuple[int, float]:
        if self.proc is None:
            import psutil  # noqa: PLC0415 (after READY=1: the governor starts then)

            self.proc = psutil.Process()
        with self.proc.oneshot():
            t = self.proc.cpu_times()
            m = self.proc.memory_info()
            return int(m.rss - getattr(m, "shared", 0)), float(t.user + t.system)


@dataclass(frozen=True, slots=True)
class GovernorSnapshot:
    level: str
    rss: int
    cpu: float
    decisions: int
    soft: int | None
    hard: int | None


class Governor:
    def __init__(self, config: Config, *, limits: Limits | None = None,
                 sample: Callable[[], tuple[int, float]] | None = None, tick: float = 1.0,
                 battery: Callable[[], bool] | None = None) -> None:
        self.limits = limits if limits is not None else read_limits()
        self.sample = sample or Sampler()
        self.tick = tick
        self.on_battery = battery or _on_battery
        self.level = "normal"
        self.memory_stretch = 1.0
        self.cpu_stretch = 1.0
        self.shed_priority: int | None = None  # groups with priority >= this are stopped
        self.low_power = False
        self.forced_low_power: bool | None = None  # SIGUSR2 toggles
        self.commit_now = 0
        self.rss = 0
        self.cpu = 0.0
        self.decisions = 0
        self.samples: deque[tuple[float, int, float]] = deque(maxlen=2)
        self._configure(config)
        self.policy = self._policy()

    def _configure(self, config: Config) -> None:
        cfg = self.cfg = config.governor
        self.store_cfg = config.store
        self.priorities = sorted({g.priority for d in config.devices for g in d.groups if g.priority > 0})
        lim = self.limits
        self.soft = (cfg.memory_soft or lim.memory_high
                     or (int(lim.memory_max * 0.6) if lim.memory_max else None))
        self.hard = cfg.memory_hard or (int(lim.memory_max * 0.85) if lim.memory_max else None)
        self.cpu_budget = min(cfg.cpu_budget, lim.cpu_cores or cfg.cpu_budget)
        n = max(2, round(cfg.window / self.tick))
        if self.samples.maxlen != n:
            self.samples = deque(self.samples, maxlen=n)
        log.info("governor: limits %s: soft %s, hard %s, CPU budget %.0f %% of a core", lim.source,
                 _mib(self.soft), _mib(self.hard), 100 * self.cpu_budget)

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: new limits, intervals and priorities; low power and stretches carry over
        (a shed priority that no longer exists is lifted)."""
        self._configure(config)
        if self.shed_priority is not None and self.shed_priority not in self.priorities:
            self.shed_priority = next((p for p in self.priorities if p > self.shed_priority), None)
        self._low_power()
        self.policy = self._policy()

    def current(self) -> Policy:
        """The policy in force (what stages read at each turn of their loops)."""
        return self.policy

    def snapshot(self) -> GovernorSnapshot:
        return GovernorSnapshot(self.level, self.rss, self.cpu, self.decisions, self.soft, self.hard)

    def _policy(self) -> Policy:
        lp, store, low = self.cfg.low_power, self.store_cfg, self.low_power
        return Policy(low_power=low, cpu_stretch=self.cpu_stretch, memory_stretch=self.memory_stretch,
                      low_power_factor=lp.interval_factor if low else 1.0, shed_priority=self.shed_priority,
                      commit_interval=store.low_power_commit_interval if low else store.commit_interval,
                      session_interval=lp.uplink_session_interval if low else None,
                      commit_now=self.commit_now)

    def toggle_low_power(self) -> None:
        self.forced_low_power = not (self.forced_low_power if self.forced_low_power is not None
                                     else self.low_power)
        self.step(time.monotonic(), sample=False)

    async def run(self) -> None:
        import asyncio  # noqa: PLC0415

        released = -RELEASE_EVERY
        while True:
            now = time.monotonic()
            self.step(now)
            if now - released >= RELEASE_EVERY:
                release_memory()  # what start-up and bursts freed leaves RAM, not only under pressure
                released = now
            await asyncio.sleep(self.tick)

    def step(self, now: float, sample: bool = True) -> None:
        if sample:
            rss, cpu = self.sample()
            self.samples.append((now, rss, cpu))
        self._low_power()
        if len(self.samples) == self.samples.maxlen:
            t0, _, c0 = self.samples[0]
            t1, _, c1 = self.samples[-1]
            self.rss = int(_median([s[1] for s in self.samples]))
            self.cpu = (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0
            if self._memory() | self._cpu():
                self.samples.clear()  # judge the next decision on fresh samples only
        policy = self._policy()
        if policy != self.policy:
            self.policy = policy

    def _memory(self) -> bool:
        if self.soft is None:
            return False
        before = (self.level, self.memory_stretch, self.shed_priority)
        if self.hard is not None and self.rss > self.hard:
            below = [p for p in self.priorities if self.shed_priority is None or p < self.shed_priority]
            if below:
                self.shed_priority = below[-1]  # one more priority level each window while above
            self.level = "shed"
        elif self.rss > self.soft:
            self.memory_stretch = min(self.cfg.max_stretch, self.memory_stretch * 2)
            self.level = "soft" if self.shed_priority is None else "shed"
        elif self.rss < 0.9 * self.soft:
            if self.shed_priority is not None:
                self.shed_priority = None
            else:
                self.memory_stretch = max(1.0, self.memory_stretch / 2)
            self.level = "normal" if self.memory_stretch == 1.0 and self.shed_priority is None else "soft"
        if self.level != "normal":
            release_memory()
            self.commit_now += 1  # commit the open window now: its readings leave RAM
        if before == (self.level, self.memory_stretch, self.shed_priority):
            return False
        self.decisions += 1
        log.warning("governor: memory %s (RSS %s, soft %s, hard %s): low-priority stretch x%g%s",
                    self.level, _mib(self.rss), _mib(self.soft), _mib(self.hard), self.memory_stretch,
                    f", priority >= {self.shed_priority} stopped" if self.shed_priority else "")
        return True

    def _cpu(self) -> bool:
        before = self.cpu_stretch
        if self.cpu > self.cpu_budget:
            self.cpu_stretch = min(self.cfg.max_stretch, self.cpu_stretch * self.cpu / self.cpu_budget)
        elif self.cpu < 0.7 * self.cpu_budget and self.cpu_stretch > 1.0:
            self.cpu_stretch = max(1.0, self.cpu_stretch / 1.5)
        if abs(before - self.cpu_stretch) > 1e-9:
            self.decisions += 1
            log.warning("governor: CPU %.0f %% of a core (budget %.0f %%): intervals stretched x%.2g",
                        100 * self.cpu, 100 * self.cpu_budget, self.cpu_stretch)
            return True
        return False

    def _low_power(self) -> None:
        lp: LowPowerConfig = self.cfg.low_power
        if self.forced_low_power is not None:
            want = self.forced_low_power
        else:
            want = ((lp.on_battery and self.on_battery())
                    or (lp.control_file is not None and lp.control_file.exists())
                    or in_schedule(lp.schedule, dt.datetime.now()))
        if want != self.low_power:
            self.low_power = want
            self.decisions += 1
            interval = self.store_cfg.low_power_commit_interval if want else self.store_cfg.commit_interval
            log.warning("governor: low-power mode %s (intervals x%g, commit every %.0f s, uplink %s)",
                        "on" if want else "off", lp.interval_factor if want else 1, interval,
                        f"sessions every {lp.uplink_session_interval:.0f} s" if want else "continuous")


def _on_battery() -> bool:
    try:
        import psutil  # noqa: PLC0415 (after READY=1: the governor starts then)

        battery = psutil.sensors_battery()
    except (OSError, AttributeError, NotImplementedError):
        return False
    return battery is not None and not battery.power_plugged


def _mib(n: int | None) -> str:
    return "none" if n is None else f"{n / 2**20:.0f} MiB"

