"""Shared fixtures. Real peers (devices, socat ptys, mosquitto) and helpers live in tests/support.py."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_leaked_tasks() -> Iterator[None]:
    """Fail a test that leaves asyncio tasks pending on a loop that is still open."""
    yield
    gc.collect()
    leaked = []
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.Task) and not obj.done():
            loop = obj.get_loop()
            if not loop.is_closed():
                leaked.append(obj.get_name())
    assert not leaked, f"leaked asyncio tasks: {leaked}"
