"""The wire protocol between the preload library (preload.c) and the model server.

One request is one fixed-size message on a UNIX stream socket, one reply answers it, in
order, on the same connection. Every thread of the program has its own connection (opened at
its first call; a signal handler that calls in while its thread waits gets a connection of its
own for that call), so replies never need matching across threads.

    request  <u32 op, u32 seq, i64 arg[6]>      56 bytes
    reply    <i64 ret, i32 err, u32 seq, i64 aux> 24 bytes   err: errno, 0 on success

Nothing else travels: path names, ioctl structs and read/write buffers stay in the program,
and the server reads and writes them there (process_vm_readv / process_vm_writev on the pid
the socket's SO_PEERCRED gives). The C side gets the numbers below as -D flags (build.py), so
this module is the one place they are defined.
"""

from __future__ import annotations

import struct

REQUEST = struct.Struct("<IIqqqqqq")
REPLY = struct.Struct("<qiIq")
NARGS = 6

# op -> (arguments): what each request carries
OPS: dict[str, int] = {
    "HELLO": 1,  # (fork token or 0, ppid): first message of every connection
    "FDS": 2,  # (buf, max): the caller's model fds, as int32s written to buf; ret = count
    "OPEN": 3,  # (path, flags, fd): open path in the model at the fd the preload reserved
    "CLOSE": 4,  # (fd)
    "DUP": 5,  # (oldfd, newfd): newfd (already reserved by a real dup) shares oldfd's file
    "IOCTL": 6,  # (fd, request, arg, spare fd): aux = IOCTL_FD_USED | accmode << 8
    "READ": 7,  # (fd, buf, count)
    "WRITE": 8,  # (fd, buf, count)
    "PREAD": 9,  # (fd, buf, count, offset)
    "PWRITE": 10,  # (fd, buf, count, offset)
    "LSEEK": 11,  # (fd, offset, whence)
    "POLL": 12,  # (fd, events): ret = revents
    "FORK_PREPARE": 13,  # (): the caller's fd table is copied for a child; ret = token
    "FORK_COMMIT": 14,  # (token, child pid): the copy belongs to that child
    "FORK_ABORT": 15,  # (token): fork failed, the copy is dropped
}
IOCTL_FD_USED = 1  # aux bit: the ioctl installed a file at the spare fd (a data fd, ...)

OP_NAMES = {v: k for k, v in OPS.items()}

# Environment of the program (docs/run.md)
ENV_SOCKET = "VFIOMIG_SOCKET"  # the server's socket path
ENV_DEVICES = "VFIOMIG_DEVICES"  # comma-separated cdev paths: /dev/vfio/devices/vfio0,...
ENV_GROUPS = "VFIOMIG_GROUPS"  # comma-separated legacy group paths: /dev/vfio/0,...
ENV_TRACE = "VFIOMIG_TRACE"  # 1: the preload prints each routed call on stderr
# Set by `vfiomig run --iommufd-test`: the directory served as /sys/kernel/debug; the preload
# then also routes /proc/.../fail-nth to the model (fault injection, docs/selftests.md).
ENV_DEBUGFS = "VFIOMIG_DEBUGFS"


def c_defines() -> list[str]:
    """The protocol as gcc -D flags for preload.c."""
    defs = [f"-DVFM_OP_{name}={num}" for name, num in OPS.items()]
    defs += [
        f"-DVFM_REQUEST_SIZE={REQUEST.size}",
        f"-DVFM_REPLY_SIZE={REPLY.size}",
        f"-DVFM_IOCTL_FD_USED={IOCTL_FD_USED}",
        f'-DVFM_ENV_SOCKET="{ENV_SOCKET}"',
        f'-DVFM_ENV_TRACE="{ENV_TRACE}"',
        f'-DVFM_ENV_DEBUGFS="{ENV_DEBUGFS}"',
    ]
    return defs
