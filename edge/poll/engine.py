"""The poller: one task per line (a TCP device's connection, or a serial bus shared by its units).

Each line runs the deadline schedules of its devices' poll groups, earliest deadline first, one request
at a time (pymodbus keeps one transaction in flight per client; an RS-485 bus is half duplex anyway).
On a serial bus every request waits for the inter-frame gap (t3.5) after the previous frame, and for the
device's own `pause` workaround. Readings go to the sink per request, as soon as they are decoded.

Failure handling, per request (see health.py for the timeout and breaker):

    timeout / bad frame  -> retry up to `retries`, then TIMEOUT/BAD_FRAME readings; breaker counts it;
                            after a timeout on a serial bus (or a TCP gateway that does not echo
                            transaction ids) no other request goes out until the late replies came or the
                            line was silent for the device's timeout (Link.settle); a device whose
                            replies come later than its timeout has its wait raised to what it takes
                            (logged once): its late replies are never matched to another request
    busy (6) / ack (5)   -> wait (jittered backoff from 50 ms) and ask again, at most 3 times
    illegal address (2)  -> a multi-tag request is split into one request per tag, so the one bad tag is
                            found and named once in the log while its neighbours keep flowing
    other exception      -> EXCEPTION|code readings (the device is alive: the breaker does not count it)
    disconnected         -> DISCONNECTED readings; the line reconnects with jittered capped backoff

A failure is logged once (WARNING) per device and kind, then at DEBUG until the device recovers, which
is logged once (INFO): flash and journal are precious.

Steering: each line reads the governor's current policy (edge.policy) at every turn of its loop and,
when it changed, sets the stretch of each of its schedules from the group's priority. A poller built by
a reload takes over the counters of the one it replaces (device statistics, cycle counts by device and
group), so metrics keep counting up. Everything here runs on the event loop; observers get copies
(Poller.snapshot()).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import repeat
from typing import NamedTuple

from edge.config import BusConfig, Config, DeviceConfig, connections, tag_id
from edge.policy import Policy, normal
from edge.poll.health import Breaker, LatencyFilter, backoff
from edge.poll.plan import Request, make_request, plan_device
from edge.poll.schedule import Schedule
from edge.poll.transport import Link, RequestError, serial_link, tcp_link
from edge.reading import (
    BAD_EXCEPTION,
    BAD_FRAME,
    BREAKER_OPEN,
    DISCONNECTED,
    EXCEPTION,
    GOOD,
    TIMEOUT,
    Reading,
    Value,
    quality_name,
)

log = logging.getLogger("edge.poll")

Sink = Callable[[list[Reading]], None]
PolicySource = Callable[[], Policy]
Carried = dict[tuple[str, str], Schedule]  # (device, group) -> the schedule a reload replaces

BUSY = (EXCEPTION | 5, EXCEPTION | 6)
ILLEGAL_ADDRESS = EXCEPTION | 2
BUSY_RETRIES = 3
MAX_REPLY_WAIT = 30.0  # seconds: the longest wait a late-answering device is given
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds, "le"


@dataclass
class Job:
    """A planned request with what the hot path needs precomputed."""

    req: Request
    group: str
    ids: array[int]  # u32 tag ids in decode order: 4 B a tag, not an int object each
    # report by exception: (index, tag id, absolute band, percent band, heartbeat ns, any change)
    deadbands: list[tuple[int, int, float, float, int, bool]]
    wire_bytes: int  # request + reply bytes on an RTU line

    @classmethod
    def of(cls, req: Request, group: str, device: str) -> Job:
        tags = req.decoder.tags
        ids = array("I", [tag_id(device, t.name) for t in tags])
        dbs = [(i, ids[i], t.deadband, t.deadband_percent, round(t.heartbeat * 1e9), t.on_change)
               for i, t in enumerate(tags) if t.deadband or t.deadband_percent or t.on_change]
        reply = 5 + (-(-req.count // 8) if req.bits else 2 * req.count)
        return cls(req, group, ids, dbs, 8 + reply)


@dataclass
class DeviceStats:
    requests: int = 0
    good: int = 0
    retries: int = 0
    skipped: int = 0  # requests not sent: breaker open or link down
    readings: int = 0  # polled (any quality)
    stored: int = 0  # passed on to the store: readings minus those inside their deadband
    errors: Counter[str] = field(default_factory=Counter)
    latency_sum: float = 0.0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    up: bool = True
    down_since: float = 0.0  # unix time it stopped answering (0: up)
    problem: str = ""  # why it is down: the last failure's quality name

    def copy(self) -> DeviceStats:
        return replace(self, errors=Counter(self.errors), latency_buckets=list(self.latency_buckets))


class DeviceRunner:
    """State of one device: its jobs, latency filter, breaker, deadband memory and stats."""

    def __init__(self, device: DeviceConfig, bus: BusConfig | None, stats: DeviceStats | None = None) -> None:
        self.device = device
        self.bus = bus
        self.jobs = {g: [Job.of(r, g, device.name) for r in reqs] for g, reqs in plan_device(device).items()}
        self.filter = LatencyFilter(cap=device.timeout)
        self.breaker = Breaker()
        self.stats = stats or DeviceStats()
        self.last_kept: dict[int, tuple[Value, int]] = {}  # tag id -> (value, timestamp ns) last stored
        self.last_end = 0.0
        self.reported: set[str] = set()
        self.failing_since = 0.0  # monotonic time of the first failure of the current run of failures

    def timeout(self, job: Job) -> float:
        if self.bus is None:
            return self.filter.timeout()
        return self.bus.wire_time(job.wire_bytes) + self.bus.frame_gap + self.filter.timeout()

    def wire_time(self, job: Job) -> float:
        return 0.0 if self.bus is None else self.bus.wire_time(job.wire_bytes)

    def max_reply(self) -> float:
        """The longest this device may take to answer, beyond wire time: its configured timeout, or what
        it was seen to take. A request that timed out is followed by this much silence on its line."""
        return max(self.device.timeout, self.filter.cap)

    def late_reply(self, seconds: float) -> None:
        """A reply came `seconds` after its request (beyond wire time), after the timeout: wait that long
        (and a quarter more) for this device from now on, up to MAX_REPLY_WAIT."""
        wait = min(MAX_REPLY_WAIT, 1.25 * seconds)
        if wait <= self.filter.cap:
            return
        self.filter.cap = wait
        self.report("late", "device %s answers %.0f ms after a request, beyond its timeout of %.0f ms: "
                    "waiting up to %.0f ms for it from now on (raise its `timeout` in the config)",
                    self.device.name, 1e3 * seconds, 1e3 * self.device.timeout, 1e3 * wait)

    def wire_time_of(self, value: list[int] | bool) -> float:
        """Request and reply of a write on an RTU line (FC 16 request: 9 + 2 per register; replies 8)."""
        n = 1 if isinstance(value, bool) else len(value)
        return 0.0 if self.bus is None else self.bus.wire_time(9 + 2 * n + 8)

    def report(self, kind: str, message: str, *args: object) -> None:
        """Log a failure once at WARNING, then at DEBUG until it recovers. `kind` names the failure and
        what failed ("timeout@holding 0+10"), so a device whose one request fails while the others
        succeed logs that request once, not twice a cycle."""
        level = logging.DEBUG if kind in self.reported else logging.WARNING
        self.reported.add(kind)
        log.log(level, message, *args)

    def recovered(self, job: Job, breaker_closed: bool) -> None:
        """A good reply to `job`: what was reported of it is over (one line for all of it)."""
        suffix = f"@{job.req}"
        over = {k for k in self.reported if k.endswith(suffix)}
        if breaker_closed:
            over.add("breaker")
        if over & self.reported:
            self.reported -= over
            log.info("device %s: %s answering again", self.device.name, job.req)
        self.stats.up = True
        self.stats.down_since, self.stats.problem = 0.0, ""

    def down(self, problem: str) -> None:
        """Not answering: since when (the first failure of the episode) and why (the latest failure; a
        skip by the open breaker keeps the failure that opened it)."""
        st = self.stats
        if st.up or not st.down_since:
            st.down_since = time.time()
        st.up = False
        st.problem = problem

    def deadband(self, job: Job, values: list[Value], readings: list[Reading]) -> list[Reading]:
        """Report by exception: a good reading is stored when it moved at least its tag's deadband from
        the last one stored (with on_change, when it differs: any type), when its heartbeat passed since
        then, or when it follows a bad one."""
        drop = set()
        ts = readings[0][1]
        for i, tid, absolute, pct, heartbeat, change in job.deadbands:
            v = values[i]
            last = self.last_kept.get(tid)
            if last is not None:
                if change:
                    same = v == last[0] or _both_nan(v, last[0])
                elif isinstance(v, int | float) and isinstance(kept := last[0], int | float):
                    same = abs(v - kept) < (absolute or abs(kept) * pct / 100.0)
                else:
                    same = False
                if same and not (heartbeat and abs(ts - last[1]) >= heartbeat):
                    drop.add(i)
                    continue
            self.last_kept[tid] = (v, ts)
        return [r for i, r in enumerate(readings) if i not in drop] if drop else readings


def _both_nan(a: Value, b: Value) -> bool:
    """NaN again is no change (NaN equals nothing, itself included: on_change would store every one)."""
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


def bad(job: Job, quality: int) -> list[Reading]:
    return list(zip(job.ids, repeat(time.time_ns()), repeat(None), repeat(quality), strict=False))


class Scheduled(NamedTuple):
    """A poll group of a device on its deadline schedule."""

    schedule: Schedule
    runner: DeviceRunner
    group: str
    priority: int


@dataclass(frozen=True, slots=True)
class GroupSnapshot:
    device: str
    group: str
    interval: float  # configured, seconds
    stretch: float  # in force
    cycles: int
    overruns: int
    jitter_sum: float
    lateness: tuple[int, ...]  # cycles per LATENESS_BUCKETS bucket


@dataclass(frozen=True, slots=True)
class PollSnapshot:
    devices: tuple[tuple[str, DeviceStats], ...]  # (name, a copy of its statistics)
    groups: tuple[GroupSnapshot, ...]


class Line:
    """One link and the devices behind it, polled in turn."""

    def __init__(self, link: Link, runners: list[DeviceRunner], frame_gap: float, sink: Sink, *,
                 policy: PolicySource = normal, carried: Carried | None = None) -> None:
        self.link = link
        self.runners = runners
        self.frame_gap = frame_gap
        self.sink = sink
        self.policy = policy
        self.carried = carried or {}  # schedules of the poller this one replaces, for their counters
        self.lock = asyncio.Lock()
        self.last_end = 0.0
        self.answered_at = 0.0  # monotonic time of the last reply on the link, a value or an exception
        self.connect_failures = 0
        self.next_connect = 0.0
        self.timeout = max(r.device.timeout for r in runners)
        self.last_cycle = time.monotonic()
        self.beat = time.monotonic()  # heartbeat: the loop is alive (sleeping in <= 1 s steps, or working)
        self.started = asyncio.Event()
        self.schedules: list[Scheduled] = []  # set when run() starts
        self.stopping = False  # stop() asked: no new cycle starts
        self.wake: asyncio.Future[None] | None = None  # the pause between cycles, ended by stop()
        self.once = False  # one pass (`edge poll --once`): nothing is retried

    @property
    def name(self) -> str:
        return self.link.name

    def make_schedules(self, start: float) -> list[Scheduled]:
        """A deadline schedule per device and poll group, all starting at `start`."""
        self.schedules = []
        for r in self.runners:
            for g in r.device.groups:
                if g.name in r.jobs:
                    sched = Schedule(g.interval, start)
                    sched.carry(self.carried.get((r.device.name, g.name)))
                    self.schedules.append(Scheduled(sched, r, g.name, g.priority))
        self.carried = {}
        return self.schedules

    def steer(self, policy: Policy) -> None:
        for s in self.schedules:
            s.schedule.set_stretch(policy.stretch_for(s.priority))

    def stop(self) -> None:
        """End run() after the cycle under way (a cycle is never cut short by a stop)."""
        self.stopping = True
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    async def run(self) -> None:
        """Poll on deadlines until stop() (or a cancel, which may cut a cycle short)."""
        schedules = self.make_schedules(time.monotonic())
        if not schedules:
            self.started.set()
            return
        me = asyncio.current_task()
        steered: Policy | None = None
        # (deadline, position) of every schedule: the earliest first, ties in config order. A cycle's
        # advance moves its own deadline (pushed back at once); a steer changes the periods, so the heap
        # is built again then. A line of many units picks its next in O(log n) instead of reading every
        # schedule's deadline per request.
        due: list[tuple[float, int]] = []
        self.wake = asyncio.get_running_loop().create_future()
        try:
            while not self.stopping:
                if me is not None and me.cancelling():  # a cancel a library swallowed still stops us
                    raise asyncio.CancelledError
                if (policy := self.policy()) is not steered:
                    self.steer(policy)
                    steered = policy
                    due = [(s.schedule.deadline, i) for i, s in enumerate(schedules)]
                    heapq.heapify(due)
                deadline, i = due[0]
                sched, runner, group, _ = schedules[i]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self.beat = time.monotonic()
                    await asyncio.wait((self.wake,), timeout=min(delay, 1.0))
                    continue  # re-pick: a stretch may have moved the deadlines
                self.started.set()
                sched.begin(time.monotonic())
                await self.cycle(runner, group)
                sched.advance(time.monotonic())
                heapq.heapreplace(due, (sched.deadline, i))
        finally:
            self.link.close()

    async def run_once(self) -> None:
        """Every poll group of every device on this line, once (for `edge poll --once`)."""
        self.once = True
        for runner in self.runners:
            for group in list(runner.jobs):
                await self.cycle(runner, group)

    async def cycle(self, runner: DeviceRunner, group: str) -> None:
        async with self.lock:
            connected = await self.ensure_connected()
            for job in list(runner.jobs.get(group, ())):
                if connected:
                    readings = await self.execute(runner, job)
                else:
                    runner.stats.skipped += 1
                    readings = bad(job, DISCONNECTED)
                runner.stats.readings += len(job.ids)
                runner.stats.stored += len(readings)
                self.sink(readings)
                self.beat = time.monotonic()
            if runner.device.close_after_cycle and self.link.connected:
                self.link.close()  # a device that serves one connection per poll, or none for long
            self.last_cycle = time.monotonic()

    async def write(self, runner: DeviceRunner, table: str, address: int, value: list[int] | bool) -> None:
        """A write to one of this line's devices, between two poll cycles (never inside another
        transaction on the bus); raises RequestError."""
        async with self.lock:
            if not await self.ensure_connected():
                raise RequestError(DISCONNECTED, f"{self.name}: not connected")
            await self.wait_gap(runner)
            try:
                await self.link.write(runner.device.unit, table, address, value,
                                      runner.device.timeout + runner.wire_time_of(value),
                                      multiple=runner.device.write_multiple)
            finally:
                self.last_end = runner.last_end = time.monotonic()

    async def ensure_connected(self) -> bool:
        if self.link.connected:
            return True
        now = time.monotonic()
        if now < self.next_connect:
            return False
        if await self.link.connect(self.timeout):
            if self.connect_failures:
                log.info("%s: connected", self.name)
            self.connect_failures = 0
            if pause := max(r.device.connect_pause for r in self.runners):
                self.beat = time.monotonic()  # at most 10 s: inside a watchdog tick
                await asyncio.sleep(pause)  # devices that drop a request sent right after the handshake
                self.beat = time.monotonic()
            return True
        level = logging.WARNING if self.connect_failures == 0 else logging.DEBUG
        self.connect_failures += 1
        self.next_connect = time.monotonic() + backoff(self.connect_failures - 1, 0.5, 30.0)
        log.log(level, "%s: cannot connect%s%s", self.name,
                f" ({self.link.last_error})" if self.link.last_error else "",
                "" if self.once else "; retrying with backoff")
        for r in self.runners:
            r.stats.errors["connect_failed"] += 1  # a failed connection is an error of each device behind it
            r.down("disconnected")
        return False

    async def wait_gap(self, runner: DeviceRunner) -> None:
        """Silence on the wire between frames (t3.5), and the device's own pause between requests."""
        ready = max(self.last_end + self.frame_gap, runner.last_end + runner.device.pause)
        delay = ready - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def execute(self, runner: DeviceRunner, job: Job) -> list[Reading]:
        readings, late = await self.attempts(runner, job)
        if self.link.late:
            self.learn_late()  # first: the settling below then waits as long as replies were seen to take
        if late and self.link.connected:
            await self.settle(runner, job)
            if self.link.late:
                self.learn_late()
        return readings

    async def settle(self, runner: DeviceRunner, job: Job) -> None:
        """Hold the line after a timeout (Link.settle): until the late replies came, or it was silent for
        the longest the device may take to answer."""
        quiet = runner.wire_time(job) + runner.max_reply()
        await self.link.settle(quiet, 4 * quiet)
        self.last_end = runner.last_end = time.monotonic()

    def learn_late(self) -> None:
        """Frames that came after their request's timeout: their devices get to take that long."""
        late, self.link.late = self.link.late, []
        alone = self.runners[0] if len(self.runners) == 1 else None
        for unit, seconds in late:
            runner = next((r for r in self.runners if r.device.unit == unit), alone)
            if runner is not None:
                runner.late_reply(seconds)

    async def attempts(self, runner: DeviceRunner, job: Job) -> tuple[list[Reading], bool]:
        """The job's readings, and whether an attempt's reply may still come on a line whose replies
        cannot be told apart (the line must then be settled)."""
        dev, stats, req = runner.device, runner.stats, job.req
        if not runner.breaker.allow(time.monotonic()):
            stats.skipped += 1
            runner.down(stats.problem or quality_name(BREAKER_OPEN))  # the cause stays the reason
            return bad(job, BREAKER_OPEN), False
        attempts = 1 if runner.breaker.is_open else 1 + dev.retries
        busy_left = BUSY_RETRIES
        quality, detail = TIMEOUT, ""
        attempt = 0
        late = False  # an attempt's reply may still come, and so may those of the attempts after it
        settles = runner.bus is not None or not self.link.echoes_tid  # replies that cannot be told apart
        self.link.forget()
        while attempt < attempts:
            await self.wait_gap(runner)
            stats.requests += 1
            t0 = time.monotonic()
            try:
                regs = await self.link.read(dev.unit, req.function, req.start, req.count, runner.timeout(job))
            except RequestError as e:
                self.last_end = runner.last_end = time.monotonic()
                quality, detail = e.quality, str(e)
                stats.errors[quality_name(quality)] += 1
                if quality in (TIMEOUT, BAD_FRAME):
                    runner.filter.on_timeout()
                    attempt += 1
                    stats.retries += attempt < attempts
                    late = late or (e.pending and settles)
                elif quality in BUSY and busy_left:
                    busy_left -= 1
                    await asyncio.sleep(backoff(BUSY_RETRIES - busy_left, 0.05, 1.0))
                elif quality == ILLEGAL_ADDRESS and len(req.tags) > 1:
                    if late:
                        await self.settle(runner, job)
                    return await self.split(runner, job), False
                else:
                    break
                continue
            end = self.last_end = runner.last_end = time.monotonic()
            # after a timeout the reply may be the late one of an earlier attempt: no latency sample
            return self.decoded(runner, job, regs, end - t0, not late), late
        return self.failed(runner, job, quality, detail), late

    def decoded(self, runner: DeviceRunner, job: Job, regs: Sequence[int] | Sequence[bool],
                latency: float, sample: bool = True) -> list[Reading]:
        stats = runner.stats
        stats.good += 1
        stats.latency_sum += latency
        bucket = bisect_left(LATENCY_BUCKETS, latency)
        if bucket < len(LATENCY_BUCKETS):
            stats.latency_buckets[bucket] += 1
        if sample:
            runner.filter.update(max(0.0, latency - runner.wire_time(job)))
        self.answered_at = time.monotonic()
        closed = runner.breaker.success()
        if closed or runner.reported or not stats.up:
            runner.recovered(job, closed)
        values = job.req.decoder.decode(regs)
        readings: list[Reading] = list(zip(job.ids, repeat(time.time_ns()), values, repeat(GOOD),
                                           strict=False))
        return runner.deadband(job, values, readings) if job.deadbands else readings

    def failed(self, runner: DeviceRunner, job: Job, quality: int, detail: str = "") -> list[Reading]:
        name = runner.device.name
        for _, tid, *_ in job.deadbands:  # after a bad reading the next good one is always kept
            runner.last_kept.pop(tid, None)
        if quality & EXCEPTION or quality == BAD_EXCEPTION:
            self.answered_at = time.monotonic()
            runner.breaker.success()  # it answered: alive, but refuses this request
            if quality == ILLEGAL_ADDRESS:
                t = job.req.tags[0]
                runner.report(f"illegal:{t.name}", "device %s tag %s (%s %d): the device answers "
                              "illegal address; check the tag's table and address", name, t.name, t.table,
                              t.address)
            else:
                extra = f" ({detail})" if quality == BAD_EXCEPTION else ""
                runner.report(f"{quality_name(quality)}@{job.req}", "device %s: %s for %s%s", name,
                              quality_name(quality), job.req, extra)
            return bad(job, quality)
        runner.down(quality_name(quality))
        runner.report(f"{quality_name(quality)}@{job.req}", "device %s: %s (%s); its tags read bad quality",
                      name, quality_name(quality), job.req)
        now = time.monotonic()
        if not runner.breaker.failures:
            runner.failing_since = now
        if runner.breaker.failure(now):
            log.log(logging.WARNING if "breaker" not in runner.reported else logging.DEBUG,
                    "device %s: %d failures in a row, backing off", name, runner.breaker.failures)
            runner.reported.add("breaker")
            if runner.bus is None and self.answered_at < runner.failing_since:
                # a TCP peer that stopped answering: reconnect on the next attempt. On a gateway's
                # connection only if no unit answered since this one began failing: one dead unit is no
                # reason to drop the others' connection, a silent connection is
                self.link.close()
        return bad(job, quality)

    async def split(self, runner: DeviceRunner, job: Job) -> list[Reading]:
        """Replace a request the device rejects as a whole by one request per tag, and read them now."""
        runner.report(f"split:{job.req}", "device %s: %s rejected (illegal address); reading its %d "
                      "tags one by one", runner.device.name, job.req, len(job.req.tags))
        singles = [Job.of(make_request(job.req.table, [t]), job.group, runner.device.name)
                   for t in job.req.tags]
        jobs = runner.jobs[job.group]
        i = jobs.index(job)
        jobs[i:i + 1] = singles
        out: list[Reading] = []
        for single in singles:
            out.extend(await self.execute(runner, single))
        return out


class Poller:
    """Every line of a config, each in its own named task. `previous`: the poller this one replaces (a
    reload), stopped: its counters carry over."""

    def __init__(self, config: Config, sink: Sink, policy: PolicySource = normal,
                 previous: Poller | None = None) -> None:
        self.config = config
        self.lines: list[Line] = []
        stats = {r.device.name: r.stats for r in previous.runners} if previous else {}
        carried = {(s.runner.device.name, s.group): s.schedule for line in previous.lines
                   for s in line.schedules} if previous else {}

        def runner(d: DeviceConfig, bus: BusConfig | None) -> DeviceRunner:
            return DeviceRunner(d, bus, stats.get(d.name))

        for bus in config.buses:
            runners = [runner(d, bus) for d in config.devices if d.bus == bus.name]
            if runners:
                self.lines.append(Line(serial_link(bus), runners, bus.frame_gap, sink, policy=policy,
                                       carried=carried))
        for group in connections(config.devices):  # a gateway's devices share one, in turn as on a bus
            runners = [runner(d, None) for d in group]
            self.lines.append(Line(tcp_link(group[0], len(group)), runners, 0.0, sink, policy=policy,
                                   carried=carried))

    @property
    def runners(self) -> list[DeviceRunner]:
        return [r for line in self.lines for r in line.runners]

    def line_of(self, device: str) -> tuple[Line, DeviceRunner]:
        return next((line, r) for line in self.lines for r in line.runners if r.device.name == device)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for line in self.lines:
                tg.create_task(line.run(), name=f"poll:{line.name}")

    def stop(self) -> None:
        """run() returns once every line has finished the cycle under way."""
        for line in self.lines:
            line.stop()

    async def started(self) -> None:
        """Returns once every line has started its first poll cycle (the READY point)."""
        for line in self.lines:
            await line.started.wait()

    async def run_once(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for line in self.lines:
                    tg.create_task(line.run_once(), name=f"poll-once:{line.name}")
        finally:
            self.close()

    def close(self) -> None:
        for line in self.lines:
            line.link.close()

    def progress(self) -> float:
        """The poll stage's heartbeat (monotonic): the oldest beat of its running lines."""
        return min((line.beat for line in self.lines if line.schedules), default=time.monotonic())

    def snapshot(self) -> PollSnapshot:
        return PollSnapshot(
            tuple((r.device.name, r.stats.copy()) for r in self.runners),
            tuple(GroupSnapshot(s.runner.device.name, s.group, s.schedule.interval, s.schedule.stretch,
                                s.schedule.cycles, s.schedule.overruns, s.schedule.jitter_sum,
                                tuple(s.schedule.lateness)) for line in self.lines for s in line.schedules))

    def summary(self) -> list[str]:
        """One line per device and poll group: requests, errors, cycles, overruns, jitter."""
        out = []
        for line in self.lines:
            for sched, r, group, _ in line.schedules:
                st = r.stats
                errors = ", ".join(f"{k} {v}" for k, v in sorted(st.errors.items())) or "no errors"
                jitter = sched.jitter_sum / sched.cycles if sched.cycles else 0.0
                out.append(f"{r.device.name}/{group}: {sched.cycles} cycles, {sched.overruns} overruns, "
                           f"jitter mean {jitter * 1e3:.1f} ms max {sched.jitter_max * 1e3:.1f} ms; "
                           f"device {st.requests} requests, {st.good} good, {errors}")
        return out
