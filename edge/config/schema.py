"""The configuration's schema: one frozen dataclass per section (`*Config`), the constants of the Modbus
tables, and ConfigError. Values here are already validated (edge.config.sections makes them)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edge.config.tag import Tag, TagIndex
from edge.poll.types import MAX_BITS_PER_READ, MAX_REGISTERS_PER_READ


class ConfigError(Exception):
    """One or more configuration problems, each a line naming its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ApplianceConfig:
    id: str  # "" until `edge run` makes the machine id (edge.identity)
    state_dir: Path
    id_source: str = "config"  # where the id comes from: config, board serial (...), machine id (...)


@dataclass(frozen=True, slots=True)
class BusConfig:
    name: str
    port: str
    baud: int = 19200
    parity: str = "E"
    stop_bits: int = 1
    byte_size: int = 8
    timeout: float = 0.5
    frame_gap: float = 0.0  # seconds of silence between frames; derived from 3.5 characters when not set
    rs485_rts: bool = False  # the driver drives RTS high while sending (kernel RS-485 mode, TIOCSRS485)

    @property
    def bits_per_char(self) -> int:
        return 1 + self.byte_size + (self.parity != "N") + self.stop_bits

    def wire_time(self, nbytes: int) -> float:
        """Seconds on the line for nbytes; 8E1 at 9600 baud: 8 bytes -> 8 * 11 / 9600 = 9.17 ms."""
        return nbytes * self.bits_per_char / self.baud


def default_frame_gap(baud: int, bits_per_char: int) -> float:
    """Modbus RTU t3.5: 3.5 character times, fixed at 1.75 ms above 19200 baud (spec 2.5.1.1)."""
    return 0.00175 if baud > 19200 else 3.5 * bits_per_char / baud


@dataclass(frozen=True, slots=True)
class PollGroup:
    name: str
    interval: float
    priority: int = 0  # 0 is most important; the governor stretches/sheds higher numbers first



@dataclass(frozen=True, slots=True)
class DeviceConfig:
    name: str
    unit: int
    tags: tuple[Tag, ...]
    groups: tuple[PollGroup, ...]
    host: str | None = None
    port: int = 502
    bus: str | None = None
    timeout: float = 1.0
    retries: int = 1
    max_registers: int = MAX_REGISTERS_PER_READ
    max_bits: int = MAX_BITS_PER_READ
    single_register_reads: bool = False
    pause: float = 0.0
    max_gap: int | None = None  # registers read across to join two tags; None: derived from request overhead
    writable: tuple[tuple[str, float | None, float | None], ...] = ()  # (tag name, min, max) of writable tags
    rtu_over_tcp: bool = False  # transport = "rtu-over-tcp": RTU frames (CRC, no MBAP) on the TCP socket
    shared_connection: bool = True  # one connection with the other devices at the same host:port
    connect_pause: float = 0.0  # s of quiet after connecting, before the first request (TCP)
    close_after_cycle: bool = False  # the connection closed after each poll cycle of this device (TCP)
    write_multiple: bool = False  # writes as FC 16 / FC 15 even for one register / one coil

    @property
    def transport(self) -> str:
        return "rtu" if self.host is None else "rtu-over-tcp" if self.rtu_over_tcp else "tcp"


def connections(devices: Iterable[DeviceConfig]) -> list[list[DeviceConfig]]:
    """The TCP devices grouped by the connection they are polled on, in config order: the devices at one
    host:port share one (a gateway fronting an RS-485 bus: several unit ids, one request at a time),
    except those with shared_connection = false, which have one each."""
    shared: dict[tuple[str, int], list[DeviceConfig]] = {}
    out: list[list[DeviceConfig]] = []
    for d in devices:
        if d.host is None:
            continue
        if not d.shared_connection:
            out.append([d])
        elif (d.host, d.port) in shared:
            shared[(d.host, d.port)].append(d)
        else:
            out.append(shared.setdefault((d.host, d.port), [d]))
    return out


@dataclass(frozen=True, slots=True)
class StoreConfig:
    path: Path
    map_size: int = 1 << 30
    reserve: bool = True  # allocate the data file up to map_size (fallocate, nothing written)
    commit_interval: float = 1.0
    ack_wait: float = 1.0  # memory-first: seconds a staged window waits for its PUBACKs (0: write first)
    commit_bytes: int = 256 * 1024
    low_power_commit_interval: float = 30.0
    high_watermark: float = 0.8
    low_watermark: float = 0.7


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "edge"
    username: str | None = None
    password_file: Path | None = None
    tls: TlsConfig | None = None
    keepalive: float = 30.0
    max_inflight: int = 16
    batch_blocks: int = 64
    backoff_min: float = 1.0
    backoff_max: float = 300.0
    publish_timeout: float = 10.0
    format: str = "json"  # "json" (docs/payload.md) or "sparkplug_b" (edge.sparkplug)
    sparkplug_group: str = "edge"  # Sparkplug B group id
    sparkplug_host: str = ""  # the primary host application's id: data held while its STATE is offline
    health_interval: float = 60.0  # seconds between health messages (0: none)
    protocol: str = "5"  # MQTT "5" or "3.1.1" (brokers that speak only that)
    drain_rate: float = 0.0  # messages a second the backlog is sent at, at most (0: as fast as acked)
    max_message_bytes: int = 128 << 10  # a block's message above this goes out in parts
    require_subscriber: bool = False  # PUBACK 0x10 (no matching subscribers): keep the block, retry later


@dataclass(frozen=True, slots=True)
class LowPowerConfig:
    on_battery: bool = True
    control_file: Path | None = None
    schedule: tuple[tuple[str, str], ...] = ()  # ("22:00", "06:00") local-time windows
    interval_factor: float = 10.0
    uplink_session_interval: float = 900.0


@dataclass(frozen=True, slots=True)
class GovernorConfig:
    enabled: bool = True
    memory_soft: int | None = None  # bytes; None: from cgroup memory.high, else 60% of memory.max
    memory_hard: int | None = None  # bytes; None: 85% of cgroup memory.max
    cpu_budget: float = 0.5  # fraction of one core
    window: float = 30.0  # seconds of the sliding window; no decision on a single sample
    max_stretch: float = 8.0
    low_power: LowPowerConfig = field(default_factory=LowPowerConfig)


@dataclass(frozen=True, slots=True)
class CommandsConfig:
    """Remote writes over MQTT (cmd/write): off unless keys are configured; each command signed."""

    remote: bool = False
    keys: tuple[tuple[str, bytes], ...] = ()  # (name, HMAC-SHA256 key) pairs, read from their files
    max_age: float = 600.0  # a command's `expires` may be at most this far in the future
    remote_config: bool = False  # whole configs on cmd/config, signed like writes, tried before kept
    config_trial: float = 60.0  # seconds a pushed config has to poll every device and deliver a block
    remote_update: bool = False  # image updates on cmd/update (a bundle's URL), signed like writes

    def __repr__(self) -> str:  # keys are secrets: never in a log line or a traceback
        return (f"Commands(remote={self.remote}, keys={[n for n, _ in self.keys]}, max_age={self.max_age}, "
                f"remote_config={self.remote_config}, config_trial={self.config_trial}, "
                f"remote_update={self.remote_update})")


@dataclass(frozen=True, slots=True)
class UpdateConfig:
    """Image updates with RAUC (edge.update): a new root slot on trial until edge proves healthy on it."""

    enabled: bool = False
    trial: float = 300.0  # seconds a newly installed slot has to poll and store or deliver
    max_bundle: int = 1 << 30  # bytes: a bundle fetched from a URL, at most
    rauc: str = "rauc"  # the RAUC client (its service holds the slots and the keyring)
    # run after a failed trial (the bootloader then starts the old slot) and for a cmd/update's reboot: edge
    # holds no privilege to reboot; on the image, edge-reboot.path reboots when this file appears
    reboot: str = "touch /run/edge/reboot"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    listen: str = "127.0.0.1"
    port: int = 9108


@dataclass(frozen=True, slots=True)
class Config:
    appliance: ApplianceConfig
    buses: tuple[BusConfig, ...]
    devices: tuple[DeviceConfig, ...]
    store: StoreConfig
    uplink: UplinkConfig
    governor: GovernorConfig
    metrics: MetricsConfig
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    tags: TagIndex = field(init=False, repr=False, compare=False)  # every device's tags by id

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", TagIndex((d.name, t) for d in self.devices for t in d.tags))
