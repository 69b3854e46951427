"""The policy: what the governor wants of the pipeline now, as one immutable value.

The governor is its only author (edge.govern); poll, store and uplink read the current policy at each
turn of their loops (a callable returning it) and act on it. No stage is pushed into: a stage built by a
reload reads the same current policy as the one it replaces, so low power and stretching survive it.

    stretch_for(p)     interval multiplier of a poll group of priority p (0 = most important):
                       max(cpu_stretch, memory_stretch if p >= 1) x low_power_factor, or STOPPED
                       when p >= shed_priority
    commit_interval    seconds of the store's commit window (None: the store's configured one)
    session_interval   None: the uplink stays connected; else it works in sessions (connect, drain,
                       disconnect) this many seconds apart
    commit_now         a counter: each increase asks the store to commit its open window at once

    >>> p = Policy(cpu_stretch=1.5, memory_stretch=2.0, low_power_factor=10.0, shed_priority=5)
    >>> p.stretch_for(0), p.stretch_for(1), p.stretch_for(5) == STOPPED
    (15.0, 20.0, True)
"""

from __future__ import annotations

from dataclasses import dataclass

STOPPED = 1e6  # a stretch that puts a group's next deadline beyond any horizon


@dataclass(frozen=True, slots=True)
class Policy:
    low_power: bool = False
    cpu_stretch: float = 1.0  # every group: CPU above budget
    memory_stretch: float = 1.0  # groups of priority >= 1: memory above the soft limit
    low_power_factor: float = 1.0  # every group, in low-power mode
    shed_priority: int | None = None  # groups of this priority and above are stopped
    commit_interval: float | None = None
    session_interval: float | None = None
    commit_now: int = 0

    def stretch_for(self, priority: int) -> float:
        if self.shed_priority is not None and priority >= self.shed_priority:
            return STOPPED
        return max(self.cpu_stretch, self.memory_stretch if priority > 0 else 1.0) * self.low_power_factor


NORMAL = Policy()


def normal() -> Policy:
    """The policy of a pipeline without a governor (tests, `edge poll`)."""
    return NORMAL
