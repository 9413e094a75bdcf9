"""Resource: what the library opens, closed once, also as a context manager (no fd leaks)."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Resource:
    """`close()` runs `_release()` the first time only; `with` closes on the way out."""

    closed: bool = False

    def _release(self) -> None:
        """Give the kernel object back (close the fd, destroy the object, unmap)."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
