"""QEMU's migration parameters and capabilities, with QEMU's names and 10.0 defaults
(migration/options.c; qemu-migration.md §3.2)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

CAPABILITIES = ("auto-converge", "return-path", "switchover-ack", "postcopy-ram")


@dataclass
class Params:
    downtime_limit: int = 300  # ms
    max_bandwidth: int = 128 << 20  # B/s (MAX_THROTTLE)
    avail_switchover_bandwidth: int = 0  # B/s, 0: use the measured bandwidth
    throttle_trigger_threshold: int = 50  # %
    cpu_throttle_initial: int = 20  # %
    cpu_throttle_increment: int = 10  # %
    cpu_throttle_tailslow: bool = False
    max_cpu_throttle: int = 99  # %
    capabilities: set[str] = field(default_factory=set)

    def cap(self, name: str) -> bool:
        return name in self.capabilities

    def set(self, name: str, raw: str) -> None:
        """``--parameter NAME=VALUE`` with QEMU's parameter name; ValueError if unknown or
        out of QEMU's range (migrate_params_check)."""
        attr = name.replace("-", "_")
        known = [f.name for f in fields(self) if f.name != "capabilities"]
        if attr not in known:
            names = ", ".join(k.replace("_", "-") for k in known)
            raise ValueError(f"unknown migration parameter {name!r} (known: {names})")
        if attr == "cpu_throttle_tailslow":
            if raw.lower() not in ("on", "off", "true", "false", "1", "0"):
                raise ValueError(f"{name} takes on or off, not {raw!r}")
            setattr(self, attr, raw.lower() in ("on", "true", "1"))
            return
        try:
            value = int(raw, 0)
        except ValueError:
            raise ValueError(f"{name} takes an integer, not {raw!r}") from None
        setattr(self, attr, value)
        self.check()

    def check(self) -> None:
        """migrate_params_check's ranges."""
        if not 0 <= self.downtime_limit <= 2_000_000:
            raise ValueError("downtime-limit must be within [0, 2000000] ms")
        if self.max_bandwidth <= 0 or self.avail_switchover_bandwidth < 0:
            raise ValueError("max-bandwidth must be > 0 and avail-switchover-bandwidth >= 0")
        if not 1 <= self.throttle_trigger_threshold <= 100:
            raise ValueError("throttle-trigger-threshold must be within [1, 100]")
        for n in ("cpu_throttle_initial", "max_cpu_throttle"):
            if not 1 <= getattr(self, n) <= 99:
                raise ValueError(f"{n.replace('_', '-')} must be within [1, 99]")
        if not 1 <= self.cpu_throttle_increment <= 99:
            raise ValueError("cpu-throttle-increment must be within [1, 99]")

    def check_capabilities(self) -> None:
        """migrate_caps_check: switchover-ack needs return-path."""
        unknown = self.capabilities - set(CAPABILITIES)
        if unknown:
            raise ValueError(
                f"unknown capability {sorted(unknown)[0]!r} (known: {', '.join(CAPABILITIES)})"
            )
        if self.cap("switchover-ack") and not self.cap("return-path"):
            raise ValueError("Capability 'switchover-ack' requires capability 'return-path'")
