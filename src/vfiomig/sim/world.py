"""The simulated world the migration runs in: a seeded clock, the guest's vCPUs and its
devices' workloads. ``advance(dt)`` is the only way time passes."""

from __future__ import annotations

import json

import numpy as np

from vfiomig.sim.devices import DeviceLoad
from vfiomig.sim.workload import Workload
from vfiomig.vmm.guest_ram import GuestRam


class SimWorld:
    def __init__(
        self, ram: GuestRam, workload: Workload, loads: list[DeviceLoad], seed: int
    ) -> None:
        self.ram = ram
        self.workload = workload
        self.loads = loads
        self.rng = np.random.default_rng(seed)
        self.now = 0.0
        self.throttle = 0.0
        self.vcpus = True

    def advance(self, dt: float) -> None:
        if dt <= 0:
            return
        if self.vcpus:
            pages = self.workload.pages(dt, self.rng, self.throttle)
            self.ram.cpu_write(pages)
        for load in self.loads:
            load.advance(dt, self.vcpus)
        self.now += dt

    def stop_vcpus(self) -> None:
        self.vcpus = False

    def start_vcpus(self) -> None:
        self.vcpus = True
        self.throttle = 0.0

    def cpu_state(self) -> bytes:
        """What travels as vCPU state: the guest drivers' variables and the workload's
        position (a real guest keeps them in registers and RAM)."""
        return json.dumps(
            {
                "throttle": self.throttle,
                "workload_pos": self.workload.pos,
                "drivers": [load.state() for load in self.loads],
            },
            sort_keys=True,
        ).encode()
