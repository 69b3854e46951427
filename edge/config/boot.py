"""A config dropped on the boot partition (FAT: any laptop writes it) taken into the state directory at
boot, before the appliance starts (`edge import-config DIR`, edge-import-config.service on the image):

    DIR/config.toml      validated as the state directory will read it (relative paths against it);
                         a good one is kept as <state_dir>/config.toml (edge run prefers it), whole or
                         not at all; a bad one is refused: its problems go to the journal and to
                         <state_dir>/config-error, which the health message publishes, and the last good
                         config (or the image's) runs
    DIR/secrets/NAME     moved to <state_dir>/secrets/NAME, mode 0600, owned by the state directory's
                         owner: a FAT partition has no permissions, anyone with the card reads it; one
                         above MAX_SECRET_BYTES is left there (logged), never read whole

The same config again is a no-op (compared with the kept bytes), so it may stay on the card.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edge.config.schema import Config, ConfigError
from edge.config.source import check_devices, keep, loads, persisted, read_bounded

log = logging.getLogger("edge.config")

CONFIG_ERROR = "config-error"  # in the state directory: why the last config offered was refused
SECRETS = "secrets"
MAX_SECRET_BYTES = 1 << 20  # a key, a password, a certificate chain: anything larger is left on the card


def imported_error(config: Config) -> str:
    """Why the last config offered on the boot partition was refused ("" if none was, or it was fixed)."""
    try:
        return (config.appliance.state_dir / CONFIG_ERROR).read_text(errors="replace").strip()[:4000]
    except OSError:
        return ""


def import_dir(source: Path, running: Config) -> str:
    """Take source/secrets and source/config.toml into the state directory of `running` (the config the
    image starts with); what was done, in words. Raises ConfigError for a refused config (recorded)."""
    state = running.appliance.state_dir
    done = [f"secret {name} moved to {state / SECRETS}" for name in _move_secrets(source / SECRETS, state)]
    offered = source / "config.toml"
    if not offered.is_file():
        return "; ".join(done) or f"nothing to import in {source}"
    kept = persisted(running)
    try:
        try:
            raw = read_bounded(offered)  # a regular file of at most MAX_CONFIG_BYTES, never read past that
        except OSError as e:
            raise ConfigError([f"{offered}: cannot read: {e.strerror}"]) from e
        check_devices(loads(raw, state, str(offered)), str(offered))
    except ConfigError as e:
        _record(state, "; ".join(e.problems))
        raise
    error = state / CONFIG_ERROR
    if kept.is_file() and kept.read_bytes() == raw:
        error.unlink(missing_ok=True)
        return "; ".join([*done, f"{offered}: already the kept config"])
    keep(kept, raw)
    _give(kept, state)
    error.unlink(missing_ok=True)
    return "; ".join([*done, f"{offered} kept as {kept}"])


def _move_secrets(secrets: Path, state: Path) -> list[str]:
    if not secrets.is_dir():
        return []
    target = state / SECRETS
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    _give(target, state)
    moved = []
    for item in sorted(secrets.iterdir()):
        if not item.is_file():
            continue
        with open(item, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
        if len(data) > MAX_SECRET_BYTES:
            log.warning("edge: %s is above the %d bytes a secret may have: left on the boot partition",
                        item, MAX_SECRET_BYTES)
            continue
        keep(target / item.name, data)
        _give(target / item.name, state)
        try:
            item.unlink()
        except OSError as e:
            log.warning("edge: secret %s copied but not removed from the boot partition: %s", item,
                        e.strerror)
        moved.append(item.name)
    return moved


def _give(path: Path, state: Path) -> None:
    """Owned by the state directory's owner (the appliance's user), when run as root."""
    if os.geteuid() == 0:
        st = os.stat(state)
        os.chown(path, st.st_uid, st.st_gid)


def _record(state: Path, problems: str) -> None:
    state.mkdir(parents=True, exist_ok=True)
    keep(state / CONFIG_ERROR, problems.encode() + b"\n")
    _give(state / CONFIG_ERROR, state)
