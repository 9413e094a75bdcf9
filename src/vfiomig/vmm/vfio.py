"""QEMU's VFIO migration client for one device (hw/vfio/migration.c), over vfiomig.host.

Source: ``save_setup`` (RUNNING -> PRE_COPY when the device has PRE_COPY), ``save_iterate``
(one read of at most 1 MiB from data_fd; ENOMSG counts as 0 bytes), the pending estimates,
``switchover_prepare`` (-> *_P2P when the device has P2P), ``switchover`` (-> STOP_COPY),
``save_complete`` (read to EOF), ``cleanup`` (STOP_COPY -> STOP after completion) and the
failure path (``vfio_migration_set_state_or_reset``: a transition that fails resets the
device, which then runs). Destination: ``load_setup`` (-> RESUMING), ``load`` (write chunks
to data_fd), ``start`` (-> RUNNING_P2P for P2P devices, then RUNNING; the kernel passes
through STOP, where the driver loads and checks the state).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from vfiomig.host import MigrationFile, MigrationFlags, MigrationState, VfioDevice, VfioError

# hw/vfio/migration.c
VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE = 1 << 20
VFIO_MIG_STOP_COPY_SIZE = 100 << 30  # assumed stop-copy size when MIG_DATA_SIZE fails

S = MigrationState


@dataclass
class VfioMigration:
    """One passthrough device's migration state, as QEMU's VFIOMigration keeps it."""

    name: str
    kind: str
    dev: VfioDevice
    flags: MigrationFlags
    data: MigrationFile | None = None
    state: int = S.RUNNING
    precopy_init_size: int = 0
    precopy_dirty_size: int = 0
    stop_copy_size: int = 0
    data_buffer_size: int = VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE
    initial_data_sent: bool = False
    transferred: int = 0  # bytes of device data read (QEMU's vfio "transferred")
    transitions: list[str] = field(default_factory=list)

    @property
    def precopy(self) -> bool:
        return bool(self.flags & MigrationFlags.PRE_COPY)

    @property
    def p2p(self) -> bool:
        return bool(self.flags & MigrationFlags.P2P)

    @property
    def in_precopy(self) -> bool:
        return self.state in (S.PRE_COPY, S.PRE_COPY_P2P)

    def set_state(self, new: int) -> None:
        """VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE; keeps the data fd the kernel hands out."""
        f = self.dev.set_state(new)
        self.transitions.append(S(new).name)
        self.state = new
        if f is not None:
            if self.data is not None:
                self.data.close()
            self.data = f

    def set_state_or_reset(self, new: int) -> bool:
        """vfio_migration_set_state_or_reset: on failure VFIO_DEVICE_RESET; the device then
        runs (RUNNING). Returns False when it had to reset."""
        try:
            self.set_state(new)
            return True
        except VfioError:
            self.close_data()
            self.dev.reset()
            self.transitions.append("RESET")
            self.state = S.RUNNING
            return False

    def close_data(self) -> None:
        if self.data is not None:
            self.data.close()
            self.data = None

    # -- source ---------------------------------------------------------------------------

    def save_setup(self) -> None:
        """vfio_save_setup: buffer size from MIG_DATA_SIZE; RUNNING -> PRE_COPY if offered."""
        try:
            self.stop_copy_size = self.dev.mig_data_size()
            self.data_buffer_size = max(
                1, min(VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE, self.stop_copy_size)
            )
        except VfioError:
            self.data_buffer_size = VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE
        if self.precopy:
            self.set_state(S.PRE_COPY)  # recover state RUNNING: a failure leaves it there
            self.update_precopy_info()

    def update_precopy_info(self) -> None:
        """vfio_query_precopy_size: VFIO_MIG_GET_PRECOPY_INFO while in a PRE_COPY state."""
        if not self.in_precopy or self.data is None:
            self.precopy_init_size = self.precopy_dirty_size = 0
            return
        info = self.data.precopy_info()
        self.precopy_init_size, self.precopy_dirty_size = info.initial_bytes, info.dirty_bytes

    def pending_estimate(self) -> int:
        """vfio_state_pending_estimate: precopy sizes, only while in PRE_COPY."""
        return self.precopy_init_size + self.precopy_dirty_size if self.in_precopy else 0

    def pending_exact(self) -> int:
        """vfio_state_pending_exact (QEMU >= 9.2): only the stop-copy size, 100 GiB if the
        device cannot say; then the precopy info is queried again."""
        try:
            self.stop_copy_size = self.dev.mig_data_size()
        except VfioError:
            self.stop_copy_size = VFIO_MIG_STOP_COPY_SIZE
        self.update_precopy_info()
        return self.stop_copy_size

    def save_iterate(self) -> bytes:
        """One read of at most the buffer size; ENOMSG (nothing now) and EOF give b"" and
        zero both precopy sizes, as vfio_save_block does."""
        if not self.in_precopy or self.data is None:
            return b""
        chunk = self.data.read_chunk(self.data_buffer_size)
        if not chunk:
            self.precopy_init_size = self.precopy_dirty_size = 0
            return b""
        n = len(chunk)
        take = min(n, self.precopy_init_size)
        self.precopy_init_size -= take
        self.precopy_dirty_size = max(0, self.precopy_dirty_size - (n - take))
        self.transferred += n
        return chunk

    def switchover_prepare(self) -> None:
        """The VM-state prepare callback: -> *_P2P, only for devices with P2P."""
        if self.p2p:
            self.set_state(S.PRE_COPY_P2P if self.in_precopy else S.RUNNING_P2P)

    def switchover(self) -> None:
        """vfio_save_complete_precopy: -> STOP_COPY (recover state STOP)."""
        self.set_state(S.STOP_COPY)

    def save_complete(self) -> Iterator[bytes]:
        """Read data_fd until EOF, in chunks of the buffer size."""
        if self.data is None:
            raise VfioError(0, f"{self.name}: STOP_COPY gave no data fd")
        while True:
            chunk = self.data.read(self.data_buffer_size)
            if not chunk:
                return
            self.transferred += len(chunk)
            yield chunk

    def config(self) -> bytes:
        """vfio_save_state: the config the destination checks (here: kind and flags)."""
        return json.dumps({"kind": self.kind, "flags": int(self.flags)}).encode()

    def cleanup(self) -> None:
        """vfio_save_cleanup after completion: STOP_COPY -> STOP, data fd closed."""
        self.close_data()
        if self.state == S.STOP_COPY:
            self.set_state_or_reset(S.STOP)

    def recover(self) -> bool:
        """A failed migration: the device back to RUNNING (precopy failed notifier, or
        vm_start after the VM had stopped), resetting it where a transition fails. True if it
        got there without a reset."""
        self.close_data()
        if self.state == S.RUNNING:
            return True
        if self.state in (S.STOP_COPY, S.STOP) and self.p2p:
            if not self.set_state_or_reset(S.RUNNING_P2P):
                return False
        return self.set_state_or_reset(S.RUNNING)

    # -- destination ----------------------------------------------------------------------

    def load_setup(self) -> None:
        self.set_state(S.RESUMING)

    def load(self, chunk: bytes | bytearray | memoryview) -> None:
        if self.data is None:
            raise VfioError(0, f"{self.name}: device data before RESUMING")
        self.data.write_all(chunk)

    def load_config(self, payload: bytes | bytearray | memoryview) -> None:
        try:
            cfg = json.loads(bytes(payload))
        except ValueError:
            raise VfioError(0, f"{self.name}: config section is not valid") from None
        if cfg != {"kind": self.kind, "flags": int(self.flags)}:
            raise VfioError(0, f"{self.name}: config {cfg} does not match this {self.kind}")

    def start(self) -> None:
        """vm_start on the destination: RESUMING -> (RUNNING_P2P) -> RUNNING."""
        self.close_data()
        if self.p2p:
            self.set_state(S.RUNNING_P2P)
        self.set_state(S.RUNNING)
