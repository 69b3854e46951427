"""`edge run`: the appliance. One asyncio loop (uvloop where available), named tasks in one TaskGroup:

    poll:<line>   edge.poll    readings -> store.add (RAM window)
    store         commits the window every commit_interval (or commit_bytes) in a worker thread, so a
                  slow flash fsync never stalls polling; wakes the uplink after each commit
    uplink        edge.uplink  oldest blocks -> MQTT -> accept / reject / keep
    metrics       Prometheus text and /health on 127.0.0.1 (edge.metrics)

Signals: SIGTERM / SIGINT stop polling, commit the open window, let in-flight publishes finish within
publish_timeout, publish "offline", exit 0. SIGHUP reloads the config: validated first, a bad one is
refused (logged) and the running one kept; a good one restarts polling and the uplink with it (store
settings other than the commit window take effect at the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from edge.config import Config, ConfigError, load
from edge.govern import Governor
from edge.poll.engine import Poller
from edge.reading import Reading
from edge.store import READING_BYTES, Store
from edge.supervise import Supervisor, dump_stacks, test_hooks
from edge.uplink import Uplink
from edge.write import Commands

log = logging.getLogger("edge.app")


class Appliance:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.store = Store(config.store, config.appliance.id)
        self.commit_now = asyncio.Event()
        self.poller = Poller(config, self.sink)
        self.commands = Commands(self.poller)
        self.uplink = Uplink(config, self.store, self.commands)
        self.stopping = asyncio.Event()
        self.started = time.time()
        self.last_commit = time.monotonic()
        self.store_beat = time.monotonic()
        self.governor = Governor(self, config.governor)
        self.supervisor = Supervisor(self.beats, self.status_line)
        self.reloads = 0
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.metrics: object | None = None
        self.low_power = False
        self._tg: asyncio.TaskGroup | None = None

    def sink(self, readings: list[Reading]) -> None:
        self.store.add(readings)
        if len(self.store.buffer) * READING_BYTES >= self.config.store.commit_bytes:
            self.commit_now.set()

    async def committer(self) -> None:
        store = self.store
        while True:
            self.store_beat = time.monotonic()
            remaining = store.window_start + store.commit_interval - time.monotonic()
            if remaining > 0 and not self.commit_now.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, 1.0)):
                        await self.commit_now.wait()
                if not self.commit_now.is_set() and remaining > 1.0:
                    continue  # beat once a second through a long (low-power) window
            self.commit_now.clear()
            await self.commit()

    def beats(self) -> dict[str, float]:
        """Heartbeat of each stage, for the watchdog (monotonic seconds)."""
        out = {"poll": min((line.beat for line in self.poller.lines), default=time.monotonic()),
               "store": self.store_beat}
        if self.config.uplink.enabled:
            out["uplink"] = self.uplink.stats.last_progress
        return out

    def status_line(self) -> str:
        runners = self.poller.runners
        up = sum(r.stats.up for r in runners)
        uplink = ("connected" if self.uplink.stats.connected else "offline") if self.config.uplink.enabled \
            else "disabled"
        return (f"{len(runners)} devices ({up} up), backlog {self.store.counters.backlog_readings} readings, "
                f"uplink {uplink}{', low power' if self.low_power else ''}")

    async def commit(self) -> None:
        """Commit what is pending (the committer calls this when the window is over: not re-checked
        against the clock, a timer firing a millisecond early must not cost readings a second window)."""
        store = self.store
        if store.buffer or store.acked or store.rejecting:
            if await asyncio.to_thread(store.commit):
                self.uplink.wake.set()
        else:
            store.window_start = time.monotonic()
        self.last_commit = time.monotonic()

    def _start(self, name: str, coro: object) -> None:
        assert self._tg is not None
        self.tasks[name] = self._tg.create_task(coro, name=name)  # type: ignore[arg-type]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        loop.add_signal_handler(signal.SIGUSR2, self.governor.toggle_low_power)
        loop.add_signal_handler(signal.SIGUSR1, dump_stacks)
        n_tags = sum(len(d.tags) for d in self.config.devices)
        log.info("edge: %s polling %d devices (%d tags), store %s, uplink %s:%d", self.config.appliance.id,
                 len(self.config.devices), n_tags, self.config.store.path, self.config.uplink.host,
                 self.config.uplink.port)
        metrics = None
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._start("poll", self.poller.run())
                self._start("store", self.committer())
                await self.poller.started()
                if delay := float(os.environ.get("EDGE_TEST_READY_DELAY", "0")):  # systemd test hook
                    await asyncio.sleep(delay)
                self.supervisor.ready()
                # Polling and storing: READY=1 sent. What is not needed for that starts now, so that its
                # imports (aiomqtt, paho, prometheus-client, psutil) do not delay READY.
                if self.config.uplink.enabled:
                    self._start("uplink", self.uplink.run())
                if self.config.governor.enabled:
                    self._start("govern", self.governor.run())
                if self.config.metrics.enabled:
                    from edge.metrics import MetricsServer  # noqa: PLC0415

                    self.metrics = metrics = MetricsServer(self)
                    log.info("edge: metrics on http://%s:%d/metrics", self.config.metrics.listen,
                             metrics.port)
                self._start("supervise", self.supervisor.run())
                test_hooks()
                await self.stopping.wait()
                self.supervisor.stopping()
                await self.shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
                loop.remove_signal_handler(sig)
            if metrics is not None:
                metrics.close()
            self.store.close()
        return 0

    async def shutdown(self) -> None:
        log.info("edge: stopping: committing the open window, finishing in-flight publishes")
        for name in ("supervise", "govern", "poll"):
            await _cancel(self.tasks.pop(name, None))
        await _cancel(self.tasks.pop("store", None))
        await asyncio.to_thread(self.store.commit)
        self.uplink.wake.set()
        uplink = self.tasks.pop("uplink", None)
        if uplink is not None:
            self.uplink.stop()
            done, _ = await asyncio.wait({uplink}, timeout=self.config.uplink.publish_timeout + 2)
            if not done:
                await _cancel(uplink)
        await asyncio.to_thread(self.store.commit)  # the deletes of the last acknowledged blocks

    async def reload(self) -> None:
        if self.config_path is None:
            return
        try:
            config = load(self.config_path)
        except ConfigError as e:
            log.error("edge: reload refused, keeping the running config: %s", "; ".join(e.problems))  # noqa: TRY400
            return
        if (config.store.path, config.store.map_size) != (self.config.store.path, self.config.store.map_size):
            log.warning("edge: store path/map_size changes take effect at the next start")
        self.store.commit_interval = config.store.commit_interval
        await _cancel(self.tasks.pop("poll", None))
        self.config = config
        self.poller = Poller(config, self.sink)
        self.commands.poller = self.poller
        self._start("poll", self.poller.run())
        self.governor.app = self
        uplink = self.tasks.pop("uplink", None)
        if uplink is not None:
            self.uplink.stop()
            await asyncio.wait({uplink}, timeout=config.uplink.publish_timeout + 2)
            await _cancel(uplink)
        self.uplink = Uplink(config, self.store, self.commands)
        if config.uplink.enabled:
            self._start("uplink", self.uplink.run())
        self.reloads += 1
        log.info("edge: config reloaded from %s", self.config_path)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
