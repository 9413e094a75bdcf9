"""vfiomig.hw.dma and DmaDevice: bytes move only where the IOMMU allows, faults write nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiomig.hw.device import DmaDevice
from vfiomig.hw.dma import dma_read, dma_write
from vfiomig.hw.iommu import VENDORS, Iommu, IommuFault
from vfiomig.hw.memory import Memory

K4 = 4096
IOVA = 1 << 30
WINDOW = 48  # IOVA pages the random maps and DMAs play in
MEM_PAGES = 16


def test_dma_write_and_read_bytes_through_the_iommu() -> None:
    mem = Memory()
    r = mem.mmap(4 * K4)
    dom = Iommu("vtd").domain_alloc(dirty_tracking=False)
    dev = object()
    dom.attach(dev)
    # IOVA pages 0,1 -> memory pages 2,3; IOVA page 2 -> memory page 0 (not contiguous)
    dom.map(IOVA, r.addr + 2 * K4, 2 * K4, read=True, write=True, huge=True)
    dom.map(IOVA + 2 * K4, r.addr, K4, read=True, write=True, huge=True)
    payload = bytes(range(256)) * 15  # 3840 bytes across the page boundary
    dma_write(dom, mem, dev, IOVA + 2 * K4 - 1000, payload)
    assert mem.read(r.addr + 4 * K4 - 1000, 1000) == payload[:1000]
    assert mem.read(r.addr, len(payload) - 1000) == payload[1000:]
    assert dma_read(dom, mem, dev, IOVA + 2 * K4 - 1000, len(payload)) == payload
    assert mem.read(r.addr + 2 * K4, K4 - 1000).count(0) == K4 - 1000  # nothing else written


def test_bytes_to_unbacked_memory_is_a_clear_error_with_no_side_effect() -> None:
    mem = Memory()
    r = mem.mmap(1 << 30, backed=False)
    dom = Iommu("vtd").domain_alloc(dirty_tracking=True)
    dev = object()
    dom.attach(dev)
    dom.set_dirty_tracking(True)
    dom.map(IOVA, r.addr, 1 << 21, read=True, write=True, huge=False)
    with pytest.raises(ValueError, match="unbacked"):
        dma_write(dom, mem, dev, IOVA, b"abc")
    with pytest.raises(ValueError, match="unbacked"):
        dma_read(dom, mem, dev, IOVA, 3)
    assert not dom.read_and_clear_dirty(IOVA, 1 << 21, clear=False).any()
    dma_write(dom, mem, dev, IOVA + 5 * K4, 3 * K4)  # a length dirties without bytes
    bits = dom.read_and_clear_dirty(IOVA, 1 << 21, clear=False)
    assert np.flatnonzero(np.unpackbits(bits, bitorder="little")).tolist() == [5, 6, 7]


def test_dma_device_records_faults_on_both_sides() -> None:
    mem = Memory()
    r = mem.mmap(K4)
    dev = DmaDevice(mem, "dev0")
    with pytest.raises(IommuFault):
        dev.dma_write(IOVA, b"x")  # no domain attached
    dom = Iommu("amd").domain_alloc(dirty_tracking=False)
    dom.attach(dev)
    dev.domain = dom
    dom.map(IOVA, r.addr, K4, read=True, write=False, huge=False)
    with pytest.raises(IommuFault):
        dev.dma_write(IOVA + 8, b"x")
    assert dev.faults == [(IOVA, True, "no domain attached"), (IOVA + 8, True, "read-only")]
    assert dom.faults == [(IOVA + 8, True, "read-only")]
    assert dev.dma_read(IOVA + 8, 2) == b"\0\0"


# Random maps: (first IOVA page, pages, first memory page, writable).
maps_st = st.lists(
    st.tuples(
        st.integers(0, WINDOW - 1), st.integers(1, 6), st.integers(0, MEM_PAGES - 1), st.booleans()
    ),
    max_size=10,
)
dmas_st = st.lists(
    st.tuples(st.integers(0, WINDOW * K4 - 1), st.integers(1, 3 * K4), st.booleans()),
    min_size=1,
    max_size=15,
)


@settings(max_examples=150, deadline=None)
@given(vendor=st.sampled_from(VENDORS), maps=maps_st, dmas=dmas_st, seed=st.integers(0, 2**32 - 1))
def test_a_device_never_writes_where_it_has_no_writable_mapping(
    vendor: str,
    maps: list[tuple[int, int, int, bool]],
    dmas: list[tuple[int, int, bool]],
    seed: int,
) -> None:
    mem = Memory()
    region = mem.mmap(MEM_PAGES * K4)
    assert region.data is not None
    region.data[:] = np.random.default_rng(seed).integers(0, 256, region.length, dtype=np.uint8)
    dom = Iommu(vendor).domain_alloc(dirty_tracking=False)
    dev = DmaDevice(mem, "dev")
    dom.attach(dev)
    dev.domain = dom
    table: dict[int, tuple[int, bool]] = {}  # IOVA page -> (memory byte address, writable)
    for ip, n, mp, w in maps:
        n = min(n, MEM_PAGES - mp, WINDOW - ip)
        if any(ip + k in table for k in range(n)):
            continue
        dom.map(IOVA + ip * K4, region.addr + mp * K4, n * K4, read=True, write=w, huge=False)
        table.update({ip + k: (region.addr + (mp + k) * K4, w) for k in range(n)})
    shadow = region.data.copy()
    rng = np.random.default_rng(seed + 1)
    for off, n, write in dmas:
        pages = range(off // K4, (off + n - 1) // K4 + 1)
        bad = next((p for p in pages if p not in table or (write and not table[p][1])), None)
        nfaults = len(dom.faults)
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        try:
            got = dev.dma_write(IOVA + off, data) if write else dev.dma_read(IOVA + off, n)
        except IommuFault as f:
            assert bad is not None
            assert f.iova == IOVA + max(off, bad * K4)
            assert f.reason == ("not mapped" if bad not in table else "read-only")
            assert len(dom.faults) == nfaults + 1 and dev.faults[-1] == (f.iova, write, f.reason)
        else:
            assert bad is None
            expect = bytearray()
            for i in range(n):  # byte by byte through the oracle's table
                addr = table[(off + i) // K4][0] + (off + i) % K4 - region.addr
                if write:
                    shadow[addr] = data[i]
                else:
                    expect.append(int(shadow[addr]))
            if not write:
                assert got == bytes(expect)
        assert np.array_equal(region.data, shadow)
