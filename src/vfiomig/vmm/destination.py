"""The incoming side: QEMU's loadvm over a stream of sections (migration/savevm.c
qemu_loadvm_state, ram_load, vfio_load_state).

RAM pages land in the destination's guest memory; each device's data goes to its data_fd in
RESUMING; CONFIG is checked; the CPU state is kept for the guest to resume with. Only after
END OF STREAM with every device's END and CONFIG seen may the VM start (``start``): RESUMING ->
(RUNNING_P2P) -> RUNNING. A damaged section, data for a device in the wrong state, or a stream
that stops early leaves the VM never started: ``abort`` resets its devices, as QEMU's failed
incoming migration exits without running the guest.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vfiomig.host import VfioError
from vfiomig.vmm import stream as st
from vfiomig.vmm.guest_ram import PAGE
from vfiomig.vmm.vm import Vm


class Destination:
    def __init__(
        self,
        vm: Vm,
        *,
        now: Callable[[], float] = lambda: 0.0,
        load_rate: float = float("inf"),
        latency: float = 0.0,
    ) -> None:
        self.vm = vm
        self.ram = vm.ram
        self.devices = [pd.mig for pd in vm.devices if pd.mig is not None]
        self.now = now
        self.load_rate = load_rate
        self.latency = latency
        self.busy_until = 0.0  # when the destination has loaded all it received
        self.ended: set[int] = set()
        self.configured: set[int] = set()
        self.init_pending = {i for i, d in enumerate(self.devices) if d.precopy}
        self.ack_time: float | None = None
        self.cpu: bytes | None = None
        self.eos = False
        self.error: str | None = None
        self.started = False
        self.received = 0

    def setup(self) -> None:
        """load_setup: every device to RESUMING."""
        for d in self.devices:
            d.load_setup()

    def receive(self, header: bytes, payload: st.Buffer) -> None:
        """One section from the channel. A damaged one raises StreamError (the sender then
        sees the connection fail)."""
        sec = st.check(header, payload, self.received)
        self.received += len(header) + len(payload)
        try:
            self.apply(sec)
        except (st.StreamError, VfioError) as e:
            self.error = str(e)
            raise st.StreamError(f"destination refused the stream: {e}") from None

    def apply(self, sec: st.Section) -> None:
        if self.eos:
            raise st.StreamError("section after end of stream")
        if sec.type == st.RAM:
            pages, zero, versions, rest = st.decode_ram(sec.payload)
            if pages.size and (pages[0] < 0 or pages[-1] >= self.ram.npages):
                raise st.StreamError("RAM section outside guest RAM")
            nrows = int((~zero & self.ram.backed_mask(pages)).sum())
            if len(rest) != nrows * PAGE:
                raise st.StreamError("RAM section: page bytes do not match its pages")
            rows = np.frombuffer(rest, np.uint8).reshape(-1, PAGE)
            self.ram.store(pages, zero, versions, rows)
        elif sec.type == st.DEVICE:
            self._device(sec)
        elif sec.type == st.CPU:
            self.cpu = bytes(sec.payload)
        elif sec.type == st.EOS:
            missing = [
                d.name
                for i, d in enumerate(self.devices)
                if i not in self.ended or i not in self.configured
            ]
            if missing or self.cpu is None:
                what = f"END and CONFIG of {', '.join(missing)}" if missing else "CPU state"
                raise st.StreamError(f"stream ended without {what}")
            self.eos = True

    def _device(self, sec: st.Section) -> None:
        if not 0 <= sec.index < len(self.devices):
            raise st.StreamError(f"device section for unknown device {sec.index}")
        d = self.devices[sec.index]
        if sec.sub == st.DEV_DATA:
            if sec.index in self.ended:
                raise st.StreamError(f"{d.name}: data after its END")
            d.load(sec.payload)
            self.busy_until = max(self.busy_until, self.now()) + len(sec.payload) / self.load_rate
        elif sec.sub == st.DEV_INIT_DATA_SENT:
            # qemu_loadvm_approve_switchover once every PRE_COPY device has its initial data
            self.init_pending.discard(sec.index)
            if not self.init_pending and self.ack_time is None:
                self.ack_time = max(self.busy_until, self.now()) + self.latency
        elif sec.sub == st.DEV_END:
            self.ended.add(sec.index)
        elif sec.sub == st.DEV_CONFIG:
            d.load_config(sec.payload)
            self.configured.add(sec.index)
        elif sec.sub != st.DEV_SETUP:
            raise st.StreamError(f"{d.name}: unknown device marker {sec.sub}")

    def start(self) -> None:
        """vm_start after a complete stream: devices RESUMING -> RUNNING."""
        if not self.eos:
            raise st.StreamError("the stream did not reach its end: the VM does not start")
        for d in self.devices:
            d.start()
        self.started = True

    def abort(self) -> None:
        """A failed incoming migration: no device runs half-loaded state."""
        for d in self.devices:
            d.close_data()
            try:
                d.dev.reset()
            except VfioError:
                pass
