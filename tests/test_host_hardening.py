"""Library defects a fuzzer found (issue "Hardening"), each pinned by a test.

On the model through ModelTransport, and on the Linux seam with a recording fake where the
point is what reaches (or does not reach) the kernel.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import numpy as np
import pytest
from test_host_linux import FakeSyscalls

from vfiomig.host import (
    DirtyBitmap,
    Hwpt,
    Ioas,
    Iommufd,
    LinuxTransport,
    MigrationState,
    ModelTransport,
    VfioDevice,
)
from vfiomig.kernel import ModelKernel

PAGE = 4096
S = MigrationState


@pytest.fixture
def k() -> Iterator[ModelKernel]:
    kernel = ModelKernel(iommu="smmuv3")
    yield kernel
    gc.collect()  # finalizers of dropped handles
    assert kernel.fdt.files == {}, "a test leaked fds"


@pytest.fixture
def t(k: ModelKernel) -> ModelTransport:
    return ModelTransport(k)


@pytest.fixture
def fake() -> FakeSyscalls:
    return FakeSyscalls()


@pytest.fixture
def lt(fake: FakeSyscalls) -> LinuxTransport:
    return LinuxTransport(fake)


def _dirty_setup(
    k: ModelKernel, t: ModelTransport, ictx: Iommufd, dev: VfioDevice
) -> tuple[Ioas, Hwpt]:
    dev_id = dev.bind(ictx)
    ioas = ictx.ioas_alloc()
    ioas.set_huge_pages(False)
    hwpt = ictx.hwpt_alloc(dev_id, ioas, dirty_tracking=True)
    dev.attach(hwpt)
    return ioas, hwpt


# -- i: DirtyBitmap arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [0, -4096])
def test_dirty_bitmap_rejects_a_page_size_that_is_not_positive(page_size: int) -> None:
    words = np.zeros(1, dtype=np.uint64)
    with pytest.raises(ValueError, match="page_size"):
        DirtyBitmap.from_words(0, PAGE, page_size, words)
    with pytest.raises(ValueError, match="page_size"):
        DirtyBitmap.from_pages(0, PAGE, page_size, [])
    with pytest.raises(ValueError):
        DirtyBitmap.from_words(0, -1, PAGE, words)
    with pytest.raises(TypeError):
        DirtyBitmap.from_words(0, PAGE, 4096.0, words)  # type: ignore[arg-type]
