"""A migration scenario: the guest, its devices, the hosts and the link, and how to build
the source and destination hosts from it (two ModelKernels, each with its VMM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vfiomig.host import ModelTransport
from vfiomig.kernel import ModelKernel
from vfiomig.sim.devices import MODEL_DEFAULTS
from vfiomig.sim.workload import Workload
from vfiomig.vmm.guest_ram import BYTES_MODE_MAX, GuestRam
from vfiomig.vmm.params import Params
from vfiomig.vmm.vm import DeviceConfig, Vm


@dataclass
class Scenario:
    memory: int = 1 << 30
    zero: float = 0.0
    ram_content: str | None = None  # bytes | versions; None: by size
    devices: list[DeviceConfig] = field(default_factory=list)
    iommu: str = "iommufd"  # the VFIO backend: iommufd | type1
    iommu_hw: str = "smmuv3"
    iommu_dirty: bool = True
    hugepages: bool = False
    workload: Workload = field(default_factory=Workload)
    link: float | None = None  # B/s; None: the loopback default
    params: Params = field(default_factory=Params)
    tracker: str = "auto"
    enable_migration: str = "auto"
    seed: int = 1
    max_time: float = 60.0

    @property
    def mode(self) -> str:
        if self.ram_content is not None:
            return self.ram_content
        return "bytes" if self.memory <= BYTES_MODE_MAX else "versions"

    def to_dict(self) -> dict[str, Any]:
        """What a save file's header records (enough to rebuild the destination)."""
        return {
            "memory": self.memory,
            "zero": self.zero,
            "ram_content": self.mode,
            "devices": [
                {
                    "kind": d.kind,
                    "options": {k: _jsonable(v) for k, v in d.options.items()},
                    "dirty_page_tracking": d.dirty_page_tracking,
                    "workload": d.workload,
                }
                for d in self.devices
            ],
            "iommu": self.iommu,
            "iommu_hw": self.iommu_hw,
            "iommu_dirty": self.iommu_dirty,
            "hugepages": self.hugepages,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scenario:
        devices = [
            DeviceConfig(x["kind"], dict(x["options"]), x["dirty_page_tracking"], x["workload"])
            for x in d["devices"]
        ]
        return cls(
            memory=int(d["memory"]),
            zero=float(d["zero"]),
            ram_content=str(d["ram_content"]),
            devices=devices,
            iommu=d["iommu"],
            iommu_hw=d["iommu_hw"],
            iommu_dirty=bool(d["iommu_dirty"]),
            hugepages=bool(d["hugepages"]),
            seed=int(d["seed"]),
        )


def _jsonable(v: Any) -> Any:
    if isinstance(v, frozenset | set):
        return sorted(v)
    if isinstance(v, tuple):
        return list(v)
    return v


@dataclass
class Host:
    """One model host: its kernel, the transport a VMM uses, and the VMM."""

    kernel: ModelKernel
    t: ModelTransport
    vm: Vm
    paths: list[str]


def build_host(sc: Scenario, *, source: bool) -> Host:
    """A ModelKernel with the scenario's devices and a VMM set up on it (RAM mapped,
    devices bound and attached). The destination's RAM starts empty."""
    k = ModelKernel(iommu=sc.iommu_hw)
    paths = [
        k.add_device(
            d.kind,
            **{
                **MODEL_DEFAULTS.get(d.kind, {}),
                **_model_options(d.options),
                "iommu_dirty": sc.iommu_dirty,  # the IOMMU's, never a device option
            },
        )
        for d in sc.devices
    ]
    t = ModelTransport(k)
    ram = GuestRam(t, sc.memory, mode=sc.mode, zero=sc.zero, source=source)
    vm = Vm(
        t,
        k,
        ram,
        list(zip(sc.devices, paths, strict=True)),
        backend=sc.iommu,
        hugepages=sc.hugepages,
    )
    vm.setup()
    return Host(k, t, vm, paths)


def _model_options(opts: dict[str, Any]) -> dict[str, Any]:
    out = dict(opts)
    if isinstance(out.get("defects"), list):
        out["defects"] = frozenset(out["defects"])
    for key in ("log_page_shift", "log_addr_space"):
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    return out
