"""The model server of `vfiomig run`: one ModelKernel serving a C program's processes.

The preload library (preload.c) sends each call the program makes on a model fd as one
request (protocol.py); this server runs it on the ModelKernel, in the caller's context:

* memory: the kernel's Memory is a ProcessMemory (hw/process_memory.py) set to the caller's
  pid for the request (SO_PEERCRED of its connection), so ioctl structs, path names and
  read/write buffers are read and written in the program itself (the ioctl's arg is a
  UserPtr into it: the handler reads the struct by its own size rules, argsz / size first,
  as the kernel does), and what a handler changes in a view is written back when the
  request ends;
* fds: every process has its own fd table (`ProcessFdTable`), keyed by the program's real
  fd numbers, which the preload reserved as placeholders. Files are shared between tables
  with reference counts, exactly as struct file is: fork copies the table (FORK_PREPARE, at
  the moment of the fork, claimed by the child's HELLO or the parent's FORK_COMMIT, whichever
  comes first), a process's exit closes its table (pidfd), exec keeps the table and the new
  image drops what O_CLOEXEC closed (HELLO + FDS). ModelKernel.fdt is the caller's table
  for the duration of each request;
* order: requests are served one at a time, each to its end, so threads calling at once, or
  a thread interrupted by a signal, see the model change in whole calls only.

Devices at work: the model's devices do nothing on their own. With `dma_pages` > 0, after
every call into the model each device that is open, attached to an IO page table and in a
running migration state (RUNNING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P) writes that many
pages by DMA through its IOMMU domain, round robin over the domain's writable mappings, each
page filled with DMA_FILL: the bytes land in the program's buffer (in the memory of the
process whose call it was) and the IOMMU's dirty bits and the device's DMA log see them.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from vfiomig.hw.iommu import IommuFault
from vfiomig.hw.memory import PAGE_SIZE
from vfiomig.hw.process_memory import ProcessMemory
from vfiomig.kernel.errors import err
from vfiomig.kernel.fs import FdTable, File
from vfiomig.kernel.machine import ModelKernel
from vfiomig.kernel.uaccess import UserPtr
from vfiomig.kernel.vfio_fsm import PRE_COPY, PRE_COPY_P2P, RUNNING, RUNNING_P2P
from vfiomig.shim.protocol import IOCTL_FD_USED, OP_NAMES, OPS, REPLY, REQUEST
from vfiomig.uapi import vfio as v

U64_MAX = (1 << 64) - 1
PATH_MAX = 4096  # include/uapi/linux/limits.h
MAX_RW_COUNT = 0x7FFFF000  # include/linux/fs.h: INT_MAX & PAGE_MASK, read/write clamp it
DMA_FILL = 0xA5  # what a device at work writes (docs/run.md)
DMA_STATES = frozenset({RUNNING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P})

# ioctls whose `unsigned long arg` is a value, not a pointer (drivers/vfio/container.c
# vfio_fops_unl_ioctl, vfio_iommu_type1.c, iommufd/vfio_compat.c, vfio_main.c RESET,
# group.c UNSET_CONTAINER; ENABLE/DISABLE are SPAPR's, ENOTTY here).
VALUE_IOCTLS = frozenset(
    {
        v.VFIO_GET_API_VERSION,
        v.VFIO_CHECK_EXTENSION,
        v.VFIO_SET_IOMMU,
        v.VFIO_GROUP_UNSET_CONTAINER,
        v.VFIO_DEVICE_RESET,
        v.VFIO_IOMMU_ENABLE,
        v.VFIO_IOMMU_DISABLE,
    }
)

_MODEL_OPS = frozenset(
    OPS[n]
    for n in ("OPEN", "CLOSE", "DUP", "IOCTL", "READ", "WRITE", "PREAD", "PWRITE", "LSEEK", "POLL")
)


class ProcessFdTable(FdTable):
    """The fd table of one process of the program. Its numbers are the program's real fds:
    the preload reserved each one (a placeholder) before asking, so the one number a new
    file may take is `spare` (EMFILE for a second file in the same call)."""

    def __init__(self) -> None:
        super().__init__(limit=1 << 16)
        self.spare: int | None = None

    def get_unused_fd(self) -> int:
        if self.spare is None or self.spare in self.files:
            raise err(errno.EMFILE)
        return self.spare

    def reserve(self, fd: int) -> None:
        """The preload holds a fresh placeholder at `fd`: a file still recorded there was
        closed behind the preload's back (syscall(2), a static helper): let it go."""
        if fd in self.files:
            self.close(fd)
        self.spare = fd

    def copy(self) -> ProcessFdTable:
        """dup_fd() at fork: the same files, one more reference each."""
        t = ProcessFdTable()
        for fd, f in self.files.items():
            t.fd_install(fd, f)
        return t

    def close_all(self) -> None:
        """exit_files(): every fd closed, files released at their last reference."""
        for fd in sorted(self.files):
            self.close(fd)


@dataclass
class _Conn:
    sock: socket.socket
    pid: int
    buf: bytearray = field(default_factory=bytearray)


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[0])


class ShimServer:
    """Serves the processes of one program (see the module docstring)."""

    def __init__(
        self,
        kernel: ModelKernel,
        listener: socket.socket,
        *,
        dma_pages: int = 0,
        log: TextIO | None = None,
    ) -> None:
        if not isinstance(kernel.mm, ProcessMemory):
            raise TypeError("the kernel's memory must be a ProcessMemory (ModelKernel(mm=...))")
        self.kernel = kernel
        self.mem: ProcessMemory = kernel.mm
        self.listener = listener
        self.dma_pages = dma_pages
        self.log = log if log is not None else sys.stderr
        self.tables: dict[int, ProcessFdTable] = {}
        self.forks: dict[int, ProcessFdTable] = {}  # token -> table copied for a child
        self._next_token = 1
        self._pidfds: dict[int, int] = {}
        self._dma_cursor: dict[int, int] = {}  # id(device) -> next IOVA it writes
        self.calls = 0  # requests served
        self._warned: set[int] = set()  # pids whose memory could not be reached
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, self._accept)
        self._ops: dict[int, Callable[[int, ProcessFdTable, list[int]], tuple[int, int]]] = {
            OPS["FDS"]: self._fds,
            OPS["OPEN"]: self._open,
            OPS["CLOSE"]: self._close,
            OPS["DUP"]: self._dup,
            OPS["IOCTL"]: self._ioctl,
            OPS["READ"]: self._read,
            OPS["WRITE"]: self._write,
            OPS["PREAD"]: self._pread,
            OPS["PWRITE"]: self._pwrite,
            OPS["LSEEK"]: self._lseek,
            OPS["POLL"]: self._poll,
            OPS["FORK_PREPARE"]: self._fork_prepare,
            OPS["FORK_COMMIT"]: self._fork_commit,
            OPS["FORK_ABORT"]: self._fork_abort,
        }

    # -- the loop ------------------------------------------------------------------------

    def serve(self, main_pid: int) -> None:
        """Serve until process `main_pid` (the program) has exited. Its exit status is for
        the caller to reap."""
        done: list[bool] = []
        main_fd = os.pidfd_open(main_pid)
        self._sel.register(main_fd, selectors.EVENT_READ, lambda: done.append(True))
        try:
            while not done:
                for key, _ in self._sel.select():
                    key.data()
        finally:
            self._sel.unregister(main_fd)
            os.close(main_fd)

    def close(self) -> None:
        for key in list(self._sel.get_map().values()):
            obj = key.fileobj
            if isinstance(obj, socket.socket) and obj is not self.listener:
                obj.close()
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()
        self._sel.close()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        conn = _Conn(sock, _peer_pid(sock))
        self._sel.register(sock, selectors.EVENT_READ, lambda: self._readable(conn))

    def _drop(self, conn: _Conn) -> None:
        self._sel.unregister(conn.sock)
        conn.sock.close()

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.buf += data
        while len(conn.buf) >= REQUEST.size:
            raw = bytes(conn.buf[: REQUEST.size])
            del conn.buf[: REQUEST.size]
            op, seq, *args = REQUEST.unpack(raw)
            ret, error, aux = self.call(conn.pid, op, list(args))
            try:
                conn.sock.sendall(REPLY.pack(ret, error, seq, aux))
            except OSError:  # the caller is gone (killed while waiting)
                self._drop(conn)
                return

    # -- one call ------------------------------------------------------------------------

    def call(self, pid: int, op: int, args: list[int]) -> tuple[int, int, int]:
        """Serve one request of process `pid`: (ret, errno or 0, aux)."""
        self.calls += 1
        if op == OPS["HELLO"]:
            self._hello(pid, args[0], args[1])
            return 0, 0, 0
        handler = self._ops.get(op)
        if handler is None:
            return -1, errno.ENOSYS, 0
        table = self._table(pid)
        self.kernel.fdt = table
        self.mem.begin(pid)
        ret, aux, error = -1, 0, 0
        try:
            ret, aux = handler(pid, table, args)
        except OSError as e:
            error = e.errno or errno.EIO
        except Exception:  # a bug in the model: say so, and keep serving
            print(
                f"vfiomig run: internal error in {OP_NAMES.get(op, op)}{tuple(args)}:\n"
                + traceback.format_exc(),
                file=self.log,
            )
            error = errno.EIO
        finally:
            table.spare = None
        if op in _MODEL_OPS and self.dma_pages:
            self.devices_work()
        if not self.mem.end() and not error:
            error = errno.EFAULT  # what the call wrote could not all be written back
        if self.mem.last_error == errno.EPERM and pid not in self._warned:
            self._warned.add(pid)
            print(
                f"vfiomig run: no access to the memory of process {pid} "
                "(ptrace permission: setuid, PR_SET_DUMPABLE 0, or a ptrace_scope)",
                file=self.log,
            )
            self.mem.last_error = 0
        return (ret if not error else -1), error, aux

    # -- processes -----------------------------------------------------------------------

    def _table(self, pid: int) -> ProcessFdTable:
        t = self.tables.get(pid)
        if t is None:
            t = self.tables[pid] = ProcessFdTable()
            self._watch(pid)
        return t

    def _hello(self, pid: int, token: int, ppid: int) -> None:
        """A connection's first message. A fork child claims the table copied for it; a
        process new to the server (exec'd by a posix_spawn child, say) inherits its
        parent's fds as exec keeps them, and drops the O_CLOEXEC ones with FDS + CLOSE."""
        if pid in self.tables:
            return  # an exec (the table stays), or the parent's FORK_COMMIT came first
        claimed = self.forks.pop(token, None) if token else None
        if claimed is not None:
            self.tables[pid] = claimed
        elif ppid in self.tables:
            self.tables[pid] = self.tables[ppid].copy()
        else:
            self.tables[pid] = ProcessFdTable()
        self._watch(pid)

    def _watch(self, pid: int) -> None:
        if pid in self._pidfds:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # already gone (and reaped)
            self._exited(pid)
            return
        self._pidfds[pid] = pidfd
        self._sel.register(pidfd, selectors.EVENT_READ, lambda: self._exited(pid))

    def _exited(self, pid: int) -> None:
        """A process of the program ended: its fds are closed (exit_files)."""
        pidfd = self._pidfds.pop(pid, None)
        if pidfd is not None:
            self._sel.unregister(pidfd)
            os.close(pidfd)
        table = self.tables.pop(pid, None)
        if table is not None:
            self._release(table)

    def _release(self, table: ProcessFdTable) -> None:
        self.kernel.fdt = table
        try:
            table.close_all()
        except Exception:  # never lose the server to a release bug
            print("vfiomig run: error closing files:\n" + traceback.format_exc(), file=self.log)

    # -- requests: (pid, table, args) -> (ret, aux) ---------------------------------------

    def _fds(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        fds = sorted(t.files)[: max(0, a[1])]
        if fds:
            self.mem.write(a[0], struct.pack(f"<{len(fds)}i", *fds))
        return len(fds), 0

    def _open(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        path_ptr, flags, fd = a[0], a[1], a[2]
        try:
            path = UserPtr(self.mem, path_ptr & U64_MAX).strndup(PATH_MAX)
        except OSError as e:
            if e.errno == errno.EINVAL:  # getname: no NUL within PATH_MAX
                raise err(errno.ENAMETOOLONG) from None
            raise
        t.reserve(fd)
        got = self.kernel.open(path, flags & 0xFFFFFFFF)
        if got != fd:  # never: the table hands out only the spare
            raise err(errno.EMFILE)
        return fd, 0

    def _close(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        self.kernel.close(a[0])
        return 0, 0

    def _dup(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        f = t.get(a[0])
        if a[1] != a[0]:
            if a[1] in t.files:
                t.close(a[1])
            t.fd_install(a[1], f)
        return a[1], 0

    def _ioctl(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        fd, request, arg, spare = a[0], a[1] & 0xFFFFFFFF, a[2] & U64_MAX, a[3]
        if spare >= 0:
            t.reserve(spare)
        uarg: Any = arg if request in VALUE_IOCTLS else UserPtr(self.mem, arg)
        ret = self.kernel.ioctl(fd, request, uarg)
        aux = 0
        if spare >= 0 and spare in t.files:
            f = t.files[spare]
            acc = (
                os.O_RDWR
                if f.readable and f.writable
                else (os.O_RDONLY if f.readable else os.O_WRONLY)
            )
            aux = IOCTL_FD_USED | acc << 8
        return ret, aux

    def _read(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        fd, buf, n = a[0], a[1] & U64_MAX, min(a[2] & U64_MAX, MAX_RW_COUNT)
        data = self.kernel.read(fd, n)
        self.mem.write(buf, data)  # copy_to_user: EFAULT (what was read is gone)
        return len(data), 0

    def _check_write(self, fd: int) -> None:
        """vfs_write's checks before it looks at the buffer: FMODE_WRITE (EBADF), then
        FMODE_CAN_WRITE, a file without ->write (EINVAL); only then access_ok (EFAULT)."""
        f = self.kernel.fdt.get(fd)
        if not f.writable:
            raise err(errno.EBADF)
        if type(f).write is File.write:
            raise err(errno.EINVAL)

    def _write(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        fd, buf, n = a[0], a[1] & U64_MAX, min(a[2] & U64_MAX, MAX_RW_COUNT)
        self._check_write(fd)
        return self.kernel.write(fd, self.mem.read(buf, n)), 0

    def _pread(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        fd, buf, n, off = a[0], a[1] & U64_MAX, min(a[2] & U64_MAX, MAX_RW_COUNT), a[3]
        if off < 0:
            raise err(errno.EINVAL)  # ksys_pread64
        data = self.kernel.pread(fd, n, off)
        self.mem.write(buf, data)
        return len(data), 0

    def _pwrite(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        """ksys_pwrite64 as the model's pread does it: positioned through llseek (ESPIPE
        for stream files, which have no FMODE_PWRITE)."""
        fd, buf, n, off = a[0], a[1] & U64_MAX, min(a[2] & U64_MAX, MAX_RW_COUNT), a[3]
        if off < 0:
            raise err(errno.EINVAL)
        f = t.get(fd)
        f.llseek(off, os.SEEK_SET)  # no FMODE_PWRITE (a stream): ESPIPE before vfs_write
        self._check_write(fd)
        return self.kernel.write(fd, self.mem.read(buf, n)), 0

    def _lseek(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        return self.kernel.lseek(a[0], a[1], a[2]), 0

    def _poll(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        return self.kernel.poll(a[0], a[1] & 0xFFFF), 0

    def _fork_prepare(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        token = self._next_token
        self._next_token += 1
        self.forks[token] = t.copy()
        return token, 0

    def _fork_commit(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        token, child = a[0], a[1]
        table = self.forks.pop(token, None)
        if table is None:
            return 0, 0  # the child's HELLO claimed it first
        old = self.tables.pop(child, None)
        if old is not None:  # a dead process's pid, reused before its exit was seen
            self._release(old)
        self.tables[child] = table
        self._watch(child)
        return 0, 0

    def _fork_abort(self, pid: int, t: ProcessFdTable, a: list[int]) -> tuple[int, int]:
        table = self.forks.pop(a[0], None)
        if table is not None:
            self._release(table)
            self.kernel.fdt = t
        return 0, 0

    # -- devices at work -----------------------------------------------------------------

    def devices_work(self) -> None:
        """Every running, attached device writes `dma_pages` pages by DMA (module doc)."""
        page = bytes([DMA_FILL]) * PAGE_SIZE
        for dev in self.kernel.devices.values():
            hw = dev.hw
            domain = getattr(hw, "domain", None)
            if domain is None or not dev.open_count or dev.mig_state not in DMA_STATES:
                continue
            extents = [e for e in domain.pt.extents if e.write]
            if not extents:
                continue
            cur = self._dma_cursor.get(id(dev), 0)
            for _ in range(self.dma_pages):
                ext = next((e for e in extents if e.end > cur), extents[0])
                iova = max(cur, ext.iova) & ~(PAGE_SIZE - 1)
                try:
                    hw.dma_write(iova, page)
                except (IommuFault, OSError, ValueError):
                    break  # recorded in the device's faults; the program's memory untouched
                cur = iova + PAGE_SIZE
            self._dma_cursor[id(dev)] = cur
