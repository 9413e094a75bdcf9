"""vfiomig.kernel: the model Linux 7.2 kernel (see machine.ModelKernel).

Importing the package registers the device drivers in machine.DRIVERS.
"""

# The driver modules register their kinds ("reference", "mtty", "hisi_acc") on import.
from vfiomig.kernel import hisi_acc, mtty, vfio_reference  # noqa: F401
from vfiomig.kernel.machine import ModelKernel

__all__ = ["ModelKernel"]
