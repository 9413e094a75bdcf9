"""`vfiomig run`'s machinery: an unmodified C program against the model kernel.

preload.c (an LD_PRELOAD library, built by build.py) routes the program's calls on the VFIO
and iommufd nodes over a UNIX socket (protocol.py) to server.py, which runs them on a
ModelKernel whose user memory is the program's own (hw/process_memory.py). docs/run.md is
the user's guide.
"""
