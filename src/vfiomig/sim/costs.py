"""The cost model: how much simulated time each thing the migration does takes.

Nothing here is measured on this machine's Python: each default comes from a figure measured
on real QEMU/hardware (``measured``), from arithmetic on published limits in the spec's §5
(``derived``), or is a plain assumption where nothing public exists (``assumed``). `vfiomig
migrate --json` reports the model it used, so a result can always be traced to its inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

GIB = 1 << 30
TIB = 1 << 40


@dataclass(frozen=True)
class Cost:
    value: float
    unit: str
    basis: str  # measured | derived | assumed
    source: str


@dataclass(frozen=True)
class CostModel:
    # QEMU 10.0.2 migrated an idle (all-zero) 1 GiB guest in about 100 ms, bound by the zero
    # check (buffer_is_zero) at about 10 GB/s (qemu-migration.md §3.1).
    zero_scan_rate: Cost = Cost(10e9, "B/s", "measured", "QEMU 10.0.2, idle 1 GiB guest")
    # Loopback link when no --link is given: one channel ran the stop-copy burst at about
    # 2 GB/s on this kind of 2-core machine (§3.1: 0.65-2.8 GB/s; §4d: about 2 GB/s).
    loopback_rate: Cost = Cost(2e9, "B/s", "measured", "QEMU 10.0.2 stop-copy burst, loopback")
    # A dirty sync: KVM's log and QEMU's bitmaps are one bit per page; streaming a 32 MiB
    # bitmap takes 1-4 ms (§5), 2 ms per TiB of guest per bitmap pass.
    bitmap_pass: Cost = Cost(2e-3 / TIB, "s/B of RAM", "derived", "§5: 32 MiB bitmap in 1-4 ms")
    # Fixed cost of one sync (ioctl round trips, locking), whatever the size.
    sync_fixed: Cost = Cost(100e-6, "s", "assumed", "no public figure")
    # IOMMU_HWPT_GET_DIRTY_BITMAP walks 8 bytes of PTE per leaf at 10-20 GB/s (§5: 1 TiB at
    # 4 KiB = 2 GiB of PTEs, 0.1-0.2 s), i.e. 0.15 s per 2 GiB of PTEs.
    iommu_walk_rate: Cost = Cost(15e9, "B/s of PTE", "derived", "§5: 2 GiB of PTEs per TiB")
    # Device DMA log report: the device's own log is read like a bitmap (§5 bitmap pass).
    device_log_pass: Cost = Cost(2e-3 / TIB, "s/B tracked", "derived", "§5 bitmap pass")
    # One device state transition (an ioctl that quiesces or starts a function).
    device_transition: Cost = Cost(1e-3, "s", "assumed", "no public hisi/mlx5 figure")
    # Destination load of device state: mlx5 spent about 1480 ms on 300 MB of state without
    # switchover-ack, resource allocation that precopy's initial data moves off the downtime
    # (§4b: 1900 ms vs 420 ms), i.e. about 4.9 ms per MB of state not pre-loaded.
    device_load_rate: Cost = Cost(300e6 / 1.48, "B/s", "derived", "§4b mlx5 300 MB, 1480 ms")
    # vCPU stop and start (pause_all_vcpus / resume), per switchover.
    vcpu_stop: Cost = Cost(1e-3, "s", "assumed", "no public figure")
    # Setup: memory listeners, bitmaps allocation, per TiB of guest (one bitmap pass).
    setup_fixed: Cost = Cost(5e-3, "s", "assumed", "no public figure")
    # One-way latency of the link (ACKs on the return path).
    link_latency: Cost = Cost(50e-6, "s", "assumed", "loopback / LAN round trip")

    def table(self) -> dict[str, dict[str, object]]:
        return {f.name: asdict(getattr(self, f.name)) for f in fields(self)}

    def sync_time(self, ram_bytes: int) -> float:
        """A RAM bitmap sync of the vCPU log (KVM) into QEMU's bitmaps."""
        return self.sync_fixed.value + 2 * ram_bytes * self.bitmap_pass.value

    def hwpt_read_time(self, ram_bytes: int, leaf: int) -> float:
        """IOMMU_HWPT_GET_DIRTY_BITMAP over ``ram_bytes`` mapped with ``leaf``-byte IOPTEs."""
        return (ram_bytes // leaf) * 8 / self.iommu_walk_rate.value + ram_bytes * (
            self.bitmap_pass.value
        )
