"""The emulator's instance settings: ID scope, linked IoT hubs, timing knobs.

Timing choices:
- `assignment_delay` is how long an operation reads `assigning` after the register call;
  0 makes the first poll terminal (the register answer itself is always `202 assigning`,
  as the real service answers).
- `retry_after` is the `Retry-After` value (seconds) sent with every 202; 0 is allowed and
  sent as "0" (the C SDK clamps to 1 s, Python/Node use the value as-is). Use 0 with
  `assignment_delay` 0 for fleet runs that should not sleep.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

DEFAULT_ID_SCOPE = "0ne00000001"
ALLOCATION_POLICIES = ("hashed", "geoLatency", "static")


@dataclass
class Hub:
    name: str                      # host name, e.g. "hub1.azure-devices.net"
    weight: int = 1                # allocationWeight, 1..1000
    apply_allocation_policy: bool = True  # False: only chosen when an entry names it


@dataclass
class StubConfig:
    id_scope: str = DEFAULT_ID_SCOPE
    hubs: list[Hub] = field(default_factory=lambda: [Hub("hub1.azure-devices.net")])
    assignment_delay: float = 0.0
    retry_after: int = 1
    throttle: int = 0              # test knob: first N device requests per registration ID -> 429
    service_host: str = "localhost"  # resource URI host checked in service SAS tokens
    # Ports the service API answers on: a SAS whose resource is `service_host:PORT` (as the
    # service SDKs build it from a connection string's HostName) is accepted for these.
    # The server fills them in once its listeners are bound.
    service_ports: tuple[int, ...] = ()
    max_body: int = 96 * 1024
    allocation_policy: str = "hashed"  # instance default for entries that name none
    quota_units: int = 0           # DPS quotas (core/quotas.py); 0 = unlimited

    def __post_init__(self) -> None:
        self.hubs = [h if isinstance(h, Hub) else Hub(**h) for h in self.hubs]
        self.service_ports = tuple(self.service_ports)
        problems = config_problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    def service_resources(self) -> tuple[str, ...]:
        """The resource hosts a service SAS may name: the host, alone or with a port."""
        return (self.service_host, *(f"{self.service_host}:{port}" for port in self.service_ports))

    def hub(self, name: str) -> Hub | None:
        """The linked hub with this host name (case-insensitive), or None."""
        wanted = name.lower()
        for hub in self.hubs:
            if hub.name.lower() == wanted:
                return hub
        return None

    def to_dict(self) -> dict:
        return asdict(self)


def config_problems(config: StubConfig) -> list[str]:
    """Every reason the configuration is unusable, as short phrases naming the fix."""
    problems = []
    if not config.id_scope or not config.id_scope.isalnum():
        problems.append("id_scope must be non-empty and alphanumeric (e.g. 0ne00000001)")
    seen = set()
    for hub in config.hubs:
        if not hub.name or "/" in hub.name or " " in hub.name:
            problems.append(f"hub name {hub.name!r} must be a host name")
        if hub.name.lower() in seen:
            problems.append(f"hub {hub.name!r} is listed twice")
        seen.add(hub.name.lower())
        if not 1 <= int(hub.weight) <= 1000:
            problems.append(f"hub {hub.name!r} weight must be 1..1000")
    if config.assignment_delay < 0:
        problems.append("assignment_delay must be >= 0")
    if config.retry_after < 0:
        problems.append("retry_after must be >= 0")
    if config.throttle < 0:
        problems.append("throttle must be >= 0")
    if not all(isinstance(p, int) and 0 < p < 65536 for p in config.service_ports):
        problems.append("service_ports must be TCP port numbers 1..65535")
    if not 0 <= config.quota_units <= 10_000:
        problems.append("quota_units must be 0..10000")
    if config.max_body < 1024:
        problems.append("max_body must be at least 1024 bytes")
    if config.allocation_policy not in ALLOCATION_POLICIES:
        problems.append(f"allocation_policy must be one of {', '.join(ALLOCATION_POLICIES)}")
    return problems
