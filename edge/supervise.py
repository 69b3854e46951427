"""systemd supervision (sdnotify; every call is a no-op without NOTIFY_SOCKET).

    READY=1       once the store is open and the first poll cycle has started
    STATUS=...    a one-line summary, refreshed at every watchdog tick
    WATCHDOG=1    every WATCHDOG_USEC/2, only if poll, store and uplink each showed a heartbeat since the
                  previous tick. A stage that stopped beating gets all stacks dumped to stderr (the
                  journal) once, and pinging stops: systemd's WatchdogSec kills and restarts the service.
                  A blocked event loop cannot ping at all; systemd's SIGABRT then makes faulthandler
                  dump the stacks.
    STOPPING=1    on SIGTERM, before the open window is committed

Heartbeats are the stages' own loop iterations (each waits at most ~1 s at a time), so a long poll
interval or commit window is not mistaken for a stall, and a stage waiting on I/O is bounded by that
I/O's own timeout. A stage is stalled when its last beat is not after a reference time: stalled() is
that one definition, used by the watchdog (the previous tick) and by /health (now minus its limit).
SIGUSR1 dumps every thread's and every asyncio task's stack, for a look at a live process.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping

import sdnotify

log = logging.getLogger("edge.supervise")


def watchdog_is_ours(pid: str | None) -> bool:
    """Whether systemd's watchdog (WATCHDOG_PID) watches this process: the single binary's Python runs in
    a child of PyInstaller's unpacking parent, which is the process systemd started and named; without
    this the binary would never ping and systemd would kill it every WatchdogSec."""
    if pid is None:
        return True
    ours = {os.getpid(), os.getppid()} if getattr(sys, "frozen", False) else {os.getpid()}
    return pid.isdigit() and int(pid) in ours


class Supervisor:
    def __init__(self, beats: Callable[[], dict[str, float]], status: Callable[[], str]) -> None:
        self.beats = beats
        self.status = status
        self.notifier = sdnotify.SystemdNotifier()
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        self.interval = usec / 2e6 if usec and watchdog_is_ours(os.environ.get("WATCHDOG_PID")) else 0.0
        self.last_tick = time.monotonic()
        self.stalled: list[str] = []
        faulthandler.enable()  # SIGSEGV, SIGABRT (the watchdog's kill), ... -> stacks on stderr

    def notify(self, text: str) -> None:
        self.notifier.notify(text)

    def ready(self) -> None:
        self.notify(f"READY=1\nSTATUS={self.status()}")
        pings = f"watchdog pings every {self.interval:.1f} s" if self.interval else "no watchdog"
        log.info("edge: ready (%s)", pings)

    def stopping(self) -> None:
        self.notify("STOPPING=1\nSTATUS=stopping: committing the open window")

    def check(self) -> list[str]:
        """Stages without a heartbeat since the previous check."""
        now = time.monotonic()
        late = stalled(self.beats(), self.last_tick)
        self.last_tick = now
        return late

    async def run(self) -> None:
        tick = self.interval or 5.0
        self.last_tick = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            late = self.check()
            if late:
                if late != self.stalled:
                    log.error("edge: no progress from %s since the last watchdog tick: dumping stacks, "
                              "no more watchdog pings (systemd will restart the service)", ", ".join(late))
                    dump_stacks()
                self.stalled = late
                self.notify(f"STATUS=stalled: {', '.join(late)}")
                continue
            self.stalled = []
            self.notify(f"WATCHDOG=1\nSTATUS={self.status()}" if self.interval else f"STATUS={self.status()}")


def stalled(beats: Mapping[str, float], since: float) -> list[str]:
    """The stages whose last beat (monotonic seconds) is not after `since`.

    >>> stalled({"poll": 10.0, "store": 12.5, "uplink": 9.0}, since=10.0)
    ['poll', 'uplink']
    """
    return sorted(k for k, t in beats.items() if t <= since)


def dump_stacks() -> None:
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for task in asyncio.all_tasks():
        print(f"task {task.get_name()}:", file=sys.stderr)
        task.print_stack(limit=8, file=sys.stderr)
    sys.stderr.flush()


def test_hooks() -> None:
    """Fault hooks for the systemd tests, active only when their environment variables are set:

    EDGE_TEST_BLOCK_LOOP_AFTER=<s>  block the event loop that long after start (for an hour), as a hung
                                    driver would; with EDGE_TEST_ONCE_FILE only the first time
    EDGE_TEST_HOG_FILE=<path>       when that file appears, delete it and allocate memory until the
                                    cgroup's MemoryMax kills the process
    """
    loop = asyncio.get_running_loop()
    after = os.environ.get("EDGE_TEST_BLOCK_LOOP_AFTER")
    once = os.environ.get("EDGE_TEST_ONCE_FILE")
    if after is not None and not (once and os.path.exists(once)):
        if once:
            with open(once, "w") as f:
                f.write(str(time.time()))
        log.warning("edge: test hook: blocking the event loop in %s s", after)
        loop.call_later(float(after), time.sleep, 3600)
    hog = os.environ.get("EDGE_TEST_HOG_FILE")
    if hog:
        def check() -> None:
            if os.path.exists(hog):
                os.unlink(hog)
                log.warning("edge: test hook: allocating memory until killed")
                chunks = []
                while True:
                    chunks.append(bytearray(16 << 20))  # zero-filled: every page is touched
            loop.call_later(0.2, check)
        check()
