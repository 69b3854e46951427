"""Helpers for poller tests: a collecting sink that can be awaited, and config building."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from edge.config import Config, parse
from edge.reading import Reading


class Collector:
    """A sink that keeps every reading and lets a test await a condition on them (no sleeps)."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.batches: list[tuple[float, list[Reading]]] = []
        self._changed = asyncio.Event()

    def __call__(self, readings: list[Reading]) -> None:
        self.readings.extend(readings)
        self.batches.append((time.monotonic(), readings))
        self._changed.set()

    async def until(self, predicate: Callable[[list[Reading]], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.readings):
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met after {timeout} s; last: {self.readings[-5:]}")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue

    def of(self, tag: int) -> list[Reading]:
        return [r for r in self.readings if r[0] == tag]


def config(devices: list[dict[str, Any]], buses: list[dict[str, Any]] | None = None) -> Config:
    return parse({"appliance": {"id": "test", "state_dir": "/tmp/edge-test"}, "device": devices,
                  "bus": buses or []})


def tag_id(cfg: Config, device: str, tag: str) -> int:
    d = next(d for d in cfg.devices if d.name == device)
    return next(t.id for t in d.tags if t.name == tag)
