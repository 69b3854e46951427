"""The poll stage: what the other stages use of it.

Names are loaded on first use: edge.config reads edge.poll.types (the type table) without loading the
engine and pymodbus."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge.poll.decode import compile_block, encode
    from edge.poll.engine import LATENCY_BUCKETS, Poller, PollSnapshot
    from edge.poll.health import backoff
    from edge.poll.plan import plan_config, summarize
    from edge.poll.schedule import LATENESS_BUCKETS
    from edge.poll.transport import RequestError, url_link
    from edge.poll.types import MAX_BITS_PER_READ, MAX_REGISTERS_PER_READ, TABLES, TYPES

_HOME = {
    "compile_block": "decode", "encode": "decode", "LATENCY_BUCKETS": "engine", "Poller": "engine",
    "PollSnapshot": "engine", "backoff": "health", "plan_config": "plan", "summarize": "plan",
    "LATENESS_BUCKETS": "schedule", "RequestError": "transport", "url_link": "transport",
    "MAX_BITS_PER_READ": "types", "MAX_REGISTERS_PER_READ": "types", "TABLES": "types", "TYPES": "types",
}
__all__ = ["LATENCY_BUCKETS", "LATENESS_BUCKETS", "MAX_BITS_PER_READ", "MAX_REGISTERS_PER_READ", "TABLES",
           "TYPES", "PollSnapshot", "Poller", "RequestError", "backoff", "compile_block", "encode",
           "plan_config", "summarize", "url_link"]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'edge.poll' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edge.poll.{home}"), name)
