"""The model kernel's one error path: a failure is an errno, raised as OSError like a syscall's."""

from __future__ import annotations

import os


def err(code: int) -> OSError:
    """OSError for a positive errno, as a real syscall raises it (`raise err(EINVAL)`)."""
    return OSError(code, os.strerror(code))
