"""`vfiomig demo`: migrate a guest with a HiSilicon accelerator VF between two model hosts.

Until the migration engine lands this is the most real thing vfiomig runs end to end: two
ModelKernels (source and destination host), each with a hisi_acc VF behind an SMMUv3, driven
only through vfiomig.host (the same uAPI bytes a VMM sends to Linux):

1. the source binds the VF to iommufd, allocates a dirty-tracking HWPT, maps guest RAM;
2. a guest driver starts the accelerator's queue manager; the device DMAs into guest RAM;
3. pre-copy: RUNNING -> PRE_COPY (40 bytes of match data), rounds of
   IOMMU_HWPT_GET_DIRTY_BITMAP while the device keeps writing, copying only dirty pages;
4. stop-copy: PRE_COPY -> STOP_COPY, the last dirty pages and the 176-byte device state;
5. the destination resumes the VF and its RAM; the result is checked byte for byte;
6. the same workload on a legacy type1 container: every mapped page dirty in every round.

Nothing here is timed: the figures are pages and bytes, which is what each design costs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vfiomig.host import (
    Container,
    Group,
    Hwpt,
    Iommufd,
    MigrationState,
    ModelTransport,
    UserBuffer,
    VfioDevice,
)
from vfiomig.host.device import state_name
from vfiomig.hw import hisi_qm as q
from vfiomig.kernel import ModelKernel
from vfiomig.tools.options import add_iommu_hw_argument

PAGE = 4096
# Where the guest driver puts the queue manager's structures, as IOVAs in guest RAM.
EQE, AEQE, SQC, CQC = 0x1000, 0x2000, 0x3000, 0x4000
SQE, CQE = 0x10000, 0x20000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ram-mib", type=int, default=64, help="guest RAM in MiB (default 64)")
    parser.add_argument("--rounds", type=int, default=4, help="pre-copy rounds (default 4)")
    parser.add_argument(
        "--dma-pages", type=int, default=200, help="pages the device writes per round (200)"
    )
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    add_iommu_hw_argument(parser)


@dataclass
class Host:
    """One model host: kernel, transport, the VF's cdev path, guest RAM."""

    kernel: ModelKernel
    t: ModelTransport
    path: str
    ram: UserBuffer

    @classmethod
    def make(cls, iommu: str, ram_bytes: int) -> Host:
        k = ModelKernel(iommu=iommu)
        path = k.add_device("hisi_acc")
        t = ModelTransport(k)
        return cls(k, t, path, t.mmap(ram_bytes))

    @property
    def hw(self) -> Any:
        """The VF's hardware side: where the guest driver and the device's DMA act."""
        return self.kernel.device(self.path)


@dataclass
class Tally:
    rounds: list[int] = field(default_factory=list)  # pages sent per round

    @property
    def pages(self) -> int:
        return sum(self.rounds)


def device_writes(host: Host, rng: np.random.Generator, npages: int, lo: int) -> None:
    """The device DMAs `npages` random pages (above `lo`) of guest RAM, through the IOMMU."""
    pages = rng.choice(np.arange(lo // PAGE, host.ram.length // PAGE), npages, replace=False)
    for p in np.sort(pages):
        host.hw.dma_write(int(p) * PAGE, rng.bytes(64))


def copy_pages(src: Host, dst: Host, pages: np.ndarray) -> None:
    """Send guest pages to the destination (the migration stream's RAM part)."""
    s = src.ram.array.reshape(-1, PAGE)
    d = dst.ram.array.reshape(-1, PAGE)
    d[pages] = s[pages]


def migrate_iommufd(
    args: argparse.Namespace, src: Host, dst: Host, *, huge: bool
) -> tuple[Tally, bytes]:
    """Pre-copy and stop-copy with IOMMU dirty tracking; returns pages sent and device state.

    huge=False sets IOMMU_OPTION HUGE_PAGES=0 so the IOAS maps with 4 KiB IOPTEs: the IOMMU
    records dirty state per leaf, so 2 MiB leaves make every write dirty 512 pages.
    """
    rng = np.random.default_rng(args.seed)
    size = src.ram.length
    with Iommufd(src.t) as ictx, VfioDevice(src.t, src.path) as dev:
        dev_id = dev.bind(ictx)
        info = ictx.hw_info(dev_id)
        ioas = ictx.ioas_alloc()
        ioas.set_huge_pages(huge)
        hwpt: Hwpt = ictx.hwpt_alloc(dev_id, ioas, dirty_tracking=True)
        dev.attach(hwpt)
        ioas.map(src.ram, iova=0)
        flags = dev.migration_flags()
        print(
            f"source: {info.type_name} IOMMU, dirty tracking {info.dirty_tracking}, "
            f"{'2 MiB' if huge else '4 KiB'} IOPTEs; VF migration flags {flags.name}, "
            f"MIG_DATA_SIZE {dev.mig_data_size()}"
        )
        q.guest_qm_start(src.hw, eqe_dma=EQE, aeqe_dma=AEQE, sqc_dma=SQC, cqc_dma=CQC)
        q.guest_qp_start(src.hw, 0, sqe_dma=SQE, cqe_dma=CQE)
        q.guest_sq_submit(src.hw, 0, 3)

        hwpt.set_dirty_tracking(True)
        tally = Tally([size // PAGE])  # round 0: every page, once
        copy_pages(src, dst, np.arange(size // PAGE))
        state = b""
        f = dev.set_state(MigrationState.PRE_COPY)
        if f is None:
            raise RuntimeError("RUNNING -> PRE_COPY returned no data fd")
        with f:
            pre = f.precopy_info()
            state += f.read_available()
            print(f"PRE_COPY: precopy initial_bytes {pre.initial_bytes}, read {len(state)} bytes")
            for _ in range(args.rounds):
                device_writes(src, rng, args.dma_pages, 0x40000)
                bm = hwpt.get_dirty_bitmap(0, size)
                tally.rounds.append(bm.count())
                copy_pages(src, dst, bm.pages())
            dev.set_state(MigrationState.STOP_COPY)  # same session: no new fd
            bm = hwpt.get_dirty_bitmap(0, size)
            tally.rounds.append(bm.count())
            copy_pages(src, dst, bm.pages())
            state += f.read_available()
        print(f"STOP_COPY: device state {len(state)} bytes in all")
        hwpt.set_dirty_tracking(False)
        dev.detach()
        ioas.unmap_all()
        hwpt.destroy()
        ioas.destroy()
    return tally, state


def resume(dst: Host, state: bytes) -> dict[str, object]:
    """Resume the VF on the destination; returns its queue-manager state (ground truth)."""
    with Iommufd(dst.t) as ictx, VfioDevice(dst.t, dst.path) as dev:
        dev.bind(ictx)
        ioas = ictx.ioas_alloc()
        dev.attach(ioas)
        ioas.map(dst.ram, iova=0)
        dev.set_state(MigrationState.STOP)
        f = dev.set_state(MigrationState.RESUMING)
        if f is None:
            raise RuntimeError("STOP -> RESUMING returned no data fd")
        with f:
            f.write_all(state)
        dev.set_state(MigrationState.RUNNING)
        print(f"destination: VF resumed, now {state_name(dev.get_state())}")
        # Ground truth for the check, read while the destination still owns the VF.
        return dst.hw.migratable_state()


def migrate_type1(args: argparse.Namespace, iommu: str) -> Tally:
    """The same workload with the legacy type1 container: what its dirty log reports."""
    rng = np.random.default_rng(args.seed)
    host = Host.make(iommu, args.ram_mib << 20)
    size = host.ram.length
    group_path = host.kernel.group_of(host.path)
    with Container(host.t) as c, Group(host.t, group_path) as g:
        g.set_container(c)
        c.set_iommu()
        c.map_dma(host.ram, iova=0)
        with g.get_device(host.path.rsplit("/", 1)[1]):
            q.guest_qm_start(host.hw, eqe_dma=EQE, aeqe_dma=AEQE, sqc_dma=SQC, cqc_dma=CQC)
            c.dirty_pages_start()
            tally = Tally([size // PAGE])
            for _ in range(args.rounds + 1):
                device_writes(host, rng, args.dma_pages, 0x40000)
                tally.rounds.append(c.dirty_pages_bitmap(0, size, PAGE).count())
            c.dirty_pages_stop()
        c.unmap_all()
    return tally


def run(args: argparse.Namespace) -> int:
    if args.ram_mib < 1 or args.rounds < 0 or args.dma_pages < 1:
        print(
            "vfiomig demo: --ram-mib and --dma-pages must be >= 1, --rounds >= 0", file=sys.stderr
        )
        return 2
    ram = args.ram_mib << 20
    if args.dma_pages > (ram - 0x40000) // PAGE:
        print(
            f"vfiomig demo: --dma-pages {args.dma_pages} exceeds the guest's {ram // PAGE} pages",
            file=sys.stderr,
        )
        return 2
    print(
        f"guest: {args.ram_mib} MiB RAM, one hisi_acc VF; {args.rounds} pre-copy rounds, "
        f"device writes {args.dma_pages} pages per round (seed {args.seed})"
    )
    rows: list[tuple[str, Tally]] = []
    ok = True
    for huge in (False, True):
        src, dst = Host.make(args.iommu_hw, ram), Host.make(args.iommu_hw, ram)
        tally, state = migrate_iommufd(args, src, dst, huge=huge)
        same_ram = np.array_equal(src.ram.array, dst.ram.array)
        same_dev = resume(dst, state) == src.hw.migratable_state()
        print(
            f"check: guest RAM identical: {_yes(same_ram)}; "
            f"accelerator queue state identical: {_yes(same_dev)}"
        )
        ok = ok and same_ram and same_dev
        rows.append((f"iommufd, {'2 MiB' if huge else '4 KiB'} IOPTEs", tally))
    rows.append(("type1 (pinned = dirty)", migrate_type1(args, args.iommu_hw)))
    print()
    print(f"{'dirty tracking':26} {'pages sent per round (round 0 = all)':44} {'total MiB':>9}")
    for name, t in rows:
        rounds = " ".join(str(n) for n in t.rounds)
        print(f"{name:26} {rounds:44} {t.pages * PAGE / 2**20:9.1f}")
    stop = {name: t.rounds[-1] for name, t in rows}
    print(
        "stop-copy RAM (downtime traffic): "
        + ", ".join(f"{name} {n} pages" for name, n in stop.items())
    )
    return 0 if ok else 1


def _yes(b: bool) -> str:
    return "yes" if b else "NO"
