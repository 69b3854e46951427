"""Read config.toml, validate it into frozen dataclasses, report every error by key path.

Every problem is collected (not just the first) and reported as one line each, e.g.::

    device[1].tag[4].type: unknown type "flaot32" (one of: bool, bit, int8, ...)

Indices are 0-based, in file order. Nothing is silently dropped: unknown keys, overlapping tags,
duplicate names and addresses beyond 65535 are all errors. Durations are seconds (number) or strings
such as "250ms", "1.5s", "5m", "2h"; sizes are bytes (integer) or strings such as "64MiB", "1GB".
See docs/config.md for the reference with defaults.

The layers, each a module:

    schema    the sections as frozen dataclasses (`*Config`) and ConfigError
    tag       a tag, packed (Tag, its shared Kind), tag_id(), and TagIndex: devices and tags by id
    reader    typed access to one TOML table with key-path errors
    sections  each section read and checked; parse() a whole document
    source    a file read, checked and parsed (tag tables streamed); load(); a pushed config kept
    boot      a config and secrets dropped on the boot partition, taken into the state directory
"""

from edge.config.boot import CONFIG_ERROR, import_dir, imported_error
from edge.config.schema import (
    ApplianceConfig,
    BusConfig,
    CommandsConfig,
    Config,
    ConfigError,
    DeviceConfig,
    GovernorConfig,
    LowPowerConfig,
    MetricsConfig,
    PollGroup,
    StoreConfig,
    TlsConfig,
    UpdateConfig,
    UplinkConfig,
    connections,
    default_frame_gap,
)
from edge.config.sections import MIN_KEY_BYTES, parse
from edge.config.source import (
    MAX_CONFIG_BYTES,
    check_devices,
    keep,
    load,
    load_for_run,
    loads,
    persisted,
    with_id,
)
from edge.config.tag import DEFAULT_GROUP, Kind, Tag, TagIndex, tag_id

__all__ = [
    "CONFIG_ERROR",
    "DEFAULT_GROUP",
    "MAX_CONFIG_BYTES",
    "MIN_KEY_BYTES",
    "ApplianceConfig",
    "BusConfig",
    "CommandsConfig",
    "Config",
    "ConfigError",
    "DeviceConfig",
    "GovernorConfig",
    "Kind",
    "LowPowerConfig",
    "MetricsConfig",
    "PollGroup",
    "StoreConfig",
    "Tag",
    "TagIndex",
    "TlsConfig",
    "UpdateConfig",
    "UplinkConfig",
    "check_devices",
    "connections",
    "default_frame_gap",
    "import_dir",
    "imported_error",
    "keep",
    "load",
    "load_for_run",
    "loads",
    "parse",
    "persisted",
    "tag_id",
    "with_id",
]
