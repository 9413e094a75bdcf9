"""Defects bench/fuzz.py found in files this branch leaves to other work in progress.

Each test is the smallest reproducer of one finding, marked xfail(strict=True): it fails
today for the reason given, and once the defect is fixed it passes, which strict makes a
failure, so the entry (and its KNOWN_DEFECTS line in bench/fuzz.py) gets removed then.
"""

from __future__ import annotations

import pytest
from conftest import Dev, resume_stream, save_stream

from vfiomig.kernel import ModelKernel
from vfiomig.kernel.vfio_fsm import RUNNING

# struct mtty_data: 24-byte header, then struct serial_port per port: uart_reg[8],
# rxtx {fifo[16], head, tail, count}, ...
_PORT0_RXTX = 24 + 8
_HEAD, _TAIL = _PORT0_RXTX + 16, _PORT0_RXTX + 17


@pytest.mark.xfail(
    strict=True,
    raises=IndexError,
    reason="mtty.py: a resumed port's FIFO head/tail are not checked (mtty resume "
    "validation, hardening work in progress); the guest's next UART access indexes fifo[] "
    "out of range (the C sample driver writes out of bounds there)",
)
@pytest.mark.parametrize("field,access", [(_HEAD, "send"), (_TAIL, "recv")])
def test_mtty_resumed_fifo_index_out_of_range(field: int, access: str) -> None:
    k = ModelKernel()
    src, dst = Dev(k, "mtty"), Dev(k, "mtty")
    stream = bytearray(save_stream(src))
    stream[field] = 200  # fifo has 16 entries
    try:
        resume_stream(dst, bytes(stream))
    except OSError:
        return  # refusing the stream is a fix
    dst.set_state(RUNNING)
    if access == "send":
        dst.hw.send(0, b"x")  # THR write: fifo[head] = data
    else:
        dst.hw.recv(0, 1)  # head != tail: RBR read returns fifo[tail]
