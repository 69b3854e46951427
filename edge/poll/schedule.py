"""Deadline scheduler for one poll group: cycle k is due at start + k * interval, never "last + interval",
so the schedule does not drift over hours however long each cycle takes.

A cycle that starts late is measured (jitter = start - deadline). A cycle still running when later
deadlines pass does not queue them up: those cycles are skipped and counted as overruns, and the group
resumes at the next deadline in the future.

Worked example: interval 1 s from t=0; cycle 0 runs 0.00..2.30 s -> deadlines 1 and 2 are missed
(2 overruns) and the next cycle is due at 3.0 s.

`stretch` (from the governor or low-power mode) multiplies the interval; the schedule re-anchors at the
current deadline so changing it never causes a burst.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field

LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)  # seconds a cycle started late, "le"


@dataclass
class Schedule:
    interval: float
    start: float
    stretch: float = 1.0
    k: int = 0
    cycles: int = 0
    overruns: int = 0
    jitter_last: float = 0.0
    jitter_max: float = 0.0
    jitter_sum: float = 0.0
    lateness: list[int] = field(default_factory=lambda: [0] * len(LATENESS_BUCKETS))  # per bucket

    @property
    def period(self) -> float:
        return self.interval * self.stretch

    @property
    def deadline(self) -> float:
        return self.start + self.k * self.period

    def begin(self, now: float) -> float:
        """Mark the start of the due cycle; returns its jitter (seconds late)."""
        jitter = max(0.0, now - self.deadline)
        self.cycles += 1
        self.jitter_last = jitter
        self.jitter_sum += jitter
        self.jitter_max = max(self.jitter_max, jitter)
        bucket = bisect_left(LATENESS_BUCKETS, jitter)
        if bucket < len(LATENESS_BUCKETS):
            self.lateness[bucket] += 1
        return jitter

    def advance(self, now: float) -> int:
        """After a cycle ends at `now`: move to the next deadline; returns overruns (skipped cycles)."""
        self.k += 1
        if self.deadline >= now:
            return 0
        behind = math.floor((now - self.deadline) / self.period) + 1
        self.k += behind
        self.overruns += behind
        return behind

    def carry(self, old: Schedule | None) -> None:
        """Continue the counters of the schedule this one replaces (a reload)."""
        if old is not None:
            self.cycles, self.overruns = old.cycles, old.overruns
            self.jitter_sum, self.jitter_max = old.jitter_sum, old.jitter_max
            self.lateness = list(old.lateness)

    def set_stretch(self, stretch: float) -> None:
        if stretch != self.stretch:
            self.start, self.k, self.stretch = self.deadline, 0, stretch
