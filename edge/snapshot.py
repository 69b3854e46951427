"""One snapshot of every stage, taken at once (the app builds it from each stage's own snapshot()), and
what is made of it for the fleet: the health message the uplink publishes, retained, on
<prefix>/<id>/health (docs/payload.md). The metrics endpoint renders the same snapshot.

Nothing here imports a library the appliance would not load anyway: the uplink publishes health without
the metrics endpoint's prometheus-client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from edge import __version__
from edge.govern import GovernorSnapshot
from edge.policy import Policy
from edge.poll import PollSnapshot
from edge.store import StoreSnapshot
from edge.uplink import UplinkStats


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the metrics and the health message show, taken at once."""

    started: float  # unix time
    reloads: int
    reloads_refused: int
    policy: Policy
    poll: PollSnapshot
    store: StoreSnapshot
    uplink: UplinkStats
    governor: GovernorSnapshot
    writes: tuple[int, int]  # executed, refused
    config_error: str = ""  # why the last reload was refused ("" since a good one)
    written: int = 0  # bytes this process caused to be written to storage since it started
    update: dict[str, Any] | None = None  # the last image update (edge.update), None when there was none


def write_bytes() -> int:
    """Bytes this process caused to be sent to storage (/proc/self/io write_bytes); 0 where unknown."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def health_state(s: Snapshot) -> tuple[Any, ...]:
    """What a health message is published again for as soon as it changes (not only every interval):
    each device up or down and why, low power, the governor's level, the config error."""
    devices = tuple((name, st.up, st.problem) for name, st in s.poll.devices)
    return devices, s.policy.low_power, s.governor.level, s.config_error, (s.update or {}).get("state")


def health_message(s: Snapshot, appliance: str, now: float | None = None) -> dict[str, Any]:
    """The retained health message (docs/payload.md, "Health")."""
    now = time.time() if now is None else now
    uptime = max(now - s.started, 0.0)
    oldest = s.store.oldest_ts
    c = s.store.counters
    return {
        "appliance": appliance,
        "version": __version__,
        "ts": int(now),
        "uptime_s": round(uptime),
        "devices": [{"name": name, "up": st.up, **({} if st.up else {"problem": st.problem,
                                                                     "down_since": round(st.down_since)})}
                    for name, st in s.poll.devices],
        "backlog_readings": c.backlog_readings,
        "oldest_backlog_s": round(max(now - oldest / 1e9, 0.0)) if oldest and c.backlog_readings else 0,
        "dropped_readings": c.readings_dropped,
        "flash_bytes_per_day": round(s.written * 86400 / uptime) if uptime >= 60 else None,
        "rss_bytes": s.governor.rss,
        "cpu": round(s.governor.cpu, 4),
        "governor": s.governor.level,
        "low_power": s.policy.low_power,
        "config_error": s.config_error or None,
        "update": s.update,
    }
