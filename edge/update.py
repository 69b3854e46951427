"""Image updates: a signed RAUC bundle into the root slot not booted, and the new slot's trial.

RAUC holds the slots, the keyring and the bootloader (its service); edge drives it with its client
([update] rauc) and keeps what it started in <state_dir>/update.json, on /data, which survives updates.

    edge update BUNDLE|URL   a URL (http or https) is fetched into the state directory first, at most
                             [update] max_bundle bytes and leaving FETCH_LEAVES free on its file
                             system (the store's too); `rauc install` checks the bundle's signature
                             against the image's keyring and writes the slot not booted, which becomes
                             the bootloader's primary; its progress is printed as it comes. Recorded as
                             "installing" before, "installed" after, with that slot, the one it came
                             from and this boot's id; refused while the slot booted is on trial.
    edge run                 at every boot, once the appliance runs (a poll cycle done, a block stored
                             or delivered): `rauc status mark-good booted` (a counting bootloader takes a
                             slot that never says so as failed). Booted, in a later boot, from the slot
                             installed last: a trial, to prove more within [update] trial seconds of the
                             boot (a good reading, and a block delivered; stored, with the uplink
                             disabled): "good"; otherwise `rauc status mark-bad booted`, "failed", and
                             [update] reboot: the bootloader starts the slot it came from. Booted from
                             that one instead: "rolled back" (a trial failed, or the bootloader gave up on
                             the new slot before edge ran).

What update.json says is in the health message and /health (`update`), and so in `edge status`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import shlex
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edge.config import UpdateConfig
from edge.durable import write_whole

log = logging.getLogger("edge.update")
STATE = "update.json"
MAX_STATE = 64 * 1024  # bytes of update.json read, at most
MAX_STATUS = 1 << 20  # bytes of `rauc status` output read, at most
RAUC_TIMEOUT = 60.0  # seconds a status or mark command may take
INSTALL_TIMEOUT = 3600.0  # seconds an install may take (an SD card writes a few MB/s)
FETCH_TIMEOUT = 60.0  # seconds without a byte from the server
FETCH_DEADLINE = 3600.0  # seconds a whole fetch may take
FETCH_LEAVES = 32 << 20  # bytes a fetch leaves free on /data, for the store and the rest


class Out(Protocol):
    """Where install() prints its progress: a terminal, or Lines (posted on cmd/result)."""

    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


SYSTEM_CONF = Path("/etc/rauc/system.conf")  # on an image with root slots


def ab_image() -> bool:
    """An image with root slots (RAUC's system.conf): its bootloader counts boots, so every healthy boot
    must mark its slot good, whether or not this box takes updates ([update] enabled)."""
    return SYSTEM_CONF.exists()


class UpdateError(Exception):
    """An update that cannot go on, with the reason for the user."""


def rauc(cfg: UpdateConfig, *args: str, timeout: float = RAUC_TIMEOUT) -> str:
    """Run the RAUC client: its output, or UpdateError with what it said."""
    cmd = [*shlex.split(cfg.rauc), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UpdateError(f"{shlex.join(cmd)}: {e}") from None
    out = done.stdout[:MAX_STATUS].decode(errors="replace")
    if done.returncode != 0:
        said = (done.stderr[-2000:] or done.stdout[-2000:]).decode(errors="replace").strip()
        raise UpdateError(f"{shlex.join(cmd)}: exit {done.returncode}: {said}")
    return out


def slots(cfg: UpdateConfig) -> tuple[str, str, dict[str, str]]:
    """(boot name of the slot booted, the bootloader's primary slot, boot name -> slot) from RAUC."""
    try:
        doc = json.loads(rauc(cfg, "status", "--output-format=json"))
        names = {v["bootname"]: k for entry in doc["slots"] for k, v in entry.items() if v.get("bootname")}
        return str(doc["booted"]), str(doc["boot_primary"]), names
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UpdateError(f"RAUC's status could not be read: {e!r}") from None


def read_state(state_dir: Path) -> dict[str, Any]:
    """update.json, or {} when there is none or it is not what edge writes (logged)."""
    path = state_dir / STATE
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(MAX_STATE + 1)[:MAX_STATE])
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("update: %s cannot be read (%s); no update is on record", path, e)
        return {}
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("state", "slot", "from")):
        log.warning("update: %s is not an update record; no update is on record", path)
        return {}
    return doc


def write_state(state_dir: Path, doc: dict[str, Any]) -> None:
    write_whole(state_dir / STATE, json.dumps(doc, sort_keys=True).encode() + b"\n", 0o644)


def _boot() -> tuple[str, float]:
    """(this boot's id, seconds since it): the kernel's; in tests that stand in a restart of RAUC's
    service for a reboot, the file EDGE_TEST_BOOT names ("<id> <unix time of the boot>")."""
    if stand_in := os.environ.get("EDGE_TEST_BOOT"):
        ident, at = Path(stand_in).read_text().split()
        return ident, time.time() - float(at)
    try:
        ident = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    except OSError:  # the unit's ProcSubset=pid hides /proc/sys: systemd passes it (%b, without dashes)
        ident = os.environ.get("EDGE_BOOT_ID", "")
    return ident, time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id() -> str:
    """This boot's id: tells a restart of edge from a reboot."""
    return _boot()[0]


def public(url: str) -> str:
    """A URL fit for the record, the health message and the log: without credentials, query or fragment
    (a presigned URL's token, a user:password@)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme:
        return url
    host = parts.hostname or ""
    return urllib.parse.urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path,
                                    "", ""))


class _SameSchemes(urllib.request.HTTPRedirectHandler):
    """Redirects only to http or https, never from https down to http."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,  # noqa: PLR0917
                         newurl: str) -> urllib.request.Request | None:
        old, new = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new != "https"):
            raise UpdateError(f"{public(req.full_url)}: redirected to a {new or 'relative'}:// URL, refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _free(fd: int) -> int:
    """Bytes free for edge on the file system of the open file `fd`."""
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


def fetch(url: str, dest: Path, limit: int, out: Out) -> Path:
    """The bundle at `url` in `dest` (http or https; at most `limit` bytes, within FETCH_DEADLINE, and
    leaving FETCH_LEAVES free beside it), progress printed."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UpdateError(f"{public(url)}: only http:// and https:// URLs (or a file)")
    tmp = dest.with_name(f".{dest.name}.part")
    deadline = time.monotonic() + FETCH_DEADLINE
    opener = urllib.request.build_opener(_SameSchemes)
    try:
        with opener.open(url, timeout=FETCH_TIMEOUT) as r, open(tmp, "wb") as f:
            declared = r.headers.get("Content-Length")
            size = int(declared) if declared and declared.isdigit() else 0
            if size > limit:
                raise UpdateError(f"{public(url)}: {size} bytes, more than [update] max_bundle ({limit})")
            if size and size > (free := _free(f.fileno())) - FETCH_LEAVES:
                raise UpdateError(f"{public(url)}: {size} bytes, and {dest.parent} has {free} free "
                                  f"(a fetch leaves {FETCH_LEAVES >> 20} MiB)")
            got, shown = 0, -1
            while chunk := r.read(1 << 16):
                got += len(chunk)
                if got > limit:
                    raise UpdateError(f"{public(url)}: more than [update] max_bundle ({limit} bytes)")
                if _free(f.fileno()) < FETCH_LEAVES + len(chunk):
                    raise UpdateError(f"{public(url)}: {dest.parent} full after {got - len(chunk)} bytes "
                                      f"(a fetch leaves {FETCH_LEAVES >> 20} MiB)")
                if time.monotonic() > deadline:
                    raise UpdateError(f"{public(url)}: not fetched within {FETCH_DEADLINE:.0f} s")
                f.write(chunk)
                if size and (pct := min(got * 100 // size, 100)) // 10 != shown:
                    shown = pct // 10
                    print(f"fetched {pct:3d} %", file=out, flush=True)
            if size and got != size:
                raise UpdateError(f"{public(url)}: {got} bytes, {size} announced")
        tmp.replace(dest)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
        raise UpdateError(f"{public(url)}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def install(cfg: UpdateConfig, state_dir: Path, source: str, out: Out) -> str:
    """Install a bundle (a file, or a URL fetched first) into the slot not booted: that slot's name, or
    UpdateError. Refused while the slot booted is on trial: the other one is the way back."""
    try:  # where the record goes: made before anything is installed, so that a failure comes first
        state_dir.mkdir(parents=True, exist_ok=True)
        for stale in (state_dir / "bundle.raucb", state_dir / ".bundle.raucb.part"):
            stale.unlink(missing_ok=True)  # left by a power cut during an earlier fetch
    except OSError as e:
        raise UpdateError(f"state directory {state_dir}: {e.strerror}") from None
    booted, _, names = slots(cfg)
    record = read_state(state_dir)
    if record.get("state") in ("installing", "installed") and record.get("boot_id") != boot_id() \
            and names.get(booted) == record.get("slot"):
        raise UpdateError(f"{record['slot']} is on trial: the other slot is the way back until it is "
                          "marked good")
    others = [slot for name, slot in names.items() if name != booted]
    fetched = None
    if "://" in source:
        fetched = fetch(source, state_dir / "bundle.raucb", cfg.max_bundle, out)
    bundle = fetched or Path(source)
    try:
        if not bundle.is_file():
            raise UpdateError(f"{bundle}: no such bundle")
        mark = {"slot": others[0] if len(others) == 1 else "?", "from": names.get(booted, booted),
                "source": public(source), "at": int(time.time()), "boot_id": boot_id()}
        _record(state_dir, {**mark, "state": "installing"})  # a power cut from here on is still on record
        try:
            _rauc_install(cfg, bundle, out)
        except UpdateError:  # refused or failed: RAUC switched nothing; the record is the one before
            if record:
                _record(state_dir, record)
            else:
                (state_dir / STATE).unlink(missing_ok=True)
            raise
        _, primary, _ = slots(cfg)
        _record(state_dir, {**mark, "slot": primary, "state": "installed"})
        print(f"installed into {primary}: it starts at the next boot, on trial", file=out, flush=True)
        return primary
    finally:
        if fetched is not None:
            fetched.unlink(missing_ok=True)


def _record(state_dir: Path, doc: dict[str, Any]) -> None:
    try:
        write_state(state_dir, doc)
    except OSError as e:
        raise UpdateError(f"cannot record the update in {state_dir / STATE}: {e.strerror}") from None


def _rauc_install(cfg: UpdateConfig, bundle: Path, out: Out) -> None:
    """`rauc install`, its output printed as it comes; killed after INSTALL_TIMEOUT."""
    cmd = [*shlex.split(cfg.rauc), "install", "--progress", str(bundle.resolve())]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
    except OSError as e:
        raise UpdateError(f"{shlex.join(cmd)}: {e}") from None
    assert proc.stdout is not None
    timer = threading.Timer(INSTALL_TIMEOUT, proc.kill)  # also when RAUC prints nothing
    timer.start()
    said: list[str] = []
    try:
        for line in proc.stdout:  # RAUC's progress
            print(line.rstrip()[:500], file=out, flush=True)
            said = [*said[-20:], line.strip()[:500]]
    finally:
        timer.cancel()
        code = proc.wait()
    if code != 0:
        raise UpdateError(f"rauc install refused or failed {bundle}: {' / '.join(s for s in said if s)}")


class Lines:
    """A text stream that hands each whole line written to it to `sink` (install()'s progress, posted)."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self.sink = sink
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            if line.strip():
                self.sink(line)
        return len(text)

    def flush(self) -> None:
        pass


def reboot_now(cfg: UpdateConfig) -> None:
    """[update] reboot: the bootloader then starts the slot it is told to."""
    cmd = shlex.split(cfg.reboot)
    log.warning("update: rebooting: %s", shlex.join(cmd))
    try:
        subprocess.run(cmd, timeout=RAUC_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        _failed(UpdateError(f"{shlex.join(cmd)}: {e}"))


def _failed(e: UpdateError) -> None:
    log.error("update: %s", e)


def since_boot() -> float:
    """Seconds since this boot (CLOCK_BOOTTIME): a trial's clock, which a restart of edge does not reset."""
    return _boot()[1]


class Trial:
    """The state of the last update as this boot finds it, and the trial of a newly installed slot.

    The record's boot_id tells a restart of edge (the same boot: nothing to decide yet) from a reboot. A
    trial is measured from the boot, not from edge's start: an edge that keeps failing on the new slot
    finds its trial over at the next start and leaves."""

    def __init__(self, cfg: UpdateConfig, state_dir: Path) -> None:
        self.cfg = cfg
        self.state_dir = state_dir
        self.record = read_state(state_dir)
        self.on_trial = False
        if not self.record or self.record.get("boot_id") == boot_id():
            return  # none, or installed since this boot: it starts at the next
        try:
            booted, _, names = slots(cfg)
        except UpdateError as e:
            _failed(e)
            return
        slot, state, new, old = names.get(booted, booted), self.record["state"], self.record["slot"], \
            self.record["from"]
        if state in ("installing", "installed") and slot == new:
            self.on_trial = True
            log.warning("update: booted from %s, installed from %s: on trial until %.0f s after boot", slot,
                        self.record.get("source", "?"), cfg.trial)
        elif state == "installing" and slot == old:
            self._settle("failed", f"the install into {new} did not finish; {old} runs on")
        elif state in ("installed", "failed") and slot == old:
            why = self.record.get("detail") if state == "failed" else None
            self._settle("rolled back", f"booted from {old} again, not from {new}"
                                        + (f" ({why})" if why else ""))
            try:  # left for good: no bootloader tries it again (a Pi's tryboot.txt left by a power cut)
                rauc(cfg, "status", "mark-bad", "other")
            except UpdateError as e:
                _failed(e)

    def view(self) -> dict[str, Any] | None:
        """For the health message: the last update's state, or None when there was none."""
        return dict(self.record) if self.record else None

    def _settle(self, state: str, detail: str) -> None:
        self.record = {**self.record, "state": state, "detail": detail, "settled_at": int(time.time())}
        try:
            write_state(self.state_dir, self.record)
        except OSError as e:
            _failed(UpdateError(f"cannot record {state} in {self.state_dir / STATE}: {e.strerror}"))
        (log.info if state == "good" else log.error)("update: %s: %s", state, detail)

    async def run(self, unhealthy: Callable[[bool], str | None]) -> None:
        """Once `unhealthy(on trial)` is None (it says what has not happened yet): mark the booted slot
        good, at every boot (a counting bootloader takes a slot that never says so as failed). On trial,
        if that takes until [update] trial seconds after boot: mark it bad and reboot."""
        while True:
            why = unhealthy(self.on_trial)
            if why is None or (self.on_trial and since_boot() >= self.cfg.trial):
                break
            await asyncio.sleep(0.5)
        if why is None:
            try:
                await asyncio.to_thread(rauc, self.cfg, "status", "mark-good", "booted")
            except UpdateError as e:  # unconfirmed: the bootloader's count decides
                _failed(e)
                return
            if self.on_trial:
                self.on_trial = False
                self._settle("good", f"{self.record['slot']} proven within its trial: marked good")
            return
        self.on_trial = False
        self._settle("failed", f"{self.record['slot']} not healthy within {self.cfg.trial:.0f} s of boot "
                               f"({why}): marked bad, rebooting into {self.record['from']}")
        try:
            await asyncio.to_thread(rauc, self.cfg, "status", "mark-bad", "booted")
        except UpdateError as e:
            _failed(e)
        await asyncio.to_thread(reboot_now, self.cfg)
