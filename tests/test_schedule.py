"""Scheduler and device health: pure state machines driven by explicit clocks."""

from __future__ import annotations

import random

import pytest

from edge.poll.health import Breaker, LatencyFilter, backoff
from edge.poll.schedule import Schedule


def test_no_drift_over_a_day_of_cycles() -> None:
    """100 ms cycles with 3 ms of work each for 24 h: the 864,000th deadline is exact."""
    s = Schedule(0.1, start=1000.0)
    for _ in range(864_000):
        s.begin(s.deadline + 0.001)
        assert s.advance(s.deadline + 0.003) == 0
    assert s.deadline == pytest.approx(1000.0 + 86_400.0, abs=1e-6)
    assert s.overruns == 0
    assert s.jitter_max == pytest.approx(0.001)


def test_overrun_skips_and_counts_worked_example() -> None:
    s = Schedule(1.0, start=0.0)
    s.begin(0.0)
    assert s.advance(2.3) == 2
    assert s.deadline == 3.0
    assert s.overruns == 2


def test_stretch_reanchors_without_burst() -> None:
    s = Schedule(1.0, start=0.0)
    for _ in range(5):
        s.begin(s.deadline)
        s.advance(s.deadline)
    s.set_stretch(4.0)
    assert s.deadline == 5.0
    s.begin(5.0)
    s.advance(5.1)
    assert s.deadline == 9.0


def test_latency_filter_adapts_and_backs_off() -> None:
    f = LatencyFilter(cap=1.0, floor=0.02)
    assert f.timeout() == 1.0  # nothing known yet: the configured timeout
    for _ in range(50):
        f.update(0.005)
    assert f.timeout() == pytest.approx(0.02)  # floor
    for _ in range(50):
        f.update(0.1)
    assert 0.1 <= f.timeout() < 0.2
    f.on_timeout()
    f.on_timeout()
    assert f.timeout() >= 0.4
    for _ in range(10):
        f.on_timeout()
    assert f.timeout() == 1.0  # capped


def test_breaker_opens_probes_and_closes() -> None:
    b = Breaker(threshold=3, base=1.0, cap=8.0)
    assert not b.failure(0.0) and not b.failure(0.1)
    assert b.failure(0.2) and b.is_open
    assert not b.allow(0.3)  # open: not asked
    assert b.allow(10.0)  # half-open probe after the pause
    assert not b.allow(10.01)  # only one probe per pause
    b.failure(10.1)
    assert b.opened == 1
    assert b.success() and not b.is_open


def test_backoff_is_jittered_and_capped() -> None:
    rng = random.Random(1)
    draws = [backoff(3, 0.5, 30.0, rng) for _ in range(200)]
    assert min(draws) >= 2.0 and max(draws) <= 4.0 and len(set(draws)) > 100
    assert all(15.0 <= backoff(40, 0.5, 30.0, rng) <= 30.0 for _ in range(50))
