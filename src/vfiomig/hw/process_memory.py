"""The user memory of a real process: a C program running under `vfiomig run`.

The model kernel consults user memory through one interface (hw/memory.py's Memory): what is
mapped (region, regions_in, contains) and the bytes (view, read, write). ProcessMemory gives
that interface over another process's address space, with process_vm_readv and
process_vm_writev (mm/process_vm_access.c) on the pid of the process making the current call
(`begin(pid)`, per request: after fork the child's calls read and write the child's memory),
and /proc/PID/maps for what is mapped. So the pointers in a C program's ioctl structs
(IOMMU_IOAS_MAP's user_va, a dirty bitmap's data, DMA-logging ranges) are the program's own
addresses, and device DMA through an IOPTE lands in the program's pages.

Rules, as the kernel's copy_{from,to}_user and pin_user_pages see a process:

* `read` and `write` happen at once, byte for byte. process_vm_readv returns a short count
  (not an error) when a range runs into an unmapped page: that, and any failure (the process
  gone, no permission), is EFAULT, never an exception of another kind;
* `view` hands out a numpy copy of the bytes, for the vectorised writers (iova_bitmap, type1
  dirty bitmaps, DMA). The bytes the caller changes in it are written back, and only those,
  before the next read / write / view and at `end()`, so that concurrent stores by the
  program's own threads to bytes the kernel did not write survive. A view needs a writable
  mapping (pin_user_pages(FOLL_WRITE)), checked when it is made: EFAULT otherwise;
* `region` / `regions_in` are the runs of adjacent writable mappings (the pages a kernel path
  can pin for writing: bitmaps, DMA targets), marked `elsewhere` (their bytes are not in
  `data`); `contains` accepts any readable or writable mapping (IOAS_MAP of a read-only
  buffer for device reads is legal).

Pages are not really pinned: a mapping the program unmaps after IOAS_MAP is gone for the
model too (as hw/memory.py's munmap note says), and DMA uses the pid of the current call.
`mmap` / `munmap` are the program's own business (it calls the real mmap): ENODEV here.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from vfiomig.hw.memory import PAGE_SIZE, TASK_SIZE_MAX, Memory, Region, efault

# One process_vm_writev takes at most IOV_MAX (UIO_MAXIOV, 1024) iovecs.
_IOV_MAX = 1024
# Bytes fetched at once for a small read (see ProcessMemory.read).
_WINDOW = 512


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_readv = _libc.process_vm_readv
_process_vm_writev = _libc.process_vm_writev
for _fn in (_process_vm_readv, _process_vm_writev):
    _fn.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_iovec),
        ctypes.c_ulong,
        ctypes.POINTER(_iovec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    _fn.restype = ctypes.c_ssize_t


@dataclass
class _Vma:
    start: int
    end: int
    readable: bool
    writable: bool


@dataclass
class _View:
    addr: int
    data: npt.NDArray[np.uint8]  # what the caller holds and may change
    seen: npt.NDArray[np.uint8]  # the bytes as last read from / written to the process


def _valid(addr: int, n: int) -> bool:
    return (
        isinstance(addr, int)
        and isinstance(n, int)
        and addr >= 0
        and n >= 0
        and (addr + n <= TASK_SIZE_MAX)
    )


class ProcessMemory(Memory):
    """Memory of the process whose call is being served (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.pid = 0
        self.last_error = 0  # errno of the last failed transfer (EPERM: no ptrace access)
        self._vmas: list[_Vma] | None = None  # /proc/PID/maps, read once per request
        self._views: list[_View] = []
        self._lost_writeback = False
        self._window: tuple[int, bytes] | None = None  # bytes read in this request
        self._iov = (_iovec(), _iovec())
        self._liov_p = ctypes.byref(self._iov[0])
        self._riov_p = ctypes.byref(self._iov[1])

    # -- one request ---------------------------------------------------------------------

    def begin(self, pid: int) -> None:
        """The calls from now on are made by process `pid`."""
        self.pid = pid
        self._vmas = None
        self._views = []
        self._lost_writeback = False
        self._window = None

    def end(self) -> bool:
        """Write back what the views changed; False if some of it could not be written (the
        program unmapped or protected the memory meanwhile): the call then fails EFAULT."""
        try:
            self._sync()
        except OSError:
            self._lost_writeback = True
        self._views = []
        self._vmas = None
        self._window = None
        return not self._lost_writeback

    # -- transfers -----------------------------------------------------------------------

    def _transfer(self, fn: Any, local: int, remote: int, n: int) -> None:
        """One process_vm_{read,write}v of n bytes; a short count is EFAULT."""
        liov, riov = self._iov
        liov.iov_base, liov.iov_len = local, n
        riov.iov_base, riov.iov_len = remote, n
        got = fn(self.pid, self._liov_p, 1, self._riov_p, 1, 0)
        if got != n:
            self.last_error = ctypes.get_errno() if got < 0 else errno.EFAULT
            raise efault()

    def _read_bytes(self, addr: int, n: int) -> bytes:
        buf = ctypes.create_string_buffer(n)
        self._transfer(_process_vm_readv, ctypes.addressof(buf), addr, n)
        return buf.raw

    def _fetch(self, addr: int, n: int) -> npt.NDArray[np.uint8]:
        if not _valid(addr, n):
            raise efault()
        buf = np.empty(n, dtype=np.uint8)
        if n:
            self._transfer(_process_vm_readv, buf.ctypes.data, addr, n)
        return buf

    def _store(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if not _valid(addr, n):
            raise efault()
        if n:
            buf = ctypes.create_string_buffer(bytes(data), n)
            self._transfer(_process_vm_writev, ctypes.addressof(buf), addr, n)

    def _sync(self) -> None:
        """Write the bytes the views' holders changed since last seen, run by run."""
        for v in self._views:
            changed = np.flatnonzero(v.data != v.seen)
            if changed.size == 0:
                continue
            # runs of consecutive changed bytes: [starts[i], ends[i])
            breaks = np.flatnonzero(np.diff(changed) != 1)
            starts = np.concatenate(([changed[0]], changed[breaks + 1]))
            ends = np.concatenate((changed[breaks] + 1, [changed[-1] + 1]))
            base = v.data.ctypes.data
            for i in range(0, starts.size, _IOV_MAX):
                s, e = starts[i : i + _IOV_MAX], ends[i : i + _IOV_MAX]
                k = s.size
                pairs = list(zip(s.tolist(), e.tolist(), strict=True))
                liov = (_iovec * k)(*[_iovec(base + a, b - a) for a, b in pairs])
                riov = (_iovec * k)(*[_iovec(v.addr + a, b - a) for a, b in pairs])
                want = int((e - s).sum())
                got = _process_vm_writev(self.pid, liov, k, riov, k, 0)
                if got != want:
                    self.last_error = ctypes.get_errno() if got < 0 else errno.EFAULT
                    v.seen[:] = v.data  # do not try again
                    raise efault()
            v.seen[:] = v.data
            self._window = None

    def read(self, addr: int, length: int) -> bytes:
        self._sync()
        w = self._window
        if w is not None and w[0] <= addr and addr + length <= w[0] + len(w[1]):
            return w[1][addr - w[0] : addr - w[0] + length]  # the struct read a moment ago
        if not _valid(addr, length):
            raise efault()
        if length == 0:
            return b""
        # A handler reads a struct's header, then the struct: fetch the first read's page
        # remainder (up to _WINDOW bytes) at once. Within one page it faults only if the
        # bytes asked for would.
        span = min(_WINDOW, PAGE_SIZE - addr % PAGE_SIZE)
        if length > span:
            return self._read_bytes(addr, length)
        data = self._read_bytes(addr, span)
        self._window = (addr, data)
        return data[:length]

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self._sync()
        self._window = None
        self._store(addr, data)
        if not self._views:
            return
        n = len(data)
        src = np.frombuffer(data, dtype=np.uint8)
        for v in self._views:  # the holders of views see the write, as they would in place
            lo, hi = max(addr, v.addr), min(addr + n, v.addr + v.data.size)
            if lo < hi:
                v.data[lo - v.addr : hi - v.addr] = src[lo - addr : hi - addr]
                v.seen[lo - v.addr : hi - v.addr] = src[lo - addr : hi - addr]

    def view(self, addr: int, length: int) -> npt.NDArray[np.uint8]:
        self._sync()
        self._window = None  # the holder may change these bytes
        if length and not self._covered(addr, length, writable=True):
            raise efault()
        data = self._fetch(addr, length)
        if length:
            self._views.append(_View(addr, data, data.copy()))
        return data

    # -- what is mapped ------------------------------------------------------------------

    def _maps(self) -> list[_Vma]:
        if self._vmas is None:
            vmas: list[_Vma] = []
            try:
                with open(f"/proc/{self.pid}/maps", "rb") as f:
                    text = f.read()
            except OSError:
                text = b""  # the process is gone: nothing is mapped
            for line in text.splitlines():
                rng, perms = line.split(b" ", 2)[:2]
                lo, hi = rng.split(b"-")
                vmas.append(_Vma(int(lo, 16), int(hi, 16), perms[:1] == b"r", perms[1:2] == b"w"))
            self._vmas = vmas
        return self._vmas

    def _runs(self, writable: bool) -> list[tuple[int, int]]:
        """Maximal runs [start, end) of adjacent mappings that are writable (or, with
        writable=False, readable or writable)."""
        runs: list[tuple[int, int]] = []
        for v in self._maps():
            if not (v.writable or (not writable and v.readable)):
                continue
            if runs and runs[-1][1] == v.start:
                runs[-1] = (runs[-1][0], v.end)
            else:
                runs.append((v.start, v.end))
        return runs

    def _covered(self, addr: int, length: int, *, writable: bool) -> bool:
        if not _valid(addr, length):
            return False
        runs = self._runs(writable)
        i = bisect.bisect_right([r[0] for r in runs], addr) - 1
        return i >= 0 and addr + length <= runs[i][1]

    def region(self, addr: int, length: int) -> Region:
        if not _valid(addr, length):
            raise efault()
        for start, end in self._runs(writable=True):
            if start <= addr < end and addr + length <= end:
                return Region(start, end - start, None, elsewhere=True)
        raise efault()

    def regions_in(self, addr: int, end: int) -> list[Region]:
        return [
            Region(s, e - s, None, elsewhere=True)
            for s, e in self._runs(writable=True)
            if s < end and e > addr
        ]

    def contains(self, addr: int, length: int) -> bool:
        return self._covered(addr, max(length, 1), writable=False)

    def contains_in(self, pid: int, addr: int, length: int) -> bool:
        """`contains` in another process of the program (pages a fork child mapped into an
        IOAS it shares, pinned later from the parent's call); False once it is gone."""
        if pid == self.pid:
            return self.contains(addr, length)
        saved_pid, saved_vmas = self.pid, self._vmas
        self.pid, self._vmas = pid, None
        try:
            return self.contains(addr, length)
        finally:
            self.pid, self._vmas = saved_pid, saved_vmas

    def writable(self, addr: int, length: int) -> bool:
        """Whether copy_to_user of `length` bytes at `addr` can succeed."""
        return length == 0 or self._covered(addr, length, writable=True)

    def mmap(self, length: int, backed: bool = True) -> Region:
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    def munmap(self, addr: int) -> None:
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    def map_data(
        self, data: npt.NDArray[np.uint8], phase: int = 0, *, kernel: bool = False
    ) -> Region:
        """Mappings of the model's memfds are not the program's: ENODEV, as mmap."""
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
