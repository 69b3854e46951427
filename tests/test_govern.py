"""The governor against fake cgroup trees and scripted RSS/CPU samples (the decisions, unit-level);
the real-cgroup kill/restart path is in test_systemd.py."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from edge.config import Config, parse
from edge.govern import Governor, Limits, in_schedule, read_limits
from edge.poll import Poller

MIB = 1 << 20


def test_cgroup2_limits(tmp_path: Path) -> None:
    d = tmp_path / "system.slice" / "edge.service"
    d.mkdir(parents=True)
    (d / "memory.max").write_text(f"{128 * MIB}\n")
    (d / "memory.high").write_text(f"{96 * MIB}\n")
    (d / "cpu.max").write_text("50000 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/edge.service\n")
    assert read_limits(tmp_path, proc) == Limits(128 * MIB, 96 * MIB, 0.5, "cgroup2")
    (d / "memory.high").write_text("max\n")
    (d / "cpu.max").write_text("max 100000\n")
    assert read_limits(tmp_path, proc) == Limits(128 * MIB, None, None, "cgroup2")


def test_cgroup1_limits_and_none(tmp_path: Path) -> None:
    mem = tmp_path / "memory" / "edge.service"
    cpu = tmp_path / "cpu" / "edge.service"
    mem.mkdir(parents=True)
    cpu.mkdir(parents=True)
    (mem / "memory.limit_in_bytes").write_text(f"{64 * MIB}\n")
    (cpu / "cpu.cfs_quota_us").write_text("25000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("9:memory:/edge.service\n3:cpu,cpuacct:/edge.service\n1:name=systemd:/edge.service\n"
                    "0::/edge.service\n")
    assert read_limits(tmp_path, proc) == Limits(64 * MIB, None, 0.25, "cgroup1")
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1 "unlimited"
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert read_limits(tmp_path, proc) == Limits(None, None, None, "cgroup1")
    assert read_limits(tmp_path / "nowhere", tmp_path / "missing") == Limits()


class Script:
    """A sampler replaying RSS values; CPU time advancing at `cpu` cores per tick."""

    def __init__(self) -> None:
        self.rss = 30 * MIB
        self.cpu = 0.1
        self.t = 0.0

    def __call__(self) -> tuple[int, float]:
        self.t += self.cpu
        return self.rss, self.t


def config_of(tmp_path: Path, factor: float = 10, commit: str = "60s") -> Config:
    return parse({
        "appliance": {"id": "g", "state_dir": str(tmp_path)},
        "device": [{"name": "d", "host": "127.0.0.1", "port": 1,
                    "group": {"fast": {"interval": 0.1, "priority": 0},
                              "slow": {"interval": 10, "priority": 5},
                              "trend": {"interval": 1, "priority": 2}},
                    "tag": [{"name": "a", "address": 0, "group": "fast"},
                            {"name": "b", "address": 1, "group": "slow"},
                            {"name": "c", "address": 2, "group": "trend"}]}],
        "store": {"commit_interval": "1s", "low_power_commit_interval": commit},
        "governor": {"window": 5, "memory_soft": "64MiB", "memory_hard": "96MiB", "cpu_budget": 0.5,
                     "low_power": {"control_file": str(tmp_path / "low-power"), "on_battery": True,
                                   "interval_factor": factor}},
    })


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return config_of(tmp_path)


PRIORITIES = {"fast": 0, "slow": 5, "trend": 2}


def stretches(gov: Governor) -> dict[str, float]:
    return {group: gov.current().stretch_for(p) for group, p in PRIORITIES.items()}


def run(gov: Governor, ticks: int, t0: list[float]) -> None:
    for _ in range(ticks):
        t0[0] += 1.0
        gov.step(t0[0])


def test_memory_pressure_stretches_sheds_and_recovers(config: Config) -> None:
    script, clock = Script(), [0.0]
    gov = Governor(config, limits=Limits(), sample=script, battery=lambda: False)
    run(gov, 5, clock)
    assert gov.level == "normal" and stretches(gov) == {"fast": 1.0, "slow": 1.0, "trend": 1.0}
    script.rss = 70 * MIB  # above soft
    asked = gov.current().commit_now
    run(gov, 5, clock)
    assert gov.level == "soft"
    assert stretches(gov) == {"fast": 1.0, "slow": 2.0, "trend": 2.0}  # priority 0 untouched
    assert gov.current().commit_now > asked  # the open window goes to flash now
    run(gov, 5, clock)
    assert stretches(gov)["slow"] == 4.0
    script.rss = 100 * MIB  # above hard: the lowest priority (5) is stopped
    run(gov, 5, clock)
    assert gov.level == "shed" and gov.shed_priority == 5 and stretches(gov)["slow"] >= 1e6
    run(gov, 5, clock)
    assert gov.shed_priority == 2  # still above: the next level goes too, never priority 0
    assert stretches(gov)["fast"] == 1.0
    script.rss = 40 * MIB  # pressure gone: recover one step per window
    run(gov, 5, clock)
    assert gov.shed_priority is None and stretches(gov)["slow"] == 4.0
    run(gov, 15, clock)
    assert gov.level == "normal" and stretches(gov) == {"fast": 1.0, "slow": 1.0, "trend": 1.0}


def test_a_single_noisy_sample_decides_nothing(config: Config) -> None:
    script, clock = Script(), [0.0]
    gov = Governor(config, limits=Limits(), sample=script, battery=lambda: False)
    for i in range(20):
        script.rss = 200 * MIB if i % 5 == 2 else 30 * MIB  # one spike in every window
        run(gov, 1, clock)
    assert gov.level == "normal" and gov.decisions == 0


def test_cpu_budget_stretches_everything_then_relaxes(config: Config) -> None:
    script, clock = Script(), [0.0]
    gov = Governor(config, limits=Limits(cpu_cores=2.0), sample=script, battery=lambda: False)
    script.cpu = 0.9  # 0.9 of a core against a budget of 0.5
    run(gov, 5, clock)
    assert stretches(gov)["fast"] == pytest.approx(1.8)
    script.cpu = 0.1
    run(gov, 20, clock)
    assert stretches(gov)["fast"] == 1.0


def test_limits_from_the_cgroup_when_not_configured(config: Config) -> None:
    config = dataclasses.replace(config, governor=config.governor.__class__(cpu_budget=0.9))
    gov = Governor(config, limits=Limits(100 * MIB, None, 0.25, "cgroup1"), sample=Script())
    assert (gov.soft, gov.hard, gov.cpu_budget) == (60 * MIB, 85 * MIB, 0.25)


def test_low_power_by_control_file_battery_and_signal(config: Config, tmp_path: Path) -> None:
    script, clock, battery = Script(), [0.0], [False]
    gov = Governor(config, limits=Limits(), sample=script, battery=lambda: battery[0])
    run(gov, 1, clock)
    p = gov.current()
    assert not p.low_power and p.commit_interval == 1.0 and p.session_interval is None
    (tmp_path / "low-power").touch()
    run(gov, 1, clock)
    p = gov.current()
    assert p.low_power and stretches(gov) == {"fast": 10.0, "slow": 10.0, "trend": 10.0}
    assert p.commit_interval == 60.0 and p.session_interval == 900.0
    (tmp_path / "low-power").unlink()
    run(gov, 1, clock)
    p = gov.current()
    assert not p.low_power and p.commit_interval == 1.0 and p.session_interval is None
    battery[0] = True
    run(gov, 1, clock)
    assert gov.current().low_power
    gov.toggle_low_power()  # SIGUSR2 overrides the automatic choice
    assert not gov.current().low_power
    gov.toggle_low_power()
    assert gov.current().low_power


def test_a_reload_keeps_low_power_and_applies_the_new_sections(config: Config, tmp_path: Path) -> None:
    gov = Governor(config, limits=Limits(), sample=Script(), battery=lambda: False)
    gov.toggle_low_power()  # SIGUSR2: on, whatever the automatic sources say
    script_rss = Script()
    script_rss.rss = 70 * MIB
    gov.sample = script_rss
    run(gov, 5, [0.0])
    assert gov.level == "soft"
    gov.reconfigure(config_of(tmp_path, factor=4, commit="45s"))
    p = gov.current()
    assert p.low_power and p.low_power_factor == 4.0 and p.commit_interval == 45.0
    assert p.session_interval == 900.0 and p.memory_stretch == 2.0  # the memory level carried over too
    assert gov.cfg.low_power.interval_factor == 4.0


def test_the_poller_reads_the_policy_at_each_turn(config: Config) -> None:
    """Stages are never pushed into: a line sets its schedules' stretches from the current policy."""
    gov = Governor(config, limits=Limits(), sample=Script(), battery=lambda: False)
    poller = Poller(config, lambda readings: None, gov.current)
    (line,) = poller.lines
    line.make_schedules(0.0)
    gov.toggle_low_power()
    line.steer(gov.current())
    assert {s.group: s.schedule.stretch for s in line.schedules} == dict.fromkeys(PRIORITIES, 10.0)
    poller.close()


def test_schedule_windows() -> None:
    night = (("22:00", "06:00"),)
    assert in_schedule(night, dt.datetime(2026, 1, 1, 5, 59))
    assert not in_schedule(night, dt.datetime(2026, 1, 1, 6, 0))
    assert in_schedule((("12:00", "13:00"),), dt.datetime(2026, 1, 1, 12, 30))
    assert not in_schedule((), dt.datetime(2026, 1, 1, 12, 30))
