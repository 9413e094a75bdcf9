"""Property: no argument makes a library call fail outside the library's error hierarchy.

Random sequences of vfiomig.host's public calls on the model (iommufd objects, a device and
its migration files, a type1 container and group, user memory, dirty bitmaps) with hostile
arguments: integers at and past every C field's limits (negative, 2^32, 2^64, 2^100), wrong
types, handles of destroyed objects and of another iommufd. What may come out is a
VfioError (the kernel's answer, or the library's own ClosedError / ArgumentError), a
ValueError (an argument the library refuses) or a TypeError (an argument of the wrong
type): never an OverflowError, AttributeError, IndexError, MemoryError, ZeroDivisionError,
struct.error or a plain OSError.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfiomig.host import (
    Container,
    DirtyBitmap,
    Group,
    Iommufd,
    MigrationFile,
    ModelTransport,
    UserBuffer,
    VfioDevice,
    VfioError,
    bitmap,
    container,
)
from vfiomig.host.iommufd import Hwpt, Ioas
from vfiomig.kernel import ModelKernel

PAGE = 4096
BASE = 1 << 21

INTS = st.sampled_from(
    [0, 1, 2, 3, 7, 8, 64, 0xFFF, PAGE, PAGE + 1, 3 * PAGE, BASE, BASE + PAGE, 1 << 30]
    + [(1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 52, 1 << 63]
    + [(1 << 64) - PAGE, (1 << 64) - 1, 1 << 64, (1 << 64) + PAGE, 1 << 100]
    + [-1, -PAGE, -(1 << 63), -(1 << 64), -(1 << 100)]
)
JUNK = st.sampled_from([None, "3", 3.5, [1], (), {}, b"xy", object(), np.float64(2.0)])
NUM = st.one_of(INTS, INTS, INTS, st.integers(), JUNK)
SMALL = st.one_of(st.sampled_from([0, 1, 8, 64, PAGE, -1, 1 << 32, 1 << 64]), JUNK)
FLAG = st.one_of(st.booleans(), JUNK)
ALLOWED = (VfioError, ValueError, TypeError)


class World:
    """A machine with every kind of library object, some of them destroyed or closed."""

    def __init__(self) -> None:
        self.k = k = ModelKernel(iommu="smmuv3")
        self.t = t = ModelTransport(k)
        path = k.add_device("reference")
        legacy = k.add_device("hisi_acc")
        self.ictx = Iommufd(t)
        self.other = Iommufd(t)
        self.dev = VfioDevice(t, path)
        self.dev_id = self.dev.bind(self.ictx)
        self.mem = t.mmap(16 * PAGE)
        self.gone = t.mmap(PAGE)
        self.gone.close()
        self.ioas = self.ictx.ioas_alloc()
        self.ioas.map(self.mem, iova=BASE)
        self.hwpt = self.ictx.hwpt_alloc(self.dev_id, self.ioas, dirty_tracking=True)
        self.dev.attach(self.hwpt)
        dead = self.ictx.ioas_alloc()
        dead.destroy()
        self.dead_hwpt = self.ictx.hwpt_alloc(self.dev_id, self.ioas)
        self.dead_hwpt.destroy()
        self.handles: list[Any] = [
            self.ioas,
            self.hwpt,
            dead,
            self.other.ioas_alloc(),
            self.ioas.id,
            self.hwpt.id,
        ]
        self.files: list[MigrationFile] = []
        self.c = Container(t)
        self.g = Group(t, k.group_of(legacy))
        self.g.set_container(self.c)
        self.c.set_iommu()
        self.c.map_dma(self.mem, iova=BASE)
        self.c.dirty_pages_start()
        self.bitmaps: list[DirtyBitmap] = [DirtyBitmap.from_pages(0, 64 * PAGE, PAGE, [1, 5])]

    def close(self) -> None:
        for f in self.files:
            f.close()
        for r in (self.dev, self.ictx, self.other, self.g, self.c, self.mem):
            r.close()
        gc.collect()
        assert self.k.fdt.files == {}


def _user(w: World, d: st.DataObject) -> Any:
    return d.draw(st.one_of(st.sampled_from([w.mem, w.gone, w.mem.addr]), NUM))


def _ranges(d: st.DataObject) -> Any:
    pair = st.one_of(st.tuples(NUM, NUM), JUNK, st.tuples(NUM))
    return d.draw(st.one_of(st.lists(pair, max_size=5), JUNK, st.just(range(3))))


def _call(w: World, d: st.DataObject) -> Callable[[], object]:
    """One public call with drawn arguments (drawing happens here, calling later)."""
    ioas = d.draw(st.sampled_from([w.ioas, w.handles[2], w.handles[3]]))
    hwpt = d.draw(st.sampled_from([w.hwpt, w.hwpt, w.dead_hwpt]))
    pt = d.draw(st.one_of(st.sampled_from(w.handles), NUM))
    f = d.draw(st.sampled_from(w.files)) if w.files else None
    bm = d.draw(st.sampled_from(w.bitmaps))
    n = [d.draw(NUM) for _ in range(4)]
    calls: list[Callable[[], object]] = [
        lambda: ioas.map(_user(w, d), d.draw(st.one_of(st.none(), NUM)), iova=n[0]),
        lambda: ioas.map(_user(w, d), n[1], readable=d.draw(FLAG), writeable=d.draw(FLAG)),
        lambda: ioas.unmap(n[0], n[1]),
        lambda: ioas.unmap_all(),
        lambda: ioas.copy(n[0], n[1], dst=d.draw(st.sampled_from([None, *w.handles])), dst_iova=n[2]),
        lambda: ioas.iova_ranges(),
        lambda: ioas.allow_iovas(_ranges(d)),
        lambda: ioas.set_huge_pages(d.draw(FLAG)),
        lambda: ioas.huge_pages(),
        lambda: hwpt.set_dirty_tracking(d.draw(FLAG)),
        lambda: hwpt.get_dirty_bitmap(n[0], n[1], n[2], no_clear=d.draw(FLAG)),
        lambda: hwpt.get_dirty_bitmap(BASE, n[1], d.draw(st.sampled_from([1, 3, 512, PAGE]))),
        lambda: w.handles.append(w.ictx.hwpt_alloc(n[0], pt, flags=d.draw(SMALL))),
        lambda: w.ictx.hwpt_alloc(w.dev_id, pt, dirty_tracking=d.draw(FLAG)),
        lambda: w.handles.append(w.ictx.ioas_alloc()),
        lambda: d.draw(st.sampled_from(w.handles[:4])).destroy(),
        lambda: w.ictx.destroy(d.draw(st.one_of(st.sampled_from([w.ioas.id, w.hwpt.id]), NUM))),
        lambda: w.ictx.hw_info(n[0], data_len=d.draw(SMALL)),
        lambda: w.ictx.hw_info(w.dev_id, data_len=d.draw(SMALL)),
        lambda: w.ictx.mmap(d.draw(NUM)),
        lambda: w.dev.attach(pt),
        lambda: w.dev.detach(),
        lambda: w.dev.bind(d.draw(st.one_of(st.sampled_from([w.ictx, w.other]), JUNK))),
        lambda: w.dev.info(),
        lambda: w.dev.reset(),
        lambda: w.dev.get_state(),
        lambda: _keep(w, w.dev.set_state(d.draw(st.one_of(NUM, st.sampled_from(["STOP", "x"]))))),
        lambda: _keep(w, w.dev.set_state(d.draw(st.integers(1, 7)))),
        lambda: w.dev.mig_data_size(),
        lambda: w.dev.migration_flags(),
        lambda: w.dev.enable_precopy_info_v2(),
        lambda: w.dev.feature(n[0], d.draw(st.one_of(SMALL, st.binary(max_size=40)))),
        lambda: w.dev.probe_feature(n[0], n[1]),
        lambda: w.dev.dma_logging_start(_ranges(d), page_size=n[2]),
        lambda: w.dev.dma_logging_start([(0, 1 << 30)], page_size=d.draw(SMALL)),
        lambda: w.dev.dma_logging_report(n[0], n[1], n[2]),
        lambda: w.dev.dma_logging_report(0, n[1]),
        lambda: w.dev.dma_logging_stop(),
        lambda: f.read(d.draw(NUM)) if f else None,
        lambda: f.read_available() if f else None,
        lambda: f.write(d.draw(st.one_of(st.binary(max_size=64), JUNK))) if f else None,
        lambda: f.write_all(d.draw(st.one_of(st.binary(max_size=64), NUM))) if f else None,
        lambda: f.precopy_info(d.draw(NUM)) if f else None,
        lambda: f.poll(d.draw(NUM), d.draw(NUM)) if f else None,
        lambda: f.close() if f else None,
        lambda: w.c.check_extension(n[0]),
        lambda: w.c.set_iommu(n[0]),
        lambda: w.c.iommu_info(),
        lambda: w.c.map_dma(_user(w, d), n[0], d.draw(st.one_of(st.none(), NUM))),
        lambda: w.c.unmap_dma(n[0], n[1]),
        lambda: w.c.dirty_pages_bitmap(n[0], n[1], n[2]),
        lambda: w.c.unmap_dma_dirty(n[0], n[1], n[2]),
        lambda: w.g.set_container(d.draw(st.one_of(st.just(w.c), JUNK))),
        lambda: w.g.status(),
        lambda: _close_later(w, w.g.get_device(d.draw(st.one_of(st.text(max_size=8), JUNK)))),
        lambda: w.mem.read(n[0], d.draw(st.one_of(st.none(), NUM))),
        lambda: w.mem.write(d.draw(st.one_of(st.binary(max_size=16), NUM)), n[0]),
        lambda: w.gone.read(),
        lambda: w.bitmaps.append(DirtyBitmap.from_words(n[0], n[1], n[2], np.ones(2, np.uint64))),
        lambda: w.bitmaps.append(DirtyBitmap.from_pages(n[0], n[1], n[2], [0, 1])),
        lambda: bm.is_dirty(n[0]),
        lambda: bm | d.draw(st.one_of(st.sampled_from(w.bitmaps), JUNK)),
    ]
    return d.draw(st.sampled_from(calls))


def _keep(w: World, f: MigrationFile | None) -> None:
    if f is not None:
        w.files.append(f)


def _close_later(w: World, dev: VfioDevice) -> None:
    dev.close()


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # the patch below is the same for every input
    ],
)
@given(data=st.data())
def test_public_calls_fail_only_inside_the_hierarchy(
    data: st.DataObject, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A smaller bitmap cap keeps every accepted request cheap; the refusals stay the same.
    monkeypatch.setattr(bitmap, "MAX_BITMAP_BYTES", 1 << 20)
    monkeypatch.setattr(container, "MAX_BITMAP_BYTES", 1 << 20)
    w = World()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            for _ in range(data.draw(st.integers(1, 12), label="calls")):
                call = _call(w, data)
                try:
                    call()
                except ALLOWED:
                    pass
    finally:
        w.close()


def test_the_world_is_clean() -> None:
    """The fixture itself opens and closes without leaks or warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        w = World()
        assert isinstance(w.handles[0], Ioas) and isinstance(w.handles[1], Hwpt)
        assert isinstance(w.mem, UserBuffer)
        w.close()
