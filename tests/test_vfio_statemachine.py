"""Random ioctl/read/write/close sequences against a reference device (hypothesis).

Invariants after every step:
* the migration state is one the device supports, or ERROR;
* at most one live data session, and it matches the state (a saving file exactly in the
  saving group, a resuming file exactly in RESUMING);
* the fd table holds exactly the fds the test did not close (nothing leaks, nothing
  vanishes), and a closed device fd leaves no open device and no live session behind;
* nothing but OSError ever escapes a ModelKernel call (any other exception fails the test).
"""

from __future__ import annotations

import struct

from conftest import GET, PROBE, SET, Dev, save_stream
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vfiomig.kernel import ModelKernel
from vfiomig.kernel import vfio_fsm as fsm
from vfiomig.uapi import vfio as v

SAVING = {fsm.STOP_COPY, fsm.PRE_COPY, fsm.PRE_COPY_P2P}
STATES = st.one_of(st.integers(0, 9), st.sampled_from([255, 2**31, 2**32 - 1]))
DEVICE_CMDS = [
    v.VFIO_DEVICE_FEATURE,
    v.VFIO_DEVICE_GET_INFO,
    v.VFIO_DEVICE_RESET,
    v.VFIO_DEVICE_BIND_IOMMUFD,
    v.VFIO_MIG_GET_PRECOPY_INFO,
    0,
    0xFFFFFFFF,
]


class VfioMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.k = ModelKernel()
        self.data_fds: list[int] = []
        self.stream = b""  # a complete stream of this device kind (saved, or read here)
        self.partial: dict[int, bytes] = {}  # bytes read so far, per data fd

    @initialize(flags=st.sampled_from(fsm.VALID_MIGRATION_FLAGS), logging=st.booleans())
    def setup(self, flags: int, logging: bool) -> None:
        self.flags = flags
        opts = {"migration_flags": flags, "state_size": 10_000, "chunk_size": 4096}
        src = Dev(self.k, seed=42, **opts)  # a sibling, to have a valid stream at hand
        self.stream = save_stream(src)
        src.close()
        self.k.close(src.iommufd)
        self.d = Dev(self.k, dma_logging=logging, **opts)
        self.bound = True
        self.mem, _ = self.k.mmap(1 << 16)

    # ------------------------------------------------------------- helpers

    def call(self, fn: object, *args: object) -> object:
        try:
            return fn(*args)  # type: ignore[operator]
        except OSError:
            return None

    def open_fds(self) -> set[int]:
        fds = set(self.data_fds) | {self.d.iommufd}
        if self.bound:
            fds.add(self.d.fd)
        return fds

    # ------------------------------------------------------------- rules

    @precondition(lambda self: self.bound)
    @rule(state=STATES)
    def set_state(self, state: int) -> None:
        e, fd, echoed = self.d.try_set_state(state)
        assert struct.unpack_from("<I", echoed)[0] == state  # always echoed
        if e == 0 and fd >= 0:
            self.data_fds.append(fd)
        elif e == 0:
            assert fd == -1

    @precondition(lambda self: self.bound)
    @rule()
    def get_state(self) -> None:
        assert self.d.get_state() == self.d.vdev.mig_state

    @precondition(lambda self: self.data_fds)
    @rule(i=st.integers(0, 50), n=st.sampled_from([0, 1, 24, 100, 5000, 1 << 20]))
    def read(self, i: int, n: int) -> None:
        fd = self.data_fds[i % len(self.data_fds)]
        data = self.call(self.k.read, fd, n)
        if isinstance(data, bytes):
            self.partial[fd] = self.partial.get(fd, b"") + data
            if not data and n and self.d.vdev.mig_state == fsm.STOP_COPY:
                self.stream = self.partial[fd]  # EOF: a complete stream of this device kind

    @precondition(lambda self: self.data_fds)
    @rule()
    def drain(self) -> None:
        """Read the newest data fd to its (temporary or permanent) end."""
        fd = self.data_fds[-1]
        while True:
            data = self.call(self.k.read, fd, 1 << 20)
            if not isinstance(data, bytes):
                return  # ENOMSG, ENODEV, EBADF
            self.partial[fd] = self.partial.get(fd, b"") + data
            if not data:
                if self.d.vdev.mig_state == fsm.STOP_COPY:
                    self.stream = self.partial[fd]
                return

    @precondition(lambda self: self.data_fds)
    @rule(i=st.integers(0, 50), data=st.binary(max_size=64), valid=st.booleans())
    def write(self, i: int, data: bytes, valid: bool) -> None:
        fd = self.data_fds[i % len(self.data_fds)]
        self.call(self.k.write, fd, self.stream if valid else data)

    @precondition(lambda self: self.bound and self.stream)
    @rule()
    def migrate_in(self) -> None:
        """Load the saved stream: -> RESUMING, write it whole, -> STOP."""
        e, fd, _ = self.d.try_set_state(fsm.RESUMING)
        if e:
            return
        if fd >= 0:
            self.data_fds.append(fd)
            assert self.k.write(fd, self.stream) == len(self.stream)
        self.set_state(fsm.STOP)

    @precondition(lambda self: self.data_fds)
    @rule(i=st.integers(0, 50), argsz=st.sampled_from([0, 23, 24, 32]), flags=st.integers(0, 7))
    def precopy_info(self, i: int, argsz: int, flags: int) -> None:
        fd = self.data_fds[i % len(self.data_fds)]
        buf = bytearray(struct.pack("<IIQQ", argsz, flags, 0, 0))
        self.call(self.k.ioctl, fd, v.VFIO_MIG_GET_PRECOPY_INFO, buf)

    @precondition(lambda self: self.data_fds)
    @rule(i=st.integers(0, 50))
    def close_data_fd(self, i: int) -> None:
        fd = self.data_fds.pop(i % len(self.data_fds))
        self.k.close(fd)
        self.partial.pop(fd, None)

    @precondition(lambda self: self.bound)
    @rule()
    def reset(self) -> None:
        self.d.reset()
        assert self.d.vdev.mig_state == fsm.RUNNING

    @precondition(lambda self: self.bound)
    @rule()
    def enable_v2(self) -> None:
        self.call(self.d.feature, SET | v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2)

    @rule(n=st.integers(0, 5), iova=st.integers(0, 1 << 24))
    def device_works(self, n: int, iova: int) -> None:
        self.d.hw.run(n)
        self.d.hw.on_dma_write(iova, 64)

    @precondition(lambda self: self.bound)
    @rule(
        ranges=st.lists(st.tuples(st.integers(0, 64), st.integers(0, 64)), max_size=5),
        page_shift=st.sampled_from([0, 12, 13, 21, 30]),
        num=st.integers(0, 300),
    )
    def log_start(self, ranges: list[tuple[int, int]], page_shift: int, num: int) -> None:
        raw = b"".join(struct.pack("<QQ", a << 16, n << 12) for a, n in ranges)
        if raw:
            self.k.mm.write(self.mem, raw)
        ctl = v.vfio_device_feature_dma_logging_control(
            page_size=(1 << page_shift) if page_shift else 0, num_ranges=num, ranges=self.mem
        )
        self.call(self.d.feature, SET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, ctl)

    @precondition(lambda self: self.bound)
    @rule(
        iova=st.integers(0, 1 << 22),
        length=st.integers(0, 1 << 24),
        page_shift=st.sampled_from([11, 12, 16]),
        good_ptr=st.booleans(),
    )
    def log_report(self, iova: int, length: int, page_shift: int, good_ptr: bool) -> None:
        rep = v.vfio_device_feature_dma_logging_report(
            iova=iova,
            length=length,
            page_size=1 << page_shift,
            bitmap=self.mem if good_ptr else 12345,
        )
        self.call(self.d.feature, GET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, rep)

    @precondition(lambda self: self.bound)
    @rule()
    def log_stop(self) -> None:
        self.call(self.d.feature, SET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP)

    @rule(cmd=st.sampled_from(DEVICE_CMDS), raw=st.binary(max_size=48), which=st.integers(0, 3))
    def fuzz_ioctl(self, cmd: int, raw: bytes, which: int) -> None:
        fds = sorted(self.open_fds() - {self.d.iommufd})  # VFIO fds only
        if not fds:
            return
        fd = fds[which % len(fds)]
        if cmd == v.VFIO_DEVICE_BIND_IOMMUFD or (
            cmd == v.VFIO_DEVICE_FEATURE and len(raw) >= 8 and raw[6] & 0x2  # SET
        ):
            return  # binding or changing state behind the test's back: covered elsewhere
        self.call(self.k.ioctl, fd, cmd, bytearray(raw))

    @precondition(lambda self: self.bound)
    @rule(flags=st.integers(0, 1 << 20))
    def probe_features(self, flags: int) -> None:
        self.call(self.d.feature, (flags & ~SET) | PROBE)

    @precondition(lambda self: self.bound)
    @rule()
    def close_device(self) -> None:
        self.d.close()
        self.bound = False
        vdev = self.d.vdev
        assert vdev.open_count == 0 and not vdev.precopy_info_v2
        assert not any(f.live for f in vdev.data_files())

    @precondition(lambda self: not self.bound)
    @rule()
    def reopen_device(self) -> None:
        self.d.reopen()
        self.bound = True
        assert self.d.get_state() == fsm.RUNNING

    # ------------------------------------------------------------- invariants

    @invariant()
    def state_is_supported_or_error(self) -> None:
        if hasattr(self, "d"):
            s = self.d.vdev.mig_state
            assert s == fsm.ERROR or fsm.state_supported(self.flags, s)

    @invariant()
    def one_session_matching_the_state(self) -> None:
        if not hasattr(self, "d"):
            return
        vdev = self.d.vdev
        live = [f for f in vdev.data_files() if f.live]
        assert len(live) <= 1
        s = vdev.mig_state
        if self.bound:
            assert (vdev.saving_file is not None and vdev.saving_file.live) == (s in SAVING)
            assert (vdev.resuming_file is not None and vdev.resuming_file.live) == (
                s == fsm.RESUMING
            )
        else:
            assert not live

    @invariant()
    def fd_table_is_exact(self) -> None:
        if hasattr(self, "d"):
            assert set(self.k.fdt.files) == self.open_fds()


TestVfioStateMachine = VfioMachine.TestCase
TestVfioStateMachine.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
