"""Property: IOMMU_HWPT_GET_DIRTY_BITMAP reports exactly the IOPTEs written since their last
clear, for random layouts, IOPTE sizes, DMA writes, page sizes, ranges and NO_CLEAR.

The oracle is written from the rules, not from the implementation:

* a DMA write dirties every leaf (IOPTE) it touches (leaf geometry read from the hw page
  table, ground truth below the uAPI);
* the walk covers the contiguous areas from the request's iova and stops at the first hole;
* each dirty leaf L met by the walk piece [cur, ...] is recorded as [max(L.start, cur),
  max(L.start, cur) + L.size) (the (walk cursor, leaf size) rule of §11), i.e. bits
  (x - iova) >> __ffs(page_size) for x in that range;
* bits land only within the pinnable bitmap pages (the request's u64 words rounded out to
  whole pages), and are OR-ed into whatever the user had there;
* without NO_CLEAR every leaf the walk met is clean afterwards.
"""

from __future__ import annotations

import ctypes
import errno

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_iommufd_util import BASE, DIRTY, K4, M2, NO_CLEAR, Iommufd

from vfiomig.hw.iommu import IommuFault
from vfiomig.uapi import iommufd as u

VENDORS = ["smmuv3", "vtd", "amd"]

GRANULES = [1, 512, 1024, 2048, K4, 2 * K4, 4 * K4, 16 * K4, M2]


def leaves_of(dom: object, start: int, end: int) -> list[tuple[int, int]]:
    out = []
    a = start
    while a < end:
        lf = dom.leaf(a)  # type: ignore[attr-defined]
        assert lf is not None
        out.append(lf)
        a = lf[0] + lf[1]
    return out


@st.composite
def layouts(draw: st.DrawFn) -> dict[str, object]:
    huge = draw(st.booleans())
    unit = M2 if huge and draw(st.booleans()) else K4
    areas = []
    cur = BASE
    for _ in range(draw(st.integers(1, 3))):
        cur += draw(st.sampled_from([0, 0, 0, unit, 3 * K4]))  # contiguous, or a hole
        cur = -(-cur // K4) * K4
        npages = draw(st.integers(1, 3)) * (unit // K4) + draw(st.sampled_from([0, 1, 2, 5]))
        uva_off = draw(st.sampled_from([0, 0, K4]))
        areas.append((cur, npages * K4, uva_off))
        cur += npages * K4
    return {"huge": huge, "areas": areas, "vendor": draw(st.sampled_from(VENDORS))}


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(layout=layouts(), data=st.data())
def test_dirty_bitmap_matches_oracle(layout: dict[str, object], data: st.DataObject) -> None:
    f = Iommufd(vendor=str(layout["vendor"]))
    ioas = f.ioas_alloc()
    if not layout["huge"]:
        f.huge_pages(ioas, False)
    areas: list[tuple[int, int, int]] = layout["areas"]  # type: ignore[assignment]
    for iova, length, uva_off in areas:
        uva, _ = f.buf(length + uva_off, backed=False)
        f.map(ioas, uva + uva_off, length, iova)
    d = f.dev()
    hwpt = f.hwpt_alloc(d.devid, ioas, DIRTY)
    d.attach(hwpt)
    f.set_dirty(hwpt, True)
    dom = d.hw.domain
    dirty: set[tuple[int, int]] = set()
    lo, hi = areas[0][0], areas[-1][0] + areas[-1][1]

    for _round in range(data.draw(st.integers(1, 3))):
        # DMA writes, each inside one area
        for _ in range(data.draw(st.integers(0, 6))):
            a_iova, a_len, _ = data.draw(st.sampled_from(areas))
            off = data.draw(st.integers(0, a_len - 1))
            n = data.draw(st.integers(1, min(3 * K4, a_len - off)))
            d.hw.dma_write(a_iova + off, n)
            dirty.update(leaves_of(dom, a_iova + off, a_iova + off + n))
        # a request
        g = data.draw(st.sampled_from(GRANULES))
        step = max(g, K4)
        first = data.draw(st.integers((lo - BASE) // step - 1, (hi - BASE) // step))
        iova = BASE + max(first, 0) * step
        length = data.draw(st.integers(1, max(1, (hi - iova) // step + 1))) * step
        page_size = g | ((1 << 40) if data.draw(st.booleans()) else 0)  # mask semantics
        flags = NO_CLEAR if data.draw(st.booleans()) else 0
        pgshift = (g & -g).bit_length() - 1
        words = (((length - 1) >> pgshift) >> 6) + 1
        boff = data.draw(st.sampled_from([0, 1, 0x7F1, 0xFF1]))
        buf, mem = f.buf(words * 8 + boff + 2 * K4)
        assert mem is not None
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        before = rng.integers(0, 256, mem.size, dtype=np.uint8)
        mem[:] = before
        f.get_dirty(hwpt, iova, length, page_size, buf + boff, flags)

        # the oracle
        limit = -(-(buf + boff + words * 8) // K4) * K4 - (buf + boff)  # pinnable bytes
        expect_bits = np.zeros(limit * 8, dtype=bool)
        walked: list[tuple[int, int]] = []
        cur, last = iova, iova + length - 1
        for a_iova, a_len, _ in areas:  # contiguous areas from iova
            if a_iova <= cur < a_iova + a_len:
                pend = min(last, a_iova + a_len - 1)
                walked.append((cur, pend))
                if pend == last:
                    break
                cur = pend + 1
        for c, pend in walked:
            for lf in dirty:
                if lf[0] <= pend and lf[0] + lf[1] > c:
                    rec = max(lf[0], c)
                    b0 = (rec - iova) >> pgshift
                    b1 = (rec + lf[1] - 1 - iova) >> pgshift
                    expect_bits[b0 : min(b1 + 1, expect_bits.size)] = True
        expect = before.copy()
        packed = np.packbits(expect_bits, bitorder="little")
        expect[boff : boff + limit] |= packed
        assert np.array_equal(mem, expect)
        if not flags & NO_CLEAR:
            dirty = {
                lf for lf in dirty if not any(lf[0] <= p and lf[0] + lf[1] > c for c, p in walked)
            }


# -- robustness: no input makes anything but OSError escape ------------------------------

_NUMS = [
    0,
    1,
    2,
    3,
    4,
    5,
    7,
    0x100,
    K4 - 1,
    K4,
    3 * K4,
    M2,
    BASE,
    BASE + K4,
    1 << 48,
    (1 << 63),
    (1 << 64) - K4,
    (1 << 64) - 1,
]
_CMDS = [
    (u.IOMMU_DESTROY, u.iommu_destroy),
    (u.IOMMU_IOAS_ALLOC, u.iommu_ioas_alloc),
    (u.IOMMU_IOAS_IOVA_RANGES, u.iommu_ioas_iova_ranges),
    (u.IOMMU_IOAS_ALLOW_IOVAS, u.iommu_ioas_allow_iovas),
    (u.IOMMU_IOAS_MAP, u.iommu_ioas_map),
    (u.IOMMU_IOAS_COPY, u.iommu_ioas_copy),
    (u.IOMMU_IOAS_UNMAP, u.iommu_ioas_unmap),
    (u.IOMMU_OPTION, u.iommu_option),
    (u.IOMMU_VFIO_IOAS, u.iommu_vfio_ioas),
    (u.IOMMU_HWPT_ALLOC, u.iommu_hwpt_alloc),
    (u.IOMMU_GET_HW_INFO, u.iommu_hw_info),
    (u.IOMMU_HWPT_SET_DIRTY_TRACKING, u.iommu_hwpt_set_dirty_tracking),
    (u.IOMMU_HWPT_GET_DIRTY_BITMAP, u.iommu_hwpt_get_dirty_bitmap),
    (u.IOMMU_HWPT_INVALIDATE, u.iommu_hwpt_invalidate),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_commands_only_raise_oserror(data: st.DataObject) -> None:
    f = Iommufd(vendor=data.draw(st.sampled_from(VENDORS)))
    mem, _ = f.buf(64 * K4)
    d = f.dev()
    m = f.dev("mtty")
    ids = [f.ioas_alloc(), d.devid, m.devid]
    ptrs = [mem, mem + 0xFF1, mem + 60 * K4, 16]
    for _ in range(data.draw(st.integers(1, 25))):
        kind = data.draw(st.integers(0, 9))
        try:
            if kind < 7:
                req, cls = data.draw(st.sampled_from(_CMDS))
                cmd = cls(size=ctypes.sizeof(cls))
                for field in cls._fields_:
                    name, ctype = field[0], field[1]
                    if name in ("size",) or not issubclass(ctype, ctypes._SimpleCData):
                        continue
                    pool = st.sampled_from(
                        ids + [0, 99]
                        if name.endswith("_id") or name == "id"
                        else ptrs
                        if name in ("user_va", "data", "data_uptr", "allowed_iovas")
                        else _NUMS
                    )
                    bits = ctypes.sizeof(ctype) * 8
                    setattr(cmd, name, data.draw(pool) & ((1 << bits) - 1))
                f.ioctl(req, cmd)
                for name in ("out_ioas_id", "out_hwpt_id"):
                    if hasattr(cmd, name) and getattr(cmd, name):
                        ids.append(int(getattr(cmd, name)))
            elif kind == 7:
                dev = data.draw(st.sampled_from([d, m]))
                dev.attach(
                    data.draw(st.sampled_from(ids + [0])), data.draw(st.sampled_from([0, 1, 2]))
                )
            elif kind == 8:
                data.draw(st.sampled_from([d, m])).detach()
            else:
                off = data.draw(st.integers(0, 64)) * K4
                d.hw.dma_write(BASE + off, data.draw(st.integers(1, 3 * K4)))
        except OSError:
            pass
        except IommuFault:
            pass  # a DMA the IOMMU refused: the hardware's own exception
    f.k.close(f.fd)
    d.close()
    m.close()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(0, 64)), max_size=12))
def test_allow_iovas_rejects_exactly_what_a_pairwise_check_rejects(
    ranges: list[tuple[int, int]],
) -> None:
    """iommufd_ioas_load_iovas: a range with start >= last, or one meeting any earlier
    range, is EINVAL; the oracle is the plain pairwise test, the model uses a sorted index."""
    scaled = [(s * K4, e * K4 + K4 - 1 if e > s else e * K4) for s, e in ranges]
    bad = any(s >= e for s, e in scaled) or any(
        s1 <= e2 and e1 >= s2 for i, (s1, e1) in enumerate(scaled) for s2, e2 in scaled[:i]
    )
    f = Iommufd()
    ioas = f.ioas_alloc()
    if bad:
        try:
            f.allow(ioas, scaled)
        except OSError as e:
            assert e.errno == errno.EINVAL
        else:
            raise AssertionError(f"{scaled} accepted")
    else:
        f.allow(ioas, scaled)
