"""Resource: what the library opens, closed once, also as a context manager (no fd leaks).

* ``close()`` gives the kernel object back the first time only. When that fails and the
  kernel still holds the object (an iommufd object whose IOMMU_DESTROY answered EBUSY:
  ``_retry_release``), the resource stays open so that ``close()`` can be retried. An fd is
  gone after close(2) whatever it answered (Linux frees the descriptor even on an error),
  so an fd resource counts as closed regardless.
* ``with`` closes on the way out but never hides the exception raised inside the block: if
  closing fails too, that failure is added to the block's exception as a note.
* A handle used after close refuses with :class:`ClosedError` naming the operation, before
  any syscall: the number it held may already name a new object.
* An fd resource dropped while still open is closed by its finalizer, with a
  ``ResourceWarning``, as Python's own file objects do.
"""

from __future__ import annotations

import warnings
from errno import EBADF
from types import TracebackType
from typing import Self

from vfiomig.host.errors import ClosedError


class Resource:
    """`close()` runs `_release()` once it succeeds; `with` closes on the way out."""

    closed: bool = False
    # A failed _release leaves the object with the kernel: stay open, close() may retry.
    _retry_release: bool = False
    # errno of the ClosedError a closed handle answers with.
    _closed_errno: int = EBADF
    # Owns an fd (in the attribute `fd`): a finalizer closes it with a ResourceWarning.
    _owns_fd: bool = False

    def _release(self) -> None:
        """Give the kernel object back (close the fd, destroy the object, unmap)."""

    def close(self) -> None:
        if self.closed:
            return
        if self._retry_release:
            self._release()  # raises: still open, close() can be called again
            self.closed = True
        else:
            self.closed = True
            self._release()

    def _check_open(self, op: str) -> None:
        """ClosedError for `op` once closed (the check every operation starts with)."""
        if self.closed:
            raise ClosedError(self._closed_errno, op, f"{self!r} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_error:  # the block's own exception goes on, not this one
            exc.add_note(f"closing {self!r} on the way out failed too: {close_error}")

    def __del__(self) -> None:
        if self.closed or not self._owns_fd or getattr(self, "fd", None) is None:
            return
        try:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=2)
        except Exception:  # warnings turned into errors, or interpreter shutdown
            pass
        try:
            self.close()
        except Exception:
            pass
