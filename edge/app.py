"""`edge run`: the appliance. It wires the stages together and owns only that wiring (which stage is the
current one) and the reload; each stage owns its state and its loop. One asyncio loop (uvloop where
available), named tasks in one TaskGroup:

    poll:<line>   edge.poll     readings -> store.add (the open window, in RAM)
    store         edge.store    the commit loop: writes the window in a worker thread when it is due
                                (a slow flash fsync never stalls polling); wakes the uplink after each
    uplink        edge.uplink   oldest blocks -> MQTT -> accept / reject / keep
    govern        edge.govern   computes the policy (stretches, commit interval, uplink sessions) that
                                poll, store and uplink read at each turn of their loops
    metrics       edge.metrics  Prometheus text and /health on 127.0.0.1, from the stages' snapshots
    supervise     edge.supervise  READY / WATCHDOG / STATUS to systemd, from the stages' heartbeats
    reload        a SIGHUP's reload, one at a time

Observers (metrics, supervise) get narrow read-only views: snapshot() and beats() below, built from each
stage's own snapshot()/progress(), never this object.

Signals: SIGTERM / SIGINT stop polling, commit the open window, let in-flight publishes finish within
publish_timeout (15 s at most: what is not acknowledged stays stored), publish "offline", exit 0.
SIGHUP reloads the config: validated first, a bad one is refused (logged, counted in
edge_config_reloads_refused_total) and the running one kept; a good one builds new poll and uplink
stages from it and the governor's current policy (low power and stretches carry over, and so do their
counters). Store settings other than the commit windows take effect at the next start. SIGUSR2 toggles
low-power mode; SIGUSR1 dumps every stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.config import (
    CONFIG_ERROR,
    Config,
    ConfigError,
    check_devices,
    imported_error,
    keep,
    load_for_run,
    loads,
    persisted,
    with_id,
)
from edge.govern import Governor
from edge.poll import Poller
from edge.snapshot import Snapshot, write_bytes
from edge.store import Store
from edge.supervise import Supervisor, dump_stacks, test_hooks
from edge.update import Lines, Trial, UpdateError, ab_image, install, public, reboot_now
from edge.uplink import STOP_WAIT, Uplink, UplinkStats
from edge.write import MAX_ID, Commands, Verified, safe

if TYPE_CHECKING:
    from edge.metrics import MetricsServer

log = logging.getLogger("edge.app")
REBOOT_WAIT = 15.0  # seconds an install's result may take to go out before the reboot it asked for
POLL_STOP_WAIT = 5.0  # seconds a stop or a reload waits at most for the poll cycles under way


class Appliance:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.store = Store(config.store, config.appliance.id)
        self.governor = Governor(config)
        self.poller = Poller(config, self.store.add, self.governor.current)
        self.commands = Commands(lambda: self.poller, config.commands)
        self.uplink = self._uplink(config)
        self.supervisor = Supervisor(self.beats, self.status_line)
        self.metrics: MetricsServer | None = None
        self.stopping = asyncio.Event()
        self.reload_wanted = asyncio.Event()
        self.started = time.time()
        self.reloads = 0
        self.reloads_refused = 0
        self.config_error = imported_error(config)  # why the last config offered was refused
        self.keep_at = persisted(config)  # where a pushed config that passed its trial is kept
        self.changing = asyncio.Lock()  # one change of config at a time: a reload, or a pushed one's trial
        self.trial: asyncio.Task[None] | None = None
        self.update: Trial | None = None  # the last image update, and the trial of a new slot
        self.installing: asyncio.Task[None] | None = None  # an update asked for on cmd/update
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None

    # -- views for observers ------------------------------------------------------------------------

    def beats(self) -> dict[str, float]:
        """Heartbeat of each stage (monotonic seconds): the watchdog's and /health's input."""
        out = {"poll": self.poller.progress(), "store": self.store.beat}
        if self.config.uplink.enabled:
            out["uplink"] = self.uplink.progress()
        return out

    def snapshot(self) -> Snapshot:
        return Snapshot(self.started, self.reloads, self.reloads_refused, self.governor.current(),
                        self.poller.snapshot(), self.store.snapshot(), self.uplink.snapshot(),
                        self.governor.snapshot(), (self.commands.executed, self.commands.refused),
                        self.config_error, write_bytes(), self.update_view())

    def update_view(self) -> dict[str, Any] | None:
        """The last image update, as the health message and /health show it (None: none on record)."""
        return self.update.view() if self.update else None

    def status_line(self) -> str:
        devices = self.poller.snapshot().devices
        up = sum(st.up for _, st in devices)
        uplink = ("connected" if self.uplink.snapshot().connected else "offline") \
            if self.config.uplink.enabled else "disabled"
        backlog = self.store.snapshot().counters.backlog_readings
        line = f"{len(devices)} devices ({up} up), backlog {backlog} readings, uplink {uplink}"
        if self.governor.current().low_power:
            line += ", low power"
        if self.metrics is not None and self.metrics.problem:
            line += f", metrics {self.metrics.problem}"
        return line

    # -- running ------------------------------------------------------------------------------------

    def _start(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        assert self._tg is not None
        self.tasks[name] = self._tg.create_task(coro, name=name)

    def _wake_uplink(self) -> None:
        self.uplink.wake.set()

    def _forwarding(self) -> bool:
        """The uplink is connected: the store may send a window from RAM before writing it."""
        return self.config.uplink.enabled and self.uplink.snapshot().connected

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_wanted.set)
        loop.add_signal_handler(signal.SIGUSR2, self.governor.toggle_low_power)
        loop.add_signal_handler(signal.SIGUSR1, dump_stacks)
        n_tags = sum(len(d.tags) for d in self.config.devices)
        log.info("edge: %s polling %d devices (%d tags), store %s, uplink %s:%d", self.config.appliance.id,
                 len(self.config.devices), n_tags, self.config.store.path, self.config.uplink.host,
                 self.config.uplink.port)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._start("poll", self.poller.run())
                self._start("store", self.store.run(self.governor.current, self._wake_uplink,
                                                         self._forwarding))
                await self.poller.started()
                if delay := float(os.environ.get("EDGE_TEST_READY_DELAY", "0")):  # systemd test hook
                    await asyncio.sleep(delay)
                self.supervisor.ready()
                # Polling and storing: READY=1 sent. What is not needed for that starts now, so that its
                # imports (aiomqtt, paho, prometheus-client, psutil) do not delay READY.
                self._start_optional()
                self._start("supervise", self.supervisor.run())
                self._start("reload", self._reloads())
                if self.config.update.enabled or ab_image():
                    self._start("update", self._update())
                test_hooks()
                await self.stopping.wait()
                self.supervisor.stopping()
                await self.shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
                loop.remove_signal_handler(sig)
            self.store.close()
            log.info("edge: stopped: %s", self.totals())
        return 0

    def _start_optional(self) -> None:
        """The uplink, governor and metrics tasks the config asks for (at start and after a reload)."""
        if self.config.uplink.enabled and "uplink" not in self.tasks:
            self._start("uplink", self.uplink.run())
        if self.config.governor.enabled and "govern" not in self.tasks:
            self._start("govern", self.governor.run())
        if self.config.metrics.enabled and "metrics" not in self.tasks:
            from edge.metrics import MetricsServer  # noqa: PLC0415 (prometheus-client: after READY=1)

            self.metrics = MetricsServer(self.config.metrics, self.snapshot, self.beats, self.update_view)
            self._start("metrics", self.metrics.run())

    def totals(self) -> str:
        """Where every reading went, for the log at stop."""
        polled = sum(st.readings for _, st in self.poller.snapshot().devices)
        c = self.store.snapshot().counters
        return (f"{polled} readings polled, {c.readings_appended} stored, {c.readings_forwarded} delivered, "
                f"{c.backlog_readings} in the store's backlog, {c.readings_dropped} dropped, "
                f"{c.readings_rejected} refused upstream")

    async def shutdown(self) -> None:
        log.info("edge: stopping: committing the open window, finishing in-flight publishes")
        for name in ("reload", "supervise", "govern", "update"):
            await _cancel(self.tasks.pop(name, None))
        await _cancel(self.installing)  # its thread ends with the RAUC client; the service finishes alone
        await self._stop_poll()
        await _cancel(self.tasks.pop("store", None))
        await asyncio.to_thread(self.store.commit)
        await self._stop_uplink()
        await asyncio.to_thread(self.store.commit)  # the deletes of the last acknowledged blocks
        await _cancel(self.tasks.pop("metrics", None))

    async def _stop_poll(self) -> None:
        """Let every line finish the poll cycle under way (at most POLL_STOP_WAIT s): a device's tags are
        read together, a stop or a reload does not leave a cycle half read."""
        poll = self.tasks.pop("poll", None)
        if poll is None:
            return
        self.poller.stop()
        await asyncio.wait({poll}, timeout=POLL_STOP_WAIT)
        await _cancel(poll)

    async def _stop_uplink(self) -> None:
        """Let in-flight publishes finish (at most STOP_WAIT s), publish "offline", end the task."""
        uplink = self.tasks.pop("uplink", None)
        if uplink is None:
            return
        self.uplink.stop()
        await asyncio.wait({uplink}, timeout=STOP_WAIT + 5)
        await _cancel(uplink)

    # -- reload -------------------------------------------------------------------------------------

    async def _reloads(self) -> None:
        while True:
            await self.reload_wanted.wait()
            self.reload_wanted.clear()
            await self.reload()

    async def reload(self) -> None:
        if self.config_path is None:
            return
        async with self.changing:
            try:
                config = load_for_run(self.config_path)
            except ConfigError as e:
                self.refused(e)
                return
            await self.apply(config)
            log.info("edge: config reloaded from %s", self.config_path)

    def refused(self, e: ConfigError, what: str = "reload") -> None:
        self.reloads_refused += 1
        self.config_error = "; ".join(e.problems)
        log.error("edge: %s refused, keeping the running config: %s", what, self.config_error)

    def _uplink(self, config: Config, stats: UplinkStats | None = None) -> Uplink:
        return Uplink(config, self.store, self.commands, self.governor.current, stats=stats,
                      report=self.snapshot, configure=self.configure, update=self.remote_update)

    async def apply(self, config: Config) -> None:
        """Run `config` from now on: polling restarted after the cycles under way, the uplink restarted,
        every counter carried over."""
        old = self.config
        if _later(old.store) != _later(config.store):
            log.warning("edge: [store] changes other than the commit intervals take effect at the next start")
        await self._stop_poll()
        self.governor.reconfigure(config)
        self.config = config
        self.poller = Poller(config, self.store.add, self.governor.current, previous=self.poller)
        self.commands.reconfigure(config.commands)
        self._start("poll", self.poller.run())
        await self._stop_uplink()
        self.uplink = self._uplink(config, self.uplink.stats)
        if not config.governor.enabled:
            await _cancel(self.tasks.pop("govern", None))
        if config.metrics != old.metrics:
            await _cancel(self.tasks.pop("metrics", None))
            self.metrics = None
        self._start_optional()
        self.reloads += 1
        self.config_error = ""

    # -- a config pushed on cmd/config --------------------------------------------------------------

    async def configure(self, payload: bytes) -> dict[str, Any] | None:
        """A cmd/config message: verified as a write is (edge.write), validated as a file is. The answer
        now for a refused one; for a good one None: it is tried (_trial) and its result posted then."""
        checked = self.commands.verify_signed(payload, kind="config")
        if isinstance(checked, dict):
            return checked
        if self.trial is not None and not self.trial.done():
            return {"id": checked.id, "ok": False, "error": "busy", "detail": "another config is on trial"}
        raw = str(checked.fields["config"]).encode()
        try:  # relative paths as they will read where it is kept
            config = _same_update(with_id(check_devices(loads(raw, self.keep_at.parent, "cmd/config"),
                                                        "cmd/config")), self.config)
        except ConfigError as e:
            self.refused(e, f"pushed config {safe(checked.id, MAX_ID)}")
            result = {"id": checked.id, "ok": False, "error": "invalid config",
                      "detail": "; ".join(e.problems)[:2000]}
            self.commands.remember(checked, result)
            return result
        self.trial = asyncio.create_task(self._trial(checked, config, raw), name="config-trial")
        return None

    async def _trial(self, command: Verified, config: Config, raw: bytes) -> None:
        """Run the pushed config; keep it (keep_at) once every device answered and a block was delivered
        within [commands] config_trial seconds of the new config's; else go back to the running one."""
        async with self.changing:
            old, seconds = self.config, config.commands.config_trial
            cid = safe(command.id, MAX_ID)
            log.info("edge: pushed config %s on trial for %.0f s", cid, seconds)
            marks = self._progress()
            await self.apply(config)
            why = await self._proven(marks, time.monotonic() + seconds)
            if why is None:
                try:
                    path = await asyncio.to_thread(keep, self.keep_at, raw)
                except OSError as e:
                    why = f"cannot keep it in {self.keep_at}: {e.strerror}"
                else:
                    self.config_path = path
                    self.config_error = ""
                    (path.parent / CONFIG_ERROR).unlink(missing_ok=True)
                    result = {"id": command.id, "ok": True, "status": "applied", "kept": str(path)}
                    log.info("edge: pushed config %s applied and kept in %s", cid, path)
            if why is not None:
                await self.apply(old)
                result = {"id": command.id, "ok": False, "error": "rolled back", "detail": why}
                log.warning("edge: pushed config %s rolled back: %s", cid, why)
            self.commands.remember(command, result)
            self.uplink.post_result(result)

    async def remote_update(self, payload: bytes) -> dict[str, Any] | None:
        """A cmd/update message: verified as a write is; the bundle at its "url" installed (edge.update)
        in a thread, RAUC's progress posted on cmd/result as it comes, then the result; with "reboot":
        true, [update] reboot after a good install. The answer now only for a refused one."""
        checked = self.commands.verify_signed(payload, kind="update")
        if isinstance(checked, dict):
            return checked
        if not self.config.update.enabled:
            return {"id": checked.id, "ok": False, "error": "not enabled",
                    "detail": "[update] enabled = false: this box does not take image updates"}
        if self.installing is not None and not self.installing.done():
            if self.installing.get_name() == f"update-install:{checked.key}:{checked.id}":
                return None  # a redelivery of the one installing: its result comes when it ends
            return {"id": checked.id, "ok": False, "error": "busy", "detail": "another update is installing"}
        if self.update is not None and self.update.on_trial:
            return {"id": checked.id, "ok": False, "error": "busy",
                    "detail": "the slot booted is on trial: the other one is the way back until it is kept"}
        self.installing = asyncio.create_task(self._install(checked),
                                              name=f"update-install:{checked.key}:{checked.id}")
        return None

    async def _install(self, command: Verified) -> None:
        loop = asyncio.get_running_loop()
        cid, url, reboot = command.id, str(command.fields["url"]), command.fields.get("reboot") is True

        def progress(line: str) -> None:  # from the installing thread
            loop.call_soon_threadsafe(self.uplink.post_result, {"id": cid, "ok": True, "status": "installing",
                                                                "progress": line.strip()[:200]})

        log.info("edge: update %s: installing %s", safe(cid, MAX_ID), safe(public(url), 200))
        result: dict[str, Any]
        try:
            slot = await asyncio.to_thread(install, self.config.update, self.config.appliance.state_dir, url,
                                           Lines(progress))
        except UpdateError as e:
            result = {"id": cid, "ok": False, "error": "update failed", "detail": str(e)[:2000]}
            log.error("edge: update %s failed: %s", safe(cid, MAX_ID), e)  # noqa: TRY400 (one line)
        except Exception as e:  # a command is hostile input: it gets a result, edge runs on
            result = {"id": cid, "ok": False, "error": "internal error", "detail": type(e).__name__}
            log.exception("edge: update %s failed unexpectedly", safe(cid, MAX_ID))
        else:
            result = {"id": cid, "ok": True, "status": "installed", "slot": slot,
                      "detail": "rebooting into it" if reboot else "it starts at the next boot, on trial"}
        self.commands.remember(command, result)
        self.uplink.post_result(result)
        if result["ok"] and reboot:
            for _ in range(int(REBOOT_WAIT / 0.2)):  # the result out first (the outbox goes every second)
                if result not in self.uplink.outbox:
                    break
                await asyncio.sleep(0.2)
            await asyncio.to_thread(reboot_now, self.config.update)

    async def _update(self) -> None:
        """What became of the last image update; a newly installed slot's trial (edge.update)."""
        try:
            self.update = await asyncio.to_thread(Trial, self.config.update, self.config.appliance.state_dir)
            await self.update.run(self._unhealthy)
        except Exception:  # the appliance runs on; the bootloader's count decides about the slot
            log.exception("edge: update: the slot's trial failed unexpectedly")

    def _unhealthy(self, trial: bool) -> str | None:
        """What the slot booted has not done yet to be confirmed. A new slot on trial: a good reading from
        a device, and a block delivered (stored, with the uplink disabled): an image that broke the
        uplink would look offline, and a box nobody reaches is lost. A slot already kept: the appliance
        runs (a poll cycle done, a block stored or delivered), also with its meters or its network down,
        which are not the image's fault and must not send it back to an older one."""
        devices = self.poller.snapshot().devices
        c = self.store.snapshot().counters
        if not trial:
            if not sum(st.readings for _, st in devices):
                return "no poll cycle done"
            return None if c.blocks_committed or c.blocks_forwarded else "no block stored or delivered"
        if devices and not any(st.good for _, st in devices):
            return "no good reading from any device"
        if self.config.uplink.enabled:
            return None if c.blocks_forwarded else "no block delivered"
        return None if c.blocks_committed else "no block stored"

    def _progress(self) -> tuple[dict[str, int], int]:
        return {name: st.good for name, st in self.poller.snapshot().devices}, self.uplink.stats.acked

    async def _proven(self, marks: tuple[dict[str, int], int], deadline: float) -> str | None:
        """None once every device answered since `marks` and a block was delivered (uplink on); else,
        at the deadline, what did not happen."""
        while True:
            good, acked = self._progress()
            silent = sorted(name for name, n in good.items() if n <= marks[0].get(name, 0))
            undelivered = self.config.uplink.enabled and acked <= marks[1]
            if not silent and not undelivered:
                return None
            if time.monotonic() >= deadline:
                return "; ".join([*([f"no good reading from {', '.join(silent)}"] if silent else []),
                                  *(["no block delivered"] if undelivered else [])])
            await asyncio.sleep(0.5)


def _same_update(config: Config, running: Config) -> Config:
    """A pushed config, refused if its [update] is not the running one's: that section names the commands
    that install and reboot, and is the image's to set."""
    if config.update != running.update:
        raise ConfigError(["cmd/config: [update]: set by the image's config, not by a pushed one"])
    return config


def _later(store: Any) -> tuple[Any, ...]:
    """The [store] settings that take effect at the next start."""
    return (store.path, store.map_size, store.commit_bytes, store.high_watermark, store.low_watermark)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
