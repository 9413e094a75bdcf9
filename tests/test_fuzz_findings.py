"""Defects bench/fuzz.py found, kept as regression tests now that they are fixed.

A resumed mtty port whose FIFO head/tail lie past fifo[] (mtty.c does not check them and
indexes out of bounds): the model loads it as the kernel does, and the guest's next UART
access uses the masked slot and records the out-of-bounds access instead of crashing.
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
